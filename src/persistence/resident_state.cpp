// The resident state's binary layout (docs/architecture.md §14.3) and the checks a receiver
// makes before it maps a memfd it was handed.
#include "tensorreg/persistence/resident_state.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <utility>

#include "tensorreg/hash/multihash.hpp"
#include "tensorreg/hash/sha256.hpp"
#include "tensorreg/hash/tree_hash.hpp"
#include "tensorreg/identity/artifact_id.hpp"

namespace tensorreg::persistence {
namespace {

constexpr std::string_view kMagic = "TRRESIDS";
// Longest id, multihash, name or version string; an index has its own limit.
constexpr std::uint32_t kMaxShortString = 4096;
constexpr std::uint32_t kMaxIndexBytes = 256u << 20;
constexpr std::uint64_t kMaxStateBytes = std::uint64_t{1} << 30;

enum flag : std::uint8_t {
  required = 1,
  shared_disk_for_spill = 2,
  remote_stable_for_spill = 4,
  persisted = 8,
  has_uid = 16,
  has_ttl = 32,
};

template <typename T>
void put(std::string& out, T value) {
  char raw[sizeof(T)];
  std::memcpy(raw, &value, sizeof(T));
  out.append(raw, sizeof(T));
}

void put_string(std::string& out, std::string_view s) {
  put<std::uint32_t>(out, static_cast<std::uint32_t>(s.size()));
  out.append(s);
}

// Reads fields off the front of the bytes; every read checks what is left.
class reader {
 public:
  explicit reader(std::string_view bytes) : bytes_(bytes) {}

  template <typename T>
  result<T> get(std::string_view field) {
    if (bytes_.size() - at_ < sizeof(T)) return short_of(field, sizeof(T));
    T value;
    std::memcpy(&value, bytes_.data() + at_, sizeof(T));
    at_ += sizeof(T);
    return value;
  }

  result<std::string> get_string(std::string_view field, std::uint32_t limit) {
    const auto started = at_;
    TENSORREG_TRY_ASSIGN(const auto length, get<std::uint32_t>(field));
    if (length > limit) {
      return fail(errc::invalid_argument, "cannot decode resident state: " + std::string(field) + " at offset " +
                                              std::to_string(started) + " is " + std::to_string(length) +
                                              " bytes, more than " + std::to_string(limit));
    }
    if (bytes_.size() - at_ < length) return short_of(field, length);
    std::string out(bytes_.substr(at_, length));
    at_ += length;
    return out;
  }

  [[nodiscard]] std::size_t offset() const noexcept { return at_; }
  [[nodiscard]] std::size_t left() const noexcept { return bytes_.size() - at_; }

 private:
  tl::unexpected<error> short_of(std::string_view field, std::size_t need) const {
    return tl::unexpected(error{errc::invalid_argument, "cannot decode resident state: " + std::string(field) +
                                                            " at offset " + std::to_string(at_) + " needs " +
                                                            std::to_string(need) + " bytes, " +
                                                            std::to_string(bytes_.size() - at_) + " are left"});
  }

