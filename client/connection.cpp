#include "tensorreg/client/connection.hpp"

#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include <algorithm>
#include <chrono>
#include <map>
#include <mutex>
#include <optional>
#include <thread>

#include "client/access.hpp"
#include "client/wire_convert.hpp"
#include "tensorreg/common/thread_pool.hpp"
#include "tensorreg/hash/multihash.hpp"
#include "tensorreg/hash/sha256.hpp"
#include "tensorreg/hash/tree_hash.hpp"
#include "tensorreg/identity/content_id.hpp"
#include "tensorreg/memory/mapped_file.hpp"
#include "tensorreg/memory/segmented_view.hpp"
#include "tensorreg/memory/shared_memory.hpp"
#include "tensorreg/policy/store_policy.hpp"

namespace tensorreg::client {

namespace {

namespace wc = wire_convert;

std::int32_t own_pid() { return static_cast<std::int32_t>(::getpid()); }

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// A writable shared mapping of the daemon's memfd, unmapped when it goes out of scope: before
// Commit, so that the daemon can seal the memfd and keep it as its replica (stable_dram.hpp).
class memfd_mapping {
 public:
  memfd_mapping(std::byte* base, std::size_t size) noexcept : base_(base), size_(size) {}
  memfd_mapping(const memfd_mapping&) = delete;
  memfd_mapping& operator=(const memfd_mapping&) = delete;
  ~memfd_mapping() { ::munmap(base_, size_); }
  [[nodiscard]] std::byte* data() const noexcept { return base_; }

