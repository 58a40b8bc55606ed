// The durable store: files written whole under a temporary directory, then published with one
// rename; every check on the way back in reports DATA_LOSS and moves the copy out of the way.
// The crash-safety argument is docs/architecture.md §14.
#include "tensorreg/persistence/durable_store.hpp"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <set>
#include <thread>
#include <utility>

#include "memory/system_calls.hpp"
#include "tensorreg/common/random.hpp"
#include "tensorreg/common/thread_pool.hpp"
#include "tensorreg/common/unique_fd.hpp"
#include "tensorreg/hash/multihash.hpp"
#include "tensorreg/hash/tree_hash.hpp"

namespace tensorreg::persistence {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

constexpr const char* kManifest = "MANIFEST";
constexpr const char* kIndex = "index.json";
constexpr const char* kData = "data.bin";
constexpr const char* kQuarantine = "quarantine";
constexpr const char* kFormat = "tensorreg-persist";

std::string os_reason(int e) { return std::strerror(e); }

result<unique_fd> open_file(const std::string& path, int flags, mode_t mode = 0600) {
  unique_fd fd(memory::sys::open(path.c_str(), flags | O_CLOEXEC, mode));
  if (!fd) return tl::unexpected(memory::sys::file_error("open", path, errno));
  return fd;
}

status sync_fd(int fd, const std::string& path) {
  if (memory::sys::fsync(fd) != 0) return tl::unexpected(memory::sys::file_error("fsync", path, errno));
  return {};
}

status sync_directory(const std::string& path) {
  TENSORREG_TRY_ASSIGN(auto fd, open_file(path, O_RDONLY | O_DIRECTORY));
  return sync_fd(fd.get(), path);
}

// Reads exactly out.size() bytes at `offset`; a file that ends first is DATA_LOSS.
status read_exact(int fd, std::uint64_t offset, std::span<std::byte> out, const std::string& path) {
  while (!out.empty()) {
    const auto n = memory::sys::pread(fd, out.data(), out.size(), offset);
    if (n < 0) {
      if (errno == EINTR) continue;
      return tl::unexpected(memory::sys::file_error("read", path, errno));
    }
    if (n == 0) return fail(errc::data_loss, "cannot read '" + path + "': it ends at " + std::to_string(offset));
    out = out.subspan(static_cast<std::size_t>(n));
    offset += static_cast<std::uint64_t>(n);
  }
  return {};
}

result<std::string> read_small_file(const std::string& path) {
  TENSORREG_TRY_ASSIGN(auto fd, open_file(path, O_RDONLY));
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) return tl::unexpected(memory::sys::file_error("inspect", path, errno));
  std::string text(static_cast<std::size_t>(st.st_size), '\0');
  TENSORREG_TRY(read_exact(fd.get(), 0, std::as_writable_bytes(std::span(text.data(), text.size())), path));
  return text;
}

status write_small_file(const std::string& path, std::string_view text) {
  TENSORREG_TRY_ASSIGN(auto fd, open_file(path, O_WRONLY | O_CREAT | O_EXCL));
  TENSORREG_TRY(memory::sys::write_all(fd.get(), std::as_bytes(std::span(text.data(), text.size())), path));
  return sync_fd(fd.get(), path);
}

std::string fingerprint_hex(const hash::fingerprint128& f) {
  char text[33];
  std::snprintf(text, sizeof text, "%016llx%016llx", static_cast<unsigned long long>(f.high),
                static_cast<unsigned long long>(f.low));
  return text;
}

std::optional<hash::fingerprint128> fingerprint_from_hex(std::string_view hex) {
  if (hex.size() != 32) return std::nullopt;
  hash::fingerprint128 f;
  for (std::size_t i = 0; i < 32; ++i) {
    const char c = hex[i];
    int v = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
    if (v < 0) return std::nullopt;
    auto& half = i < 16 ? f.high : f.low;
    half = (half << 4) | static_cast<std::uint64_t>(v);
  }
  return f;
}

// Removes a directory tree, ignoring errors: used on leftovers only.
void remove_tree(const std::string& path) noexcept {
  std::error_code ec;
  fs::remove_all(path, ec);
}

json manifest_json(const artifact_record& r, const index::canonical_index& idx, const std::vector<leaf_check>& leaves) {
  json j;
  j["format"] = kFormat;
  j["version"] = manifest_version;
  j["artifact_id"] = r.artifact_id;
  j["id_kind"] = r.id_kind;
  j["index_multihash"] = r.index_multihash;
  j["data_multihash"] = r.data_multihash;
  j["schema_version"] = r.schema_version;
  j["encoding"] = r.encoding;
  j["total_size"] = r.total_size;
  j["index_bytes"] = idx.json().size();
  j["index_sha256"] = hash::to_hex(hash::sha256(idx.json()));
  j["leaf_bytes"] = hash::leaf_bytes;
  json cache;
  cache["retention"] = static_cast<int>(r.cache.retention);
  if (r.cache.ttl_ms) cache["ttl_ms"] = *r.cache.ttl_ms;
  cache["overflow"] = static_cast<int>(r.cache.overflow);
  cache["required"] = r.cache.required;
  cache["require_shared_disk_for_spill"] = r.cache.require_shared_disk_for_spill;
  cache["require_remote_stable_for_spill"] = r.cache.require_remote_stable_for_spill;
  j["cache"] = cache;
  json list = json::array();
  for (const auto& l : leaves) list.push_back(json::array({hash::to_hex(l.sha256), fingerprint_hex(l.xxh3)}));
  j["leaves"] = std::move(list);
  return j;
}