  std::string_view bytes_;
  std::size_t at_ = 0;
};

tl::unexpected<error> bad_entry(std::size_t i, const std::string& id, const std::string& why) {
  return fail(errc::invalid_argument,
              "cannot decode resident state: entry " + std::to_string(i) + " ('" + id + "'): " + why);
}

// An entry's ids must agree with each other and with its index: what the adopter serves under
// an id is then the id's, but for the bytes, which verify_resident_bytes() checks.
status check_entry(std::size_t i, const resident_entry& e) {
  const auto& r = e.record;
  auto kind = identity::check_artifact_id(r.artifact_id);
  if (!kind) return bad_entry(i, r.artifact_id, kind.error().message);
  if (r.total_size == 0) return bad_entry(i, r.artifact_id, "total_size is 0");
  if (e.fd_name != fd_name_of(r.artifact_id)) {
    return bad_entry(i, r.artifact_id, "its fd name '" + e.fd_name + "' is not " + fd_name_of(r.artifact_id));
  }
  if (*kind == identity::id_kind::mi2) {
    if (r.id_kind != "MI2") return bad_entry(i, r.artifact_id, "id_kind '" + r.id_kind + "' is not MI2");
    if (r.artifact_id != "mi2:" + r.index_multihash + ":" + r.data_multihash) {
      return bad_entry(i, r.artifact_id, "its multihashes do not make its id");
    }
    auto index_digest = hash::decode_multihash(r.index_multihash);
    if (!index_digest || !hash::decode_multihash(r.data_multihash)) {
      return bad_entry(i, r.artifact_id, "a multihash does not decode");
    }
    if (hash::sha256(e.index->json()) != *index_digest) {
      return bad_entry(i, r.artifact_id, "its index does not hash to its id");
    }
  } else if (r.id_kind != "CGID") {
    return bad_entry(i, r.artifact_id, "id_kind '" + r.id_kind + "' is not CGID");
  }
  return {};
}

std::string os_reason() { return std::strerror(errno); }

// One entry's fields (shared by stable entries and leases' artifacts); `i` names it in errors.
result<resident_entry> decode_entry(reader& in, std::size_t i) {
  resident_entry e;
  auto& r = e.record;
  TENSORREG_TRY_ASSIGN(r.artifact_id, in.get_string("artifact_id", kMaxShortString));
  TENSORREG_TRY_ASSIGN(r.id_kind, in.get_string("id_kind", kMaxShortString));
  TENSORREG_TRY_ASSIGN(r.index_multihash, in.get_string("index_multihash", kMaxShortString));
  TENSORREG_TRY_ASSIGN(r.data_multihash, in.get_string("data_multihash", kMaxShortString));
  TENSORREG_TRY_ASSIGN(r.schema_version, in.get_string("schema_version", kMaxShortString));
  TENSORREG_TRY_ASSIGN(r.encoding, in.get_string("encoding", kMaxShortString));
  TENSORREG_TRY_ASSIGN(r.total_size, in.get<std::uint64_t>("total_size"));
  TENSORREG_TRY_ASSIGN(const auto retention, in.get<std::uint8_t>("retention"));
  TENSORREG_TRY_ASSIGN(const auto overflow, in.get<std::uint8_t>("overflow"));
  TENSORREG_TRY_ASSIGN(const auto flags, in.get<std::uint8_t>("flags"));
  TENSORREG_TRY_ASSIGN(const auto ttl_ms, in.get<std::uint64_t>("ttl_ms"));
  TENSORREG_TRY_ASSIGN(const auto uid, in.get<std::uint32_t>("owner_uid"));
  TENSORREG_TRY_ASSIGN(e.fd_name, in.get_string("fd_name", kMaxShortString));
  TENSORREG_TRY_ASSIGN(const auto index_json, in.get_string("index", kMaxIndexBytes));
  if (retention < 1 || retention > 3) return bad_entry(i, r.artifact_id, "retention " + std::to_string(retention));
  if (overflow < 1 || overflow > 3) return bad_entry(i, r.artifact_id, "overflow " + std::to_string(overflow));
  if (flags >= 64) return bad_entry(i, r.artifact_id, "unknown flags " + std::to_string(flags));
  r.cache.retention = static_cast<policy::retention>(retention);
  r.cache.overflow = static_cast<policy::overflow>(overflow);
  r.cache.required = (flags & flag::required) != 0;
  r.cache.require_shared_disk_for_spill = (flags & flag::shared_disk_for_spill) != 0;
  r.cache.require_remote_stable_for_spill = (flags & flag::remote_stable_for_spill) != 0;
  const bool has_ttl = (flags & flag::has_ttl) != 0;
  if (has_ttl != (r.cache.retention == policy::retention::ttl) || (has_ttl && ttl_ms == 0)) {
    return bad_entry(i, r.artifact_id, "a ttl is set iff retention is ttl, and is > 0");
  }
  if (has_ttl) r.cache.ttl_ms = ttl_ms;
  e.persisted = (flags & flag::persisted) != 0;
  if ((flags & flag::has_uid) != 0) e.owner_uid = uid;
  auto idx = index::canonical_index::parse(index_json, r.total_size);
  if (!idx || idx->json() != index_json) {
    return bad_entry(i, r.artifact_id,
                     "its index is not a canonical index of " + std::to_string(r.total_size) + " bytes");
  }
  e.index = std::make_shared<const index::canonical_index>(std::move(*idx));
  TENSORREG_TRY(check_entry(i, e));
  return e;
}

}  // namespace

std::string fd_name_of(std::string_view artifact_id) {
  return "m-" + hash::to_hex(hash::sha256(artifact_id)).substr(0, 40);
}

std::string lease_source_name(std::string_view registration_id, std::size_t index) {
  return "l-" + hash::to_hex(hash::sha256(registration_id)).substr(0, 32) + "-" + std::to_string(index);
}

static void encode_entry(std::string& out, const resident_entry& e) {
  const auto& r = e.record;
  put_string(out, r.artifact_id);
  put_string(out, r.id_kind);
  put_string(out, r.index_multihash);
  put_string(out, r.data_multihash);
  put_string(out, r.schema_version);
  put_string(out, r.encoding);
  put<std::uint64_t>(out, r.total_size);
  put<std::uint8_t>(out, static_cast<std::uint8_t>(r.cache.retention));
  put<std::uint8_t>(out, static_cast<std::uint8_t>(r.cache.overflow));
  std::uint8_t flags = 0;
  if (r.cache.required) flags |= flag::required;
  if (r.cache.require_shared_disk_for_spill) flags |= flag::shared_disk_for_spill;
  if (r.cache.require_remote_stable_for_spill) flags |= flag::remote_stable_for_spill;
  if (e.persisted) flags |= flag::persisted;
  if (e.owner_uid) flags |= flag::has_uid;
  if (r.cache.ttl_ms) flags |= flag::has_ttl;
  put<std::uint8_t>(out, flags);
  put<std::uint64_t>(out, r.cache.ttl_ms.value_or(0));
  put<std::uint32_t>(out, e.owner_uid.value_or(0));
  put_string(out, e.fd_name);
  put_string(out, e.index ? std::string_view(e.index->json()) : std::string_view());
}

std::string encode_resident_state(const resident_state& state) {
  std::string out(kMagic);
  put<std::uint32_t>(out, resident_state_version);
  put<std::uint32_t>(out, static_cast<std::uint32_t>(state.entries.size()));
  for (const auto& e : state.entries) encode_entry(out, e);
  put<std::uint32_t>(out, static_cast<std::uint32_t>(state.leases.size()));
  for (const auto& l : state.leases) {
    encode_entry(out, l.artifact);
    put_string(out, l.registration_id);
    put<std::int32_t>(out, l.owner_pid);
    put<std::int32_t>(out, l.device_id);
    put<std::uint64_t>(out, l.epoch);
    put<std::uint8_t>(out, l.ttl_left_ms ? 1 : 0);
    put<std::uint64_t>(out, l.ttl_left_ms.value_or(0));
    put<std::uint32_t>(out, static_cast<std::uint32_t>(l.sources.size()));
    for (const auto& src : l.sources) {
      put_string(out, src.fd_name);
      put<std::uint64_t>(out, src.size);
    }
    put<std::uint32_t>(out, static_cast<std::uint32_t>(l.segments.size()));
    for (const auto& seg : l.segments) {
      put<std::uint64_t>(out, seg.offset);
      put<std::uint64_t>(out, seg.length);
      put<std::uint32_t>(out, seg.source);
      put<std::uint64_t>(out, seg.source_offset);
    }
  }
  return out;
}

result<resident_state> decode_resident_state(std::span<const std::byte> bytes) {
  return decode_resident_state(std::string_view(reinterpret_cast<const char*>(bytes.data()), bytes.size()));
}

result<resident_state> decode_resident_state(std::string_view bytes) {
  if (bytes.substr(0, kMagic.size()) != kMagic) {
    return fail(errc::invalid_argument, "cannot decode resident state: it does not begin with " + std::string(kMagic));
  }
  reader in(bytes.substr(kMagic.size()));
  TENSORREG_TRY_ASSIGN(const auto version, in.get<std::uint32_t>("version"));
  if (version != resident_state_version) {
    return fail(errc::invalid_argument, "cannot decode resident state: version " + std::to_string(version) +
                                            ", this daemon reads version " + std::to_string(resident_state_version));
  }
  TENSORREG_TRY_ASSIGN(const auto count, in.get<std::uint32_t>("entry count"));
  // Each entry takes at least its fixed fields: a count beyond what the bytes can hold is a lie.
  constexpr std::size_t min_entry = 8 * 4 + 8 + 3 + 8 + 4;
  if (count > in.left() / min_entry) {
    return fail(errc::invalid_argument, "cannot decode resident state: " + std::to_string(count) +
                                            " entries cannot fit in " + std::to_string(in.left()) + " bytes");
  }
  resident_state out;
  out.entries.reserve(count);
  for (std::size_t i = 0; i < count; ++i) {
    TENSORREG_TRY_ASSIGN(auto e, decode_entry(in, i));
    out.entries.push_back(std::move(e));
  }
  TENSORREG_TRY_ASSIGN(const auto leases, in.get<std::uint32_t>("lease count"));
  if (leases > in.left() / min_entry) {
    return fail(errc::invalid_argument, "cannot decode resident state: " + std::to_string(leases) +
                                            " leases cannot fit in " + std::to_string(in.left()) + " bytes");
  }
  for (std::size_t i = 0; i < leases; ++i) {
    resident_lease l;
    TENSORREG_TRY_ASSIGN(l.artifact, decode_entry(in, count + i));
    TENSORREG_TRY_ASSIGN(l.registration_id, in.get_string("registration_id", kMaxShortString));
    TENSORREG_TRY_ASSIGN(l.owner_pid, in.get<std::int32_t>("owner_pid"));
    TENSORREG_TRY_ASSIGN(l.device_id, in.get<std::int32_t>("device_id"));
    TENSORREG_TRY_ASSIGN(l.epoch, in.get<std::uint64_t>("epoch"));
    TENSORREG_TRY_ASSIGN(const auto has_ttl, in.get<std::uint8_t>("has_ttl"));
    TENSORREG_TRY_ASSIGN(const auto ttl, in.get<std::uint64_t>("ttl_left_ms"));
    if (has_ttl > 1) return bad_entry(count + i, l.artifact.record.artifact_id, "has_ttl is not 0 or 1");
    if (has_ttl == 1) l.ttl_left_ms = ttl;
    if (l.registration_id.empty() || l.owner_pid <= 0) {
      return bad_entry(count + i, l.artifact.record.artifact_id, "a lease needs a registration id and an owner_pid");
    }
    TENSORREG_TRY_ASSIGN(const auto sources, in.get<std::uint32_t>("source count"));
    if (sources > in.left() / 12) return bad_entry(count + i, l.artifact.record.artifact_id, "too many sources");
    for (std::uint32_t k = 0; k < sources; ++k) {
      resident_source src;
      TENSORREG_TRY_ASSIGN(src.fd_name, in.get_string("source fd_name", kMaxShortString));
      TENSORREG_TRY_ASSIGN(src.size, in.get<std::uint64_t>("source size"));
      l.sources.push_back(std::move(src));
    }
    TENSORREG_TRY_ASSIGN(const auto segments, in.get<std::uint32_t>("segment count"));
    if (segments > in.left() / 28) return bad_entry(count + i, l.artifact.record.artifact_id, "too many segments");
    for (std::uint32_t k = 0; k < segments; ++k) {
      resident_segment seg;
      TENSORREG_TRY_ASSIGN(seg.offset, in.get<std::uint64_t>("segment offset"));
      TENSORREG_TRY_ASSIGN(seg.length, in.get<std::uint64_t>("segment length"));
      TENSORREG_TRY_ASSIGN(seg.source, in.get<std::uint32_t>("segment source"));
      TENSORREG_TRY_ASSIGN(seg.source_offset, in.get<std::uint64_t>("segment source_offset"));
      // Bounds against the artifact and the source are checked when the view is built.
      if (seg.source >= l.sources.size()) {
        return bad_entry(count + i, l.artifact.record.artifact_id,
                         "segment " + std::to_string(k) + " names source " + std::to_string(seg.source) + " of " +
                             std::to_string(l.sources.size()));
      }
      l.segments.push_back(seg);
    }
    out.leases.push_back(std::move(l));
  }
  if (in.left() != 0) {
    return fail(errc::invalid_argument,
                "cannot decode resident state: " + std::to_string(in.left()) + " bytes follow the last entry");
  }
  return out;
}

result<std::shared_ptr<const memory::shared_memory>> map_handed_memfd(const resident_entry& entry, unique_fd fd) {
  const auto& id = entry.record.artifact_id;
  const std::string what = "cannot adopt the memfd of " + id;
  if (!fd) return fail(errc::failed_precondition, what + ": no file descriptor arrived for it");
  const int seals = ::fcntl(fd.get(), F_GET_SEALS);
  if (seals < 0) return fail(errc::failed_precondition, what + ": it cannot carry seals (" + os_reason() + ")");
  const auto s = static_cast<unsigned>(seals);
  const auto missing = [&](const char* seal) {
    return fail(errc::failed_precondition, what + ": it lacks the seal " + std::string(seal) +
                                               ", so its bytes or size could change under readers");
  };
  if ((s & F_SEAL_SHRINK) == 0) return missing("F_SEAL_SHRINK");
  if ((s & F_SEAL_GROW) == 0) return missing("F_SEAL_GROW");
  if ((s & static_cast<unsigned>(F_SEAL_WRITE | F_SEAL_FUTURE_WRITE)) == 0) return missing("F_SEAL_WRITE");
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) return fail(errc::failed_precondition, what + ": fstat: " + os_reason());
  if (static_cast<std::uint64_t>(st.st_size) != entry.record.total_size) {
    return fail(errc::failed_precondition, what + ": it holds " + std::to_string(st.st_size) +
                                               " bytes, its entry says " + std::to_string(entry.record.total_size));
  }
  auto mapped = memory::shared_memory::adopt(std::move(fd), entry.record.total_size, /*writable=*/false);
  if (!mapped) return tl::unexpected(with_context(std::move(mapped).error(), what));
  return std::make_shared<const memory::shared_memory>(std::move(*mapped));
}

