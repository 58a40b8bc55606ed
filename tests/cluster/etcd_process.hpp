// tests/cluster/etcd_process.hpp — a real etcd for the catalogue's tests: its own data
// directory, client and peer ports on 127.0.0.1 picked free, its log in the data directory.
//
// Thread-safety: one object per thread. Ownership: the object owns the etcd process (killed and
// reaped by the destructor) and the data directory it was given (not removed: a temp_dir is).
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>

#include "support/child_process.hpp"

namespace tensorreg::testing {

/// Whether an etcd binary is installed (tests SKIP without one).
[[nodiscard]] std::optional<std::string> find_etcd();

class etcd_process {
 public:
  /// Starts etcd with its data in `data_dir` on free ports (`client_port` 0 = pick one) and
  /// waits until it answers. Throws std::runtime_error when it does not within 15 s.
  etcd_process(std::filesystem::path data_dir, std::uint16_t client_port = 0);
  ~etcd_process();
  etcd_process(const etcd_process&) = delete;
  etcd_process& operator=(const etcd_process&) = delete;

  [[nodiscard]] std::uint16_t client_port() const noexcept { return client_port_; }
  /// "http://127.0.0.1:<port>".
  [[nodiscard]] std::string endpoint() const;
  /// "etcd://127.0.0.1:<port>/<prefix>".
  [[nodiscard]] std::string url(const std::string& prefix) const;

  /// SIGKILLs etcd (a crash: no goodbye to clients).
  void kill();
  /// Starts it again on the same ports and data directory, and waits until it answers.
  void restart();

 private:
  void launch();
  std::filesystem::path data_dir_;
  std::uint16_t client_port_ = 0;
  std::uint16_t peer_port_ = 0;
  std::unique_ptr<child_process> process_;
};

/// A TCP port on 127.0.0.1 that was free a moment ago.
[[nodiscard]] std::uint16_t free_local_port();

}  // namespace tensorreg::testing
