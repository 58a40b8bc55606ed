#include "cluster/etcd_process.hpp"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <stdexcept>
#include <thread>

#include "tensorreg/cluster/etcd_client.hpp"

namespace tensorreg::testing {

std::optional<std::string> find_etcd() {
  for (const char* candidate : {"/usr/bin/etcd", "/usr/local/bin/etcd"}) {
    if (::access(candidate, X_OK) == 0) return std::string(candidate);
  }
  return std::nullopt;
}

std::uint16_t free_local_port() {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) throw std::runtime_error("cannot make a socket to find a free port");
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof addr;
  if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 ||
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    ::close(fd);
    throw std::runtime_error("cannot bind a socket to find a free port");
  }
  ::close(fd);
  return ntohs(addr.sin_port);
}

etcd_process::etcd_process(std::filesystem::path data_dir, std::uint16_t client_port)
    : data_dir_(std::move(data_dir)),
      client_port_(client_port != 0 ? client_port : free_local_port()),
      peer_port_(free_local_port()) {
  launch();
}

etcd_process::~etcd_process() = default;

std::string etcd_process::endpoint() const { return "http://127.0.0.1:" + std::to_string(client_port_); }

std::string etcd_process::url(const std::string& prefix) const {
  return "etcd://127.0.0.1:" + std::to_string(client_port_) + "/" + prefix;
}

void etcd_process::kill() {
  if (process_) {
    process_->kill(SIGKILL);
    (void)process_->wait();
    process_.reset();
  }
}

void etcd_process::restart() {
  kill();
  launch();
}

void etcd_process::launch() {
  const auto etcd = find_etcd();
  if (!etcd) throw std::runtime_error("no etcd binary");
  std::filesystem::create_directories(data_dir_);
  const auto client = "http://127.0.0.1:" + std::to_string(client_port_);
  const auto peer = "http://127.0.0.1:" + std::to_string(peer_port_);
  const auto command = "exec " + *etcd + " --name t --data-dir '" + (data_dir_ / "data").string() +
                       "' --listen-client-urls " + client + " --advertise-client-urls " + client +
                       " --listen-peer-urls " + peer + " --initial-advertise-peer-urls " + peer +
                       " --initial-cluster t=" + peer + " 2>>'" + (data_dir_ / "etcd.log").string() + "'";
  process_ = std::make_unique<child_process>(std::vector<std::string>{"/bin/sh", "-c", command});
  auto client_or =
      cluster::etcd_client::create({client, std::chrono::milliseconds(200), std::chrono::milliseconds(500)});
  if (!client_or) throw std::runtime_error(client_or.error().message);
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(15);
  while (std::chrono::steady_clock::now() < give_up) {
    if ((*client_or)->get("/ready-probe")) return;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  throw std::runtime_error("etcd did not answer on " + client + " within 15 s (see " +
                           (data_dir_ / "etcd.log").string() + ")");
}

}  // namespace tensorreg::testing
