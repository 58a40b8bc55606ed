"""The put flows: a copy of the tensors made by the daemon's own plans.

- Safetensors files: the stable_dram plan with the files' read-only fds on the Begin; the
  daemon reads, copies and hashes them itself at Commit (docs/wire-format.md §18). Where it
  cannot (more files than a frame's fds, an older daemon), as CPU tensors:
- CPU tensors and safetensors files: the stable_dram plan. Begin hands over the publish memfd;
  the canonical bytes are written into it here, each storage once from the tensor's memory (with
  pwrite on a few cores, through a mapping closed before the Feed on more: _buffers.py), or the
  files' bytes read with pread and written with pwrite. No writable mapping is left, so that the
  daemon can seal the memfd and keep it as its replica; then one Feed says the upload is
  complete.
- CUDA tensors: the coalesced plan. Begin hands over the CUDA IPC handle of a zeroed buffer on
  the GPU; torch copies each storage into it on the device and waits for the copies to land.

Either way Commit follows, where the daemon hashes. A failure after Begin aborts the
registration (nothing is left behind in the daemon).

Content the daemon holds already (reuse_held, as the C++ client's put_options::reuse_held): the
canonical index is built (cheap) and the artifacts listed; only when a stable mi2 replica of
the same index multihash is listed are the CPU tensors hashed here (_hash.py, on all cores),
and when the id matches its descriptor is answered with existed and nothing is sent: no
Begin, no memfd, no copy. Only with the default profile (cache): a put is not a join, so it
could not carry another profile's demands to the daemon's copy.

Thread-safety: each function runs one put over the given connection (which serialises calls).
"""

from __future__ import annotations

import ctypes
import os
import threading
import time

from . import _buffers, _cuda, _hash, _layout, _messages, _requests
from ._artifact import RegisteredArtifact
from ._torch import module as _torch
from ._wire import MAX_FDS_PER_FRAME, Connection, _close_fds
from .errors import DataLoss, Error, InvalidArgument, NotFound, PermissionDenied

# The profiles a held replica can answer: none given means cache (registration.md §6.1).
_REUSE_POLICIES = (None, "", "cache")


def put(conn: Connection, state_dict, policy: str | None, view=None, reuse_held: bool = False,
        replica_timeout_ms: int = 0) -> RegisteredArtifact:
    """Store.put: CPU tensors through stable_dram, CUDA tensors through coalesced. `view`: the
    ViewRegistrationOptions of a CLIENT-placement view (_views.py), put into the Begin.
    reuse_held: CPU tensors the daemon holds already are answered from its list (module doc).
    replica_timeout_ms: the commit's wait for copies on other hosts (0: the daemon's)."""
    torch = _torch()
    descs, device = _layout.state_dict_descs(torch, state_dict, "put state dict")
    layout = _layout.build(descs)
    profile = _requests.policy_profile(policy, "put state dict")
    if device.startswith("cuda"):
        return _put_cuda(conn, torch, layout, torch.device(device), profile, view, replica_timeout_ms)
    if reuse_held and view is None and policy in _REUSE_POLICIES and layout.total_size > 0:
        held = _held_replica(conn, torch, layout)
        if held is not None:
            return held

    def write(fd, start):
        with torch.no_grad():
            _buffers.write_publish_memfd(torch, fd, start, layout)

    return _put_stable_dram(conn, layout, profile, write, view, replica_timeout_ms)


def put_safetensors(conn: Connection, paths, policy: str | None, replica_timeout_ms: int = 0) -> RegisteredArtifact:
    """Store.put_safetensors: the files' layout (as the C++ client's) through stable_dram."""
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
    profile = _requests.policy_profile(policy, "put safetensors files")
    handed = _put_from_files(conn, layout, profile, replica_timeout_ms)
    if handed is not None:
        return handed

    def write(fd, start):
        files = {}
        buffer = bytearray(_buffers._FILE_PIECE)
        try:
            for s in layout.storages:
                path, at, length = s.source
                if not length:
                    continue
                if path not in files:
                    files[path] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                _buffers.pwrite_file_range(fd, start + s.offset, files[path], at, length, buffer)
        finally:
            for f in files.values():
                os.close(f)

    return _put_stable_dram(conn, layout, profile, write, None, replica_timeout_ms)


