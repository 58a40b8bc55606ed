// connection's view calls (registration.md §7): register_view, register_piece, view, get_view.
//
// Begin goes first, so that every rule of §7 is the daemon's check with its status; only then
// are view bytes made (gathered from the replica by a local view_plan of the same request) and
// written into the staging memfd the Begin answer hands out, 4 MiB at a time, each batch
// reported in one Feed stream as it is written, so that the daemon copies them out as they come.
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <functional>
#include <thread>

#include "client/access.hpp"
#include "client/raw_connection.hpp"
#include "client/wire_convert.hpp"
#include "tensorreg/client/connection.hpp"
#include "tensorreg/index/canonical_index.hpp"
#include "tensorreg/views/scatter.hpp"

namespace tensorreg::client {

namespace {

namespace wc = wire_convert;

// View bytes written into the staging memfd between two progress reports.
constexpr std::uint64_t staged_bytes = std::uint64_t{4} << 20;

// View bytes [at, at + n): gathered into a buffer of the caller's, or a span of bytes it holds
// already.
using fill_fn = std::function<result<std::span<const std::byte>>(std::uint64_t at, std::uint64_t n)>;

// Writes view bytes [0, size), made by fill(view_offset, n), into the staging memfd `fd`,
// reporting each batch in one Feed stream as soon as it is written (wire-format.md §16): the
// daemon copies one batch out while the next is written.
status stage_view(raw::connection& raw, const std::string& registration_id, int fd, std::uint64_t size,
                  const fill_fn& fill) {
  std::uint64_t at = 0;
  const auto next = [&]() -> result<std::optional<wc::v2::FeedRegisterArtifactStreamRequest>> {
    if (at >= size) return std::nullopt;
    TENSORREG_TRY_ASSIGN(const auto bytes, fill(at, std::min(staged_bytes, size - at)));
    TENSORREG_TRY(write_to_memfd(fd, bytes, at));
    registration::feed_request progress;
    progress.registration_id = registration_id;
    progress.payload = registration::stable_write_progress{{{at, bytes.size()}}, false};
    at += bytes.size();
    return wc::feed_frame(progress);
  };
  TENSORREG_TRY(raw.feed(next));
  return {};
}

// Commit; again, backing off, while the daemon answers that bytes of this piece lie in the claim
// of a piece that has not committed yet (docs/registration.md §7.11): until that one has
// committed or ended, for at most the registration's TTL (600 s when it has none).
result<raw::connection::reply> commit_when_free(raw::connection& raw, const std::string& registration_id,
                                                std::uint32_t ttl_ms) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(ttl_ms != 0 ? ttl_ms : 600'000);
  auto pause = std::chrono::milliseconds(1);
  for (;;) {
    auto committed = raw.call(wc::commit_request(registration_id));
    if (committed || committed.error().code != errc::failed_precondition ||
        committed.error().message.find("which has not committed yet") == std::string::npos ||
        std::chrono::steady_clock::now() + pause > deadline) {
      return committed;
    }
    std::this_thread::sleep_for(pause);
    pause = std::min(pause * 2, std::chrono::milliseconds(50));
  }
}

// Begin → (SERVER: view bytes from `fill` into the staging memfd; CLIENT: the canonical bytes
// into the publish memfd)
// → Commit, aborting on failure.
// `view_size` runs once the daemon has accepted the Begin (so its status, not a local check's,
// answers a bad request).
result<view_registered> run_view(raw::connection& raw, const wc::begin_args& begin,
                                 const std::function<result<std::uint64_t>()>& view_size, const fill_fn& fill,
                                 std::span<const std::byte> canonical) {
  TENSORREG_TRY_ASSIGN(auto begun, raw.call(wc::begin_request(begin)));
  const std::string registration_id = wc::registration_id_of(begun.response);
  auto abort_on_error = [&](error e) -> tl::unexpected<error> {
    static_cast<void>(raw.call(wc::abort_request(registration_id)));
    return tl::unexpected(std::move(e));
  };
  if (begun.fds.empty()) {
    return abort_on_error(error{errc::data_loss, "cannot register view: the daemon sent no memfd"});
  }
  if (begin.view->place == views::placement::client) {
    if (auto written = write_to_memfd(begun.fds.front().get(), canonical, 0); !written) {
      return abort_on_error(written.error());
    }
    begun.fds.clear();
    registration::feed_request progress;
    progress.registration_id = registration_id;
    progress.payload = registration::stable_write_progress{{{0, canonical.size()}}, true};
    std::vector<wc::v2::FeedRegisterArtifactStreamRequest> frames;
    frames.push_back(wc::feed_frame(progress));
    if (auto fed = raw.feed(std::move(frames)); !fed) return abort_on_error(fed.error());
  } else {
    auto size = view_size();
    if (!size) return abort_on_error(size.error());
    if (auto sent = stage_view(raw, registration_id, begun.fds.front().get(), *size, fill); !sent) {
      return abort_on_error(sent.error());
    }
    begun.fds.clear();
  }
  auto committed = commit_when_free(raw, registration_id, begin.ttl_ms);
  if (!committed) return abort_on_error(committed.error());
  return wc::view_commit_of(committed->response, registration_id);
}

}  // namespace

result<view_registered> connection::register_view(std::string_view artifact_id, const view_options& options) {
  TENSORREG_TRY_ASSIGN(const auto replica, get(artifact_id));
  auto parsed = index::canonical_index::parse(replica.index_json, replica.descriptor.total_size);
  if (!parsed) {
    return fail(errc::data_loss, "cannot register view of " + std::string(artifact_id) +
                                     ": its index does not parse: " + parsed.error().message);
  }
  const auto& canonical = *parsed;
  views::view_request request;
  request.view_id = options.view_id;
  request.spec = options.spec;
  request.tensor_names = options.tensor_names;
  if (request.tensor_names.empty()) {
    for (const auto& e : canonical.entries()) {
      if (!request.spec.contains(e.name)) request.tensor_names.push_back(e.name);
    }
  }
  request.place = options.place;
  request.kind = views::registration_kind::canonical;
  request.staging_memfd = request.place == views::placement::server;
  wc::begin_args begin;
  begin.plan = wc::begin_plan::stable_dram;
  begin.total_size = canonical.total_size();
  begin.ttl_ms = default_ttl_ms;
  begin.owner_pid = static_cast<std::int32_t>(::getpid());
  begin.index_json = replica.index_json;
  begin.view = &request;
  const auto bytes = replica.memory.bytes().first(static_cast<std::size_t>(canonical.total_size()));
  std::optional<views::view_plan> plan;
  const auto view_size = [&]() -> result<std::uint64_t> {
    TENSORREG_TRY_ASSIGN(plan, views::view_plan::create(request, canonical, {canonical.total_size(), false}));
    return plan->view_size();
  };
  std::vector<std::byte> scratch;
  const fill_fn fill = [&](std::uint64_t at, std::uint64_t n) -> result<std::span<const std::byte>> {
    scratch.resize(static_cast<std::size_t>(n));
    TENSORREG_TRY(views::gather(*plan, bytes, at, scratch));
    return scratch;
  };
  return run_view(*raw_, begin, view_size, fill, bytes);
}

result<view_registered> connection::register_piece(const piece_options& options,
                                                   std::span<const std::byte> view_bytes) {
  auto parsed = index::canonical_index::parse(options.canonical_index_json, std::nullopt);
  if (!parsed) {
    return fail(errc::invalid_argument, "cannot register piece of " + options.cgid +
                                            ": its canonical index does not parse: " + parsed.error().message);
  }
  views::view_request request;
  request.view_id = options.view_id;
  request.spec = options.spec;
  request.tensor_names = options.tensor_names;
  request.place = views::placement::server;
  request.kind = views::registration_kind::piece;
  request.staging_memfd = true;
  request.canonical_size_bytes = parsed->total_size();
  wc::begin_args begin;
  begin.plan = wc::begin_plan::stable_dram;
  begin.total_size = view_bytes.size();
  begin.ttl_ms = options.ttl_ms;
  begin.owner_pid = static_cast<std::int32_t>(::getpid());
  begin.index_json = parsed->json();
  begin.client_artifact_id = options.cgid;
  begin.view = &request;
  const fill_fn fill = [&](std::uint64_t at, std::uint64_t n) -> result<std::span<const std::byte>> {
    return view_bytes.subspan(static_cast<std::size_t>(at),
                              static_cast<std::size_t>(n));  // written from where they are
  };
  const auto view_size = [&]() -> result<std::uint64_t> { return view_bytes.size(); };
  return run_view(*raw_, begin, view_size, fill, {});
}

result<artifact_view> connection::view(std::string_view artifact_id, std::string_view view_id) {
  TENSORREG_TRY_ASSIGN(auto r, raw_->call(wc::view_request(artifact_id, view_id)));
  return wc::view_of(r.response.get_artifact_index_by_id().view());
}

result<view_bytes> connection::get_view(std::string_view artifact_id, std::string_view view_id) {
  TENSORREG_TRY_ASSIGN(auto record, view(artifact_id, view_id));
  TENSORREG_TRY_ASSIGN(const auto replica, get(artifact_id));
  const std::string what = "cannot read view " + std::string(view_id) + " of " + std::string(artifact_id) + ": ";
  auto parsed = index::canonical_index::parse(replica.index_json, replica.descriptor.total_size);
  if (!parsed) return fail(errc::data_loss, what + "its index does not parse: " + parsed.error().message);
  views::view_request request;
  request.spec = record.spec;
  request.place = record.place;
  request.kind = record.kind;
  views::registration_facts facts{parsed->total_size(), false};
  if (record.kind == views::registration_kind::piece) {
    request.canonical_size_bytes = parsed->total_size();
    facts = {record.view_size, true};
  }
  auto plan = views::view_plan::create(request, *parsed, facts);
  if (!plan) return fail(errc::data_loss, what + plan.error().message);
  view_bytes out{std::move(record), std::vector<std::byte>(static_cast<std::size_t>(plan->view_size()))};
  const auto canonical = replica.memory.bytes().first(static_cast<std::size_t>(parsed->total_size()));
  if (auto gathered = views::gather(*plan, canonical, 0, out.bytes); !gathered) {
    return fail(errc::data_loss, what + gathered.error().message);
  }
  return out;
}

}  // namespace tensorreg::client
