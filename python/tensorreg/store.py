"""`Store`: register, put and get PyTorch state dicts through tensorregd.

    with tensorreg.Store() as store:
        art = store.put(model.state_dict())            # stable DRAM copy, content-addressed
        same = store.get(art.artifact_id)              # zero-copy CPU tensors of that copy
        lease = store.register(model.state_dict())     # lease-in-place, kept alive until closed

- put(): the stable_dram plan through the daemon's publish memfd. The bytes of each storage are
  copied once, by torch, straight into the daemon's memory (no bytes object in between).
- register(): lease-in-place. CPU memory is not readable by the daemon, so the storages are
  copied once into a daemon-managed HOST_SHARED region and leased from there (as
  daemon/client.cpp store::register_lease does). A keepalive thread extends the lease every
  max(1 s, ttl/2) ±10 %; close() (or garbage collection of the artifact, or interpreter exit)
  revokes it and unregisters the region. CUDA tensors need the CUDA data plane, not written yet.
- get(): the tensors back from the daemon's stable DRAM replica, as views of a private (copy on
  write) mapping of its memfd: no bytes are copied, and writes stay in this process.

The same tensors give the same `mi2:` id from put(), register(), the C++ client and
`tensorreg digest` (the index bytes are the SDK's json.dumps; DECISIONS §5.13).

Thread-safety: a Store may be shared by threads; its calls go one at a time over one connection
(open several Stores for parallel calls). Ownership: a Store owns its connection; close() closes
the leases it made, then the connection. A RegisteredArtifact from register() owns its lease.
"""

from __future__ import annotations

import json
import mmap
import os
import random
import threading
import weakref
from typing import Any, NamedTuple

