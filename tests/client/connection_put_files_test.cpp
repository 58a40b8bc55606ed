// A put from files (docs/wire-format.md §18) against a real tensorregd on a fresh socket: the
// client hands its file's read-only fd over with the Begin, the daemon reads, copies and hashes
// it in one pass. The same id as the offline index; held content hashed and not copied; files
// that change under the put and fds that are not regular files refused with clear errors.
#include "tensorreg/client/connection.hpp"

#include <catch2/catch.hpp>

#include <fcntl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <thread>

#include "client/raw_connection.hpp"
#include "client/wire_convert.hpp"
#include "support/client_helpers.hpp"
#include "support/daemon_process.hpp"
#include "support/safetensors_writer.hpp"
#include "support/temp_dir.hpp"

namespace {

using namespace tensorreg;
using client::connection;
using testing::connect;
using testing::daemon_process;
using testing::offline_id;
namespace wc = client::wire_convert;

// Several 4 MiB leaves and PAD between tensors of odd sizes.
std::filesystem::path leafy_model(const testing::temp_dir& dir, std::uint32_t seed) {
  const auto path = dir.path() / ("model-" + std::to_string(seed) + ".safetensors");
  testing::write_safetensors(path,
                             {{"a", "BF16", {3}, testing::pattern_bytes(6, seed)},
                              {"big", "F32", {(9 << 20) / 4 + 3}, testing::pattern_bytes((9 << 20) + 12, seed + 1)},
                              {"b", "U8", {5}, testing::pattern_bytes(5, seed + 2)},
                              {"big2", "F32", {(5 << 20) / 4}, testing::pattern_bytes(5 << 20, seed + 3)}});
  return path;
}

std::unique_ptr<index::safetensors_bundle> open_bundle(const std::filesystem::path& path) {
  return index::safetensors_bundle::open({path.string()}).value();
}

std::uint64_t tensor_bytes(const index::safetensors_bundle& bundle) {
  std::uint64_t n = 0;
  memory::for_each_leaf(bundle.canonical(), 0, bundle.canonical().size(), 0,
                        [&](const memory::byte_source&, std::uint64_t, std::uint64_t size, std::uint64_t) {
                          n += size;
                          return true;
                        });
  return n;
}

// The daemon's replica of `artifact_id` holds exactly `bundle`'s canonical bytes.
void check_replica(connection& c, const std::string& artifact_id, const index::safetensors_bundle& bundle) {
  auto replica = c.get(artifact_id);
  REQUIRE(replica);
  std::vector<std::byte> expected(bundle.index().total_size());
  REQUIRE(bundle.canonical().read(0, expected));
  REQUIRE(replica->memory.size() == expected.size());
  CHECK(std::memcmp(replica->memory.bytes().data(), expected.data(), expected.size()) == 0);
}

// Whether this process holds an fd of a daemon publish memfd (the memfd path hands one out).
bool holds_publish_memfd() {
  for (const auto& entry : std::filesystem::directory_iterator("/proc/self/fd")) {
    std::error_code ec;
    if (std::filesystem::read_symlink(entry.path(), ec).string().starts_with("/memfd:tensorreg-publish")) return true;
  }
  return false;
}

// A Begin of a put from files for `bundle`'s layout, its segments as given.
wire::v1::Request begin_from_files(const index::safetensors_bundle& bundle,
                                   std::vector<registration::file_segment> segments) {
  wc::begin_args begin;
  begin.plan = wc::begin_plan::stable_dram;
  begin.total_size = bundle.index().total_size();
  begin.ttl_ms = 30000;
  begin.owner_pid = static_cast<std::int32_t>(::getpid());
  begin.index_json = bundle.index().json();
  begin.file_segments = std::move(segments);
  return wc::begin_request(begin);
}

// The segments the client would send: each tensor's bytes in the file, in canonical order.
std::vector<registration::file_segment> segments_of(const index::safetensors_bundle& bundle) {
  std::vector<registration::file_segment> out;
  memory::for_each_leaf(bundle.canonical(), 0, bundle.canonical().size(), 0,
                        [&](const memory::byte_source&, std::uint64_t offset, std::uint64_t size, std::uint64_t at) {
                          out.push_back({0, offset, at, size});
                          return true;
                        });
  return out;
}

std::shared_ptr<client::raw::connection> raw_connect(const daemon_process& d) {
  auto c = client::raw::connection::connect(d.socket_path());
  REQUIRE(c);
  return std::shared_ptr<client::raw::connection>(std::move(*c));
}

unique_fd open_read_only(const std::filesystem::path& path) {
  unique_fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  REQUIRE(fd);
  return fd;
}

// A Feed frame reporting bytes [0, 16) written, which a put from files has no use for.
wc::v2::FeedRegisterArtifactStreamRequest progress_frame(const std::string& registration_id) {
  registration::feed_request progress;
  progress.registration_id = registration_id;
  progress.payload = registration::stable_write_progress{{{0, 16}}, false};
  return wc::feed_frame(progress);
}

}  // namespace

