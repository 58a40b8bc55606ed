"""The register flows: a lease in place of a state dict, its regions, its Feed and its commit.

- CPU tensors (`register_host`): the daemon cannot read this process's memory, so a
  daemon-managed HOST_SHARED region is registered, the canonical bytes are copied into its memfd
  once, and the lease's storages are fed from that region (as daemon/client.cpp
  store::register_lease does).
- CUDA tensors (`CudaRegistration`): leased where they are. The allocations behind the storages
  are planned (_device.plan: an IPC handle per cudaMalloc block, VMM pages as POSIX fds), their
  regions sent pipelined, and while the daemon imports them this process builds the
  description, the canonical layout, the Begin (which needs total_size) and the Feed; the
  Feed's region refs are filled in from the answers.

A failure after anything was made in the daemon releases it (revoke, then unregister), and the
storages stay referenced by the Lease for as long as it lives, so the caching allocator cannot
hand their memory to other tensors meanwhile.

Thread-safety: each flow runs one register over the given connection (which serialises
calls); a CudaRegistration is used once, by one thread.
"""

from __future__ import annotations

import os
import time

from . import _buffers, _cuda, _device, _layout, _requests
from ._artifact import RegisteredArtifact
from ._leases import Lease, release_now
from ._put import commit
from ._torch import module as _torch
from ._wire import Connection, _close_fds
from .errors import DataLoss, Error, FailedPrecondition, InvalidArgument

WHAT = "register state dict"


def register(conn: Connection, state_dict, ttl_ms: int, client_artifact_id: str | None,
             policy: str | None, hash_in_background: bool = False) -> RegisteredArtifact:
    """Store.register: checks everything it can before any call, then runs the flow of the
    tensors' device. The result's lease is live (and owns the storages)."""
    started = time.perf_counter()
    torch = _torch()
    items, storages, device = _layout.state_dict_storages(torch, state_dict, WHAT)
    cuda = device.startswith("cuda")
    if cuda:  # described and laid out later, while the daemon maps the regions
        _layout.check([name for name, _ in items], [s[2] for s in storages])
    else:
        layout = _layout.build(_layout.describe(items, storages))
    profile = _requests.policy_profile(policy, WHAT)
    if not isinstance(ttl_ms, int) or not 0 <= ttl_ms < 2**32:
        raise InvalidArgument(f"cannot register state dict: ttl_ms {ttl_ms!r} is not a uint32")
    begin = _requests.lease_begin(ttl_ms, client_artifact_id, profile)
    if cuda:
        return CudaRegistration(conn, torch, items, storages, torch.device(device), begin).run(
            ttl_ms, started, hash_in_background)
    begin.begin_register_artifact.total_size = layout.total_size
    return register_host(conn, torch, layout, begin, ttl_ms, started, hash_in_background)


def register_host(conn: Connection, torch, layout, begin, ttl_ms: int, started: float,
                  hash_in_background: bool = False) -> RegisteredArtifact:
    """LIP of CPU tensors: RegisterRegion (HOST_SHARED) → copy into its memfd → Begin → Feed →
    Commit."""
    request = _requests.host_shared_region(layout.total_size, os.getpid())
    prepared = time.perf_counter()
    answer, fds = conn.call(request)
    region = answer.register_region.region
    registration_id = None
    try:
        if not fds:
            raise DataLoss(f"cannot register region {region.region_id}: the daemon sent no memfd")
        mm, start = _buffers.map_received(fds, 0, layout.total_size,
                                          f"cannot register region {region.region_id}: cannot map its memfd")
        try:
            dst = torch.frombuffer(mm, dtype=torch.uint8, count=layout.total_size, offset=start)
            _buffers.write_storages(torch, dst, layout)
            del dst
        finally:
            _buffers.close_map(mm)  # the daemon maps the region itself

        begun, extra = conn.call(begin)
        _close_fds(extra)
        registration_id = begun.begin_register_artifact.registration_id

        frame = _requests.host_region_feed(layout, region)
        frame.feed_register_artifact_stream.registration_id = registration_id
        conn.feed([frame])
        fed = time.perf_counter()
        done = commit(conn, registration_id, hash_in_background)
    except BaseException:
        _close_fds(fds)
        release_now(conn, registration_id, [region.region_id])  # revoke, then unregister
        raise
    lease = Lease(conn, registration_id, [region.region_id], ttl_ms)
    timings = {"metadata": prepared - started, "rpc": fed - prepared, "commit": time.perf_counter() - fed}
    return RegisteredArtifact(done, layout, registration_id, "lease_in_place", lease, timings)


