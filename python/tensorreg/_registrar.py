"""`Registrar`: one producer registering the same state dict again and again (a trainer's
weights, each step), where every registration after the first costs almost nothing.

A plain register() exports every allocation, registers its regions, builds the canonical
layout and the Feed, and unregisters the regions when the lease ends. A producer whose tensors
stay in the same allocations step after step needs none of that again. The Registrar keeps,
for the life of the producer (until close()):

- per allocation its export and its daemon region (every allocation is a region, no lone
  handles, so the daemon keeps its mapping open while the region lives: 0 driver opens per
  version); a version's lease ends without unregistering them;
- the canonical layout, its `tensor_index_key` and the Feed already serialised (only the
  registration id changes from one version to the next);
- for CPU tensors, the HOST_SHARED region and this process's mapping of it (each version copies
  the bytes in again: the daemon cannot read this process's memory);
- the storages of the last registration, held so that their allocations cannot be freed and
  handed to other tensors: a storage at the same address is then the same memory.

Each register() first compares, in one pass, every tensor's (name, data_ptr, shape, stride,
dtype) with the last registration's. Equal: one RepublishLease of the last registration's lease
(the daemon reuses its tables, mappings and layout; docs/wire-format.md §20), or, when that lease
has ended, Begin (the index by key), the kept Feed, Commit. Different: the full flow again, reusing the regions whose memory is unchanged (same allocation
and IPC handle, or the same VMM pages, all held since) and unregistering, once the new version
is committed, those no longer used (a lease still reading them keeps them until it ends).

Thread-safety: one register() at a time (a lock); the calls go over the Store's connection.
Ownership: the Registrar owns its regions, its mapping and the storages it holds; the artifacts
it returns own their leases (close() of the Registrar closes those still open first).
"""

from __future__ import annotations

import hashlib
import operator
import os
import threading
import time
import weakref

from . import _buffers, _cuda, _device, _layout, _requests
from ._artifact import RegisteredArtifact
from ._leases import Lease, release_now
from ._torch import module as _torch
from . import _wire
from ._wire import Connection, _close_fds
from .errors import Error, FailedPrecondition, InvalidArgument, NotFound

WHAT = "register state dict"


class RawFeed:
    """A Feed frame whose body was serialised ahead: Connection.feed() sets request_id and calls
    SerializeToString(), which puts the request id and the registration id in front of the kept
    bytes. Protobuf parses fields in any order, so the frame is the same message that building
    it would give (wire-format.md §3, §6: Request.request_id is field 1, the Feed body field 11, its
    registration_id field 1)."""

    __slots__ = ("request_id", "_inner")

    def __init__(self, registration_id: str, body: bytes) -> None:
        self.request_id = 0
        rid = registration_id.encode()
        self._inner = b"\x0a" + _wire.encode_varint(len(rid)) + rid + body

    def SerializeToString(self) -> bytes:  # noqa: N802 - the protobuf name Connection calls
        return b"\x08" + _wire.encode_varint(self.request_id) + b"\x5a" + _wire.encode_varint(len(self._inner)) + self._inner


def signature(state_dict) -> tuple:
    """What the fast path compares: the names, data_ptrs, shapes, strides and dtypes of every
    tensor, in the dict's order, as one list each (map() over C calls: this runs for every
    version of a 1000-tensor dict). Raises AttributeError/TypeError for what is not a dense
    tensor (the full path then says what is wrong)."""
    tensor = _torch().Tensor
    values = list(state_dict.values())
    return (list(state_dict), list(map(tensor.data_ptr, values)), list(map(_shape, values)),
            list(map(tensor.stride, values)), list(map(_dtype, values)))


_shape = operator.attrgetter("shape")
_dtype = operator.attrgetter("dtype")


def _commit(conn: Connection, registration_id: str, hash_in_background: bool):
    answer, fds = conn.call(_requests.commit(registration_id, hash_in_background))
    _close_fds(fds)
    return answer.commit_registered_artifact


class _Kept:
    """What the last registration left for the next: compared and reused by the fast path."""

    def __init__(self) -> None:
        self.signature: list | None = None
        self.layout = None
        self.feed_body = b""
        self.index_key = ""
        self.device = "cpu"
        self.ordinal = -1
        self.uuid = ""
        self.storages: list = []  # held: their allocations stay allocated
        self.lease = None  # weakref to the last registration's Lease: RepublishLease names it
        self.regions: dict = {}  # region key -> RegionRef (CUDA); {"host": RegionRef} (CPU)
        self.host_map = None  # (mmap, uint8 tensor over the region's bytes), CPU only
        self.host_size = 0


