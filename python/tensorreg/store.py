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

This module is the facade; the work is done in: _put (the put flows), _register (the register
flows: host region, CUDA regions with the Feed built meanwhile), _registrar (the same tensors
registered again and again, with what can be reused kept), _leases (Lease, keep-alive,
release), _reads (get, open), _requests (the wire messages), _artifact (RegisteredArtifact),
_buffers (memfd mappings, storage copies) and _torch (torch on first use, device parsing).
"""
from __future__ import annotations

import json
import weakref
from typing import Any

from . import _put, _reads, _register, _requests, _views
from ._artifact import LocalStableTier, RegisteredArtifact
from ._leases import Lease
from ._registrar import Registrar
from ._views import AssemblyStatus, Narrow, Transpose, ViewRegistration
from ._requests import DEFAULT_TTL_MS
from ._wire import Connection
from .errors import InvalidArgument

__all__ = ["Store", "RegisteredArtifact", "Lease", "LocalStableTier", "ViewRegistration", "AssemblyStatus", "Narrow",
           "Transpose"]


def _replica_timeout_ms(seconds, what: str) -> int:
    """A commit's wait for copies on other hosts, in ms for the wire (0: the daemon's own)."""
    if seconds is None:
        return 0
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0:
        raise InvalidArgument(f"cannot {what}: replica_timeout {seconds!r} is not a number of seconds > 0")
    return min(max(1, round(seconds * 1000)), 2**32 - 1)


class Store:
    """A connection to tensorregd and the registration calls over it.

    socket: the daemon's socket path (default: $XDG_RUNTIME_DIR/tensorreg/tensorregd.sock, else
    /tmp/tensorreg-$UID/tensorregd.sock). timeout: seconds per socket operation (None = wait).
    Errors: Unavailable when no daemon answers there.
    """

    def __init__(self, socket: str | None = None, *, timeout: float | None = None) -> None:
        self._conn = Connection(socket, timeout)
        self._leases: weakref.WeakSet[Lease] = weakref.WeakSet()
        self._registrars: weakref.WeakSet[Registrar] = weakref.WeakSet()
        self._kept_mappings = _reads.KeptMappings()

    @property
    def socket_path(self) -> str:
        return self._conn.path

    def close(self) -> None:
        """Releases the leases and registrars this store made and the mappings open() kept,
        then closes the connection. Idempotent."""
        for lease in list(self._leases):
            lease.close()
        for registrar in list(self._registrars):
            registrar.close()
        self._kept_mappings.close()
        self._conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- put (_put.py) ----

    def put(self, state_dict, *, policy: str | None = "cache", reuse_held: bool = True,
            replica_timeout: float | None = None) -> RegisteredArtifact:
        """Stores a copy of the tensors in the daemon: CPU tensors in its stable DRAM (the
        stable_dram plan through the publish memfd), CUDA tensors in a daemon-owned buffer on
        their GPU (the coalesced plan). `policy` is a profile name (cache, durable, ha, cold,
        warm, pinned), explicit tiers "LEVEL:TIER[:SCOPE[:N]],..." (e.g.
        "should:stable_dram:remote:2": two other hosts hold it, docs/cluster.md §5; the answer's
        remote_stable_tier says whether they do), or None for the daemon's default.
        reuse_held (CPU tensors, policy cache or None): when the daemon lists a stable replica
        of the same index, the tensors are hashed here first, and content it holds already is
        answered with existed=True and registration_id "" without copying anything; False
        always copies. replica_timeout: seconds the commit waits for the copies on other hosts
        that the policy asks for (None: the daemon's --replica-timeout-ms, which also caps it).
        Errors: InvalidArgument (bad input, mixed devices, a replica_timeout not > 0; before
        anything is sent), FailedPrecondition (CUDA tensors and no usable driver, or a daemon
        without that GPU), the daemon's status (ResourceExhausted when its budget or the GPU is
        full, ...)."""
        wait_ms = _replica_timeout_ms(replica_timeout, "put state dict")
        return _put.put(self._conn, state_dict, policy, reuse_held=reuse_held, replica_timeout_ms=wait_ms)

    def put_safetensors(self, paths, *, policy: str | None = "cache",
                        replica_timeout: float | None = None) -> RegisteredArtifact:
        """Stores safetensors files (one artifact) as `tensorreg put` does: the same layout and
        id as the C++ client. Needs no torch. replica_timeout: as put()'s.
        Errors: InvalidArgument (bad files, a replica_timeout not > 0), NotFound (no such file),
        the daemon's status."""
        wait_ms = _replica_timeout_ms(replica_timeout, "put safetensors files")
        return _put.put_safetensors(self._conn, paths, policy, replica_timeout_ms=wait_ms)

    # ---- register (_register.py) ----

    def register(self, state_dict, *, ttl_ms: int = DEFAULT_TTL_MS, client_artifact_id: str | None = None,
                 policy: str | None = None, hash_in_background: bool = False) -> RegisteredArtifact:
        """Leases the tensors in place (LIP). CUDA tensors are leased where they are (the daemon
        maps their allocations; other processes can then open() them); CPU tensors are copied
        once into a daemon-managed HOST_SHARED region and leased from there. The lease lives
        until the artifact's close(), its garbage collection, this Store's close() or
        interpreter exit, and holds the storages until then. ttl_ms 0 = no expiry (and no
        keepalive thread). client_artifact_id makes a `cgid:` artifact.
        hash_in_background (needs client_artifact_id): the commit answers once the artifact is
        usable by its cgid and the daemon computes its mi2 id afterwards; wait_hash() answers it.
        Do not write the tensors until wait_hash() says "done": the id is of the bytes at hash
        time (docs/registration.md §4.8).
        Errors: InvalidArgument (bad input, mixed devices; before anything is sent),
        FailedPrecondition (CUDA tensors and no usable driver, VMM memory that cannot be
        exported as POSIX fds, a daemon that does not see the GPU), the daemon's status
        (InvalidArgument for hash_in_background without client_artifact_id)."""
        art = _register.register(self._conn, state_dict, ttl_ms, client_artifact_id, policy, hash_in_background)
        self._leases.add(art.lease)
        return art

    def registrar(self, *, ttl_ms: int = DEFAULT_TTL_MS, policy: str | None = None,
                  snapshot: bool = False, publish_copy: bool = False) -> Registrar:
        """A Registrar: register() of the same state dict again and again, where a registration
        whose tensors are in the same memory with the same layout as the last one's only sends
        Begin, the kept Feed and Commit (the exports, regions, layout and Feed are kept until
        the registrar's close(), or this Store's). _registrar.py has the rules. snapshot=True
        asks for snapshot leases (the daemon copies the bytes at commit). publish_copy=True (CUDA
        tensors) makes each registration a put whose copy the daemon makes on the GPU from the
        kept regions: a put of the same allocations again opens nothing (registration.md §5.5).
        Errors: InvalidArgument (ttl_ms, policy)."""
        registrar = Registrar(self._conn, ttl_ms, policy, snapshot, publish_copy)
        self._registrars.add(registrar)
        return registrar

    # ---- get and open (_reads.py) ----

    # ---- views and pieces (_views.py; registration.md §7) ----

    def register_view(self, artifact_or_tensors, spec=None, placement: str = "server", *, tensor_names=None,
                      view_id: str = "", policy: str | None = None) -> ViewRegistration:
        """Registers a CANONICAL view: of an artifact the daemon holds (its id; read from its
        stable DRAM replica) or of a state dict (CPU or CUDA tensors; registered whole as well).
        spec: {name: ("narrow", dim, start, length) | ("transpose", d0, d1) | [ops]}.
        tensor_names: canonical tensors taken whole; None = every tensor the spec does not name
        (a CANONICAL view must cover every canonical byte). placement "server": the view bytes
        (the spec applied to the tensors, made contiguous) are written into a staging memfd the
        daemon hands out, and the daemon writes them to canonical offsets, so a transpose is
        made twice, here and back in the daemon; "client": the canonical tensors go up as put()
        sends them (the cheaper way when you hold them). view_id: checked by the
        daemon when given. Returns a ViewRegistration (view_id, canonical_ranges,
        view_index_json, view_data_hash, registration_kind, artifact_id).
        Errors: the daemon's status for every rule of registration.md §7 (InvalidArgument for a
        bad spec, bounds, coverage or view_id; NotFound for an unknown artifact, ...);
        InvalidArgument for a spec that is not ops, before anything is sent."""
        return _views.register_view(self._conn, artifact_or_tensors, spec, placement, tensor_names, view_id, policy)

    def register_piece(self, cgid: str, tensors, rank_spec=None, *, canonical_index=None,
                       ttl_ms: int = DEFAULT_TTL_MS, view_id: str = "") -> ViewRegistration:
        """Registers a tensor-parallel rank's tensors as a PIECE of the artifact `cgid`.
        rank_spec: {name: (dim, start, canonical_size)}: the local tensor is
        narrow(dim, start, its size) of a canonical tensor whose dim has canonical_size
        elements; tensors it does not name are whole. The canonical index is the whole model's
        (each tensor contiguous in its own storage, as model.state_dict() has them) unless
        canonical_index (its JSON) is given. When the pieces so far cover every canonical byte,
        the daemon seals the assembly under the mi2 id of the whole; the answer's `assembly`
        says where it stands. ttl_ms: the assembly expires this long after its last piece.
        A piece whose bytes another rank is still sending (the tensors every rank holds whole,
        claimed by the rank that began first) commits once that rank has: the call waits, up
        to ttl_ms, and compares them then.
        Errors: the daemon's status (InvalidArgument for the §7 rules, Aborted when bytes this
        piece shares with an earlier one differ, FailedPrecondition once the assembly is sealed);
        InvalidArgument for a bad rank_spec, before anything is sent."""
        return _views.register_piece(self._conn, cgid, tensors, rank_spec, canonical_index, ttl_ms, view_id)

    def view(self, artifact_id: str, view_id: str) -> dict:
        """The record of a view registered on an artifact: view_id, registration_kind, spec
        ({name: [Narrow | Transpose]}, normalized), view_index (dict), view_data_hash,
        view_size, canonical_ranges. Errors: NotFound (no such artifact or view)."""
        r = _views.view_record(self._conn, artifact_id, view_id)
        return {"view_id": r.view_id, "registration_kind": _views._kind_name(r.registration_kind),
                "spec": _views.record_ops(r), "view_index": json.loads(r.view_index_json or b"{}"),
                "view_data_hash": r.view_data_hash, "view_size": r.view_size,
                "canonical_ranges": [(c.offset, c.length) for c in r.canonical_ranges]}

    def get(self, artifact_id: str, device: Any = "cpu", *, view: str | None = None,
            load_threads: int | None = None) -> dict:
        """The artifact's tensors from the daemon's stable DRAM replica, as zero-copy views of a
        private mapping of its memfd (writes stay in this process). On a CUDA device ("cuda",
        "cuda:N") the replica is copied to that GPU once and the tensors are views of the copy.
        Tied weights come back as views of the same bytes.
        Errors: NotFound (unknown artifact), FailedPrecondition (no stable DRAM replica, e.g. a
        lease only; or being deregistered), PermissionDenied (another uid than the daemon's),
        InvalidArgument (devices other than cpu and cuda).
        view: a view_id registered on the artifact: its tensors instead, with the view's shapes
        (torch's narrow/transpose of the canonical tensors, zero-copy); NotFound when the
        artifact has no such view.
        On a CUDA device, an artifact the daemon holds on disk only (--persist-dir, after a
        restart) is read from its persisted file straight to the GPU, every 4 MiB leaf checked
        against its XXH3-128 (DataLoss naming a leaf that does not match), by `load_threads`
        threads (default min(8, cpus)); the daemon then loads nothing into its own memory."""
        if view is not None:
            return _views.get_view(self._conn, artifact_id, view, device)
        return _reads.get_tensors(self._conn, artifact_id, device, load_threads=load_threads)

    def open(self, artifact_id: str, device: Any = "cuda", *, keep_mappings: bool = False,
             place: bool = False) -> dict:
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
        (device not cuda, or cuda:N when the artifact is on another GPU).
        keep_mappings=True: this Store keeps the mappings (and the tensors) of the last such
        open until the next one or close(); the next open maps only the allocations it does not
        hold yet, and gives back the same tensor objects when the answer is the last one's but
        for the id (a producer's next version over the same memory and layout).
        place=True: an artifact with no GPU memory (a stable DRAM replica only: put from files,
        on disk only, or held by another host of the daemon's cluster, which the daemon pulls
        first) is copied by the daemon to a buffer of its own on `device` (the current GPU for
        "cuda"), and the tensors map that copy; other processes that open it map the same copy.
        It lives as long as the artifact. Without place, such an artifact is FailedPrecondition."""
        if not keep_mappings:
            return _reads.open_tensors(self._conn, artifact_id, device, place=place)
        with self._kept_mappings.lock:
            return _reads.open_tensors(self._conn, artifact_id, device, self._kept_mappings, place=place)

    def _open_pages(self, artifact_id: str, what: str) -> tuple:
        """_reads.open_pages over this store's connection (the paging, testable alone)."""
        return _reads.open_pages(self._conn, artifact_id, what)

    def wait_hash(self, artifact_id: str, timeout: float | None = None) -> tuple:
        """(state, mi2_id) of the background hash of a cgid artifact registered with
        hash_in_background, named by its cgid or its mi2 id: state is "done" (mi2_id set),
        "failed" (the lease was revoked or expired, its owner exited, it was deregistered),
        "pending" (`timeout` seconds passed first; None waits until it ends) or "none" (no
        background hash; an mi2 artifact answers ("done", its own id)).
        Errors: NotFound (unknown artifact), InvalidArgument (timeout not a number >= 0)."""
        if timeout is None:
            timeout_ms = 0
        else:
            if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout >= 0:
                raise InvalidArgument(f"cannot wait for the hash of {artifact_id}: timeout {timeout!r} is not a "
                                      "number of seconds >= 0")
            # 0 on the wire means no limit: a zero timeout still waits one millisecond.
            timeout_ms = min(max(1, round(timeout * 1000)), 2**32 - 1)
        answer, _ = self._conn.call(_requests.wait_artifact_hash(artifact_id, timeout_ms))
        body = answer.wait_artifact_hash
        return _requests.HASH_STATES.get(body.hash_state, "none"), body.mi2_id

    # ---- catalogue ----

    def index(self, artifact_id: str) -> tuple:
        """(descriptor dict, index dict) of an artifact. Errors: NotFound."""
        answer, _ = self._conn.call(_requests.artifact_index(artifact_id))
        body = answer.get_artifact_index_by_id
        return _requests.descriptor_dict(body.artifact_descriptor), json.loads(body.tensor_index_data)

    def list(self) -> list:
        """Every artifact the daemon holds: dicts of the descriptor plus tiers, lease_count and
        verified_id."""
        answer, _ = self._conn.call(_requests.list_artifacts())
        out = []
        for a in answer.list_artifacts.artifacts:
            d = _requests.descriptor_dict(a.artifact_descriptor)
            d["tiers"] = [_requests.tier_name(t) for t in a.tiers]
            d["lease_count"] = a.lease_count
            d["verified_id"] = a.verified_id  # the mi2 id a background hash found, else ""
            out.append(d)
        return out

    def assemblies(self) -> list:
        """The piece assemblies the daemon holds, open or sealed until they expire, by cgid
        (AssemblyStatus each): an open one has no artifact yet, so list() cannot show it."""
        answer, _ = self._conn.call(_requests.list_artifacts())
        return [AssemblyStatus.from_message(a) for a in answer.list_artifacts.assemblies]

    def stats(self) -> dict:
        answer, _ = self._conn.call(_requests.stats())
        s = answer.get_stats
        tier_name = _requests.tier_name
        return {
            "artifacts": s.artifacts, "leases": s.leases, "regions": s.regions, "open_mappings": s.open_mappings,
            "pending_registrations": s.pending_registrations, "connections": s.connections,
            "vmm_reserved_bytes": s.vmm_reserved_bytes,
            # Faulted in ahead of the next host put (tensorregd --populated-reserve), ready now.
            "populated_reserve_bytes": s.populated_reserve_bytes,
            "tiers": {tier_name(t.tier): {"bytes": t.bytes, "artifacts": t.artifacts} for t in s.tiers},
            # Pulls from the cluster under way (docs/wire-format.md §14).
            "pulls": [{"artifact_id": p.artifact_id, "total_bytes": p.total_bytes,
                       "verified_bytes": p.verified_bytes, "sources": list(p.sources), "seconds": p.seconds}
                      for p in s.pulls],
        }

    def publish(self, artifact_id: str, replicas: int | None = None, all: bool = False,
                timeout: float = 60.0) -> dict:
        """Asks the members of the daemon's cluster to hold replicas of `artifact_id`, which the
        daemon holds, until `replicas` of them (the daemon counted) do, or every member with
        `all`, and waits for them up to `timeout` seconds (docs/cluster.md §5). Returns
        {"holders": [host ids with a complete replica], "asked": [host ids asked], "target": n,
        "reached": bool, "members": n (it ends once they all hold it), "declined": ["HOST: reason"
        of asked members whose pull failed, each replaced by another]}; not reached in time is no error. A Store opened with a socket timeout
        shorter than `timeout` gives up first.
        Errors: InvalidArgument (neither or both of replicas and all, replicas < 1, a timeout
        that is not a number > 0, a cgid), NotFound (not held by the daemon),
        FailedPrecondition (the daemon runs without --cluster), Unavailable (etcd unreachable)."""
        if (replicas is None) == (not all):
            raise InvalidArgument(f"cannot publish {artifact_id}: give replicas or all=True, not both or neither")
        if replicas is not None and (isinstance(replicas, bool) or not isinstance(replicas, int) or
                                     not 1 <= replicas < 2**32):
            raise InvalidArgument(f"cannot publish {artifact_id}: replicas {replicas!r} is not a number >= 1")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise InvalidArgument(f"cannot publish {artifact_id}: timeout {timeout!r} is not a number of "
                                  "seconds > 0")
        timeout_ms = _replica_timeout_ms(timeout, f"publish {artifact_id}")
        answer, _ = self._conn.call(_requests.publish_artifact(artifact_id, replicas or 0, bool(all), timeout_ms))
        p = answer.publish_artifact
        return {"holders": list(p.holders), "asked": list(p.asked), "target": p.target, "reached": p.reached,
                "members": p.members, "declined": list(p.declined)}

    def deregister(self, artifact_id: str, *, wait_for_drain: bool = True) -> dict:
        """Drains and removes an artifact. Errors: NotFound, DeadlineExceeded."""
        answer, _ = self._conn.call(_requests.deregister(artifact_id, wait_for_drain))
        r = answer.deregister_artifact
        return {"drained": r.drained, "removed": r.removed}