from . import _layout, _messages
from ._wire import Connection, _close_fds
from .errors import DataLoss, Error, InvalidArgument, NotFound, PermissionDenied, Unimplemented

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
    garbage collection or at interpreter exit (whichever comes first; later ones do nothing)."""

    def __init__(self, conn: Connection, registration_id: str, region_id: str, ttl_ms: int) -> None:
        self.registration_id = registration_id
        self.region_id = region_id
        self.ttl_ms = ttl_ms
        self._state = _LeaseState()
        if ttl_ms > 0:
            self._state.thread = threading.Thread(target=_keep_alive_loop,
                                                  args=(conn, registration_id, ttl_ms, self._state),
                                                  name=f"tensorreg-keepalive-{registration_id}", daemon=True)
            self._state.thread.start()
        # The finalizer holds no reference to self, so garbage collection can trigger it.
        self._finalizer = weakref.finalize(self, _release_lease, conn, registration_id, region_id, self._state)

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
        """Revokes the lease and unregisters its region. Idempotent; errors are swallowed (the
        daemon also releases everything of this process when it exits)."""
        self._finalizer()

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


def _release_now(conn: Connection, registration_id: str, region_id: str) -> None:
    if conn.closed:
        return
    revoke = _messages.Request()
    revoke.revoke_registered_artifact.registration_id = registration_id
    revoke.revoke_registered_artifact.reason = "lease released by its holder"
    unregister = _messages.Request()
    u = unregister.unregister_region
    u.region_id = region_id
    u.owner_pid = os.getpid()
    u.force = True
    for request in (revoke, unregister):
        try:
            conn.call(request)
        except Error:
            pass


def _release_lease(conn: Connection, registration_id: str, region_id: str, state: _LeaseState) -> None:
    state.stop.set()
    if conn.held_by_current_thread():
        # Garbage collection ran in the middle of a call on this very connection: a call now
        # would interleave frames (and the keepalive thread may wait for that call). Release
        # from another thread once the lock is free.
        threading.Thread(target=_join_and_release, args=(conn, registration_id, region_id, state),
                         name="tensorreg-release", daemon=True).start()
    else:
        _join_and_release(conn, registration_id, region_id, state)


def _join_and_release(conn: Connection, registration_id: str, region_id: str, state: _LeaseState) -> None:
    thread = state.thread
    if thread is not None and thread is not threading.current_thread():
        thread.join(timeout=10)
    _release_now(conn, registration_id, region_id)


class RegisteredArtifact:
    """What put() and register() return.

    artifact_id, index (name → [offset, size, shape, stride, dtype, storage_offset]),
    index_json (the canonical bytes), total_size, existed (the daemon held it already),
    descriptor (dict), registration_id, registration_kind ("stable_dram" for put,
    "lease_in_place" for register), local_stable_tier (LocalStableTier or None), lease (a Lease
    for register, else None). close() releases the lease, if any; so does leaving a `with`.
    """

    def __init__(self, commit, layout, registration_id: str, kind: str, lease: Lease | None) -> None:
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
        """Stores the tensors in the daemon's stable DRAM (the stable_dram plan through the
        publish memfd). `policy` is a profile name (cache, durable, ha, cold, warm, pinned) or
        None for the daemon's default.
        Errors: InvalidArgument (bad input, before anything is sent), Unimplemented (CUDA
        tensors), the daemon's status (ResourceExhausted when the stable budget is full, ...)."""
        torch = _torch()
        descs, _ = _layout.state_dict_descs(torch, state_dict, "put state dict")
        layout = _layout.build(descs)
        profile = _policy_profile(policy, "put state dict")

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
        begin = _messages.Request()
        b = begin.begin_register_artifact
        b.device_id = 0
        b.total_size = layout.total_size
        b.ttl_ms = DEFAULT_TTL_MS
        b.owner_pid = os.getpid()
        b.tensor_index_data.data = layout.json
        b.tensor_index_data.schema_version = "v3"
        b.tensor_index_data.encoding = "json"
        b.stable_dram.SetInParent()
        if profile is not None:
            b.policy.profile = profile
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
            feed = _messages.FeedRequest()
            feed.registration_id = registration_id
            progress = feed.stable_dram_write_progress
            r = progress.ranges.add()
            r.canonical_offset = 0
            r.length = layout.total_size
            progress.upload_complete = True
            self._conn.feed([feed])
            commit = _messages.Request()
            commit.commit_registered_artifact.registration_id = registration_id
            done, _ = self._conn.call(commit)
        except BaseException:
            _close_fds(fds)
            self._abort(registration_id)
            raise
        return RegisteredArtifact(done.commit_registered_artifact, layout, registration_id, "stable_dram", None)

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
        """Leases the tensors in place (LIP). CPU tensors are copied once into a daemon-managed
        HOST_SHARED region and leased from there; the lease lives until the artifact's close(),
        its garbage collection, this Store's close() or interpreter exit. ttl_ms 0 = no expiry
        (and no keepalive thread). client_artifact_id makes a `cgid:` artifact.
        Errors: InvalidArgument (bad input, before anything is sent), Unimplemented (CUDA
        tensors: the CUDA data plane is pending), the daemon's status."""
        torch = _torch()
        descs, _ = _layout.state_dict_descs(torch, state_dict, "register state dict")
        layout = _layout.build(descs)
        profile = _policy_profile(policy, "register state dict")
        if not isinstance(ttl_ms, int) or not 0 <= ttl_ms < 2**32:
            raise InvalidArgument(f"cannot register state dict: ttl_ms {ttl_ms!r} is not a uint32")
        pid = os.getpid()

        # 1. A daemon-managed HOST_SHARED region that will hold the canonical bytes.
        reg = _messages.Request()
        rr = reg.register_region
        rr.memory_kind = _messages.enum_value(_DAEMON + ".RegionMemoryKind", "REGION_MEMORY_KIND_HOST_SHARED")
        rr.owner_pid = pid
        rr.size_bytes = layout.total_size
        rr.host_shared.daemon_managed = True
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
            begin = _messages.Request()
            b = begin.begin_register_artifact
            b.device_id = -1
            b.total_size = layout.total_size
            b.ttl_ms = ttl_ms
            b.owner_pid = pid
            b.lease.in_place = True
            if client_artifact_id:
                b.client_artifact_id = client_artifact_id
            if profile is not None:
                b.policy.profile = profile
            begun, extra = self._conn.call(begin)
            _close_fds(extra)
            registration_id = begun.begin_register_artifact.registration_id
            self._conn.feed([_lease_feed(registration_id, layout, region)])
            commit = _messages.Request()
            commit.commit_registered_artifact.registration_id = registration_id
            done, _ = self._conn.call(commit)
        except BaseException:
            _close_fds(fds)
            if registration_id:
                _release_now(self._conn, registration_id, region.region_id)  # revoke, then unregister
            else:
                self._unregister_region(region.region_id)
            raise
        lease = Lease(self._conn, registration_id, region.region_id, ttl_ms)
        self._leases.add(lease)
        return RegisteredArtifact(done.commit_registered_artifact, layout, registration_id, "lease_in_place", lease)

    def _unregister_region(self, region_id: str) -> None:
        request = _messages.Request()
        u = request.unregister_region
        u.region_id = region_id
        u.owner_pid = os.getpid()
        u.force = True
        try:
            self._conn.call(request)
        except Error:
            pass

    # ---- get ----

    def get(self, artifact_id: str, device: Any = "cpu") -> dict:
        """The artifact's tensors from the daemon's stable DRAM replica, as zero-copy views of a
        private mapping of its memfd (writes stay in this process). Tied weights come back as
        views of the same bytes.
        Errors: NotFound (unknown artifact), FailedPrecondition (no stable DRAM replica, e.g. a
        lease only; or being deregistered), PermissionDenied (another uid than the daemon's),
        Unimplemented (device cuda: pending), InvalidArgument (other devices)."""
        torch = _torch()
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise InvalidArgument(f"cannot get {artifact_id}: bad device {device!r}: {e}") from None
        if dev.type == "cuda":
            raise Unimplemented(f"cannot get {artifact_id} on {dev}: the CUDA data plane of the Python client is "
                                f"pending; get it on cpu and move it")
        if dev.type != "cpu":
            raise InvalidArgument(f"cannot get {artifact_id} on {dev}: only cpu is supported")
        request = _messages.Request()
        request.get_artifact_memfd.artifact_id = artifact_id
        answer, fds = self._conn.call(request)
        body = answer.get_artifact_memfd
        try:
            if not fds:
                raise DataLoss(f"cannot get {artifact_id}: the daemon sent no memfd")
            size = body.size_bytes
            try:
                mm = mmap.mmap(fds[0], size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
            except (OSError, ValueError) as e:
                raise DataLoss(f"cannot get {artifact_id}: cannot map its replica of {size} bytes: {e}") from None
        finally:
            _close_fds(fds)
        try:
            index = json.loads(body.tensor_index_data)
        except ValueError as e:
            raise DataLoss(f"cannot get {artifact_id}: the daemon's index is not json: {e}") from None
        return _tensors_from(torch, mm, size, index, artifact_id)

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


def _lease_feed(registration_id: str, layout, region):
    feed = _messages.FeedRequest()
    feed.registration_id = registration_id
    ids = []
    for k, s in enumerate(layout.storages):
        sid = f"s{k}"
        ids.append(sid)
        e = feed.storage_entries.add()
        e.storage_id = sid
        e.device_id = -1
        e.storage_length = s.nbytes
        e.region_ref.CopyFrom(region)
        e.mapping_base_offset = s.offset
        seg = feed.lease_segments.segments.add()
        seg.storage_id = sid
        seg.storage_offset = 0
        seg.artifact_offset = s.offset
        seg.length = s.nbytes
    for name in sorted(layout.index):
        d = layout.descs[name]
        a = feed.tensor_aliases.add()
        a.name = name
        a.storage_id = ids[layout.storage_of[name]]
        a.storage_offset = d.storage_offset
        a.logical_length = _layout.extent_bytes(d.shape, d.stride, _layout.DTYPE_SIZES[d.dtype])
        a.shape.extend(d.shape)
        a.stride.extend(d.stride)
        a.dtype = d.dtype
    return feed


def _torch_dtype(torch, name: str, tensor: str, artifact_id: str):
    dtype = getattr(torch, name[len("torch."):], None) if name.startswith("torch.") else None
    if name not in _layout.DTYPE_SIZES or not isinstance(dtype, torch.dtype):
        raise InvalidArgument(f"cannot get {artifact_id}: tensor {_layout.quote(tensor)} has dtype {name}, which "
                              f"this torch cannot view")
    return dtype


def _tensors_from(torch, mm, size: int, index: dict, artifact_id: str) -> dict:
    if not isinstance(index, dict):
        raise DataLoss(f"cannot get {artifact_id}: the daemon's index is not a json object")
    base = torch.frombuffer(mm, dtype=torch.uint8) if size else torch.empty(0, dtype=torch.uint8)
    typed_cache: dict = {}
    out = {}
    for name, entry in index.items():
        try:
            offset, nbytes, shape, stride, dtype_name, storage_offset = entry
        except (TypeError, ValueError):
            raise DataLoss(f"cannot get {artifact_id}: index entry {_layout.quote(name)} is not "
                           f"[offset, size, shape, stride, dtype, storage_offset]") from None
        dtype = _torch_dtype(torch, dtype_name, name, artifact_id)
        element = _layout.DTYPE_SIZES[dtype_name]
        if offset + nbytes > size or nbytes % element:
            raise DataLoss(f"cannot get {artifact_id}: storage of tensor {_layout.quote(name)} [{offset}, "
                           f"{offset + nbytes}) does not fit the replica of {size} bytes in whole {dtype_name}s")
        if storage_offset * element + _layout.extent_bytes(shape, stride, element) > nbytes or \
                any(s < 0 for s in stride) or storage_offset < 0:
            raise DataLoss(f"cannot get {artifact_id}: tensor {_layout.quote(name)} reaches past its storage of "
                           f"{nbytes} bytes")
        key = (offset, nbytes, dtype_name)
        typed = typed_cache.get(key)
        if typed is None:
            typed = base[offset:offset + nbytes].view(dtype)
            typed_cache[key] = typed
        out[name] = typed.as_strided(shape, stride, typed.storage_offset() + storage_offset)
    return out
