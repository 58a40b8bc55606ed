// tests/support/engine_helpers.hpp — shared pieces of the registration engine's test suite.
//
// A small model of tensors (storages with known bytes, tensors over them, aliases and PAD),
// what each plan feeds for it, and the ids computed independently of the engine: index bytes
// hashed by hand, the canonical buffer assembled by hand and tree-hashed.
//
// Thread-safety: plain values and free functions.
#pragma once

#include <catch2/catch.hpp>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "support/fake_clock.hpp"
#include "tensorreg/common/error.hpp"
#include "tensorreg/index/canonical_index.hpp"
#include "tensorreg/registration/engine.hpp"

namespace Catch {
template <>
struct StringMaker<tensorreg::errc> {
  static std::string convert(tensorreg::errc code) { return std::string(tensorreg::errc_name(code)); }
};
template <>
struct StringMaker<tensorreg::error> {
  static std::string convert(const tensorreg::error& e) {
    return "{" + std::string(tensorreg::errc_name(e.code)) + ", \"" + e.message + "\"}";
  }
};
}  // namespace Catch

/// Asserts that a result failed with exactly this code and message.
#define CHECK_ERROR(expr, code_, message_)                                         \
  do {                                                                             \
    auto&& check_error_result_ = (expr);                                           \
    REQUIRE_FALSE(check_error_result_);                                            \
    CHECK(check_error_result_.error() == ::tensorreg::error{(code_), (message_)}); \
  } while (false)

/// Asserts that a result failed with this code (for messages checked elsewhere).
#define CHECK_CODE(expr, code_)                        \
  do {                                                 \
    auto&& check_code_result_ = (expr);                \
    REQUIRE_FALSE(check_code_result_);                 \
    CHECK(check_code_result_.error().code == (code_)); \
  } while (false)

/// Requires success, printing the error otherwise.
#define REQUIRE_OK(expr)                                                                         \
  do {                                                                                           \
    auto&& require_ok_result_ = (expr);                                                          \
    if (!require_ok_result_)                                                                     \
      FAIL_CHECK(::Catch::StringMaker<::tensorreg::error>::convert(require_ok_result_.error())); \
    REQUIRE(require_ok_result_);                                                                 \
  } while (false)

namespace tensorreg::testing {

namespace reg = tensorreg::registration;

/// Options for a deterministic engine: fake time, no background sweep, no owner watch.
[[nodiscard]] reg::engine_options deterministic_options(const fake_clock& clock);
/// An engine with deterministic_options(clock), adjusted by `tweak` fields set afterwards.
[[nodiscard]] std::unique_ptr<reg::engine> make_engine(reg::engine_options options);
[[nodiscard]] std::unique_ptr<reg::engine> make_engine(const fake_clock& clock);

/// A byte_source owning its bytes.
class owned_bytes final : public memory::byte_source {
 public:
  explicit owned_bytes(std::string bytes) : bytes_(std::move(bytes)) {}
  [[nodiscard]] std::uint64_t size() const noexcept override { return bytes_.size(); }
  [[nodiscard]] status visit(std::uint64_t offset, std::uint64_t length, memory::piece_sink sink) const override;

 private:
  std::string bytes_;
};

/// `n` deterministic non-zero-ish bytes from `seed`.
[[nodiscard]] std::string pattern(std::size_t n, std::uint32_t seed);

struct storage_spec {
  std::string id;
  std::string bytes;
};
struct tensor_spec {
  std::string name;
  std::string storage;
  std::vector<std::int64_t> shape;
  std::vector<std::int64_t> stride;
  std::string dtype = "torch.float32";
  std::int64_t storage_offset = 0;   ///< elements
  std::uint64_t logical_length = 0;  ///< bytes of the view (alias logical_length)
};

/// Tensors over storages, laid out as the SDK does (canonical_index::build).
struct model {
  std::vector<storage_spec> storages;
  std::vector<tensor_spec> tensors;

  [[nodiscard]] index::canonical_index index() const;
  [[nodiscard]] std::uint64_t total_size() const { return index().total_size(); }
  /// Canonical offset of each storage.
  [[nodiscard]] std::map<std::string, std::uint64_t> offsets() const;
  /// The canonical buffer, PAD as zero (assembled by hand from the storages).
  [[nodiscard]] std::string canonical() const;
  /// The canonical buffer with `fill` in every PAD byte.
  [[nodiscard]] std::string canonical_with_pad(char fill) const;
  [[nodiscard]] const storage_spec& storage(const std::string& id) const;
};

/// b: 5 floats in s1 at 0; v and w: aliases of s0 (16 bytes) at 24; PAD [20, 24); total 40.
[[nodiscard]] model small_model();
/// Its canonical index, written out by hand.
inline constexpr const char* small_model_json =
    R"({"b":[0,20,[5],[1],"torch.float32",0],"v":[24,16,[2],[1],"torch.float32",2],)"
    R"("w":[24,16,[2,2],[2,1],"torch.float32",0]})";

/// "mi2:<multihash(sha256(index_json))>:<multihash(tree_hash(canonical))>", computed
/// without the engine.
[[nodiscard]] std::string expected_mi2(const std::string& index_json, const std::string& canonical);
[[nodiscard]] std::string index_multihash_of(const std::string& index_json);

/// A descriptor as one line of text, for comparing whole descriptors.
[[nodiscard]] std::string describe(const reg::artifact_descriptor& d);

// ---- requests ----

/// Begin of a stable_dram registration with the model's index inline.
[[nodiscard]] reg::begin_request stable_begin(const model& m, std::int32_t owner_pid);
/// Begin of a lease-in-place registration.
[[nodiscard]] reg::begin_request lip_begin(std::uint64_t total_size, std::int32_t owner_pid, std::uint32_t ttl_ms = 0);

/// The storage entries (host memory), segments and aliases of a model, in one feed message.
[[nodiscard]] reg::feed_request lip_feed(const std::string& registration_id, const model& m);
/// The same, with sources chosen by the caller per storage id.
[[nodiscard]] reg::feed_request lip_feed(const std::string& registration_id, const model& m,
                                         const std::map<std::string, reg::storage_entry>& entries);
/// A daemon-managed HOST_SHARED scratch region of `size` bytes owned by `owner_pid`.
[[nodiscard]] regions::register_request host_region(std::int32_t owner_pid, std::uint64_t size = 4096);
/// The small model's storages as region_ref entries in `region`: s0 at 0 and s1 at 64, as a
/// trainer's allocations would lie.
[[nodiscard]] std::map<std::string, reg::storage_entry> region_entries(const regions::region_info& region);
/// One alias of a tensor of the model.
[[nodiscard]] reg::tensor_alias alias_of(const tensor_spec& t);

/// Feeds `bytes` as streamed chunks of `chunk` bytes (the whole canonical buffer).
[[nodiscard]] status feed_chunks(reg::engine& e, const std::string& registration_id, const std::string& bytes,
                                 std::size_t chunk);

/// Begin + feed (host storages) + commit of a LIP registration of `m`.
[[nodiscard]] result<reg::commit_response> register_lip(reg::engine& e, const model& m, std::int32_t owner_pid,
                                                        std::string* registration_id = nullptr,
                                                        std::optional<policy::store_policy> policy = std::nullopt);
/// Begin + odd-sized chunks + commit of a stable_dram registration of `m`.
[[nodiscard]] result<reg::commit_response> register_stable(reg::engine& e, const model& m, std::int32_t owner_pid,
                                                           std::string* registration_id = nullptr);

}  // namespace tensorreg::testing