class Registrar:
    """Registers state dicts in place, keeping what the next registration can reuse.

    ttl_ms: each lease's TTL (0 = no expiry and no keepalive thread); policy: a profile name or
    None; snapshot: ask for snapshot leases (LeaseOptions.in_place = false: the daemon copies the
    bytes into its own memory at commit, so the producer may change its tensors at once; a
    daemon without them answers Unimplemented). publish_copy (CUDA tensors; implies snapshot):
    each registration is a put instead, whose copy the daemon makes on the GPU from the kept
    regions and keeps as the artifact's GPU replica, with no lease left (docs/registration.md
    §5.5): the artifact outlives the registrar, and the registration returns no Lease. Made by
    Store.registrar().
    """

    def __init__(self, conn: Connection, ttl_ms: int = _requests.DEFAULT_TTL_MS, policy: str | None = None,
                 snapshot: bool = False, publish_copy: bool = False) -> None:
        if not isinstance(ttl_ms, int) or not 0 <= ttl_ms < 2**32:
            raise InvalidArgument(f"cannot make a registrar: ttl_ms {ttl_ms!r} is not a uint32")
        self._conn = conn
        self._ttl_ms = ttl_ms
        self._profile = _requests.policy_profile(policy, WHAT)
        self._publish_copy = bool(publish_copy)
        self._snapshot = bool(snapshot) or self._publish_copy
        self._lock = threading.Lock()
        self._kept = _Kept()
        self._leases: weakref.WeakSet = weakref.WeakSet()
        self._closed = False
        self.counts = {"full": 0, "fast": 0, "republished": 0, "regions_registered": 0, "regions_reused": 0,
                       "regions_released": 0}
        # Unregisters the regions at garbage collection or interpreter exit, as a Lease does.
        self._finalizer = weakref.finalize(self, _release_kept, conn, self._kept)

    @property
    def closed(self) -> bool:
        return self._closed

    def register(self, state_dict, *, client_artifact_id: str | None = None, hash_in_background: bool = False,
                 replaces: RegisteredArtifact | None = None) -> RegisteredArtifact:
        """Leases the tensors in place, as Store.register(); fast when the layout and the
        tensors' memory are the last registration's. The lease's close() revokes it without
        unregistering the regions (the Registrar's close() does). `replaces`: an artifact this
        registrar returned whose lease ends once the new one is committed (in the same call when
        it is the last registration's).
        Errors: as Store.register(); FailedPrecondition after close()."""
        with self._lock:
            art = self._register(state_dict, client_artifact_id, hash_in_background,
                                 replaces.lease if replaces is not None else None)
        if replaces is not None:
            replaces.close()  # a no-op when the daemon ended it already
        return art

    def _register(self, state_dict, client_artifact_id, hash_in_background: bool, replaces) -> RegisteredArtifact:
        if self._closed:
            raise FailedPrecondition(f"cannot {WHAT}: the registrar is closed")
        started = time.perf_counter()
        try:
            sig = signature(state_dict)
        except (AttributeError, TypeError, RuntimeError):
            sig = None  # not tensors: the full path names the problem
        fast = sig is not None and sig == self._kept.signature
        try:
            if fast:
                art = self._fast(client_artifact_id, hash_in_background, started, replaces)
            else:
                art = self._full(state_dict, sig, client_artifact_id, hash_in_background, started)
        except (NotFound, FailedPrecondition) as e:
            # A kept region the daemon no longer has (it restarted; the region was poisoned
            # or retired): forget what was kept and register from scratch, once.
            if not self._kept.regions or not (fast or "region" in e.message):
                raise
            self._forget()
            art = self._full(state_dict, sig, client_artifact_id, hash_in_background, started)
        if art.lease is not None:  # a publish_copy registration leaves none
            self._leases.add(art.lease)
            self._kept.lease = weakref.ref(art.lease)
        return art

    def close(self) -> None:
        """Closes the leases it made that are still open, then unregisters its regions and
        drops what it held. Idempotent."""
        with self._lock:
            self._closed = True
            for lease in list(self._leases):
                lease.close()
            self._finalizer()

    def __enter__(self) -> Registrar:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _lease_begin(self, client_artifact_id: str | None):
        begin = _requests.lease_begin(self._ttl_ms, client_artifact_id, self._profile)
        if self._snapshot:
            begin.begin_register_artifact.lease.in_place = False
        if self._publish_copy:
            begin.begin_register_artifact.lease.publish_copy = True
        return begin

    # ---- the fast path ----

    def _begin(self, layout_total: int, client_artifact_id: str | None, by_key: bool):
        kept = self._kept
        begin = self._lease_begin(client_artifact_id)
        b = begin.begin_register_artifact
        b.total_size = layout_total
        if kept.ordinal >= 0:
            b.device_id = kept.ordinal
            b.device_uuid = kept.uuid
        if by_key:
            b.tensor_index_key = kept.index_key  # the daemon holds it from the last commit
        return begin

    def _republish(self, client_artifact_id, hash_in_background: bool, started: float, replaces):
        """RepublishLease of the last registration's lease (one call); None when that lease has
        ended, here or in the daemon (the caller then registers again)."""
        previous = self._kept.lease() if self._kept.lease is not None else None
        if previous is None or previous.closed or self._snapshot:
            return None
        revoke = replaces is previous
        prepared = time.perf_counter()
        try:
            answer, fds = self._conn.call(_requests.republish_lease(
                previous.registration_id, client_artifact_id, self._ttl_ms, self._profile, hash_in_background, revoke))
        except (NotFound, FailedPrecondition):
            return None  # ended meanwhile (expired, revoked), or a region changed: the Feed path checks
        _close_fds(fds)
        done = answer.republish_lease
        committed = time.perf_counter()
        if done.revoked_previous:
            previous.ended_by_daemon()
        art = self._leased(done.commit, done.registration_id)
        self.counts["fast"] += 1
        self.counts["republished"] += 1
        art.timings = {"metadata": prepared - started, "rpc": 0.0, "commit": committed - prepared,
                       "client_work": (prepared - started) + (time.perf_counter() - committed), "reused": True}
        return art

    def _fast(self, client_artifact_id, hash_in_background: bool, started: float, replaces=None) -> RegisteredArtifact:
        kept = self._kept
        conn = self._conn
        layout = kept.layout
        if kept.host_map is not None:  # CPU: the bytes go into the kept region again
            _buffers.write_storages(_torch(), kept.host_map[1], layout)
        art = self._republish(client_artifact_id, hash_in_background, started, replaces)
        if art is not None:
            return art
        begin = self._begin(layout.total_size, client_artifact_id, True)
        prepared = time.perf_counter()
        try:
            answer, fds = conn.call(begin)
        except NotFound:  # the index key is no longer held (its last artifact went): send none
            begin = self._begin(layout.total_size, client_artifact_id, False)
            answer, fds = conn.call(begin)
        _close_fds(fds)
        registration_id = answer.begin_register_artifact.registration_id
        try:
            built = time.perf_counter()
            frame = RawFeed(registration_id, kept.feed_body)
            client = time.perf_counter() - built
            conn.feed([frame])
            fed = time.perf_counter()
            done = _commit(conn, registration_id, hash_in_background)
        except BaseException:
            release_now(conn, registration_id, [])
            raise
        committed = time.perf_counter()
        art = self._leased(done, registration_id)
        self.counts["fast"] += 1
        art.timings = {"metadata": prepared - started, "rpc": fed - prepared, "commit": committed - fed,
                       "client_work": (prepared - started) + client + (time.perf_counter() - committed),
                       "reused": True}
        return art

    # ---- the full path ----

    def _full(self, state_dict, sig, client_artifact_id, hash_in_background: bool,
              started: float) -> RegisteredArtifact:
        torch = _torch()
        items, storages, device = _layout.state_dict_storages(torch, state_dict, WHAT)
        if sig is None:
            sig = signature(state_dict)
        self.counts["full"] += 1
        if device.startswith("cuda"):
            return self._full_cuda(torch, items, storages, torch.device(device), sig, client_artifact_id,
                                   hash_in_background, started)
        return self._full_host(torch, items, storages, sig, client_artifact_id, hash_in_background, started)

    def _finish(self, registration_id: str, feed, hash_in_background: bool, timings: dict):
        """Feed → Commit; returns the commit answer. The caller releases on failure."""
        conn = self._conn
        conn.feed([feed])
        fed = time.perf_counter()
        done = _commit(conn, registration_id, hash_in_background)
        timings["commit"] = time.perf_counter() - fed
        return done

    def _full_host(self, torch, items, storages, sig, client_artifact_id, hash_in_background,
                   started: float) -> RegisteredArtifact:
        conn = self._conn
        old = self._kept
        layout = _layout.build(_layout.describe(items, storages))
        region = old.regions.get("host")
        made = None  # a region registered here (released on failure)
        host_map = old.host_map
        if region is None or old.host_size < layout.total_size:
            answer, fds = conn.call(_requests.host_shared_region(layout.total_size, os.getpid()))
            made = answer.register_region.region
            try:
                if not fds:
                    raise FailedPrecondition(f"cannot register region {made.region_id}: the daemon sent no memfd")
                mm, start = _buffers.map_received(fds, 0, layout.total_size,
                                                  f"cannot register region {made.region_id}: cannot map its memfd")
            except BaseException:
                _close_fds(fds)
                release_now(conn, None, [made.region_id])
                raise
            host_map = (mm, torch.frombuffer(mm, dtype=torch.uint8, count=layout.total_size, offset=start))
            region = made
        registration_id = None
        try:
            _buffers.write_storages(torch, host_map[1], layout)
            begin = self._lease_begin(client_artifact_id)
            begin.begin_register_artifact.total_size = layout.total_size
            prepared = time.perf_counter()
            answer, extra = conn.call(begin)
            _close_fds(extra)
            registration_id = answer.begin_register_artifact.registration_id

            frame = _requests.host_region_feed(layout, region)
            body = frame.feed_register_artifact_stream.SerializeToString()
            timings = {"metadata": prepared - started}
            done = self._finish(registration_id, RawFeed(registration_id, body), hash_in_background, timings)
        except BaseException:
            release_now(conn, registration_id, [made.region_id] if made is not None else [])
            if made is not None:
                _buffers.close_map(host_map[0])
            raise
        if made is None:
            self.counts["regions_reused"] += 1
        else:
            self.counts["regions_registered"] += 1
            if old.host_map is not None:
                _buffers.close_map(old.host_map[0])
            old.host_map, old.host_size = host_map, layout.total_size
        self._replace_regions({"host": region})
        self._keep(sig, layout, body, "cpu", -1, "", storages)
        return self._artifact(done, registration_id, timings, started)

    def _full_cuda(self, torch, items, storages, device, sig, client_artifact_id, hash_in_background,
                   started: float) -> RegisteredArtifact:
        conn = self._conn
        drv = _cuda.driver()
        ordinal = device.index if device.index is not None else torch.cuda.current_device()
        uuid = drv.device_uuid(ordinal)
        found: dict = {}
        spans = []
        for _, ptr, nbytes, _ in storages:
            if (ptr, nbytes) not in found:
                found[(ptr, nbytes)] = len(spans)
                spans.append((ptr, nbytes))
        with drv.on(ordinal):
            plan = _device.plan(drv, spans, WHAT)
        old = self._kept
        made_ids: list = []
        registration_id = None
        exported: list = []
        try:
            plan = _device.every_storage_in_a_region(plan)
            keys = [_device.region_key(r) for r in plan.regions]
            refs = [old.regions.get(k) if old.ordinal == ordinal else None for k in keys]
            missing = [i for i, ref in enumerate(refs) if ref is None]
            pid = os.getpid()
            calls = []
            for i in missing:
                r = plan.regions[i]
                fds = []
                for p in r.pages:
                    try:
                        fds.append(drv.export_fd(p.vmm_handle, f"export the VMM page at {p.base:#x} as a POSIX fd"))
                    except FailedPrecondition as e:
                        raise FailedPrecondition(f"{e.message}; {_device.FIX_HANDLE_TYPE}") from None
                    exported.append(fds[-1])
                calls.append((_device.region_request(r, ordinal, uuid, pid), fds))
            answers = conn.call_many(calls) if calls else []
            _close_fds(exported)
            exported = []
            failed = None
            for i, answer in zip(missing, answers):
                if isinstance(answer, Error):
                    failed = failed or answer
                    continue
                _close_fds(answer[1])
                refs[i] = answer[0].register_region.region
                made_ids.append(refs[i].region_id)
            if failed is not None:
                raise failed
            layout = _layout.build(_layout.describe(items, storages))
            begin = self._lease_begin(client_artifact_id)
            b = begin.begin_register_artifact
            b.device_id = ordinal
            b.device_uuid = uuid
            b.total_size = layout.total_size

            def source(entry, k):
                src = plan.sources[found[layout.descs[layout.storages[k].first_name].storage_key]]
                entry.device_id = ordinal
                entry.device_uuid = uuid
                entry.region_ref.CopyFrom(refs[src.region])
                entry.mapping_base_offset = src.mapping_base_offset

            frame = _requests.lease_feed(layout, source)
            body = frame.feed_register_artifact_stream.SerializeToString()
            prepared = time.perf_counter()
            answer, extra = conn.call(begin)
            _close_fds(extra)
            registration_id = answer.begin_register_artifact.registration_id
            timings = {"metadata": prepared - started}
            done = self._finish(registration_id, RawFeed(registration_id, body), hash_in_background, timings)
        except BaseException:
            _close_fds(exported)
            release_now(conn, registration_id, made_ids)
            raise
        finally:
            plan.release(drv)
        self.counts["regions_registered"] += len(made_ids)
        self.counts["regions_reused"] += len(refs) - len(made_ids)
        if old.host_map is not None:  # CPU tensors before: their host region goes
            _buffers.close_map(old.host_map[0])
            old.host_map, old.host_size = None, 0
        self._replace_regions(dict(zip(keys, refs)))
        self._keep(sig, layout, body, str(device), ordinal, uuid, storages)
        return self._artifact(done, registration_id, timings, started)

    # ---- what is kept ----

    def _keep(self, sig, layout, body: bytes, device: str, ordinal: int, uuid: str, storages: list) -> None:
        kept = self._kept
        kept.signature = sig
        kept.layout = layout
        kept.feed_body = body
        kept.index_key = hashlib.sha256(layout.json).hexdigest()
        kept.device = device
        kept.ordinal = ordinal
        kept.uuid = uuid
        kept.storages = [s[0] for s in storages]

    def _leased(self, done, registration_id: str) -> RegisteredArtifact:
        """The artifact of a commit answer over the kept layout, owning its lease (which holds
        the kept storages). The regions are the Registrar's: the lease does not unregister them.
        A publish_copy registration left no lease: its artifact is the daemon's GPU copy."""
        if self._publish_copy:
            return RegisteredArtifact(done, self._kept.layout, registration_id, "coalesced", None)
        lease = Lease(self._conn, registration_id, [], self._ttl_ms, keep=self._kept.storages)
        return RegisteredArtifact(done, self._kept.layout, registration_id, "lease_in_place", lease)

    def _artifact(self, done, registration_id: str, timings: dict, started: float) -> RegisteredArtifact:
        art = self._leased(done, registration_id)
        timings["rpc"] = time.perf_counter() - started - timings["metadata"] - timings["commit"]
        timings["reused"] = False
        art.timings = timings
        return art

    def _replace_regions(self, regions: dict) -> None:
        """Keeps `regions` and unregisters the kept ones it does not reuse (forced: a lease still
        reading one keeps it until that lease ends); errors are swallowed, as every release is."""
        stale = [ref for key, ref in self._kept.regions.items() if regions.get(key) is not ref]
        self._kept.regions = regions
        if stale:
            self.counts["regions_released"] += len(stale)
            release_now(self._conn, None, [r.region_id for r in stale])

    def _forget(self) -> None:
        _release_kept(self._conn, self._kept)


def _release_kept(conn: Connection, kept: _Kept) -> None:
    """Unregisters the kept regions, unmaps the host region, drops the storages and the kept
    layout (so the next register() takes the full path)."""
    regions = list(kept.regions.values())
    kept.regions = {}
    kept.signature = None
    kept.lease = None
    kept.layout = None
    kept.storages = []
    if kept.host_map is not None:
        mm = kept.host_map[0]
        kept.host_map = None
        _buffers.close_map(mm)
    kept.host_size = 0
    if not regions:
        return
    ids = [r.region_id for r in regions]
    if conn.held_by_current_thread():
        # Garbage collection in the middle of a call on this connection: calling now would
        # interleave frames; release from another thread once the call is done (as a Lease does).
        threading.Thread(target=release_now, args=(conn, None, ids), name="tensorreg-release", daemon=True).start()
    else:
        release_now(conn, None, ids)