status verify_resident_bytes(const resident_entry& entry, const memory::byte_source& bytes,
                             const std::atomic<bool>* cancelled) {
  const auto& r = entry.record;
  if (r.id_kind != "MI2") return {};
  TENSORREG_TRY_ASSIGN(const auto expected, hash::decode_multihash(r.data_multihash));
  const auto count = hash::leaf_count(r.total_size);
  std::vector<hash::digest> leaves;
  leaves.reserve(count);
  for (std::uint64_t i = 0; i < count; ++i) {
    if (cancelled != nullptr && cancelled->load(std::memory_order_relaxed)) {
      return fail(errc::cancelled, "cannot verify " + r.artifact_id + ": cancelled");
    }
    TENSORREG_TRY_ASSIGN(auto leaf, hash::hash_leaf(bytes, i));
    leaves.push_back(leaf);
  }
  if (hash::tree_root(leaves) != expected) {
    return fail(errc::data_loss, "adopted artifact " + r.artifact_id + ": its " + std::to_string(r.total_size) +
                                     " bytes do not hash to its id");
  }
  return {};
}

result<unique_fd> state_memfd(std::string_view bytes) {
  unique_fd fd(::memfd_create("tensorreg-resident-state", MFD_CLOEXEC | MFD_ALLOW_SEALING));
  if (!fd) return fail(errc::resource_exhausted, "cannot create the resident state memfd: " + os_reason());
  std::size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t n = ::write(fd.get(), bytes.data() + done, bytes.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return fail(errc::resource_exhausted, "cannot write the resident state memfd: " + os_reason());
    done += static_cast<std::size_t>(n);
  }
  if (::fcntl(fd.get(), F_ADD_SEALS, F_SEAL_WRITE | F_SEAL_GROW | F_SEAL_SHRINK | F_SEAL_SEAL) != 0) {
    return fail(errc::failed_precondition, "cannot seal the resident state memfd: " + os_reason());
  }
  return fd;
}

result<std::string> read_state_fd(int fd) {
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    return fail(errc::invalid_argument,
                "cannot read resident state from fd " + std::to_string(fd) + ": it is not a regular file or memfd");
  }
  if (static_cast<std::uint64_t>(st.st_size) > kMaxStateBytes) {
    return fail(errc::invalid_argument, "cannot read resident state from fd " + std::to_string(fd) + ": " +
                                            std::to_string(st.st_size) + " bytes is more than 1 GiB");
  }
  std::string out(static_cast<std::size_t>(st.st_size), '\0');
  std::size_t done = 0;
  while (done < out.size()) {
    const ssize_t n = ::pread(fd, out.data() + done, out.size() - done, static_cast<off_t>(done));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0)
      return fail(errc::unavailable, "cannot read resident state from fd " + std::to_string(fd) + ": " + os_reason());
    if (n == 0) break;
    done += static_cast<std::size_t>(n);
  }
  out.resize(done);
  return out;
}

}  // namespace tensorreg::persistence