// Parses and checks a MANIFEST and the index it names; `dir` holds the files. Every failure
// is DATA_LOSS naming the file and what is wrong with it.
result<stored_artifact> read_manifest(const std::string& dir) {
  const std::string path = dir + "/" + kManifest;
  auto text = read_small_file(path);
  if (!text) {
    if (text.error().code == errc::unavailable && ::access(path.c_str(), F_OK) != 0) {
      return fail(errc::data_loss, "cannot read manifest '" + path + "': it is missing");
    }
    return tl::unexpected(std::move(text).error());
  }
  const auto bad = [&](const std::string& why) { return fail(errc::data_loss, "bad manifest '" + path + "': " + why); };
  json j = json::parse(*text, nullptr, false);
  if (j.is_discarded() || !j.is_object()) return bad("it is not a JSON object");
  stored_artifact a;
  a.directory = dir;
  auto& r = a.record;
  try {
    if (j.at("format").get<std::string>() != kFormat) return bad("format is not '" + std::string(kFormat) + "'");
    if (j.at("version").get<std::uint32_t>() != manifest_version) {
      return bad("version " + std::to_string(j.at("version").get<std::uint32_t>()) + " is not " +
                 std::to_string(manifest_version));
    }
    r.artifact_id = j.at("artifact_id").get<std::string>();
    r.id_kind = j.at("id_kind").get<std::string>();
    r.index_multihash = j.at("index_multihash").get<std::string>();
    r.data_multihash = j.at("data_multihash").get<std::string>();
    r.schema_version = j.at("schema_version").get<std::string>();
    r.encoding = j.at("encoding").get<std::string>();
    r.total_size = j.at("total_size").get<std::uint64_t>();
    if (j.at("leaf_bytes").get<std::uint64_t>() != hash::leaf_bytes) return bad("leaf_bytes is not 4 MiB");
    const auto& c = j.at("cache");
    r.cache.retention = static_cast<policy::retention>(c.at("retention").get<int>());
    if (c.contains("ttl_ms")) r.cache.ttl_ms = c.at("ttl_ms").get<std::uint64_t>();
    r.cache.overflow = static_cast<policy::overflow>(c.at("overflow").get<int>());
    r.cache.required = c.at("required").get<bool>();
    r.cache.require_shared_disk_for_spill = c.at("require_shared_disk_for_spill").get<bool>();
    r.cache.require_remote_stable_for_spill = c.at("require_remote_stable_for_spill").get<bool>();
    for (const auto& l : j.at("leaves")) {
      leaf_check check;
      auto sha = hash::digest_from_hex(l.at(0).get<std::string>());
      auto fp = fingerprint_from_hex(l.at(1).get<std::string>());
      if (!sha || !fp) return bad("leaf " + std::to_string(a.leaves.size()) + " has a malformed hash");
      check.sha256 = *sha;
      check.xxh3 = *fp;
      a.leaves.push_back(check);
    }
    const auto index_bytes = j.at("index_bytes").get<std::uint64_t>();
    auto index_sha = hash::digest_from_hex(j.at("index_sha256").get<std::string>());
    if (!index_sha) return bad("index_sha256 is malformed");
    if (r.total_size == 0 || a.leaves.size() != hash::leaf_count(r.total_size)) {
      return bad("it lists " + std::to_string(a.leaves.size()) + " leaves for total_size " +
                 std::to_string(r.total_size));
    }
    // The index: its size and hash as the manifest says, and valid.
    const std::string index_path = dir + "/" + kIndex;
    auto index_text = read_small_file(index_path);
    if (!index_text) {
      return fail(errc::data_loss, "cannot read index '" + index_path + "': " + index_text.error().message);
    }
    if (index_text->size() != index_bytes) {
      return fail(errc::data_loss, "bad index '" + index_path + "': " + std::to_string(index_text->size()) +
                                       " bytes, the manifest says " + std::to_string(index_bytes));
    }
    if (hash::sha256(*index_text) != *index_sha) {
      return fail(errc::data_loss, "bad index '" + index_path + "': its SHA-256 differs from the manifest's");
    }
    auto idx = index::canonical_index::parse(*index_text, r.total_size);
    if (!idx || idx->json() != *index_text) {
      return fail(errc::data_loss, "bad index '" + index_path + "': it is not a canonical index of " +
                                       std::to_string(r.total_size) + " bytes");
    }
    a.index = std::make_shared<const index::canonical_index>(std::move(*idx));
  } catch (const json::exception& e) {
    return bad(std::string("a field is missing or of the wrong type: ") + e.what());
  }
  // An mi2 id names the index hash and the tree root: the manifest must agree with its own id.
  if (r.id_kind == "MI2") {
    if (r.artifact_id != "mi2:" + r.index_multihash + ":" + r.data_multihash) {
      return bad("artifact_id does not match its multihashes");
    }
    auto index_digest = hash::decode_multihash(r.index_multihash);
    auto data_digest = hash::decode_multihash(r.data_multihash);
    if (!index_digest || !data_digest) return bad("a multihash does not decode");
    if (hash::sha256(a.index->json()) != *index_digest) return bad("the index does not hash to the artifact id");
    std::vector<hash::digest> roots;
    roots.reserve(a.leaves.size());
    for (const auto& l : a.leaves) roots.push_back(l.sha256);
    if (hash::tree_root(roots) != *data_digest) return bad("its leaf hashes do not fold to the artifact id");
  } else if (r.id_kind != "CGID") {
    return bad("id_kind '" + r.id_kind + "' is neither MI2 nor CGID");
  }
  if (durable_store::directory_name(r.artifact_id) != fs::path(dir).filename().string()) {
    return bad("artifact_id '" + r.artifact_id + "' does not match its directory");
  }
  // The data file: exactly total_size bytes (a truncated copy is found here, before any read).
  const std::string data_path = dir + "/" + kData;
  struct stat st {};
  if (::stat(data_path.c_str(), &st) != 0) {
    return fail(errc::data_loss, "cannot read data '" + data_path + "': " + os_reason(errno));
  }
  if (static_cast<std::uint64_t>(st.st_size) != r.total_size) {
    return fail(errc::data_loss, "bad data '" + data_path + "': " + std::to_string(st.st_size) +
                                     " bytes, the manifest says " + std::to_string(r.total_size));
  }
  return a;
}