TEST_CASE("client connection put from files: the offline id, the daemon copies once and hashes once, no memfd here",
          "[client][connection]") {
  daemon_process d;
  testing::temp_dir dir;
  auto bundle = open_bundle(leafy_model(dir, 1));
  auto c = connect(d);
  const auto before = c.stats().value();

  bool saw_publish_memfd = false;
  client::put_options options;
  options.progress = [&](std::uint64_t, std::uint64_t) {
    saw_publish_memfd = saw_publish_memfd || holds_publish_memfd();
  };
  auto put = c.put(*bundle, options);
  REQUIRE(put);
  CHECK_FALSE(put->existed);
  CHECK(put->registration_id.starts_with("reg"));
  CHECK(put->descriptor.artifact_id == offline_id(*bundle));
  CHECK_FALSE(saw_publish_memfd);

  // The daemon copied the tensor bytes (not the PAD) once and hashed the whole buffer once.
  const auto after = c.stats().value();
  CHECK(after.bytes_copied - before.bytes_copied == tensor_bytes(*bundle));
  CHECK(after.bytes_hashed - before.bytes_hashed == bundle->index().total_size());
  CHECK(after.pending_registrations == 0);

  check_replica(c, put->descriptor.artifact_id, *bundle);

  // The memfd path gives the same id.
  client::put_options copying;
  copying.hand_over_files = false;
  auto copied = c.put(*bundle, copying);
  REQUIRE(copied);
  CHECK(copied->existed);
  CHECK(copied->descriptor.artifact_id == put->descriptor.artifact_id);
}