def _put_from_files(conn: Connection, layout, profile, replica_timeout_ms: int = 0) -> RegisteredArtifact | None:
    """Begin (stable_dram) with the files' read-only fds and where their bytes go → Commit: the
    daemon reads, copies and hashes them itself (docs/wire-format.md §18). None when there are
    more files than one frame carries fds for, or the daemon takes no files: then the caller
    copies them into the publish memfd."""
    stored = sorted((s for s in layout.storages if s.source[2]), key=lambda s: s.offset)
    paths = list(dict.fromkeys(s.source[0] for s in stored))
    if not stored or len(paths) > MAX_FDS_PER_FRAME:
        return None
    begin = _requests.put_begin(layout, profile, "stable_dram")
    number = {path: k for k, path in enumerate(paths)}
    for s in stored:
        path, at, length = s.source
        segment = begin.begin_register_artifact.stable_dram.file_segments.add()
        segment.fd_index, segment.file_offset = number[path], at
        segment.canonical_offset, segment.length = s.offset, length
    fds = []
    try:
        for path in paths:
            fds.append(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
        try:
            begun, _ = conn.call(begin, fds=fds)
        except InvalidArgument as e:
            if "arrived with a message that uses none" in str(e):
                return None  # a daemon from before puts from files
            raise
    finally:
        _close_fds(fds)
    registration_id = begun.begin_register_artifact.registration_id
    try:
        done = commit(conn, registration_id, replica_timeout_ms=replica_timeout_ms)
    except BaseException:
        abort(conn, registration_id)
        raise
    return RegisteredArtifact(done, layout, registration_id, "stable_dram", None)


def _held_replica(conn: Connection, torch, layout) -> RegisteredArtifact | None:
    """The daemon's stable mi2 replica of exactly these CPU tensors, as a put that existed;
    None when it holds none (then nothing was hashed unless a replica of this index was listed)."""
    index_multihash = _hash.index_multihash(layout.json)
    listed, _ = conn.call(_requests.list_artifacts())
    mi2 = _messages.enum_value(_messages.COMMON + ".ArtifactIdKind", "ARTIFACT_ID_KIND_MI2")
    stable = _messages.enum_value(_messages.WIRE + ".Tier", "TIER_STABLE_DRAM")
    candidates = [a.artifact_descriptor for a in listed.list_artifacts.artifacts
                  if a.artifact_descriptor.id_kind == mi2 and stable in a.tiers
                  and a.artifact_descriptor.index_multihash == index_multihash]
    if not candidates:
        return None
    started = time.perf_counter()
    keep, pieces = [], []
    with torch.no_grad():
        for s, src in _buffers.storage_sources(torch, layout):
            keep.append(src)  # the bytes stay alive while they are hashed
            pieces.append((s.offset, memoryview((ctypes.c_ubyte * s.nbytes).from_address(src.data_ptr())).cast("B")))
        pieces.sort(key=lambda p: p[0])
        artifact_id = _hash.mi2_id(layout.json, pieces, layout.total_size)
    del pieces, keep
    for d in candidates:
        if d.artifact_id == artifact_id:
            answer = _messages.Response().commit_registered_artifact
            answer.artifact_descriptor.CopyFrom(d)
            answer.existed = True
            return RegisteredArtifact(answer, layout, "", "stable_dram", None,
                                      {"hash": time.perf_counter() - started})
    return None


def _put_stable_dram(conn: Connection, layout, profile, write, view=None,
                     replica_timeout_ms: int = 0) -> RegisteredArtifact:
    """Begin (stable_dram) → write(fd, start) into the publish memfd → Feed → Commit."""
    begin = _requests.put_begin(layout, profile, "stable_dram")
    if view is not None:
        begin.begin_register_artifact.view.CopyFrom(view)
    begun, fds = conn.call(begin)
    registration_id = begun.begin_register_artifact.registration_id
    try:
        hs = begun.begin_register_artifact.stable_dram
        if not fds or not hs.HasField("publish_cpu_memfd"):
            raise DataLoss(f"cannot put {registration_id}: the daemon sent no publish memfd")
        handle = hs.publish_cpu_memfd
        if handle.size_bytes < layout.total_size:
            raise DataLoss(f"cannot put {registration_id}: the publish memfd holds {handle.size_bytes} bytes, "
                           f"fewer than total_size {layout.total_size}")
        # No writable mapping is left: the daemon then keeps the memfd as it is (one copy in all).
        try:
            write(fds[0], handle.offset_bytes)
        except OSError as e:
            raise DataLoss(f"cannot put {registration_id}: cannot write the publish memfd: {e}") from None
        finally:
            _close_fds(fds)
            fds.clear()
        conn.feed([_requests.stable_dram_feed(registration_id, layout.total_size)])
        done = commit(conn, registration_id, replica_timeout_ms=replica_timeout_ms)
    except BaseException:
        _close_fds(fds)
        abort(conn, registration_id)
        raise
    return RegisteredArtifact(done, layout, registration_id, "stable_dram", None)


def _put_cuda(conn: Connection, torch, layout, device, profile, view=None,
              replica_timeout_ms: int = 0) -> RegisteredArtifact:
    """Begin (coalesced, on the tensors' GPU by UUID) → copy into the daemon's buffer → Commit."""
    started = time.perf_counter()
    drv = _cuda.driver()
    ordinal = device.index if device.index is not None else torch.cuda.current_device()
    begin = _requests.put_begin(layout, profile, "coalesced", ordinal, drv.device_uuid(ordinal))
    if view is not None:
        begin.begin_register_artifact.view.CopyFrom(view)
    prepared = time.perf_counter()
    begun, fds = conn.call(begin)
    _close_fds(fds)
    registration_id = begun.begin_register_artifact.registration_id
    split = {"begin": time.perf_counter() - prepared}
    try:
        handle = begun.begin_register_artifact.coalesced.daemon_ipc_handle
        if not handle:
            raise DataLoss(f"cannot put {registration_id}: the daemon sent no IPC handle for its buffer")
        at = time.perf_counter()
        mapping = _cuda.IpcMapping(drv, ordinal, handle, layout.total_size,
                                   f"the daemon's buffer for {registration_id}")
        split["map"] = time.perf_counter() - at
        try:
            at = time.perf_counter()
            dst = _cuda.as_tensor(torch, mapping, ordinal, layout.total_size)
            with torch.cuda.device(ordinal):
                _buffers.write_storages(torch, dst, layout)
                # The daemon reads the buffer at commit: every copy must have landed.
                torch.cuda.synchronize(ordinal)
            del dst
            split["copy"] = time.perf_counter() - at
        except BaseException:
            mapping.close()
            raise
        # Unmapping a model-sized buffer takes tens of ms: it runs beside the Commit's hash.
        unmapping = threading.Thread(target=mapping.close, name="tensorreg-unmap")
        unmapping.start()
        copied = time.perf_counter()
        try:
            done = commit(conn, registration_id, replica_timeout_ms=replica_timeout_ms)
        finally:
            at = time.perf_counter()
            unmapping.join()
            split["unmap_wait"] = time.perf_counter() - at
    except BaseException:
        abort(conn, registration_id)
        raise
    # "rpc" is everything between the metadata and the Commit, begin, map and copy its parts;
    # unmap_wait is what the unmapping added after the Commit.
    timings = {"metadata": prepared - started, "rpc": copied - prepared, "commit": time.perf_counter() - copied,
               **split}
    return RegisteredArtifact(done, layout, registration_id, "coalesced", None, timings)


def commit(conn: Connection, registration_id: str, hash_in_background: bool = False, replica_timeout_ms: int = 0):
    """CommitRegisteredArtifact; the response body. Errors: the daemon's status
    (InvalidArgument for hash_in_background without a client_artifact_id)."""
    answer, _ = conn.call(_requests.commit(registration_id, hash_in_background, replica_timeout_ms))
    return answer.commit_registered_artifact


def abort(conn: Connection, registration_id: str) -> None:
    """AbortRegisteredArtifact, its errors swallowed: it runs while another error propagates."""
    try:
        conn.call(_requests.abort(registration_id))
    except Error:
        pass