// The root: ours, 0700, a real directory, as the socket's (daemon/unix_socket.cpp).
status prepare_root(const std::string& root) {
  if (::mkdir(root.c_str(), 0700) != 0 && errno != EEXIST) {
    if (errno != ENOENT) {
      const auto code = errno == EACCES ? errc::permission_denied : errc::unavailable;
      return fail(code, "cannot create persist directory '" + root + "': " + os_reason(errno));
    }
    std::error_code ec;
    fs::create_directories(fs::path(root).parent_path(), ec);
    if (ec) return fail(errc::unavailable, "cannot create persist directory '" + root + "': " + ec.message());
    if (::mkdir(root.c_str(), 0700) != 0 && errno != EEXIST) {
      return fail(errc::unavailable, "cannot create persist directory '" + root + "': " + os_reason(errno));
    }
  }
  struct stat st {};
  if (::lstat(root.c_str(), &st) != 0) {
    return fail(errc::unavailable, "cannot inspect persist directory '" + root + "': " + os_reason(errno));
  }
  const auto refuse = [&](const std::string& why) {
    return fail(errc::failed_precondition, "cannot use persist directory '" + root + "': " + why +
                                               "; it must be a directory owned by uid " + std::to_string(::geteuid()) +
                                               " with mode 0700");
  };
  if (S_ISLNK(st.st_mode)) return refuse("it is a symbolic link");
  if (!S_ISDIR(st.st_mode)) return refuse("it is not a directory");
  if (st.st_uid != ::geteuid()) return refuse("it is owned by uid " + std::to_string(st.st_uid));
  if ((st.st_mode & 077) != 0) {
    char mode[8];
    std::snprintf(mode, sizeof mode, "%04o", static_cast<unsigned>(st.st_mode & 07777));
    return refuse(std::string("its mode is ") + mode);
  }
  return {};
}

// Hashes the leaves of `source` on a helper thread (and `pool`) while the caller does its I/O.
// `ready` says how many bytes of the source may be read so far (loads: what has arrived).
class leaf_hasher {
 public:
  leaf_hasher(const memory::byte_source& source, thread_pool* pool, bool sha256 = true, bool xxh3 = true)
      : source_(source), pool_(pool), sha256_(sha256), xxh3_(xxh3) {
    leaves_.resize(hash::leaf_count(source.size()));
    thread_ = std::thread([this] { run(); });
  }
  ~leaf_hasher() { finish_and_join(); }
  leaf_hasher(const leaf_hasher&) = delete;
  leaf_hasher& operator=(const leaf_hasher&) = delete;

  void advance(std::uint64_t ready) {
    {
      std::lock_guard lock(mutex_);
      ready_ = ready;
    }
    wake_.notify_all();
  }
  void stop() {
    {
      std::lock_guard lock(mutex_);
      stop_ = true;
    }
    wake_.notify_all();
  }
  // Joins and returns the leaves, or the first error.
  result<std::vector<leaf_check>> finish_and_join() {
    if (thread_.joinable()) thread_.join();
    if (!outcome_) return tl::unexpected(outcome_.error());
    return leaves_;
  }

