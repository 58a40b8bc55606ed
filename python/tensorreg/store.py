"""`Store`: register, put, get and open PyTorch state dicts through tensorregd.

    with tensorreg.Store() as store:
        art = store.put(model.state_dict())            # a daemon-owned copy, content-addressed
        same = store.get(art.artifact_id)              # zero-copy CPU tensors of a DRAM copy
        lease = store.register(model.state_dict())     # lease-in-place, kept alive until closed
        views = store.open(lease.artifact_id)          # (another process) zero-copy GPU views

- put(): CPU tensors take the stable_dram plan through the daemon's publish memfd; CUDA tensors
  the coalesced plan: the daemon hands over the CUDA IPC handle of a zeroed buffer, and torch
  copies each storage into it on the GPU. Either way each storage is copied once, by torch.
- register(): lease-in-place. CPU memory is not readable by the daemon, so CPU storages are
  copied once into a daemon-managed HOST_SHARED region and leased from there (as
  daemon/client.cpp store::register_lease does). CUDA storages are leased where they are: each
  allocation is exported once (an IPC handle, or for PyTorch's expandable_segments the VMM pages
  as POSIX fds; _device.py has the rules), and the daemon maps it. A keepalive thread extends
  the lease every max(1 s, ttl/2) +-10 %; close() (or garbage collection of the artifact, or
  interpreter exit) revokes it and unregisters the regions. The lease keeps the storages
  referenced, so the caching allocator cannot hand their memory to other tensors meanwhile.
- get(): the tensors back from the daemon's stable DRAM replica, as views of a private (copy on
  write) mapping of its memfd: no bytes are copied, and writes stay in this process. On a CUDA
  device the replica is copied to the GPU once, and the tensors are views of that copy.
- open(): the artifact's GPU memory (a live lease, or a daemon-owned VRAM copy), each allocation
  mapped once into this process, and every tensor a zero-copy view of it; the mappings close
  when the last tensor over them is freed. The bytes are the producer's: writes reach it.

The same tensors give the same `mi2:` id from put(), register(), the C++ client and
`tensorreg digest` (the index bytes are the SDK's json.dumps; DECISIONS §5.13).

Thread-safety: a Store may be shared by threads; its calls go one at a time over one connection
(open several Stores for parallel calls). Ownership: a Store owns its connection; close() closes
the leases it made, then the connection. A RegisteredArtifact from register() owns its lease.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import random
import threading
import time
import weakref
from typing import Any, NamedTuple

from . import _cuda, _device, _layout, _messages
from ._wire import Connection, _close_fds
from .errors import Aborted, DataLoss, Error, FailedPrecondition, InvalidArgument, NotFound, PermissionDenied, Unimplemented

__all__ = ["Store", "RegisteredArtifact", "Lease", "LocalStableTier"]

PROFILES = ("cache", "durable", "ha", "cold", "warm", "pinned")
DEFAULT_TTL_MS = 600_000
_COMMON = _messages.COMMON
_DAEMON = _messages.DAEMON


def _torch():
    try:
        import torch
    except ImportError as e:  # pragma: no cover - exercised only without torch
        raise Unimplemented(f"cannot use tensors: torch is not importable ({e})") from None
    return torch


def _torch_device(torch, device, what: str):
    """torch.device(device). Errors: InvalidArgument naming the bad device."""
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise InvalidArgument(f"cannot {what}: bad device {device!r}: {e}") from None


class LocalStableTier(NamedTuple):
    """The local stable tier's outcome at commit: status is "ready", "degraded", "skipped" or
    "unspecified"; message says why when it is not ready."""

    status: str
    message: str


def _policy_profile(policy: str | None, verb: str) -> int | None:
    if policy is None or policy == "":
        return None
    if policy not in PROFILES:
        raise InvalidArgument(f"cannot {verb}: unknown policy profile {policy!r}: expected one of "
                              f"{', '.join(PROFILES)}")
    return _messages.enum_value(_COMMON + ".PolicyProfile", "POLICY_PROFILE_" + policy.upper())


def _begin_request(layout, profile, plan: str, device_id: int = 0, device_uuid: str = ""):
    """BeginRegisterArtifact of a put: the index inline, `plan` ("stable_dram" or "coalesced")
    with its defaults, the policy profile when one is given, the device by UUID when known."""
    begin = _messages.Request()
    b = begin.begin_register_artifact
    b.device_id = device_id
    if device_uuid:
        b.device_uuid = device_uuid
    b.total_size = layout.total_size
    b.ttl_ms = DEFAULT_TTL_MS
    b.owner_pid = os.getpid()
    b.tensor_index_data.data = layout.json
    b.tensor_index_data.schema_version = "v3"
    b.tensor_index_data.encoding = "json"
    getattr(b, plan).SetInParent()
    if profile is not None:
        b.policy.profile = profile
    return begin


def _descriptor_dict(d) -> dict:
    return {
        "artifact_id": d.artifact_id,
        "index_multihash": d.index_multihash,
        "data_multihash": d.data_multihash,
        "schema_version": d.schema_version,
        "encoding": d.encoding,
        "total_size": d.total_size,
        "id_kind": _messages.enum_name(_COMMON + ".ArtifactIdKind", d.id_kind),
    }


def _map_shared(fd: int, offset: int, length: int) -> tuple:
    """Maps [offset, offset + length) of `fd` shared and writable; returns (mmap, start in it)."""
    base = offset - offset % mmap.ALLOCATIONGRANULARITY
    mm = mmap.mmap(fd, length + (offset - base), flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE,
                   offset=base)
    return mm, offset - base


def _close_map(mm) -> None:
    try:
        mm.close()
    except BufferError:
        pass  # a view still exports it; it closes when that goes


class Lease:
    """A live lease-in-place registration: kept alive by a thread, released by close(), by
    garbage collection or at interpreter exit (whichever comes first; later ones do nothing).
    region_ids: the regions it was fed from (unregistered on release); `keep`: objects held
    until then (the leased CUDA storages)."""

    def __init__(self, conn: Connection, registration_id: str, region_ids: list, ttl_ms: int, keep=None) -> None:
        self.registration_id = registration_id
        self.region_ids = list(region_ids)
        self.ttl_ms = ttl_ms
        self._keep = keep
        self._state = _LeaseState()
        if ttl_ms > 0:
            self._state.thread = threading.Thread(target=_keep_alive_loop,
                                                  args=(conn, registration_id, ttl_ms, self._state),
                                                  name=f"tensorreg-keepalive-{registration_id}", daemon=True)
            self._state.thread.start()
        # The finalizer holds no reference to self, so garbage collection can trigger it.
        self._finalizer = weakref.finalize(self, _release_lease, conn, registration_id, self.region_ids, self._state)

    @property
    def keepalives_sent(self) -> int:
        return self._state.sent

    @property
    def last_keepalive_error(self) -> Error | None:
        return self._state.last_error

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def close(self) -> None:
        """Revokes the lease and unregisters its regions. Idempotent; errors are swallowed (the
        daemon also releases everything of this process when it exits)."""
        self._finalizer()
        self._keep = None

    def __repr__(self) -> str:
        return f"Lease({self.registration_id!r}, closed={self.closed})"


class _LeaseState:
    def __init__(self) -> None:
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None
        self.sent = 0
        self.failed = 0
        self.last_error: Error | None = None


def _keep_alive_loop(conn: Connection, registration_id: str, ttl_ms: int, state: _LeaseState) -> None:
    # registration.md §10: every max(1 s, ttl/2), ±10 % jitter, the epoch counting up from 1.
    interval = max(1.0, ttl_ms / 2000.0)
    rng = random.Random()
    epoch = 0
    while not state.stop.wait(interval * rng.uniform(0.9, 1.1)):
        epoch += 1
        request = _messages.Request()
        k = request.keep_alive_register_artifact
        k.registration_id = registration_id
        k.ttl_ms = ttl_ms
        k.epoch = epoch
        k.owner_pid = os.getpid()
        try:
            conn.call(request)
            state.sent += 1
        except (NotFound, PermissionDenied) as e:
            state.last_error = e  # the lease is gone (revoked, expired) or not ours: stop
            return
        except Error as e:
            state.failed += 1
            state.last_error = e
            if conn.closed:
                return


def _unregister_request(region_id: str):
    request = _messages.Request()
    u = request.unregister_region
    u.region_id = region_id
    u.owner_pid = os.getpid()
    u.force = True
    return request


def _release_now(conn: Connection, registration_id: str | None, region_ids: list) -> None:
    """Revokes the registration (when there is one), then unregisters the regions; errors are
    swallowed (the daemon releases everything of an owner that exits)."""
    if conn.closed:
        return
    if registration_id:
        revoke = _messages.Request()
        revoke.revoke_registered_artifact.registration_id = registration_id
        revoke.revoke_registered_artifact.reason = "lease released by its holder"
        try:
            conn.call(revoke)
        except Error:
            pass
    if region_ids:
        try:
            conn.call_many([(_unregister_request(r), ()) for r in region_ids])
        except Error:
            pass


def _release_lease(conn: Connection, registration_id: str, region_ids: list, state: _LeaseState) -> None:
    state.stop.set()
    if conn.held_by_current_thread():
        # Garbage collection ran in the middle of a call on this very connection: a call now
        # would interleave frames (and the keepalive thread may wait for that call). Release
        # from another thread once the lock is free.
        threading.Thread(target=_join_and_release, args=(conn, registration_id, region_ids, state),
                         name="tensorreg-release", daemon=True).start()
    else:
        _join_and_release(conn, registration_id, region_ids, state)


def _join_and_release(conn: Connection, registration_id: str, region_ids: list, state: _LeaseState) -> None:
    thread = state.thread
    if thread is not None and thread is not threading.current_thread():
        thread.join(timeout=10)
    _release_now(conn, registration_id, region_ids)


class RegisteredArtifact:
    """What put() and register() return.

    artifact_id, index (name → [offset, size, shape, stride, dtype, storage_offset]),
    index_json (the canonical bytes), total_size, existed (the daemon held it already),
    descriptor (dict), registration_id, registration_kind ("stable_dram" for put of CPU
    tensors, "coalesced" for put of CUDA tensors, "lease_in_place" for register),
    local_stable_tier (LocalStableTier or None), lease (a Lease for register, else None),
    timings (seconds: "metadata" = layout and driver queries in this process, "rpc" = the calls
    before commit, "commit" = the commit call, where the daemon hashes; a register of CUDA
    tensors adds "feed_build" and "answer_wait", the parts of "rpc" spent building the Feed
    while the daemon imports the regions and then waiting for it). close() releases the lease,
    if any; so does leaving a `with`.
    """

    def __init__(self, commit, layout, registration_id: str, kind: str, lease: Lease | None,
                 timings: dict | None = None) -> None:
        self.timings: dict = timings or {}
        d = commit.artifact_descriptor
        self.artifact_id: str = d.artifact_id
        self.descriptor: dict = _descriptor_dict(d)
        self.index: dict = layout.index
        self.index_json: bytes = layout.json
        self.total_size: int = d.total_size
        self.existed: bool = commit.existed
        self.registration_id = registration_id
        self.registration_kind = kind
        self.lease = lease
        self.local_stable_tier = None
        if commit.HasField("local_stable_tier"):
            t = commit.local_stable_tier
            name = _messages.enum_name(_DAEMON + ".LocalStableTierStatus", t.status)
            self.local_stable_tier = LocalStableTier(name.replace("LOCAL_STABLE_TIER_STATUS_", "").lower(),
                                                     t.message)

    def close(self) -> None:
        if self.lease is not None:
            self.lease.close()

    def __enter__(self) -> "RegisteredArtifact":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"RegisteredArtifact({self.artifact_id!r}, total_size={self.total_size}, existed={self.existed}, "
                f"kind={self.registration_kind!r})")


class Store:
    """A connection to tensorregd and the registration calls over it.

    socket: the daemon's socket path (default: $XDG_RUNTIME_DIR/tensorreg/tensorregd.sock, else
    /tmp/tensorreg-$UID/tensorregd.sock). timeout: seconds per socket operation (None = wait).
    Errors: Unavailable when no daemon answers there.
    """

    def __init__(self, socket: str | None = None, *, timeout: float | None = None) -> None:
        self._conn = Connection(socket, timeout)
        self._leases: "weakref.WeakSet[Lease]" = weakref.WeakSet()

    @property
    def socket_path(self) -> str:
        return self._conn.path

    def close(self) -> None:
        """Releases the leases this store made, then closes the connection. Idempotent."""
        for lease in list(self._leases):
            lease.close()
        self._conn.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- put ----

    def put(self, state_dict, *, policy: str | None = "cache") -> RegisteredArtifact:
        """Stores a copy of the tensors in the daemon: CPU tensors in its stable DRAM (the
        stable_dram plan through the publish memfd), CUDA tensors in a daemon-owned buffer on
        their GPU (the coalesced plan). `policy` is a profile name (cache, durable, ha, cold,
        warm, pinned) or None for the daemon's default.
        Errors: InvalidArgument (bad input, mixed devices; before anything is sent),
        FailedPrecondition (CUDA tensors and no usable driver, or a daemon without that GPU),
        the daemon's status (ResourceExhausted when its budget or the GPU is full, ...)."""
        torch = _torch()
        descs, device = _layout.state_dict_descs(torch, state_dict, "put state dict")
        layout = _layout.build(descs)
        profile = _policy_profile(policy, "put state dict")
        if device.startswith("cuda"):
            return self._put_cuda(torch, layout, torch.device(device), profile)

        def write(mm, start):
            dst = torch.frombuffer(mm, dtype=torch.uint8, count=layout.total_size, offset=start)
            try:
                with torch.no_grad():
                    for s in layout.storages:
                        if s.nbytes:
                            dst[s.offset:s.offset + s.nbytes].copy_(_layout.storage_bytes(torch, s.source))
            finally:
                del dst

        return self._put(layout, profile, write)

    def put_safetensors(self, paths, *, policy: str | None = "cache") -> RegisteredArtifact:
        """Stores safetensors files (one artifact) as `tensorreg put` does: the same layout and
        id as the C++ client. Needs no torch.
        Errors: InvalidArgument (bad files), NotFound (no such file), the daemon's status."""
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        paths = [os.fspath(p) for p in paths]
        if not paths:
            raise InvalidArgument("cannot put safetensors files: no file given")
        try:
            layout = _layout.build(_layout.safetensors_descs(paths))
        except FileNotFoundError as e:
            raise NotFound(f"cannot read safetensors file '{e.filename}': no such file") from None
        except PermissionError as e:
            raise PermissionDenied(f"cannot read safetensors file '{e.filename}': permission denied") from None
        profile = _policy_profile(policy, "put safetensors files")

        def write(mm, start):
            dst = memoryview(mm)
            maps = {}
            try:
                for s in layout.storages:
                    path, at, length = s.source
                    if not length:
                        continue
                    if path not in maps:
                        with open(path, "rb") as f:
                            maps[path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                    src = memoryview(maps[path])
                    try:
                        dst[start + s.offset:start + s.offset + length] = src[at:at + length]
                    finally:
                        src.release()
            finally:
                dst.release()
                for m in maps.values():
                    m.close()

        return self._put(layout, profile, write)

    def _put(self, layout, profile, write) -> RegisteredArtifact:
        begin = _begin_request(layout, profile, "stable_dram")
        begun, fds = self._conn.call(begin)
        registration_id = begun.begin_register_artifact.registration_id
        try:
            hs = begun.begin_register_artifact.stable_dram
            if not fds or not hs.HasField("publish_cpu_memfd"):
                raise DataLoss(f"cannot put {registration_id}: the daemon sent no publish memfd")
            handle = hs.publish_cpu_memfd
            if handle.size_bytes < layout.total_size:
                raise DataLoss(f"cannot put {registration_id}: the publish memfd holds {handle.size_bytes} bytes, "
                               f"fewer than total_size {layout.total_size}")
            try:
                mm, start = _map_shared(fds[0], handle.offset_bytes, layout.total_size)
            except (OSError, ValueError) as e:
                raise DataLoss(f"cannot put {registration_id}: cannot map the publish memfd: {e}") from None
            finally:
                _close_fds(fds)
                fds = []
            try:
                write(mm, start)
            finally:
                _close_map(mm)
            frame = _messages.Request()
            feed = frame.feed_register_artifact_stream
            feed.registration_id = registration_id
            progress = feed.stable_dram_write_progress
            r = progress.ranges.add()
            r.canonical_offset = 0
            r.length = layout.total_size
            progress.upload_complete = True
            self._conn.feed([frame])
            done = self._commit(registration_id)
        except BaseException:
            _close_fds(fds)
            self._abort(registration_id)
            raise
        return RegisteredArtifact(done, layout, registration_id, "stable_dram", None)

    def _put_cuda(self, torch, layout, device, profile) -> RegisteredArtifact:
        started = time.perf_counter()
        drv = _cuda.driver()
        ordinal = device.index if device.index is not None else torch.cuda.current_device()
        begin = _begin_request(layout, profile, "coalesced", ordinal, drv.device_uuid(ordinal))
        prepared = time.perf_counter()
        begun, fds = self._conn.call(begin)
        _close_fds(fds)
        registration_id = begun.begin_register_artifact.registration_id
        try:
            handle = begun.begin_register_artifact.coalesced.daemon_ipc_handle
            if not handle:
                raise DataLoss(f"cannot put {registration_id}: the daemon sent no IPC handle for its buffer")
            mapping = _cuda.IpcMapping(drv, ordinal, handle, layout.total_size,
                                       f"the daemon's buffer for {registration_id}")
            try:
                dst = _cuda.as_tensor(torch, mapping, ordinal, layout.total_size)
                with torch.no_grad(), torch.cuda.device(ordinal):
                    for s in layout.storages:
                        if s.nbytes:
                            dst[s.offset:s.offset + s.nbytes].copy_(_layout.storage_bytes(torch, s.source))
                    # The daemon reads the buffer at commit: every copy must have landed.
                    torch.cuda.synchronize(ordinal)
                del dst
            finally:
                mapping.close()
            copied = time.perf_counter()
            done = self._commit(registration_id)
        except BaseException:
            self._abort(registration_id)
            raise
        timings = {"metadata": prepared - started, "rpc": copied - prepared, "commit": time.perf_counter() - copied}
        return RegisteredArtifact(done, layout, registration_id, "coalesced", None,
                                  timings)

    def _abort(self, registration_id: str) -> None:
        abort = _messages.Request()
        abort.abort_registered_artifact.registration_id = registration_id
        try:
            self._conn.call(abort)
        except Error:
            pass

    # ---- register ----

    def register(self, state_dict, *, ttl_ms: int = DEFAULT_TTL_MS, client_artifact_id: str | None = None,
                 policy: str | None = None) -> RegisteredArtifact:
        """Leases the tensors in place (LIP). CUDA tensors are leased where they are (the daemon
        maps their allocations; other processes can then open() them); CPU tensors are copied
        once into a daemon-managed HOST_SHARED region and leased from there. The lease lives
        until the artifact's close(), its garbage collection, this Store's close() or
        interpreter exit, and holds the storages until then. ttl_ms 0 = no expiry (and no
        keepalive thread). client_artifact_id makes a `cgid:` artifact.
        Errors: InvalidArgument (bad input, mixed devices; before anything is sent),
        FailedPrecondition (CUDA tensors and no usable driver, VMM memory that cannot be
        exported as POSIX fds, a daemon that does not see the GPU), the daemon's status."""
        started = time.perf_counter()
        torch = _torch()
        items, storages, device = _layout.state_dict_storages(torch, state_dict, "register state dict")
        cuda = device.startswith("cuda")
        if cuda:  # described and laid out later, while the daemon maps the regions
            _layout.check([name for name, _ in items], [s[2] for s in storages])
        else:
            layout = _layout.build(_layout.describe(items, storages))
        profile = _policy_profile(policy, "register state dict")
        if not isinstance(ttl_ms, int) or not 0 <= ttl_ms < 2**32:
            raise InvalidArgument(f"cannot register state dict: ttl_ms {ttl_ms!r} is not a uint32")
        begin = _messages.Request()
        b = begin.begin_register_artifact
        b.device_id = -1
        b.ttl_ms = ttl_ms
        b.owner_pid = os.getpid()
        b.lease.in_place = True
        if client_artifact_id:
            b.client_artifact_id = client_artifact_id
        if profile is not None:
            b.policy.profile = profile
        if cuda:
            return self._register_cuda(torch, items, storages, torch.device(device), begin, ttl_ms, started)
        b.total_size = layout.total_size
        return self._register_host(torch, layout, begin, ttl_ms, started)

    def _register_host(self, torch, layout, begin, ttl_ms: int, started: float) -> RegisteredArtifact:
        pid = os.getpid()
        # 1. A daemon-managed HOST_SHARED region that will hold the canonical bytes.
        reg = _messages.Request()
        rr = reg.register_region
        rr.memory_kind = _messages.enum_value(_DAEMON + ".RegionMemoryKind", "REGION_MEMORY_KIND_HOST_SHARED")
        rr.owner_pid = pid
        rr.size_bytes = layout.total_size
        rr.host_shared.daemon_managed = True
        prepared = time.perf_counter()
        answer, fds = self._conn.call(reg)
        region = answer.register_region.region
        registration_id = None
        try:
            if not fds:
                raise DataLoss(f"cannot register region {region.region_id}: the daemon sent no memfd")
            try:
                mm, start = _map_shared(fds[0], 0, layout.total_size)
            except (OSError, ValueError) as e:
                raise DataLoss(f"cannot register region {region.region_id}: cannot map its memfd: {e}") from None
            finally:
                _close_fds(fds)
                fds = []
            try:
                dst = torch.frombuffer(mm, dtype=torch.uint8, count=layout.total_size, offset=start)
                with torch.no_grad():
                    for s in layout.storages:
                        if s.nbytes:
                            dst[s.offset:s.offset + s.nbytes].copy_(_layout.storage_bytes(torch, s.source))
                del dst
            finally:
                _close_map(mm)  # the daemon maps the region itself

            # 2. Begin → Feed (storages from the region, one segment each, aliases) → Commit.
            begun, extra = self._conn.call(begin)
            _close_fds(extra)
            registration_id = begun.begin_register_artifact.registration_id

            def source(entry, k):
                entry.device_id = -1
                entry.region_ref.CopyFrom(region)
                entry.mapping_base_offset = layout.storages[k].offset

            frame = _lease_feed(layout, source)
            frame.feed_register_artifact_stream.registration_id = registration_id
            self._conn.feed([frame])
            fed = time.perf_counter()
            done = self._commit(registration_id)
        except BaseException:
            _close_fds(fds)
            _release_now(self._conn, registration_id, [region.region_id])  # revoke, then unregister
            raise
        lease = Lease(self._conn, registration_id, [region.region_id], ttl_ms)
        self._leases.add(lease)
        timings = {"metadata": prepared - started, "rpc": fed - prepared, "commit": time.perf_counter() - fed}
        return RegisteredArtifact(done, layout, registration_id, "lease_in_place", lease,
                                  timings)

    def _register_cuda(self, torch, items, storages, device, begin, ttl_ms: int, started: float) -> RegisteredArtifact:
        """LIP of CUDA tensors: the allocations are planned from the storages as found; the
        tensors' description, the canonical layout, the Begin (it needs total_size) and the Feed
        are made while the daemon imports the regions, so that Python work overlaps the
        daemon's."""
        what = "register state dict"
        drv = _cuda.driver()
        ordinal = device.index if device.index is not None else torch.cuda.current_device()
        uuid = drv.device_uuid(ordinal)
        b = begin.begin_register_artifact
        b.device_id = ordinal
        b.device_uuid = uuid
        found: dict = {}  # storage key (data_ptr, nbytes), as Desc.storage_key -> position in spans
        spans = []  # (data_ptr, nbytes) of each storage, in the order found
        for _, ptr, nbytes, _ in storages:
            if (ptr, nbytes) not in found:
                found[(ptr, nbytes)] = len(spans)
                spans.append((ptr, nbytes))
        with drv.on(ordinal):
            plan = _device.plan(drv, spans, what)
        pid = os.getpid()
        region_ids: list = []
        registration_id = None
        exported: list = []
        try:
            # 1. The regions, sent at once: the daemon imports them concurrently.
            calls = []
            for r in plan.regions:
                request = _device.region_request(r, ordinal, uuid, pid)
                fds = []
                for p in r.pages:
                    try:
                        fds.append(drv.export_fd(p.vmm_handle, f"export the VMM page at {p.base:#x} as a POSIX fd"))
                    except FailedPrecondition as e:
                        raise FailedPrecondition(f"{e.message}; {_device.FIX_HANDLE_TYPE}") from None
                    exported.append(fds[-1])
                calls.append((request, fds))

            # 2. Meanwhile: the canonical layout, then Begin; and the Feed (each storage from its
            # region or its allocation's handle), whose region refs wait for the answers.
            built: dict = {}
            awaiting_ref: list = []  # (storage entry, region index): filled in from the answers

            def source(entry, k):
                layout = built["layout"]
                src = plan.sources[found[layout.descs[layout.storages[k].first_name].storage_key]]
                entry.device_id = ordinal
                entry.device_uuid = uuid
                if src.region is None:
                    entry.cuda_ipc_handle = src.ipc_handle
                else:
                    awaiting_ref.append((entry, src.region))
                entry.mapping_base_offset = src.mapping_base_offset

            def meanwhile():
                try:
                    layout = built["layout"] = _layout.build(_layout.describe(items, storages))
                    b.total_size = layout.total_size
                    built["frame"] = _lease_feed(layout, source)
                    return [(begin, ())]
                except BaseException as e:  # noqa: BLE001 - raised below, once the answers are read
                    built["error"] = e  # and no Begin: nothing to abort
                    return []
                finally:
                    built["at"] = time.perf_counter()

            prepared = time.perf_counter()
            answers = self._conn.call_many(calls, meanwhile=meanwhile)
            answered = time.perf_counter()
            _close_fds(exported)
            exported = []
            refs = []
            failed = None
            for answer in answers[:len(calls)]:
                if isinstance(answer, Error):
                    failed = failed or answer
                else:
                    _close_fds(answer[1])
                    refs.append(answer[0].register_region.region)
                    region_ids.append(refs[-1].region_id)
            for answer in answers[len(calls):]:  # Begin, unless the layout failed
                if isinstance(answer, Error):
                    failed = failed or answer
                else:
                    _close_fds(answer[1])
                    registration_id = answer[0].begin_register_artifact.registration_id
            failed = failed or built.get("error")
            if failed is not None:
                raise failed

            # 3. The region refs, then Feed → Commit.
            layout = built["layout"]
            frame = built["frame"]
            feed = frame.feed_register_artifact_stream
            feed.registration_id = registration_id
            for entry, region in awaiting_ref:
                entry.region_ref.CopyFrom(refs[region])
            self._conn.feed([frame])
            fed = time.perf_counter()
            done = self._commit(registration_id)
        except BaseException:
            _close_fds(exported)
            _release_now(self._conn, registration_id, region_ids)
            raise
        finally:
            # The daemon holds its own references now (or nothing, after a failure).
            plan.release(drv)
        lease = Lease(self._conn, registration_id, region_ids, ttl_ms, keep=[s.source[0] for s in layout.storages])
        self._leases.add(lease)
        # rpc = feed_build (the layout, Begin and Feed, made while the daemon imports the
        # regions) + answer_wait (the daemon still at work after it) + the Feed's round trip.
        timings = {"metadata": prepared - started, "rpc": fed - prepared, "commit": time.perf_counter() - fed,
                   "feed_build": built["at"] - prepared, "answer_wait": answered - built["at"]}
        return RegisteredArtifact(done, layout, registration_id, "lease_in_place", lease,
                                  timings)

    # ---- get ----

    def get(self, artifact_id: str, device: Any = "cpu") -> dict:
        """The artifact's tensors from the daemon's stable DRAM replica, as zero-copy views of a
        private mapping of its memfd (writes stay in this process). On a CUDA device ("cuda",
        "cuda:N") the replica is copied to that GPU once and the tensors are views of the copy.
        Tied weights come back as views of the same bytes.
        Errors: NotFound (unknown artifact), FailedPrecondition (no stable DRAM replica, e.g. a
        lease only; or being deregistered), PermissionDenied (another uid than the daemon's),
        InvalidArgument (devices other than cpu and cuda)."""
        torch = _torch()
        what = f"get {artifact_id}"
        dev = _torch_device(torch, device, what)
        if dev.type not in ("cpu", "cuda"):
            raise InvalidArgument(f"cannot {what} on {dev}: only cpu and cuda are supported")
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise FailedPrecondition(f"cannot {what} on {dev}: torch {torch.__version__} sees no CUDA device")
        request = _messages.Request()
        request.get_artifact_memfd.artifact_id = artifact_id
        answer, fds = self._conn.call(request)
        body = answer.get_artifact_memfd
        try:
            if not fds:
                raise DataLoss(f"cannot {what}: the daemon sent no memfd")
            size = body.size_bytes
            try:
                mm = mmap.mmap(fds[0], size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
            except (OSError, ValueError) as e:
                raise DataLoss(f"cannot {what}: cannot map its replica of {size} bytes: {e}") from None
        finally:
            _close_fds(fds)
        try:
            index = json.loads(body.tensor_index_data)
        except ValueError as e:
            raise DataLoss(f"cannot {what}: the daemon's index is not json: {e}") from None
        base = torch.frombuffer(mm, dtype=torch.uint8) if size else torch.empty(0, dtype=torch.uint8)
        if dev.type == "cuda":
            # One copy of the whole replica keeps tied names tied and views views.
            try:
                moved = base.to(dev)
            except RuntimeError as e:
                raise FailedPrecondition(f"cannot {what} on {dev}: cannot copy the replica there: {e}") from None
            finally:
                del base  # the mapping can close only once no tensor exports it
                _close_map(mm)
            base = moved

        def locate(offset, nbytes, name):
            if offset + nbytes > size:
                raise DataLoss(f"cannot {what}: storage of tensor {_layout.quote(name)} [{offset}, "
                               f"{offset + nbytes}) does not fit the replica of {size} bytes")
            return base, offset

        return _device.build_views(torch, index, locate, what, empty_device=base.device)

    # ---- open ----

    def open(self, artifact_id: str, device: Any = "cuda") -> dict:
        """The artifact's tensors as zero-copy views of its GPU memory: the producer's own
        allocations for a lease (register() of CUDA tensors, in another process), or the
        daemon's buffer for a coalesced put(). Each allocation is mapped once, whatever the
        number of tensors; the mappings close when the last tensor over them is freed. Writes
        reach the producer's memory. The device is found by UUID, so it is right whatever this
        process's CUDA_VISIBLE_DEVICES; `device` "cuda" takes it wherever it is, "cuda:N" also
        checks that it is there. Hold the artifact (a lease) for as long as the tensors are used.
        Errors: FailedPrecondition (no CUDA driver or device here, the GPU is not visible to
        this process, the artifact has no GPU copy), NotFound (unknown artifact),
        PermissionDenied (another uid than the producer's or the daemon's), InvalidArgument
        (device not cuda, or cuda:N when the artifact is on another GPU)."""
        torch = _torch()
        what = f"open {artifact_id}"
        dev = _torch_device(torch, device, what)
        if dev.type != "cuda":
            raise InvalidArgument(f"cannot {what} on {dev}: open() maps GPU memory; use get() for cpu")
        drv = _cuda.driver()  # before the call: no GPU here means nothing to ask the daemon for
        body, fds, vmm_fds = self._open_pages(artifact_id, what)
        bases = []
        ordinal = dev.index
        try:
            try:
                index = json.loads(body.tensor_index_data)
            except ValueError as e:
                raise DataLoss(f"cannot {what}: the daemon's index is not json: {e}") from None
            allocations = list(body.allocations)  # each repeated-field access builds a wrapper: once
            opens = []  # (allocation number, ordinal, allocation, source), checked before any is mapped
            for k, a in enumerate(allocations):
                here = drv.ordinal_of_uuid(a.device_uuid) if a.device_uuid else None
                if here is None:
                    raise FailedPrecondition(
                        f"cannot {what}: allocation {k} lives on {a.device_uuid or 'an unnamed device'} (the daemon's "
                        f"cuda:{a.device_id}), which this process does not see (CUDA_VISIBLE_DEVICES="
                        f"{os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')})")
                if dev.index is not None and here != dev.index:
                    raise InvalidArgument(f"cannot {what} on {dev}: allocation {k} lives on {a.device_uuid}, which is "
                                          f"cuda:{here} here")
                source = a.WhichOneof("source")
                if source == "vmm":
                    if len(vmm_fds.get(k, ())) != len(a.vmm.chunks):
                        raise DataLoss(f"cannot {what}: allocation {k} has {len(a.vmm.chunks)} VMM chunks, but the "
                                       f"daemon's answers carried {len(vmm_fds.get(k, ()))} fds for it")
                elif source != "cuda_ipc_handle":
                    raise DataLoss(f"cannot {what}: allocation {k} has neither an IPC handle nor VMM chunks")
                opens.append((k, here, a, source))
                ordinal = here

            def map_one(k, here, a, source):
                label = f"allocation {k} of {artifact_id}"
                if source == "cuda_ipc_handle":
                    return _cuda.IpcMapping(drv, here, a.cuda_ipc_handle, a.size_bytes, label)
                return _cuda.VmmMapping(drv, here, vmm_fds[k], [c.size_bytes for c in a.vmm.chunks], a.size_bytes,
                                        label)

            # One after the other: the driver serialises IPC opens (about 80 us each on an H100;
            # from 4 threads the same 525 opens took 66 ms instead of 41) and VMM imports (the
            # same from 2 to 8 threads). The device's context is made current once for the
            # batch, not once per allocation.
            with drv.on(opens[0][1]) if opens else contextlib.nullcontext():
                mappings = [map_one(*job) for job in opens]
            bases = [_cuda.as_tensor(torch, m, here, a.size_bytes) for m, (_, here, a, _) in zip(mappings, opens)]
        finally:
            _close_fds(fds)  # imported (or failed): the mappings do not need them
        sizes = [a.size_bytes for a in allocations]
        segments = []
        for s in body.segments:
            allocation, at, length = s.allocation, s.allocation_offset, s.length
            if allocation >= len(bases) or at + length > sizes[allocation]:
                raise DataLoss(f"cannot {what}: segment at artifact offset {s.artifact_offset} of {length} bytes "
                               f"lies outside allocation {allocation}")
            segments.append((s.artifact_offset, length, allocation, at))
        found = _device.Segments(segments, what)

        def locate(offset, nbytes, name):
            allocation, at = found.find(offset, nbytes, name)
            return bases[allocation], at

        empty_device = torch.device("cuda", ordinal if ordinal is not None else torch.cuda.current_device())
        return _device.build_views(torch, index, locate, what, empty_device=empty_device)

    def _open_pages(self, artifact_id: str, what: str) -> tuple:
        """OpenArtifactDevice, page after page (docs/wire-format.md §13): one answer carries at
        most 250 fds, so the VMM fds of a large expandable-segment model come in several.
        Returns (the first answer, every fd received, {allocation number: its chunks' fds})."""
        fds, vmm_fds, first, body = [], {}, 0, None
        try:
            while True:
                request = _messages.Request()
                request.open_artifact_device.artifact_id = artifact_id
                request.open_artifact_device.first_allocation = first
                answer, got = self._conn.call(request)
                fds.extend(got)
                page = answer.open_artifact_device
                if body is None:
                    body = page
                elif [(a.device_uuid, a.size_bytes) for a in page.allocations] != \
                        [(a.device_uuid, a.size_bytes) for a in body.allocations]:
                    raise Aborted(f"cannot {what}: its GPU memory changed while it was being opened; try again")
                end = page.end_allocation
                for k in range(first, min(end, len(page.allocations))):
                    a = page.allocations[k]
                    if a.WhichOneof("source") != "vmm":
                        continue
                    bad = [c.fd_index for c in a.vmm.chunks if c.fd_index >= len(got)]
                    if bad:
                        raise DataLoss(f"cannot {what}: allocation {k} names fd #{bad[0]}, but the answer carried "
                                       f"{len(got)} fds")
                    vmm_fds[k] = [got[c.fd_index] for c in a.vmm.chunks]
                if end >= len(page.allocations):
                    return body, fds, vmm_fds
                if end <= first:
                    raise DataLoss(f"cannot {what}: the daemon's answer for allocations from {first} made no progress")
                first = end
        except BaseException:
            _close_fds(fds)
            raise

    def _commit(self, registration_id: str):
        """CommitRegisteredArtifact; the response body. Errors: the daemon's status."""
        commit = _messages.Request()
        commit.commit_registered_artifact.registration_id = registration_id
        answer, _ = self._conn.call(commit)
        return answer.commit_registered_artifact

    # ---- catalogue ----

    def index(self, artifact_id: str) -> tuple:
        """(descriptor dict, index dict) of an artifact. Errors: NotFound."""
        request = _messages.Request()
        request.get_artifact_index_by_id.artifact_id = artifact_id
        answer, _ = self._conn.call(request)
        body = answer.get_artifact_index_by_id
        return _descriptor_dict(body.artifact_descriptor), json.loads(body.tensor_index_data)

    def list(self) -> list:
        """Every artifact the daemon holds: dicts of the descriptor plus tiers and lease_count."""
        request = _messages.Request()
        request.list_artifacts.SetInParent()
        answer, _ = self._conn.call(request)
        out = []
        for a in answer.list_artifacts.artifacts:
            d = _descriptor_dict(a.artifact_descriptor)
            d["tiers"] = [_tier_name(t) for t in a.tiers]
            d["lease_count"] = a.lease_count
            out.append(d)
        return out

    def stats(self) -> dict:
        request = _messages.Request()
        request.get_stats.SetInParent()
        answer, _ = self._conn.call(request)
        s = answer.get_stats
        return {
            "artifacts": s.artifacts, "leases": s.leases, "regions": s.regions, "open_mappings": s.open_mappings,
            "pending_registrations": s.pending_registrations, "connections": s.connections,
            "vmm_reserved_bytes": s.vmm_reserved_bytes,
            "tiers": {_tier_name(t.tier): {"bytes": t.bytes, "artifacts": t.artifacts} for t in s.tiers},
        }

    def deregister(self, artifact_id: str, *, wait_for_drain: bool = True) -> dict:
        """Drains and removes an artifact. Errors: NotFound, DeadlineExceeded."""
        request = _messages.Request()
        d = request.deregister_artifact
        d.artifact_id = artifact_id
        d.wait_for_drain = wait_for_drain
        answer, _ = self._conn.call(request)
        r = answer.deregister_artifact
        return {"drained": r.drained, "removed": r.removed}


def _tier_name(tier: int) -> str:
    name = _messages.enum_name(_messages.WIRE + ".Tier", tier)
    return {"TIER_VRAM": "vram", "TIER_VRAM_LEASED": "leased", "TIER_STABLE_DRAM": "stable_dram",
            "TIER_SHARED_DISK": "shared_disk"}.get(name, name)


def _lease_feed(layout, source):
    """The one Feed frame of a lease (a Request; the caller sets its registration_id): a storage
    entry per layout storage (`source(entry, k)` fills in where its bytes are), one segment
    each covering it whole, and the tensor aliases."""
    frame = _messages.Request()
    feed = frame.feed_register_artifact_stream
    ids = []
    entries = feed.storage_entries
    segments = feed.lease_segments.segments
    for k, s in enumerate(layout.storages):
        sid = f"s{k}"
        ids.append(sid)
        e = entries.add()
        e.storage_id = sid
        e.storage_length = s.nbytes
        source(e, k)
        seg = segments.add()
        seg.storage_id = sid  # storage_offset 0: the default, not stored
        seg.artifact_offset = s.offset
        seg.length = s.nbytes
    aliases = feed.tensor_aliases
    sizes, descs, storage_of, extent = _layout.DTYPE_SIZES, layout.descs, layout.storage_of, _layout.extent_bytes
    for name in sorted(layout.index):
        d = descs[name]
        a = aliases.add()
        a.name = name
        a.storage_id = ids[storage_of[name]]
        if d.storage_offset:
            a.storage_offset = d.storage_offset
        a.logical_length = extent(d.shape, d.stride, sizes[d.dtype])
        a.shape.extend(d.shape)
        a.stride.extend(d.stride)
        a.dtype = d.dtype
    return frame
