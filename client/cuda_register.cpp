#include "client/cuda_register.hpp"

#include <unistd.h>

#include <chrono>

#include "client/access.hpp"
#include "client/wire_convert.hpp"

namespace tensorreg::client {

namespace detail {

namespace {

namespace wc = wire_convert;
using clock_type = std::chrono::steady_clock;

double ms_between(clock_type::time_point a, clock_type::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}

}  // namespace

result<lease> register_cuda_tensors(const std::shared_ptr<raw::connection>& raw, cuda_driver& driver,
                                    const cuda_device& device, std::span<const cuda_tensor> tensors,
                                    const cuda_register_options& options) {
  constexpr std::string_view what = "register CUDA tensors";
  cuda_register_report report;
  const auto pid = static_cast<std::int32_t>(::getpid());

  // 1. index: the descriptions, the canonical layout, each storage's canonical place.
  const auto t_index = clock_type::now();
  TENSORREG_TRY_ASSIGN(auto layout, plan_layout(tensors, what));
  report.storages = layout.canonical_storages.size();

  // 2. driver: the allocations behind the storages and the regions.
  const auto t_driver = clock_type::now();
  TENSORREG_TRY_ASSIGN(auto plan, plan_device(driver, layout.storages, what));
  report.allocations = plan.allocations.size();
  report.regions = plan.regions.size();
  report.lone_handles = plan.lone_handles;

  // 3. messages: a RegisterRegion per region (its VMM page fds exported), the Begin, the Feed.
  const auto t_messages = clock_type::now();
  std::vector<wc::wire::Request> region_requests;
  std::vector<std::vector<unique_fd>> region_fds(plan.regions.size());
  for (std::size_t r = 0; r < plan.regions.size(); ++r) {
    const auto& region = plan.regions[r];
    wc::region_args args;
    args.owner_pid = pid;
    args.size_bytes = region.size;
    args.device_id = device.ordinal;
    args.device_uuid = device.uuid;
    args.cuda_ipc_handle = region.ipc_handle;
    for (const auto& page : region.pages) {
      args.vmm_chunk_bytes.push_back(page.size);
      TENSORREG_TRY_ASSIGN(auto fd, driver.export_fd(*page.vmm_handle));
      region_fds[r].push_back(std::move(fd));
    }
    region_requests.push_back(wc::register_region_request(args));
  }
  wc::begin_args begin_args;
  begin_args.plan = wc::begin_plan::lease_in_place;
  begin_args.device_id = device.ordinal;
  begin_args.device_uuid = device.uuid;
  begin_args.total_size = layout.index.total_size();
  begin_args.ttl_ms = options.ttl_ms;
  begin_args.owner_pid = pid;
  begin_args.client_artifact_id = options.client_artifact_id;
  auto begin = wc::begin_request(begin_args);
  for (const auto& request : region_requests) report.request_bytes += wc::wire_size(request);
  report.request_bytes += wc::wire_size(begin);

  registration::feed_request feed;
  registration::lease_segments segments;
  feed.storage_entries.reserve(layout.canonical_storages.size());
  segments.segments.reserve(layout.canonical_storages.size());
  std::vector<std::string> ids(layout.canonical_storages.size());
  for (std::size_t c = 0; c < layout.canonical_storages.size(); ++c) {
    const std::size_t k = layout.canonical_storages[c];
    ids[c] = "s" + std::to_string(c);
    const auto& src = plan.sources[k];
    registration::storage_entry e;
    e.storage_id = ids[c];
    e.device_id = device.ordinal;
    e.storage_length = layout.storages[k].nbytes;
    if (!src.region) e.source = registration::cuda_ipc_source{src.ipc_handle};  // regions: after the answers
    e.mapping_base_offset = src.mapping_base_offset;
    feed.storage_entries.push_back(std::move(e));
    segments.segments.push_back({ids[c], 0, layout.canonical_offsets[c], layout.storages[k].nbytes});
  }
  feed.payload = std::move(segments);
  const auto& entries = layout.index.entries();
  feed.tensor_aliases.reserve(entries.size());
  for (std::size_t i = 0; i < entries.size(); ++i) {
    const auto& e = entries[i];
    feed.tensor_aliases.push_back({e.name, ids[layout.alias_storage[i]], static_cast<std::uint64_t>(e.storage_offset),
                                   layout.logical_lengths[i], e.shape, e.stride, e.dtype});
  }
  const auto t_rpc = clock_type::now();

  // 4. rpc: the regions (one at a time: no pipelining here), then Begin.
  std::vector<std::string> region_ids;
  std::vector<registration::region_ref_source> refs;
  std::string registration_id;
  const auto release_all = [&](error e) -> tl::unexpected<error> {
    if (!registration_id.empty()) static_cast<void>(raw->call(wc::revoke_request(registration_id, {})));
    release_regions(*raw, region_ids);
    return tl::unexpected(std::move(e));
  };
  for (std::size_t r = 0; r < region_requests.size(); ++r) {
    std::vector<int> fds;
    for (const auto& fd : region_fds[r]) fds.push_back(fd.get());
    auto answer = raw->call(std::move(region_requests[r]), fds);
    if (!answer) return release_all(answer.error());
    refs.push_back(wc::region_of(answer->response));
    region_ids.push_back(refs.back().region_id);
  }
  region_fds.clear();  // the daemon holds its own references now
  const auto t_begin = clock_type::now();
  {
    auto answer = raw->call(std::move(begin));
    if (!answer) return release_all(answer.error());
    registration_id = wc::registration_id_of(answer->response);
  }
  const auto t_patch = clock_type::now();

  // (messages, continued) the region refs and the registration id, then the Feed frame.
  feed.registration_id = registration_id;
  for (std::size_t c = 0; c < layout.canonical_storages.size(); ++c) {
    const auto& src = plan.sources[layout.canonical_storages[c]];
    if (src.region) feed.storage_entries[c].source = refs[*src.region];
  }
  std::vector<wc::v2::FeedRegisterArtifactStreamRequest> frames;
  frames.push_back(wc::feed_frame(feed, device.uuid));
  report.feed_bytes = wc::wire_size(frames.front());
  const auto t_feed = clock_type::now();

  // (rpc, continued) the Feed stream.
  if (auto fed = raw->feed(std::move(frames)); !fed) return release_all(fed.error());
  const auto t_commit = clock_type::now();

  // 5. commit.
  auto committed = raw->call(wc::commit_request(registration_id, options.hash_in_background));
  const auto t_done = clock_type::now();
  if (!committed) return release_all(committed.error());
  const auto commit = wc::commit_of(committed->response);

  report.index_ms = ms_between(t_index, t_driver);
  report.driver_ms = ms_between(t_driver, t_messages);
  report.messages_ms = ms_between(t_messages, t_rpc) + ms_between(t_patch, t_feed);
  report.rpc_regions_ms = ms_between(t_rpc, t_begin);
  report.rpc_begin_ms = ms_between(t_begin, t_patch);
  report.rpc_feed_ms = ms_between(t_feed, t_commit);
  report.commit_ms = ms_between(t_commit, t_done);
  if (options.report != nullptr) *options.report = report;
  registered info{commit.descriptor, commit.existed, registration_id, ms_between(t_begin, t_done) / 1000.0};
  info.hash = commit.hash;
  return lease_access::make(raw, std::move(info), std::move(region_ids), nullptr, options.ttl_ms);
}

}  // namespace detail

bool connection::cuda_supported() noexcept { return detail::have_cuda_driver(); }

result<lease> connection::register_cuda(std::span<const cuda_tensor> tensors, const cuda_register_options& options) {
  TENSORREG_TRY_ASSIGN(auto opened, detail::open_cuda_driver(options.device));
  return detail::register_cuda_tensors(raw_, *opened.driver, opened.device, tensors, options);
}

}  // namespace tensorreg::client