 private:
  void run() {
    const std::uint64_t size = source_.size();
    const std::uint64_t count = leaves_.size();
    std::uint64_t next = 0;
    while (next < count) {
      std::uint64_t ready = 0;
      {
        std::unique_lock lock(mutex_);
        wake_.wait(lock, [&] { return stop_ || ready_ >= std::min(size, (next + 1) * hash::leaf_bytes); });
        if (stop_ && ready_ < std::min(size, (next + 1) * hash::leaf_bytes)) {
          outcome_ = fail(errc::cancelled, "cannot hash the leaves: stopped");
          return;
        }
        ready = ready_;
      }
      // Every whole leaf that has arrived, over the pool.
      const std::uint64_t end = ready >= size ? count : ready / hash::leaf_bytes;
      const std::uint64_t first = next;
      auto one = [&](std::size_t k) -> status {
        const std::uint64_t i = first + k;
        const std::uint64_t offset = i * hash::leaf_bytes;
        const std::uint64_t length = std::min(hash::leaf_bytes, size - offset);
        if (sha256_) {
          TENSORREG_TRY_ASSIGN(leaves_[i].sha256, hash::hash_leaf(source_, i));
        }
        if (xxh3_) {
          TENSORREG_TRY_ASSIGN(leaves_[i].xxh3, hash::xxh3_128(source_, offset, length));
        }
        return {};
      };
      status done = pool_ != nullptr ? pool_->parallel_for(end - first, one) : status{};
      if (pool_ == nullptr) {
        for (std::uint64_t k = 0; k < end - first && done; ++k) done = one(k);
      }
      if (!done) {
        outcome_ = tl::unexpected(std::move(done).error());
        return;
      }
      next = end;
    }
  }

  const memory::byte_source& source_;
  thread_pool* pool_;
  const bool sha256_;
  const bool xxh3_;
  std::vector<leaf_check> leaves_;
  status outcome_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::uint64_t ready_ = 0;
  bool stop_ = false;
  std::thread thread_;
};

// Removes `path` when it goes out of scope unless released.
class tree_guard {
 public:
  explicit tree_guard(std::string path) : path_(std::move(path)) {}
  ~tree_guard() {
    if (!path_.empty()) remove_tree(path_);
  }
  tree_guard(const tree_guard&) = delete;
  tree_guard& operator=(const tree_guard&) = delete;

 private:
  std::string path_;
};

}  // namespace