TEST_CASE("client connection put from files: a daemon with a populated reserve puts into it and says so",
          "[client][connection]") {
  daemon_process d({"--populated-reserve", std::to_string(16 << 20)});
  testing::temp_dir dir;
  auto bundle = open_bundle(leafy_model(dir, 3));
  auto c = connect(d);
  const auto reserve_ready = [&] {
    for (int i = 0; i < 1000; ++i) {
      if (c.stats().value().populated_reserve_bytes != 0) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    return false;
  };
  REQUIRE(reserve_ready());
  CHECK(c.stats().value().populated_reserve_bytes == 16u << 20);

  auto put = c.put(*bundle);
  REQUIRE(put);
  CHECK_FALSE(put->existed);
  CHECK(put->descriptor.artifact_id == offline_id(*bundle));
  // Taken by the put (the next one is made two seconds after it at the earliest).
  CHECK(c.stats().value().populated_reserve_bytes == 0);
  check_replica(c, put->descriptor.artifact_id, *bundle);
  REQUIRE(reserve_ready());  // made again once puts paused
}

TEST_CASE("client connection put from files: held content is hashed and not copied, a new version of its layout is",
          "[client][connection]") {
  daemon_process d;
  testing::temp_dir dir;
  auto first = open_bundle(leafy_model(dir, 1));
  auto other = open_bundle(leafy_model(dir, 9));  // the same layout (index), other bytes
  REQUIRE(first->index().json() == other->index().json());
  auto c = connect(d);
  REQUIRE(c.put(*first));

  const auto before = c.stats().value();
  auto again = c.put(*first);
  REQUIRE(again);
  CHECK(again->existed);
  const auto held = c.stats().value();
  CHECK(held.bytes_copied == before.bytes_copied);
  CHECK(held.bytes_hashed - before.bytes_hashed == first->index().total_size());
  CHECK(held.pending_registrations == 0);

  auto fresh = c.put(*other);
  REQUIRE(fresh);
  CHECK_FALSE(fresh->existed);
  CHECK(fresh->descriptor.artifact_id == offline_id(*other));
  const auto after = c.stats().value();
  CHECK(after.bytes_copied - held.bytes_copied == tensor_bytes(*other));
  check_replica(c, fresh->descriptor.artifact_id, *other);
}

TEST_CASE("client connection put from files: a file cut short or grown during the put fails cleanly, nothing kept",
          "[client][connection]") {
  daemon_process d;
  testing::temp_dir dir;
  const auto path = leafy_model(dir, 3);
  auto bundle = open_bundle(path);
  const auto segments = segments_of(*bundle);
  const auto file_size = std::filesystem::file_size(path);
  auto raw = raw_connect(d);
  auto c = connect(d);
  auto kept = c.put(*open_bundle(leafy_model(dir, 8)));
  REQUIRE(kept);

  SECTION("truncated after Begin: the read finds the end") {
    auto fd = open_read_only(path);
    const int fds[] = {fd.get()};
    auto begun = raw->call(begin_from_files(*bundle, segments), fds);
    REQUIRE(begun);
    std::filesystem::resize_file(path, file_size / 2);
    auto committed = raw->call(wc::commit_request(wc::registration_id_of(begun->response)));
    REQUIRE_FALSE(committed);
    CHECK(committed.error().code == errc::failed_precondition);
    CHECK_THAT(committed.error().message, Catch::Contains("cannot read the put's fd #0 at file offset") &&
                                              Catch::Contains("it was truncated after the put began"));
  }
  SECTION("grown after Begin: the size check after the read") {
    auto fd = open_read_only(path);
    const int fds[] = {fd.get()};
    auto begun = raw->call(begin_from_files(*bundle, segments), fds);
    REQUIRE(begun);
    std::ofstream(path, std::ios::app | std::ios::binary) << "more";
    auto committed = raw->call(wc::commit_request(wc::registration_id_of(begun->response)));
    REQUIRE_FALSE(committed);
    CHECK(committed.error().code == errc::failed_precondition);
    CHECK_THAT(committed.error().message,
               Catch::Contains("the file changed size during the put, from " + std::to_string(file_size) + " to " +
                               std::to_string(file_size + 4) + " bytes"));
  }
  // Nothing kept of the failed put, nothing pending, what was committed before still there,
  // and the daemon goes on serving puts.
  auto stats = c.stats();
  REQUIRE(stats);
  CHECK(stats->artifacts == 1);
  CHECK(stats->pending_registrations == 0);
  CHECK(c.get(kept->descriptor.artifact_id));
  auto next = c.put(*open_bundle(leafy_model(dir, 4)));
  REQUIRE(next);
  CHECK_FALSE(next->existed);
}

TEST_CASE("client connection put from files: fds that are not regular files open for reading are refused at Begin",
          "[client][connection]") {
  daemon_process d;
  testing::temp_dir dir;
  const auto path = leafy_model(dir, 5);
  auto bundle = open_bundle(path);
  auto raw = raw_connect(d);
  const auto refused = [&](int fd, const std::string& why) {
    const int fds[] = {fd};
    auto begun = raw->call(begin_from_files(*bundle, segments_of(*bundle)), fds);
    REQUIRE_FALSE(begun);
    CHECK(begun.error().code == errc::invalid_argument);
    CHECK_THAT(begun.error().message,
               Catch::Contains("cannot begin stable_dram registration from files: fd #0 " + why));
  };
  int pipe_fds[2];
  REQUIRE(::pipe2(pipe_fds, O_CLOEXEC) == 0);
  const unique_fd pipe_read(pipe_fds[0]), pipe_write(pipe_fds[1]);
  refused(pipe_read.get(), "is a pipe, not a regular file");
  int pair[2];
  REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pair) == 0);
  const unique_fd one(pair[0]), two(pair[1]);
  refused(one.get(), "is a socket, not a regular file");
  const unique_fd directory(::open(dir.path().c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  REQUIRE(directory);
  refused(directory.get(), "is a directory, not a regular file");
  const unique_fd write_only(::open(path.c_str(), O_WRONLY | O_CLOEXEC));
  REQUIRE(write_only);
  refused(write_only.get(), "is not open for reading");
  const unique_fd by_path(::open(path.c_str(), O_PATH | O_CLOEXEC));
  REQUIRE(by_path);
  refused(by_path.get(), "is not open for reading");
  auto stats = raw->call([] {
    wire::v1::Request r;
    r.mutable_get_stats();
    return r;
  }());
  REQUIRE(stats);
  CHECK(stats->response.get_stats().pending_registrations() == 0);
}

TEST_CASE("client connection put from files: segments must fit their files and cover exactly the tensor bytes",
          "[client][connection]") {
  daemon_process d;
  testing::temp_dir dir;
  const auto path = leafy_model(dir, 6);
  auto bundle = open_bundle(path);
  const auto good = segments_of(*bundle);
  REQUIRE(good.size() == 4);
  auto raw = raw_connect(d);
  auto fd = open_read_only(path);
  const auto refused = [&](std::vector<registration::file_segment> segments, std::size_t fd_count,
                           const std::string& why) {
    const std::vector<int> fds(fd_count, fd.get());
    auto begun = raw->call(begin_from_files(*bundle, std::move(segments)), fds);
    REQUIRE_FALSE(begun);
    CHECK(begun.error().code == errc::invalid_argument);
    CHECK_THAT(begun.error().message, Catch::Contains(why));
  };
  const auto file_size = std::filesystem::file_size(path);

  auto past_end = good;
  past_end.back().file_offset = file_size - past_end.back().length + 1;
  refused(past_end, 1, "past the file's " + std::to_string(file_size) + " bytes");
  auto missing = good;
  missing.erase(missing.begin() + 1);
  refused(missing, 1, "no segment covers canonical bytes [" + std::to_string(good[1].canonical_offset));
  auto padded = good;
  padded[0].length += 2;  // into the PAD after tensor "a"
  refused(padded, 1, "which are not all tensor data (padding must stay zero)");
  auto reversed = good;
  std::swap(reversed[0], reversed[1]);
  refused(reversed, 1, "overlaps the one before it or is out of canonical order");
  auto unknown_fd = good;
  unknown_fd[2].file = 1;
  refused(unknown_fd, 1, "arrived with a message that uses 2");
  refused(good, 2, "2 file descriptors arrived with a message that uses 1");

  // The same segments, right: the offline id; no Feed is taken meanwhile.
  const int fds[] = {fd.get()};
  auto begun = raw->call(begin_from_files(*bundle, good), fds);
  REQUIRE(begun);
  const auto registration_id = wc::registration_id_of(begun->response);
  CHECK_FALSE(begun->response.begin_register_artifact().stable_dram().has_publish_cpu_memfd());
  CHECK(begun->fds.empty());
  std::vector<wc::v2::FeedRegisterArtifactStreamRequest> frames;
  frames.push_back(progress_frame(registration_id));
  auto fed = raw->feed(std::move(frames));
  REQUIRE_FALSE(fed);
  CHECK(fed.error().code == errc::failed_precondition);
  auto committed = raw->call(wc::commit_request(registration_id));
  REQUIRE(committed);
  CHECK(wc::commit_of(committed->response).descriptor.artifact_id == offline_id(*bundle));
}

TEST_CASE("client raw feed: frames made as they are sent; a source that fails ends the stream first",
          "[client][connection]") {
  daemon_process d;
  testing::temp_dir dir;
  const auto path = leafy_model(dir, 2);
  auto bundle = open_bundle(path);
  auto raw = raw_connect(d);
  auto fd = open_read_only(path);
  const int fds[] = {fd.get()};
  auto begun = raw->call(begin_from_files(*bundle, segments_of(*bundle)), fds);
  REQUIRE(begun);
  const auto registration_id = wc::registration_id_of(begun->response);
  int made = 0;
  auto fed = raw->feed([&]() -> result<std::optional<wc::v2::FeedRegisterArtifactStreamRequest>> {
    if (++made == 3) return fail(errc::internal, "the source broke");
    return progress_frame(registration_id);
  });
  REQUIRE_FALSE(fed);
  CHECK(fed.error().code == errc::internal);
  CHECK(fed.error().message == "the source broke");
  CHECK(made == 3);
  // The stream was ended and answered: the connection goes on with the next request.
  auto committed = raw->call(wc::commit_request(registration_id));
  REQUIRE(committed);
  CHECK(wc::commit_of(committed->response).descriptor.artifact_id == offline_id(*bundle));
}