 private:
  std::byte* base_;
  std::size_t size_;
};

// Writes the bundle's canonical bytes into the memfd `fd` at [0, size), leaf by leaf on all
// cores, two ways at once. pwrite() (the file read into a small buffer, then written) costs the
// least CPU, but it takes the memfd's inode lock: writers on several cores serialise and spin.
// So one thread at a time writes with pwrite(), and on more cores than
// memory::max_pwrite_fill_threads a thread that finds it busy pread()s its leaf from the file
// straight into a shared mapping of the memfd instead, whose page faults run in parallel. Only
// the kernel writes the mapping, so a memfd that shrank under it fails the read (EFAULT) rather
// than raising SIGBUS here. The mapping is gone when this returns: the daemon keeps a memfd no
// one maps writable as its replica, with no second copy.
status write_canonical(const index::safetensors_bundle& bundle, int fd,
                       const std::function<void(std::uint64_t, std::uint64_t)>& progress) {
  const auto& source = bundle.canonical();
  const std::uint64_t total = source.size();
  if (total == 0) return {};
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    const int e = errno;
    return fail(errc::data_loss, "cannot write the daemon's memfd: cannot stat it: " + std::string(std::strerror(e)));
  }
  // The daemon sized the memfd; a shorter one would fault under the mapping.
  if (static_cast<std::uint64_t>(st.st_size) < total) {
    return fail(errc::data_loss, "cannot write the daemon's memfd: it holds " + std::to_string(st.st_size) +
                                     " bytes, fewer than the artifact's " + std::to_string(total));
  }
  // A memfd with no pages reads as zeros: the canonical buffer's gaps (PAD) need no writing.
  const bool zeroed = st.st_blocks == 0;
  void* base = ::mmap(nullptr, static_cast<std::size_t>(total), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (base == MAP_FAILED) {
    const int e = errno;
    return fail(errc_of_errno(e, errc::resource_exhausted),
                "cannot map the daemon's memfd of " + std::to_string(total) + " bytes: " + std::strerror(e));
  }
  const memfd_mapping mapping(static_cast<std::byte*>(base), static_cast<std::size_t>(total));
  const auto write_at = [&](std::uint64_t at) {
    return [fd, at](std::span<const std::byte> piece) mutable -> status {
      TENSORREG_TRY(write_to_memfd(fd, piece, at));
      at += piece.size();
      return {};
    };
  };
  // [begin, begin + length) through the mapping: file bytes pread() into place, other sources
  // (none in a safetensors bundle) written with pwrite(), gaps left as they are when zeroed.
  const auto map_leaves = [&](std::uint64_t begin, std::uint64_t length) -> status {
    std::uint64_t cursor = begin;
    status copied;
    const auto gap = [&](std::uint64_t to) -> status {
      if (zeroed || cursor >= to) return {};
      return memory::visit_zeros(to - cursor, write_at(cursor));
    };
    memory::for_each_leaf(
        source, begin, length, begin,
        [&](const memory::byte_source& leaf, std::uint64_t offset, std::uint64_t size, std::uint64_t at) {
          copied = gap(at);
          if (!copied) return false;
          if (const auto* file = dynamic_cast<const memory::mapped_file*>(&leaf)) {
            copied = file->read_into(offset, {mapping.data() + at, static_cast<std::size_t>(size)});
          } else {
            copied = leaf.visit(offset, size, write_at(at));
          }
          cursor = at + size;
          return copied.has_value();
        });
    TENSORREG_TRY(std::move(copied));
    return gap(begin + length);
  };
  const std::uint64_t chunks = total / hash::leaf_bytes + (total % hash::leaf_bytes != 0 ? 1 : 0);
  thread_pool pool(std::max(1u, std::thread::hardware_concurrency()) - 1);
  std::mutex writer;
  // With few cores every leaf waits for its turn to pwrite() (memory::max_pwrite_fill_threads).
  const bool map_when_busy = pool.size() + 1 > memory::max_pwrite_fill_threads;
  std::uint64_t done = 0;  // guarded by progress_mutex
  std::mutex progress_mutex;
  return pool.parallel_for(chunks, [&](std::size_t chunk) -> status {
    const std::uint64_t begin = chunk * hash::leaf_bytes;
    const std::uint64_t length = std::min(hash::leaf_bytes, total - begin);
    std::unique_lock writing(writer, std::defer_lock);
    if (map_when_busy) {
      (void)writing.try_lock();
    } else {
      writing.lock();
    }
    auto copied = writing.owns_lock() ? source.visit(begin, length, write_at(begin)) : map_leaves(begin, length);
    if (writing.owns_lock()) writing.unlock();
    if (!copied) {
      return fail(copied.error().code, "cannot copy the artifact into the daemon's memfd: " + copied.error().message);
    }
    // Counted under the lock that reports it, so that the reports never go backwards: a
    // thread that added first may otherwise report after one that added later.
    std::lock_guard lock(progress_mutex);
    done += length;
    if (progress) progress(done, total);
    return {};
  });
}

// The descriptor of the daemon's stable replica of `bundle`, if it holds one. The bundle is
// hashed only when the daemon lists a stable mi2 artifact with the same index multihash.
result<std::optional<artifact_descriptor>> held_replica(connection& c, const index::safetensors_bundle& bundle) {
  const auto& idx = bundle.index();
  const auto index_multihash = hash::encode_multihash(hash::sha256(idx.json()));
  TENSORREG_TRY_ASSIGN(const auto listed, c.list());
  const auto stable = [](const artifact_info& a) {
    return std::find(a.tiers.begin(), a.tiers.end(), tier::stable_dram) != a.tiers.end();
  };
  const auto candidate = [&](const artifact_info& a) {
    return a.descriptor.id_kind == identity::id_kind::mi2 && a.descriptor.index_multihash == index_multihash &&
           stable(a);
  };
  if (std::none_of(listed.begin(), listed.end(), candidate)) return std::nullopt;
  thread_pool pool(std::max(1u, std::thread::hardware_concurrency()) - 1);
  TENSORREG_TRY_ASSIGN(const auto id, identity::content_id(idx.json(), bundle.canonical(), &pool));
  const auto text = id.to_string();
  for (const auto& a : listed) {
    if (candidate(a) && a.descriptor.artifact_id == text) return a.descriptor;
  }
  return std::nullopt;
}

// The bundle's canonical bytes as ranges of its files, for a put whose files the daemon reads
// itself (wire-format.md §18); nullopt when some bytes come from elsewhere or there are more
// files than one frame carries fds for: the client then copies them.
struct file_plan {
  std::vector<int> fds;  // the bundle's own descriptors, open as long as the bundle
  std::vector<registration::file_segment> segments;
};

constexpr std::size_t max_frame_fds = 250;  // wire-format.md §7

std::optional<file_plan> files_of(const index::safetensors_bundle& bundle) {
  file_plan plan;
  std::map<const memory::mapped_file*, std::uint32_t> numbers;
  const auto& source = bundle.canonical();
  bool whole = true;
  memory::for_each_leaf(
      source, 0, source.size(), 0,
      [&](const memory::byte_source& leaf, std::uint64_t offset, std::uint64_t size, std::uint64_t at) {
        const auto* file = dynamic_cast<const memory::mapped_file*>(&leaf);
        if (file == nullptr) return whole = false;
        auto [it, added] = numbers.emplace(file, static_cast<std::uint32_t>(plan.fds.size()));
        if (added) plan.fds.push_back(file->fd());
        auto& segments = plan.segments;
        if (!segments.empty() && segments.back().file == it->second &&
            segments.back().canonical_offset + segments.back().length == at &&
            segments.back().file_offset + segments.back().length == offset) {
          segments.back().length += size;
        } else {
          segments.push_back({it->second, offset, at, size});
        }
        return true;
      });
  if (!whole || plan.segments.empty() || plan.fds.size() > max_frame_fds) return std::nullopt;
  return plan;
}

// A daemon from before puts from files refuses fds on a Begin (wire-format.md §7).
bool refuses_files(const error& e) {
  return e.code == errc::invalid_argument &&
         e.message.find("arrived with a message that uses none") != std::string::npos;
}

result<unique_fd> take_fd(raw::connection::reply& r, std::string_view what) {
  if (r.fds.empty()) return fail(errc::data_loss, "cannot " + std::string(what) + ": the daemon sent no memfd");
  return std::move(r.fds.front());
}

}  // namespace

std::string_view tier_name(tier t) noexcept {
  switch (t) {
    case tier::vram: return "vram";
    case tier::vram_leased: return "leased";
    case tier::stable_dram: return "stable_dram";
    case tier::shared_disk: return "shared_disk";
    case tier::unspecified: break;
  }
  return "?";
}

connection::connection(std::shared_ptr<raw::connection> raw) noexcept : raw_(std::move(raw)) {}

result<connection> connection::connect(std::string socket_path) {
  TENSORREG_TRY_ASSIGN(auto raw, raw::connection::connect(std::move(socket_path)));
  return connection(std::shared_ptr<raw::connection>(std::move(raw)));
}

const std::string& connection::socket_path() const noexcept { return raw_->socket_path(); }

result<server_config> connection::config() {
  TENSORREG_TRY_ASSIGN(auto r, raw_->call(wc::config_request()));
  return wc::config_of(r.response);
}

result<registered> connection::put(const index::safetensors_bundle& bundle, const put_options& options) {
  const auto started = std::chrono::steady_clock::now();
  const auto& idx = bundle.index();
  const auto files = options.hand_over_files ? files_of(bundle) : std::nullopt;
  // With its files handed over the daemon hashes them before it copies when it knows the
  // layout already, so a client-side hash would only repeat that.
  if (options.reuse_held && options.profile.empty() && !files) {
    TENSORREG_TRY_ASSIGN(auto held, held_replica(*this, bundle));
    if (held) return registered{std::move(*held), true, "", seconds_since(started)};
  }
  wc::begin_args begin;
  begin.plan = wc::begin_plan::stable_dram;
  begin.device_id = 0;
  begin.total_size = idx.total_size();
  begin.ttl_ms = default_ttl_ms;
  begin.owner_pid = own_pid();
  begin.index_json = idx.json();
  begin.display_name = options.name;
  if (!options.profile.empty()) {
    TENSORREG_TRY_ASSIGN(begin.policy, policy::parse_policy(options.profile));
  }
  if (files) {
    begin.file_segments = files->segments;
    auto begun = raw_->call(wc::begin_request(begin), files->fds);
    if (begun || !refuses_files(begun.error())) {
      TENSORREG_TRY(begun);
      const std::string registration_id = wc::registration_id_of(begun->response);
      // The daemon reads, copies and hashes at Commit: nothing is left to write here.
      if (options.progress) options.progress(idx.total_size(), idx.total_size());
      auto committed = raw_->call(wc::commit_request(registration_id, false, options.replica_timeout_ms));
      if (!committed) {
        static_cast<void>(raw_->call(wc::abort_request(registration_id)));
        return tl::unexpected(std::move(committed).error());
      }
      const auto commit = wc::commit_of(committed->response);
      registered out{commit.descriptor, commit.existed, registration_id, seconds_since(started), commit.evicted};
      out.remote_stable_tier = commit.remote_stable_tier;
      return out;
    }
    begin.file_segments.clear();
    put_options copying = options;
    copying.hand_over_files = false;
    return put(bundle, copying);
  }
  TENSORREG_TRY_ASSIGN(auto begun, raw_->call(wc::begin_request(begin)));
  const std::string registration_id = wc::registration_id_of(begun.response);
  auto abort_on_error = [&](error e) -> tl::unexpected<error> {
    static_cast<void>(raw_->call(wc::abort_request(registration_id)));
    return tl::unexpected(std::move(e));
  };
  TENSORREG_TRY_ASSIGN(auto fd, take_fd(begun, "put"));
  // Unmapped again before Commit: with no writable mapping left the daemon keeps the memfd as
  // its replica instead of copying it (stable_dram.hpp).
  if (auto written = write_canonical(bundle, fd.get(), options.progress); !written) {
    return abort_on_error(written.error());
  }
  fd.reset();
  registration::feed_request written;
  written.registration_id = registration_id;
  written.payload = registration::stable_write_progress{{{0, idx.total_size()}}, true};
  std::vector<wc::v2::FeedRegisterArtifactStreamRequest> frames;
  frames.push_back(wc::feed_frame(written));
  if (auto fed = raw_->feed(std::move(frames)); !fed) return abort_on_error(fed.error());
  TENSORREG_TRY_ASSIGN(auto committed,
                       raw_->call(wc::commit_request(registration_id, false, options.replica_timeout_ms)));
  const auto commit = wc::commit_of(committed.response);
  registered out{commit.descriptor, commit.existed, registration_id, seconds_since(started), commit.evicted};
  out.remote_stable_tier = commit.remote_stable_tier;
  return out;
}

result<lease> connection::register_lease(const index::safetensors_bundle& bundle, std::uint32_t ttl_ms) {
  lease_register_options options;
  options.ttl_ms = ttl_ms;
  return register_lease(bundle, options);
}

result<lease> connection::register_lease(const index::safetensors_bundle& bundle,
                                         const lease_register_options& options) {
  const std::uint32_t ttl_ms = options.ttl_ms;
  // The time reported is the time the caller waits, the copy into the region included.
  const auto started = std::chrono::steady_clock::now();
  const auto& idx = bundle.index();
  // 1. A daemon-managed HOST_SHARED region that will hold the canonical bytes.
  wc::region_args region_args;
  region_args.host_shared = true;
  region_args.owner_pid = own_pid();
  region_args.size_bytes = idx.total_size();
  TENSORREG_TRY_ASSIGN(auto region_reply, raw_->call(wc::register_region_request(region_args)));
  const auto region = wc::region_of(region_reply.response);
  // From here on every failure unregisters the region: left registered it would stay, and
  // count against this uid's share of regions, until this process exits.
  auto unregister_on_error = [&](error e) -> tl::unexpected<error> {
    release_regions(*raw_, {region.region_id});
    return tl::unexpected(std::move(e));
  };
  auto fd = take_fd(region_reply, "register a region");
  if (!fd) return unregister_on_error(fd.error());
  if (auto written = write_canonical(bundle, fd->get(), options.progress); !written)
    return unregister_on_error(written.error());
  auto slab = memory::shared_memory::adopt(std::move(*fd), idx.total_size(), /*writable=*/true);
  if (!slab) return unregister_on_error(slab.error());
  auto memory = std::make_shared<memory::shared_memory>(std::move(*slab));

  // 2. Begin → Feed (one storage per distinct (offset, size), aliases, segments) → Commit.
  wc::begin_args begin;
  begin.plan = wc::begin_plan::lease_in_place;
  begin.device_id = -1;
  begin.total_size = idx.total_size();
  begin.ttl_ms = ttl_ms;
  begin.owner_pid = own_pid();
  begin.client_artifact_id = options.client_artifact_id;
  auto begun = raw_->call(wc::begin_request(begin));
  if (!begun) return unregister_on_error(begun.error());
  const std::string registration_id = wc::registration_id_of(begun->response);

  const auto feed = wc::whole_region_lease_feed(registration_id, idx, region);
  std::vector<wc::v2::FeedRegisterArtifactStreamRequest> frames;
  frames.push_back(wc::feed_frame(feed));
  auto fed = raw_->feed(std::move(frames));
  auto committed =
      fed ? raw_->call(wc::commit_request(registration_id, options.hash_in_background)) : tl::unexpected(fed.error());
  if (!committed) {
    static_cast<void>(raw_->call(wc::revoke_request(registration_id, {})));
    return unregister_on_error(committed.error());
  }
  const auto commit = wc::commit_of(committed->response);
  registered info{commit.descriptor, commit.existed, registration_id, seconds_since(started)};
  info.hash = commit.hash;
  return lease_access::make(raw_, std::move(info), {region.region_id}, std::move(memory), ttl_ms);
}

result<hash_status> connection::wait_artifact_hash(std::string_view artifact_id, std::chrono::milliseconds timeout) {
  // 0 on the wire means no limit; a positive timeout is at least 1 ms and at most the wire's.
  std::uint32_t ms = 0;
  if (timeout.count() > 0) {
    ms = static_cast<std::uint32_t>(std::clamp<std::int64_t>(timeout.count(), 1, 0xffffffffLL));
  }
  TENSORREG_TRY_ASSIGN(auto r, raw_->call(wc::wait_hash_request(artifact_id, ms)));
  return wc::hash_status_of(r.response);
}

result<artifact_index> connection::index(std::string_view artifact_id) {
  TENSORREG_TRY_ASSIGN(auto r, raw_->call(wc::index_request(artifact_id)));
  return wc::index_of(r.response);
}

result<stable_replica> connection::get(std::string_view artifact_id) {
  TENSORREG_TRY_ASSIGN(auto r, raw_->call(wc::memfd_request(artifact_id)));
  auto answer = wc::memfd_of(r.response);
  const std::string what = "get " + std::string(artifact_id);
  TENSORREG_TRY_ASSIGN(auto fd, take_fd(r, what));
  auto mapped = memory::shared_memory::adopt(std::move(fd), answer.size_bytes, /*writable=*/false);
  if (!mapped) {
    return fail(errc::data_loss, "cannot " + what + ": cannot map its replica of " + std::to_string(answer.size_bytes) +
                                     " bytes: " + mapped.error().message);
  }
  return stable_replica{std::move(answer.descriptor), std::move(answer.index_json), std::move(*mapped)};
}

result<device_layout> connection::open_device(std::string_view artifact_id) {
  const std::string what = "open " + std::string(artifact_id);
  std::optional<wc::device_page> body;
  std::uint32_t first = 0;
  for (;;) {
    TENSORREG_TRY_ASSIGN(auto answer, raw_->call(wc::open_device_request(artifact_id, first)));
    TENSORREG_TRY_ASSIGN(auto page, wc::device_page_of(answer.response, what));
    if (body) {
      const auto same = [](const device_allocation& a, const device_allocation& b) {
        return a.device_uuid == b.device_uuid && a.size_bytes == b.size_bytes;
      };
      if (!std::equal(page.layout.allocations.begin(), page.layout.allocations.end(), body->layout.allocations.begin(),
                      body->layout.allocations.end(), same)) {
        return fail(errc::aborted, "cannot " + what + ": its GPU memory changed while it was being opened; try again");
      }
    }
    auto& target = body ? body->layout : page.layout;
    const std::size_t count = target.allocations.size();
    const std::uint32_t end = page.end_allocation;
    for (std::size_t k = first; k < std::min<std::size_t>(end, count); ++k) {
      if (!page.is_vmm[k]) continue;
      const auto& indices = page.chunk_fd_index[k];
      auto& chunks = target.allocations[k].vmm_chunks;
      for (std::size_t c = 0; c < indices.size(); ++c) {
        if (indices[c] >= answer.fds.size()) {
          return fail(errc::data_loss, "cannot " + what + ": allocation " + std::to_string(k) + " names fd #" +
                                           std::to_string(indices[c]) + ", but the answer carried " +
                                           std::to_string(answer.fds.size()) + " fds");
        }
        chunks[c].fd = unique_fd(::dup(answer.fds[indices[c]].get()));
        if (!chunks[c].fd) return fail(errc::resource_exhausted, "cannot " + what + ": cannot duplicate a VMM fd");
      }
    }
    if (!body) body = std::move(page);
    if (end >= count) return std::move(body->layout);
    if (end <= first) {
      return fail(errc::data_loss, "cannot " + what + ": the daemon's answer for allocations from " +
                                       std::to_string(first) + " made no progress");
    }
    first = end;
  }
}

result<std::vector<artifact_info>> connection::list() {
  TENSORREG_TRY_ASSIGN(auto r, raw_->call(wc::list_request()));
  return wc::list_of(r.response);
}

result<std::vector<assembly_status>> connection::assemblies() {
  TENSORREG_TRY_ASSIGN(auto r, raw_->call(wc::list_request()));
  return wc::assemblies_of(r.response);
}

result<daemon_listing> connection::listing() {
  TENSORREG_TRY_ASSIGN(auto r, raw_->call(wc::list_request()));
  return daemon_listing{wc::list_of(r.response), wc::assemblies_of(r.response)};
}

result<publish_result> connection::publish(std::string_view artifact_id, std::uint32_t replicas, bool all,
                                           std::chrono::milliseconds timeout) {
  std::uint32_t ms = 0;  // the daemon's default
  if (timeout.count() > 0) {
    ms = static_cast<std::uint32_t>(std::clamp<std::int64_t>(timeout.count(), 1, 0xffffffffLL));
  }
  TENSORREG_TRY_ASSIGN(auto r, raw_->call(wc::publish_request(artifact_id, replicas, all, ms)));
  return wc::publish_of(r.response);
}

result<daemon_stats> connection::stats() {
  TENSORREG_TRY_ASSIGN(auto r, raw_->call(wc::stats_request()));
  return wc::stats_of(r.response);
}

status connection::revoke(std::string_view registration_id, std::string_view reason) {
  TENSORREG_TRY(raw_->call(wc::revoke_request(registration_id, reason)));
  return {};
}

result<bool> connection::revoke_if_held(std::string_view registration_id, std::string_view reason) {
  TENSORREG_TRY_ASSIGN(auto r, raw_->call(wc::revoke_request(registration_id, reason)));
  return r.response.revoke_registered_artifact().revoked();
}

status connection::abort(std::string_view registration_id) {
  TENSORREG_TRY(raw_->call(wc::abort_request(registration_id)));
  return {};
}

result<persistence::task_status> connection::start_persistence(std::string_view artifact_id,
                                                               const persistence_options& options) {
  std::optional<policy::profile> profile;
  if (!options.profile.empty()) {
    TENSORREG_TRY_ASSIGN(profile, policy::parse_profile(options.profile));
  }
  TENSORREG_TRY_ASSIGN(auto r, raw_->call(wc::start_persistence_request(artifact_id, profile, options.key_hint)));
  return wc::persistence_of(r.response, artifact_id);
}

result<persistence::task_status> connection::query_persistence(std::string_view task_id) {
  if (task_id.empty()) return fail(errc::invalid_argument, "cannot query a persistence task: the task id is empty");
  TENSORREG_TRY_ASSIGN(auto r, raw_->call(wc::query_persistence_request(task_id, {})));
  return wc::persistence_of(r.response);
}

result<persistence::task_status> connection::query_persistence_of(std::string_view artifact_id) {
  if (artifact_id.empty()) {
    return fail(errc::invalid_argument, "cannot query the persistence of an artifact: the artifact id is empty");
  }
  TENSORREG_TRY_ASSIGN(auto r, raw_->call(wc::query_persistence_request({}, artifact_id)));
  return wc::persistence_of(r.response);
}

result<persistence::task_status> connection::wait_persistence(std::string_view task_id,
                                                              std::chrono::milliseconds timeout) {
  if (task_id.empty()) return fail(errc::invalid_argument, "cannot wait for a persistence task: the task id is empty");
  // 0 on the wire means no limit; a positive timeout is at least 1 ms and at most the wire's.
  std::uint32_t ms = 0;
  if (timeout.count() > 0) {
    ms = static_cast<std::uint32_t>(std::clamp<std::int64_t>(timeout.count(), 1, 0xffffffffLL));
  }
  TENSORREG_TRY_ASSIGN(auto r, raw_->call(wc::wait_persistence_request(task_id, ms)));
  return wc::persistence_of(r.response);
}

result<deregister_result> connection::deregister(std::string_view artifact_id, bool wait_for_drain) {
  TENSORREG_TRY_ASSIGN(auto r, raw_->call(wc::deregister_request(artifact_id, wait_for_drain, own_pid())));
  return wc::deregister_of(r.response);
}

status write_to_memfd(int fd, std::span<const std::byte> bytes, std::uint64_t offset) {
  while (!bytes.empty()) {
    const ssize_t n = ::pwrite(fd, bytes.data(), bytes.size(), static_cast<off_t>(offset));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      const int e = n < 0 ? errno : ENOSPC;
      return fail(errc_of_errno(e, errc::resource_exhausted), "cannot write " + std::to_string(bytes.size()) +
                                                                  " bytes at offset " + std::to_string(offset) +
                                                                  " of the daemon's memfd: " + std::strerror(e));
    }
    bytes = bytes.subspan(static_cast<std::size_t>(n));
    offset += static_cast<std::uint64_t>(n);
  }
  return {};
}

}  // namespace tensorreg::client