std::string durable_store::directory_name(std::string_view artifact_id) {
  std::string out;
  out.reserve(artifact_id.size() + 8);
  for (const char c : artifact_id) {
    const bool plain =
        (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' || c == '.' || c == '~';
    if (plain) {
      out.push_back(c);
    } else {
      char hex[4];
      std::snprintf(hex, sizeof hex, "%%%02X", static_cast<unsigned>(static_cast<unsigned char>(c)));
      out += hex;
    }
  }
  return out;
}

durable_store::durable_store(std::string root, store_options options) : root_(std::move(root)), options_(options) {
  if (options_.chunk_bytes == 0) options_.chunk_bytes = std::uint64_t{64} << 20;
}

durable_store::~durable_store() = default;

result<std::unique_ptr<durable_store>> durable_store::open(const std::string& root, store_options options) {
  if (root.empty()) return fail(errc::invalid_argument, "cannot open persist directory: no path given");
  std::error_code ec;
  const std::string absolute = fs::absolute(root, ec).lexically_normal().string();
  TENSORREG_TRY(prepare_root(absolute));
  std::unique_ptr<durable_store> store(new durable_store(absolute, options));
  TENSORREG_TRY(store->scan());
  return store;
}

status durable_store::scan() {
  const std::string quarantine_dir = root_ + "/" + kQuarantine;
  if (::mkdir(quarantine_dir.c_str(), 0700) != 0 && errno != EEXIST) {
    return fail(errc::unavailable, "cannot create '" + quarantine_dir + "': " + os_reason(errno));
  }
  std::error_code ec;
  std::vector<std::string> names;
  for (const auto& entry : fs::directory_iterator(root_, ec)) names.push_back(entry.path().filename().string());
  if (ec) return fail(errc::unavailable, "cannot read persist directory '" + root_ + "': " + ec.message());
  std::sort(names.begin(), names.end());
  for (const auto& name : names) {
    const std::string path = root_ + "/" + name;
    if (name == kQuarantine) continue;
    if (name.starts_with(".tmp-")) {  // an interrupted write or removal: never published
      if (leftover(name, path)) remove_tree(path);
      continue;
    }
    struct stat st {};
    if (::lstat(path.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) {
      quarantine("", name, "it is not an artifact directory");
      continue;
    }
    auto found = read_manifest(path);
    if (!found) {
      if (found.error().code != errc::data_loss) return tl::unexpected(std::move(found).error());
      quarantine("", name, found.error().message);
      continue;
    }
    std::string id = found->record.artifact_id;  // before the move below
    std::lock_guard lock(mutex_);
    published_[id] = std::make_shared<const stored_artifact>(std::move(*found));
  }
  return sync_directory(root_);
}

std::string durable_store::temporary_prefix() const {
  if (!options_.shared) return ".tmp-";
  // '_' is never part of a directory_name(): no writer's prefix is another's.
  return ".tmp-" + directory_name(options_.writer_tag) + "_";
}

bool durable_store::leftover(const std::string& name, const std::string& path) const {
  if (!options_.shared || name.starts_with(temporary_prefix())) return true;
  // Another daemon's: a write under way, unless nothing has touched it for a long time (its
  // writer died and never came back).
  struct stat st {};
  if (::lstat(path.c_str(), &st) != 0) return false;
  const auto touched = std::chrono::system_clock::from_time_t(st.st_mtime);
  return std::chrono::system_clock::now() - touched > options_.stale_leftovers_after;
}

std::optional<error> durable_store::removed_by_another(const stored_artifact& a, const std::string& what) {
  if (!options_.shared) return std::nullopt;
  struct stat st {};
  if (::lstat(a.directory.c_str(), &st) == 0 || errno != ENOENT) return std::nullopt;
  {
    std::lock_guard lock(mutex_);
    if (auto it = published_.find(a.record.artifact_id);
        it != published_.end() && it->second->directory == a.directory) {
      published_.erase(it);
    }
  }
  return error{errc::not_found, what + ": another daemon sharing the persist directory removed it"};
}

result<bool> durable_store::discover(std::string_view artifact_id) {
  if (contains(artifact_id)) return true;
  if (!options_.shared || artifact_id.empty()) return false;
  const std::string name = directory_name(artifact_id);
  const std::string path = root_ + "/" + name;
  struct stat st {};
  if (::lstat(path.c_str(), &st) != 0) {
    if (errno == ENOENT) return false;
    return tl::unexpected(memory::sys::file_error("inspect", path, errno));
  }
  const std::string what = "cannot open " + std::string(artifact_id) + " in the shared persist directory";
  auto found = S_ISDIR(st.st_mode) ? read_manifest(path)
                                   : result<stored_artifact>(fail(errc::data_loss, "it is not an artifact directory"));
  if (!found) {
    // Removed meanwhile by the daemon that published it: not there, not damaged.
    if (::lstat(path.c_str(), &st) != 0 && errno == ENOENT) return false;
    if (found.error().code == errc::data_loss) quarantine("", name, found.error().message);
    return tl::unexpected(with_context(std::move(found).error(), what));
  }
  if (found->record.artifact_id != artifact_id) return false;
  std::string id = found->record.artifact_id;  // before the move below
  std::lock_guard lock(mutex_);
  published_.emplace(std::move(id), std::make_shared<const stored_artifact>(std::move(*found)));
  return true;
}

status durable_store::rescan() {
  if (!options_.shared) return {};
  std::error_code ec;
  std::set<std::string> present;
  for (const auto& entry : fs::directory_iterator(root_, ec)) {
    auto name = entry.path().filename().string();
    if (name == kQuarantine || name.starts_with(".tmp-")) continue;
    present.insert(std::move(name));
  }
  if (ec) return fail(errc::unavailable, "cannot read persist directory '" + root_ + "': " + ec.message());
  std::set<std::string> listed;
  {
    std::lock_guard lock(mutex_);
    for (auto it = published_.begin(); it != published_.end();) {
      const auto name = fs::path(it->second->directory).filename().string();
      if (!present.contains(name)) {
        it = published_.erase(it);  // another daemon removed it
        continue;
      }
      listed.insert(name);
      ++it;
    }
  }
  for (const auto& name : present) {
    if (listed.contains(name)) continue;
    const std::string path = root_ + "/" + name;
    struct stat st {};
    if (::lstat(path.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) continue;
    auto found = read_manifest(path);
    if (!found) {
      if (found.error().code == errc::data_loss && ::lstat(path.c_str(), &st) == 0) {
        quarantine("", name, found.error().message);
      }
      continue;
    }
    std::string id = found->record.artifact_id;  // before the move below
    std::lock_guard lock(mutex_);
    published_.emplace(std::move(id), std::make_shared<const stored_artifact>(std::move(*found)));
  }
  return {};
}

void durable_store::quarantine(const std::string& artifact_id, const std::string& name, const std::string& reason) {
  {
    std::lock_guard lock(mutex_);
    if (!artifact_id.empty()) published_.erase(artifact_id);
    quarantined_.push_back({name, reason});
  }
  const auto ns =
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::system_clock::now().time_since_epoch()).count();
  const std::string to = root_ + "/" + kQuarantine + "/" + name + "." + std::to_string(ns);
  if (::rename((root_ + "/" + name).c_str(), to.c_str()) != 0) {
    // Cannot move it aside: remove it, it is never served either way.
    remove_tree(root_ + "/" + name);
  }
  (void)sync_directory(root_);
}

bool durable_store::contains(std::string_view artifact_id) const {
  std::lock_guard lock(mutex_);
  return published_.find(artifact_id) != published_.end();
}

std::optional<stored_artifact> durable_store::find(std::string_view artifact_id) const {
  std::lock_guard lock(mutex_);
  auto it = published_.find(artifact_id);
  if (it == published_.end()) return std::nullopt;
  return *it->second;
}

std::vector<stored_artifact> durable_store::list() const {
  std::lock_guard lock(mutex_);
  std::vector<stored_artifact> out;
  out.reserve(published_.size());
  for (const auto& [id, a] : published_) out.push_back(*a);
  return out;
}

durable_store::totals_result durable_store::totals() const {
  std::lock_guard lock(mutex_);
  totals_result out;
  out.artifacts = published_.size();
  for (const auto& [id, a] : published_) out.bytes += a->record.total_size;
  return out;
}

std::vector<quarantined_artifact> durable_store::quarantined() const {
  std::lock_guard lock(mutex_);
  return quarantined_;
}

status durable_store::write(const artifact_record& record, const index::canonical_index& idx,
                            const memory::byte_source& bytes, const progress_fn& progress,
                            const std::atomic<bool>* cancelled) {
  const std::string& id = record.artifact_id;
  const std::string what = "cannot persist " + id;
  if (id.empty()) return fail(errc::invalid_argument, what + ": no artifact id");
  if (record.total_size == 0 || bytes.size() != record.total_size || idx.total_size() != record.total_size) {
    return fail(errc::invalid_argument, what + ": total_size " + std::to_string(record.total_size) + ", index " +
                                            std::to_string(idx.total_size()) + " and bytes " +
                                            std::to_string(bytes.size()) + " disagree");
  }
  // Content addressed: the same id is the same bytes, whichever daemon wrote them.
  if (auto there = discover(id); there && *there) return {};
  const std::string tmp = root_ + "/" + temporary_prefix() + random_hex(8);
  if (memory::sys::mkdir(tmp.c_str(), 0700) != 0)
    return tl::unexpected(with_context(memory::sys::file_error("create", tmp, errno), what));
  tree_guard guard(tmp);
  auto body = [&]() -> result<std::vector<leaf_check>> {
    TENSORREG_TRY(write_small_file(tmp + "/" + kIndex, idx.json()));
    const std::string data_path = tmp + "/" + kData;
    TENSORREG_TRY_ASSIGN(auto fd, open_file(data_path, O_WRONLY | O_CREAT | O_EXCL));
    leaf_hasher hasher(bytes, options_.hash_pool);
    hasher.advance(record.total_size);  // the source is whole: hash while writing
    const std::uint64_t total = record.total_size;
    for (std::uint64_t offset = 0; offset < total;) {
      if (cancelled != nullptr && cancelled->load(std::memory_order_relaxed)) {
        hasher.stop();
        return fail(errc::cancelled, "cancelled");
      }
      const std::uint64_t length = std::min(options_.chunk_bytes, total - offset);
      auto wrote = bytes.visit(offset, length, [&](std::span<const std::byte> piece) {
        return memory::sys::write_all(fd.get(), piece, data_path);
      });
      if (!wrote) {
        hasher.stop();
        return tl::unexpected(std::move(wrote).error());
      }
      // Start writeback of this chunk now, so the final fsync has little left to do and dirty
      // pages do not pile up in the page cache.
      (void)::sync_file_range(fd.get(), static_cast<off_t>(offset), static_cast<off_t>(length), SYNC_FILE_RANGE_WRITE);
      offset += length;
      if (progress) progress(offset, total);
      if (options_.chunk_pause.count() > 0) std::this_thread::sleep_for(options_.chunk_pause);
    }
    TENSORREG_TRY(sync_fd(fd.get(), data_path));
    return hasher.finish_and_join();
  };
  auto leaves = body();
  if (!leaves) return tl::unexpected(with_context(std::move(leaves).error(), what));
  if (record.id_kind == "MI2") {
    // What was written must be what the id names: a replica that changed underneath is refused.
    std::vector<hash::digest> roots;
    for (const auto& l : *leaves) roots.push_back(l.sha256);
    auto expected = hash::decode_multihash(record.data_multihash);
    if (!expected || hash::tree_root(roots) != *expected) {
      return fail(errc::data_loss, what + ": the bytes written do not hash to its data multihash");
    }
  }
  auto publish = [&]() -> status {
    TENSORREG_TRY(write_small_file(tmp + "/" + kManifest, manifest_json(record, idx, *leaves).dump()));
    TENSORREG_TRY(sync_directory(tmp));
    const std::string final_path = root_ + "/" + directory_name(id);
    if (memory::sys::rename(tmp.c_str(), final_path.c_str()) != 0) {
      const int e = errno;
      // Another write published the same id first: its copy is as good as ours.
      if ((e == ENOTEMPTY || e == EEXIST) && ::access((final_path + "/" + kManifest).c_str(), F_OK) == 0) return {};
      return tl::unexpected(memory::sys::file_error("rename", tmp, e));
    }
    return sync_directory(root_);
  };
  if (auto published = publish(); !published) return tl::unexpected(with_context(std::move(published).error(), what));
  stored_artifact a;
  a.record = record;
  a.index = std::make_shared<const index::canonical_index>(idx);
  a.leaves = std::move(*leaves);
  a.directory = root_ + "/" + directory_name(id);
  std::lock_guard lock(mutex_);
  published_.emplace(id, std::make_shared<const stored_artifact>(std::move(a)));
  return {};
}

status durable_store::read_checked(const stored_artifact& a, std::span<std::byte> out, const progress_fn& progress) {
  const std::string path = a.directory + "/" + kData;
  const std::uint64_t total = a.record.total_size;
  TENSORREG_TRY_ASSIGN(auto fd, open_file(path, O_RDONLY));
  (void)::posix_fadvise(fd.get(), 0, 0, POSIX_FADV_SEQUENTIAL);
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) return tl::unexpected(memory::sys::file_error("inspect", path, errno));
  if (static_cast<std::uint64_t>(st.st_size) != total) {
    return fail(errc::data_loss, "bad data '" + path + "': " + std::to_string(st.st_size) +
                                     " bytes, the manifest says " + std::to_string(total));
  }
  // With a destination, leaves are hashed in place as they arrive; without one (verify), a
  // chunk-sized scratch buffer is read and hashed in turn.
  // The scratch chunk is a whole number of leaves, so that each leaf is hashed in one piece.
  const std::uint64_t chunk_bytes =
      out.empty() ? (options_.chunk_bytes + hash::leaf_bytes - 1) / hash::leaf_bytes * hash::leaf_bytes
                  : options_.chunk_bytes;
  std::vector<std::byte> scratch;
  if (out.empty()) scratch.resize(static_cast<std::size_t>(std::min(chunk_bytes, total)));
  std::unique_ptr<memory::host_bytes_view> view;
  std::unique_ptr<leaf_hasher> hasher;
  if (!out.empty()) {
    view = std::make_unique<memory::host_bytes_view>(std::span<const std::byte>(out.data(), out.size()));
    // A load checks what options_.load_check names; verify() always SHA-256.
    const bool sha = options_.load_check == leaf_check_kind::sha256;
    hasher = std::make_unique<leaf_hasher>(*view, options_.hash_pool, sha, !sha);
  }
  std::vector<leaf_check> got;
  // A load reads several chunks at once: one thread's reads into fresh shared memory are
  // bound by its page faults, far below what the page cache or the disk serve. A round of
  // `readers` chunks is read in parallel, then handed to the hasher in order.
  const std::uint64_t readers = out.empty() ? 1 : std::max<std::uint64_t>(1, options_.load_readers);
  for (std::uint64_t offset = 0; offset < total && readers > 1;) {
    const std::uint64_t round = std::min(readers * chunk_bytes, total - offset);
    const std::uint64_t ahead = std::min(round, total - offset - round);
    if (ahead > 0) {
      (void)::posix_fadvise(fd.get(), static_cast<off_t>(offset + round), static_cast<off_t>(ahead),
                            POSIX_FADV_WILLNEED);
    }
    std::vector<status> outcomes(static_cast<std::size_t>((round + chunk_bytes - 1) / chunk_bytes));
    {
      std::vector<std::jthread> threads;
      for (std::size_t k = 0; k < outcomes.size(); ++k) {
        threads.emplace_back([&, k] {
          const std::uint64_t at = offset + k * chunk_bytes;
          const std::uint64_t length = std::min(chunk_bytes, total - at);
          outcomes[k] = read_exact(fd.get(), at,
                                   out.subspan(static_cast<std::size_t>(at), static_cast<std::size_t>(length)), path);
        });
      }
    }
    for (auto& o : outcomes) {
      if (!o) {
        hasher->stop();
        return o;
      }
    }
    offset += round;
    hasher->advance(offset);
    if (progress) progress(offset, total);
    if (offset == total) break;
  }
  for (std::uint64_t offset = 0; offset < total && readers == 1;) {
    const std::uint64_t length = std::min(chunk_bytes, total - offset);
    // The next two chunks are asked for now: a pread alone keeps only the kernel's readahead
    // window in flight, far less than a disk serves at its speed.
    if (offset + length < total) {
      const std::uint64_t ahead = std::min(2 * chunk_bytes, total - offset - length);
      (void)::posix_fadvise(fd.get(), static_cast<off_t>(offset + length), static_cast<off_t>(ahead),
                            POSIX_FADV_WILLNEED);
    }
    std::span<std::byte> dst = out.empty()
                                   ? std::span<std::byte>(scratch.data(), static_cast<std::size_t>(length))
                                   : out.subspan(static_cast<std::size_t>(offset), static_cast<std::size_t>(length));
    if (auto read = read_exact(fd.get(), offset, dst, path); !read) {
      if (hasher) hasher->stop();
      return read;
    }
    if (hasher) {
      hasher->advance(offset + length);
    } else {
      memory::host_bytes_view chunk(dst);
      for (std::uint64_t at = 0; at < length; at += hash::leaf_bytes) {
        const auto n = std::min(hash::leaf_bytes, length - at);
        leaf_check c;
        c.sha256 = hash::sha256(std::span<const std::byte>(dst.data() + at, static_cast<std::size_t>(n)));
        got.push_back(c);
      }
    }
    offset += length;
    if (progress) progress(offset, total);
  }
  if (hasher) {
    TENSORREG_TRY_ASSIGN(got, hasher->finish_and_join());
  }
  const bool by_xxh3 = !out.empty() && options_.load_check == leaf_check_kind::xxh3;
  for (std::size_t i = 0; i < a.leaves.size(); ++i) {
    const bool matches =
        i < got.size() && (by_xxh3 ? got[i].xxh3 == a.leaves[i].xxh3 : got[i].sha256 == a.leaves[i].sha256);
    if (!matches) {
      return fail(errc::data_loss, "bad data '" + path + "': leaf " + std::to_string(i) + " (bytes " +
                                       std::to_string(i * hash::leaf_bytes) + "..) does not match its " +
                                       (by_xxh3 ? "XXH3-128" : "SHA-256"));
    }
  }
  return {};
}

status durable_store::load(std::string_view artifact_id, std::span<std::byte> out) {
  std::shared_ptr<const stored_artifact> a;
  {
    std::lock_guard lock(mutex_);
    auto it = published_.find(artifact_id);
    if (it != published_.end()) a = it->second;
  }
  const std::string what = "cannot load " + std::string(artifact_id) + " from the persist directory";
  if (!a) return fail(errc::not_found, what + ": it is not there");
  if (out.size() != a->record.total_size) {
    return fail(errc::invalid_argument, what + ": the buffer holds " + std::to_string(out.size()) + " bytes, not " +
                                            std::to_string(a->record.total_size));
  }
  auto read = read_checked(*a, out, {});
  if (!read) {
    if (auto gone = removed_by_another(*a, what)) return tl::unexpected(std::move(*gone));
  }
  if (!read && read.error().code == errc::data_loss) {
    quarantine(a->record.artifact_id, directory_name(a->record.artifact_id), read.error().message);
  }
  if (!read) return tl::unexpected(with_context(std::move(read).error(), what));
  return {};
}

result<durable_store::opened_data> durable_store::open_data(std::string_view artifact_id) {
  const std::string what = "cannot open " + std::string(artifact_id) + " in the persist directory";
  const std::string name = directory_name(artifact_id);
  std::shared_ptr<const stored_artifact> a;
  {
    std::lock_guard lock(mutex_);
    if (auto it = published_.find(artifact_id); it != published_.end()) {
      a = it->second;
    } else {
      // Newest first: the reason the copy was last moved aside.
      for (auto q = quarantined_.rbegin(); q != quarantined_.rend(); ++q) {
        if (q->name == name) return fail(errc::data_loss, what + ": it was quarantined: " + q->reason);
      }
    }
  }
  if (!a) return fail(errc::not_found, what + ": it is not there");
  const std::string path = a->directory + "/" + kData;
  auto fd = open_file(path, O_RDONLY);
  if (!fd) {
    if (auto gone = removed_by_another(*a, what)) return tl::unexpected(std::move(*gone));
    return tl::unexpected(with_context(std::move(fd).error(), what));
  }
  struct stat st {};
  if (::fstat(fd->get(), &st) != 0) {
    return tl::unexpected(with_context(memory::sys::file_error("inspect", path, errno), what));
  }
  // A file cut short after open() would make the reader's reads end early: found here instead.
  if (static_cast<std::uint64_t>(st.st_size) != a->record.total_size) {
    const std::string reason = "bad data '" + path + "': " + std::to_string(st.st_size) + " bytes, the manifest says " +
                               std::to_string(a->record.total_size);
    quarantine(a->record.artifact_id, name, reason);
    return fail(errc::data_loss, what + ": " + reason);
  }
  return opened_data{std::move(a), std::move(*fd)};
}

status durable_store::verify(std::string_view artifact_id, const progress_fn& progress) {
  std::shared_ptr<const stored_artifact> a;
  {
    std::lock_guard lock(mutex_);
    auto it = published_.find(artifact_id);
    if (it != published_.end()) a = it->second;
  }
  const std::string what = "cannot verify " + std::string(artifact_id) + " in the persist directory";
  if (!a) return fail(errc::not_found, what + ": it is not there");
  auto read = read_checked(*a, {}, progress);
  if (!read) {
    if (auto gone = removed_by_another(*a, what)) return tl::unexpected(std::move(*gone));
  }
  if (!read && read.error().code == errc::data_loss) {
    quarantine(a->record.artifact_id, directory_name(a->record.artifact_id), read.error().message);
  }
  if (!read) return tl::unexpected(with_context(std::move(read).error(), what));
  return {};
}

status durable_store::remove(std::string_view artifact_id) {
  const std::string name = directory_name(artifact_id);
  const std::string what = "cannot remove " + std::string(artifact_id) + " from the persist directory";
  if (auto there = discover(artifact_id); !there || !*there) {
    return fail(errc::not_found, what + ": it is not there");
  }
  {
    std::lock_guard lock(mutex_);
    auto it = published_.find(artifact_id);
    if (it == published_.end()) return fail(errc::not_found, what + ": it is not there");
    published_.erase(it);
  }
  const std::string doomed = root_ + "/" + temporary_prefix() + "del-" + random_hex(8);
  if (memory::sys::rename((root_ + "/" + name).c_str(), doomed.c_str()) != 0) {
    const int e = errno;
    // Another daemon sharing the root removed it first.
    if (options_.shared && e == ENOENT) return {};
    return tl::unexpected(with_context(memory::sys::file_error("rename", root_ + "/" + name, e), what));
  }
  (void)sync_directory(root_);
  remove_tree(doomed);
  return {};
}

}  // namespace tensorreg::persistence