class CudaRegistration:
    """One LIP of CUDA tensors, from the allocation plan to the commit.

    Made from the storages as found (no layout yet): the constructor plans the allocations.
    run() then sends the regions and, while the daemon imports them, builds the layout, the
    Begin and the Feed (`_build`, the `meanwhile` of Connection.call_many); Feed entries of
    storages in a region wait in `awaiting_ref` for that region's ref from the answers.
    What the daemon holds so far (`region_ids`, `registration_id`) is released if anything
    fails.
    """

    def __init__(self, conn: Connection, torch, items: list, storages: list, device, begin) -> None:
        self.conn = conn
        self.torch = torch
        self.items = items
        self.storages = storages
        self.drv = drv = _cuda.driver()
        self.ordinal = device.index if device.index is not None else torch.cuda.current_device()
        self.uuid = drv.device_uuid(self.ordinal)
        self.begin = begin
        b = begin.begin_register_artifact
        b.device_id = self.ordinal
        b.device_uuid = self.uuid
        self.found: dict = {}  # storage key (data_ptr, nbytes), as Desc.storage_key -> position in spans
        spans = []  # (data_ptr, nbytes) of each storage, in the order found
        for _, ptr, nbytes, _ in storages:
            if (ptr, nbytes) not in self.found:
                self.found[(ptr, nbytes)] = len(spans)
                spans.append((ptr, nbytes))
        with drv.on(self.ordinal):
            self.plan = _device.plan(drv, spans, WHAT)
        # Built by _build while the daemon works:
        self.layout = None
        self.frame = None
        self.build_error: BaseException | None = None
        self.built_at = 0.0
        self.awaiting_ref: list = []  # (storage entry, region index): filled in from the answers
        # Held in the daemon, released on failure:
        self.region_ids: list = []
        self.registration_id: str | None = None

    def run(self, ttl_ms: int, started: float, hash_in_background: bool = False) -> RegisteredArtifact:
        """Regions (pipelined) with the build meanwhile → region refs → Feed → Commit. Returns
        the artifact with its live lease; the plan's driver references are dropped either way
        (the daemon holds its own now, or nothing)."""
        conn = self.conn
        exported: list = []
        try:
            calls = self._region_calls(exported)
            prepared = time.perf_counter()
            answers = conn.call_many(calls, meanwhile=self._build)
            answered = time.perf_counter()
            _close_fds(exported)
            exported = []
            refs = self._read_answers(answers, len(calls))
            feed = self.frame.feed_register_artifact_stream
            feed.registration_id = self.registration_id
            for entry, region in self.awaiting_ref:
                entry.region_ref.CopyFrom(refs[region])
            conn.feed([self.frame])
            fed = time.perf_counter()
            done = commit(conn, self.registration_id, hash_in_background)
        except BaseException:
            _close_fds(exported)
            release_now(conn, self.registration_id, self.region_ids)
            raise
        finally:
            self.plan.release(self.drv)
        layout = self.layout
        lease = Lease(conn, self.registration_id, self.region_ids, ttl_ms,
                      keep=[s.source[0] for s in layout.storages])
        # rpc = feed_build (the layout, Begin and Feed, made while the daemon imports the
        # regions) + answer_wait (the daemon still at work after it) + the Feed's round trip.
        timings = {"metadata": prepared - started, "rpc": fed - prepared, "commit": time.perf_counter() - fed,
                   "feed_build": self.built_at - prepared, "answer_wait": answered - self.built_at}
        return RegisteredArtifact(done, layout, self.registration_id, "lease_in_place", lease, timings)

    def _region_calls(self, exported: list) -> list:
        """(RegisterRegion, fds) of each planned region; every fd exported is also appended to
        `exported`, which the caller closes once the daemon has them (or on failure)."""
        drv, ordinal, uuid, pid = self.drv, self.ordinal, self.uuid, os.getpid()
        calls = []
        for r in self.plan.regions:
            request = _device.region_request(r, ordinal, uuid, pid)
            fds = []
            for p in r.pages:
                try:
                    fds.append(drv.export_fd(p.vmm_handle, f"export the VMM page at {p.base:#x} as a POSIX fd"))
                except FailedPrecondition as e:
                    raise FailedPrecondition(f"{e.message}; {_device.FIX_HANDLE_TYPE}") from None
                exported.append(fds[-1])
            calls.append((request, fds))
        return calls

    def _build(self) -> list:
        """The `meanwhile` of the region calls: the canonical layout, total_size into the Begin,
        the Feed. Returns the Begin to send, or nothing when the layout failed (the error is kept
        for run() to raise once the answers are read; call_many's meanwhile must not raise)."""
        try:
            layout = self.layout = _layout.build(_layout.describe(self.items, self.storages))
            self.begin.begin_register_artifact.total_size = layout.total_size
            self.frame = _requests.lease_feed(layout, self._source)
            return [(self.begin, ())]
        except BaseException as e:  # noqa: BLE001 - raised by run(), once the answers are read
            self.build_error = e  # and no Begin: nothing to abort
            return []
        finally:
            self.built_at = time.perf_counter()

    def _source(self, entry, k: int) -> None:
        """Where storage `k` of the layout is: its allocation's IPC handle, or a region whose ref
        is filled in once the daemon has answered."""
        layout = self.layout
        src = self.plan.sources[self.found[layout.descs[layout.storages[k].first_name].storage_key]]
        entry.device_id = self.ordinal
        entry.device_uuid = self.uuid
        if src.region is None:
            entry.cuda_ipc_handle = src.ipc_handle
        else:
            self.awaiting_ref.append((entry, src.region))
        entry.mapping_base_offset = src.mapping_base_offset

    def _read_answers(self, answers: list, regions: int) -> list:
        """The RegionRef of each region (and the Begin's registration id), recording what the
        daemon holds; raises the first error, of a region, the Begin or the build."""
        refs = []
        failed = None
        for answer in answers[:regions]:
            if isinstance(answer, Error):
                failed = failed or answer
            else:
                _close_fds(answer[1])
                refs.append(answer[0].register_region.region)
                self.region_ids.append(refs[-1].region_id)
        for answer in answers[regions:]:  # Begin, unless the layout failed
            if isinstance(answer, Error):
                failed = failed or answer
            else:
                _close_fds(answer[1])
                self.registration_id = answer[0].begin_register_artifact.registration_id
        failed = failed or self.build_error
        if failed is not None:
            raise failed
        return refs
