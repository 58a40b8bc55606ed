"""Reading an artifact back as tensors: get() from the stable DRAM replica, open() from GPU
memory.

- get: GetArtifactMemfd hands over the replica's memfd; it is mapped private (copy on write),
  and every tensor is a view of that mapping. On a CUDA device the whole replica is copied there
  once, so tied names stay tied and views stay views. A CUDA get of an artifact the daemon holds
  on disk only reads the persisted file straight to the device instead (_disk_load.py).
- open: OpenArtifactDevice, page after page, names the artifact's allocations (a lease's, or the
  daemon's buffer) with an IPC handle or VMM chunk fds each. Every allocation is checked first
  (its GPU visible here, on the device asked for, its fds all there), then each is mapped once,
  and every tensor is a view of its mapping; the mappings close with the last view.
- open with KeptMappings (Store.open(keep_mappings=True), a reader of successive versions): the
  mappings of the last open are kept and used again for the allocations the next answer names
  again, so a version over the same memory maps nothing; an answer equal to the last one but
  for the artifact's id gives back the last tensors after one comparison of its bytes; and when
  the daemon says the artifact's layout is the one the last answer named (its layout_token, a
  version republished over the same lease: docs/wire-format.md §20), the answer is a few bytes
  and the last tensors come back with no comparison at all.

Thread-safety: each function runs one read over the given connection (which serialises calls).
Ownership: the returned tensors own their mappings; fds received are closed here. A
KeptMappings holds the last open's mappings, tensors and a dup of its VMM fds until the next
open or close().
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from typing import Any

from . import _buffers, _cuda, _device, _disk_load, _layout, _requests
from ._torch import device as _torch_device
from ._torch import module as _torch
from . import _wire
from ._wire import Connection, _close_fds
from .errors import Aborted, DataLoss, FailedPrecondition, InvalidArgument


_STAGING_BYTES = 64 << 20


def _copy_to_device(torch, src, dev):
    """A CPU uint8 tensor over pageable memory (the replica's mapping) copied to `dev` through two
    pinned buffers: the copy engine reads pinned memory at its full speed, where a pageable
    copy goes through the driver's own small bounce buffer, and filling one buffer (torch's
    CPU copy, on all its threads) overlaps sending the other."""
    n = src.numel()
    dst = torch.empty(n, dtype=torch.uint8, device=dev)
    if n <= _STAGING_BYTES:
        dst.copy_(src)
        return dst
    stream = torch.cuda.current_stream(dev)
    staging = [torch.empty(_STAGING_BYTES, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
    sent = [None, None]  # the event after the last copy out of each buffer
    for k, offset in enumerate(range(0, n, _STAGING_BYTES)):
        length = min(_STAGING_BYTES, n - offset)
        buf = staging[k % 2]
        if sent[k % 2] is not None:
            sent[k % 2].synchronize()
        buf[:length].copy_(src[offset:offset + length])
        dst[offset:offset + length].copy_(buf[:length], non_blocking=True)
        sent[k % 2] = torch.cuda.Event()
        sent[k % 2].record(stream)
    stream.synchronize()
    return dst


def get_tensors(conn: Connection, artifact_id: str, device: Any, load_threads: int | None = None,
                direct: bool = True) -> dict:
    """Store.get: the replica mapped private, on cpu or copied once to a CUDA device. On a CUDA
    device, an artifact the daemon holds on disk only is read from its persisted file straight
    to the device instead (_disk_load, with `load_threads` threads), unless `direct` is False."""
    torch = _torch()
    what = f"get {artifact_id}"
    dev = _torch_device(torch, device, what)
    if dev.type not in ("cpu", "cuda"):
        raise InvalidArgument(f"cannot {what} on {dev}: only cpu and cuda are supported")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FailedPrecondition(f"cannot {what} on {dev}: torch {torch.__version__} sees no CUDA device")
    if dev.type == "cuda" and direct:
        loaded = _disk_load.get_tensors(conn, artifact_id, dev, torch, threads=load_threads)
        if loaded is not None:
            return loaded
    answer, fds = conn.call(_requests.get_artifact_memfd(artifact_id))
    body = answer.get_artifact_memfd
    try:
        if not fds:
            raise DataLoss(f"cannot {what}: the daemon sent no memfd")
        size = body.size_bytes
        try:
            mm = _buffers.map_private(fds[0], size)
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
            moved = _copy_to_device(torch, base, dev)
        except RuntimeError as e:
            raise FailedPrecondition(f"cannot {what} on {dev}: cannot copy the replica there: {e}") from None
        finally:
            del base  # the mapping can close only once no tensor exports it
            _buffers.close_map(mm)
        base = moved

    def locate(offset, nbytes, name):
        if offset + nbytes > size:
            raise DataLoss(f"cannot {what}: storage of tensor {_layout.quote(name)} [{offset}, "
                           f"{offset + nbytes}) does not fit the replica of {size} bytes")
        return base, offset

    return _device.build_views(torch, index, locate, what, empty_device=base.device)


def open_tensors(conn: Connection, artifact_id: str, device: Any, kept: KeptMappings | None = None,
                 place: bool = False) -> dict:
    """Store.open: each allocation mapped once on its GPU (found by UUID), the tensors views.
    With `kept`, the mappings of the last open through it are used again where the daemon names
    the same allocation, and an answer equal to the last one's (same index, allocations and
    segments) gives back the last open's tensors."""
    torch = _torch()
    what = f"open {artifact_id}"
    dev = _torch_device(torch, device, what)
    if dev.type != "cuda":
        raise InvalidArgument(f"cannot {what} on {dev}: open() maps GPU memory; use get() for cpu")
    drv = _cuda.driver()  # before the call: no GPU here means nothing to ask the daemon for
    # The GPU the daemon copies it to when it has no GPU memory: `device`'s, or the current one.
    place_on = drv.device_uuid(dev.index if dev.index is not None else torch.cuda.current_device()) if place else ""
    if kept is None:
        body, fds, vmm_fds = open_pages(conn, artifact_id, what, place_on=place_on)
    else:
        known = kept.layout[1] if kept.layout[0] == str(dev) else 0
        body, fds, vmm_fds, payload = open_pages(conn, artifact_id, what, raw=True, known_layout=known,
                                                 place_on=place_on)
        if known and body.layout_unchanged and body.layout_token == known:
            _close_fds(fds)
            kept.reopened += 1
            kept.by_token += 1
            return dict(kept.tensors)
    bases = []
    ordinal = dev.index
    signature = None
    try:
        if kept is not None:
            # The descriptor (the id) differs from version to version; everything else equal
            # means the same tensors over the same allocations (the VMM fds checked apart:
            # their numbers differ from answer to answer).
            signature = (str(dev), answer_signature(payload, body.layout_token))
            if signature[1] is not None and kept.signature == signature and kept.same_vmm(vmm_fds):
                kept.reopened += 1
                kept.layout = (str(dev), body.layout_token)
                return dict(kept.tensors)
        try:
            index = json.loads(body.tensor_index_data)
        except ValueError as e:
            raise DataLoss(f"cannot {what}: the daemon's index is not json: {e}") from None
        allocations = list(body.allocations)  # each repeated-field access builds a wrapper: once
        opens = _checked_opens(drv, dev, allocations, vmm_fds, what)
        if opens:
            ordinal = opens[-1][1]

        def map_one(k, here, a, source):
            label = f"allocation {k} of {artifact_id}"
            if source == "cuda_ipc_handle":
                return _cuda.IpcMapping(drv, here, a.cuda_ipc_handle, a.size_bytes, label)
            return _cuda.VmmMapping(drv, here, vmm_fds[k], [c.size_bytes for c in a.vmm.chunks], a.size_bytes,
                                    label)

        reused = [kept.find(job, vmm_fds) for job in opens] if kept is not None else [None] * len(opens)
        # One after the other: the driver serialises IPC opens and VMM imports, so threads would
        # only add contention. The device's context is made current once for the batch, not
        # once per allocation.
        fresh = [job for job, r in zip(opens, reused) if r is None]
        with drv.on(fresh[0][1]) if fresh else contextlib.nullcontext():
            mapped = iter([map_one(*job) for job in fresh])
        bases = [r if r is not None else _cuda.as_tensor(torch, next(mapped), here, a.size_bytes)
                 for r, (_, here, a, _) in zip(reused, opens)]
        if kept is not None:
            kept.remember(opens, bases, vmm_fds)
    finally:
        _close_fds(fds)  # imported (or failed): the mappings do not need them
    found = _segments(body, [a.size_bytes for a in allocations], len(bases), what)

    def locate(offset, nbytes, name):
        allocation, at = found.find(offset, nbytes, name)
        return bases[allocation], at

    empty_device = torch.device("cuda", ordinal if ordinal is not None else torch.cuda.current_device())
    tensors = _device.build_views(torch, index, locate, what, empty_device=empty_device)
    if kept is not None:
        kept.signature = signature
        kept.tensors = tensors
        kept.layout = (str(dev), body.layout_token)
        return dict(tensors)
    return tensors


def _varint(data: bytes, at: int) -> tuple:
    value, shift = 0, 0
    while True:
        b = data[at]
        at += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, at
        shift += 7


def _fields(data: bytes, start: int, end: int):
    """(field number, first byte, end) of each field of a message serialised in data[start:end];
    the value of a length-delimited field lies in [first byte, end)."""
    at = start
    while at < end:
        tag, at = _varint(data, at)
        number, kind = tag >> 3, tag & 7
        if kind == 0:
            _, after = _varint(data, at)
        elif kind == 2:
            n, at = _varint(data, at)
            after = at + n
        elif kind == 1:
            after = at + 8
        elif kind == 5:
            after = at + 4
        else:
            raise ValueError(f"wire type {kind}")
        yield number, at, after
        at = after


def answer_signature(payload: bytes, layout_token: int = 0):
    """An OpenArtifactDevice answer's bytes without the request id, the status, the artifact's
    descriptor (Response field 43, its field 1) and its layout_token (field 7, serialised last):
    equal for two versions of the same tensors over the same allocations, registered apart or
    republished. None when the bytes cannot be read so."""
    try:
        for number, start, end in _fields(payload, 0, len(payload)):
            if number == 43:
                out = payload[start:end]
                for inner, first, after in _fields(payload, start, end):
                    if inner == 1:  # the descriptor: as serialised, the first field
                        out = payload[after:end]
                    break
                if layout_token:
                    tail = b"\x38" + _wire.encode_varint(layout_token)
                    if out.endswith(tail):
                        out = out[:-len(tail)]
                return out
    except (IndexError, ValueError):
        pass
    return None



_KCMP_FILE = 0
_SYS_KCMP = {"x86_64": 312, "aarch64": 272}.get(os.uname().machine)
_libc = None


def same_open_file(fd_a: int, fd_b: int):
    """Whether two fds of this process share one open file description (kcmp(2)): True, False,
    or None where the kernel does not say (no kcmp; then nothing is reused)."""
    global _libc
    if _SYS_KCMP is None:
        return None
    if _libc is None:
        import ctypes
        _libc = ctypes.CDLL(None, use_errno=True)
    pid = os.getpid()
    r = _libc.syscall(_SYS_KCMP, pid, pid, _KCMP_FILE, fd_a, fd_b)
    if r < 0:
        return None
    return r == 0


class KeptMappings:
    """What open(keep_mappings=True) keeps for the next open of the same Store: the mapping
    (as its uint8 tensor) of every allocation the last answer named, and that answer's tensors.

    An IPC allocation is found again by its handle bytes and size (the producer's Registrar
    sends the same export while the allocation lives); a VMM allocation by its chunk fds being
    the same open files as the ones kept (kcmp(2): the daemon hands out duplicates of the fds it
    holds for the region, so the same pages come as the same files; a dup of each is kept here;
    where kcmp is refused, as under Docker's default seccomp profile without CAP_SYS_PTRACE,
    VMM allocations are mapped again each time: an fd's inode cannot tell them apart).
    Only the last answer's allocations are kept: one that is no longer named is dropped here and
    unmapped once the last tensor over it is freed.

    Thread-safety: one open at a time, under `lock` (the Store takes it).
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.signature = None
        self.tensors: dict = {}
        self.layout = (None, 0)  # (device, layout_token) of the answer the tensors were built from
        self.ipc: dict = {}  # (ordinal, handle bytes, size) -> uint8 tensor over the mapping
        self.vmm: list = []  # (ordinal, chunk sizes, size, [kept dup fds], uint8 tensor)
        self.reopened = 0
        self.by_token = 0  # of those, the opens the daemon answered "layout unchanged"

    def find(self, job, vmm_fds: dict):
        k, here, a, source = job
        if source == "cuda_ipc_handle":
            return self.ipc.get((here, a.cuda_ipc_handle, a.size_bytes))
        sizes = tuple(c.size_bytes for c in a.vmm.chunks)
        fds = vmm_fds[k]
        for ordinal, chunk_sizes, size, kept_fds, base in self.vmm:
            if (ordinal, chunk_sizes, size) == (here, sizes, a.size_bytes) and \
                    all(same_open_file(x, y) for x, y in zip(fds, kept_fds)):
                return base
        return None

    def same_vmm(self, vmm_fds: dict) -> bool:
        """The answer's VMM fds are the kept ones, allocation by allocation (answers with
        equal signatures name the same allocations in the same order)."""
        if not self.vmm and not vmm_fds:
            return True
        kept = [entry[3] for entry in self.vmm]
        got = [vmm_fds[k] for k in sorted(vmm_fds)]
        if len(kept) != len(got):
            return False
        return all(len(a) == len(b) and all(same_open_file(x, y) for x, y in zip(a, b)) for a, b in zip(got, kept))

    def remember(self, opens: list, bases: list, vmm_fds: dict) -> None:
        ipc, vmm = {}, []
        old = self.vmm
        for (k, here, a, source), base in zip(opens, bases):
            if source == "cuda_ipc_handle":
                ipc[(here, a.cuda_ipc_handle, a.size_bytes)] = base
                continue
            kept_fds = next((e[3] for e in old if e[4] is base), None)
            if kept_fds is None:
                kept_fds = [os.dup(fd) for fd in vmm_fds[k]]
            vmm.append((here, tuple(c.size_bytes for c in a.vmm.chunks), a.size_bytes, kept_fds, base))
        still = {id(e[3]) for e in vmm}
        for e in old:
            if id(e[3]) not in still:
                _close_fds(e[3])
        self.ipc, self.vmm = ipc, vmm

    def close(self) -> None:
        """Drops everything kept: each mapping closes once no tensor over it is left."""
        with self.lock:
            self._drop()

    def _drop(self) -> None:
        for e in self.vmm:
            _close_fds(e[3])
        self.ipc, self.vmm, self.tensors, self.signature, self.layout = {}, [], {}, None, (None, 0)


def _checked_opens(drv, dev, allocations: list, vmm_fds: dict, what: str) -> list:
    """(allocation number, ordinal here, allocation, source) of every allocation, each checked
    before any is mapped: its GPU visible to this process and the one asked for, its VMM fds all
    received. Errors: FailedPrecondition, InvalidArgument, DataLoss."""
    opens = []
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
    return opens


def _segments(body, sizes: list, mapped: int, what: str) -> _device.Segments:
    """The answer's segments, each checked to lie inside one of the `mapped` allocations."""
    segments = []
    for s in body.segments:
        allocation, at, length = s.allocation, s.allocation_offset, s.length
        if allocation >= mapped or at + length > sizes[allocation]:
            raise DataLoss(f"cannot {what}: segment at artifact offset {s.artifact_offset} of {length} bytes "
                           f"lies outside allocation {allocation}")
        segments.append((s.artifact_offset, length, allocation, at))
    return _device.Segments(segments, what)


def open_pages(conn: Connection, artifact_id: str, what: str, raw: bool = False, known_layout: int = 0,
               place_on: str = "") -> tuple:
    """OpenArtifactDevice, page after page (docs/wire-format.md §13): one answer carries at
    most 250 fds, so the VMM fds of a large expandable-segment model come in several.
    Returns (the first answer, every fd received, {allocation number: its chunks' fds}), and
    with `raw` the first answer's bytes as received. `place_on`: the UUID of the GPU the daemon
    copies the artifact to when it has no GPU memory (asked with the first page only)."""
    fds, vmm_fds, first, body = [], {}, 0, None
    try:
        while True:
            request = _requests.open_artifact_device(artifact_id, first, known_layout, place_on if first == 0 else "")
            if raw:
                answer, got, payload = conn.call(request, raw=True)
            else:
                answer, got = conn.call(request)
            fds.extend(got)
            page = answer.open_artifact_device
            if body is None:
                body = page
                first_payload = payload if raw else None
            elif [(a.device_uuid, a.size_bytes) for a in page.allocations] != \
                    [(a.device_uuid, a.size_bytes) for a in body.allocations]:
                raise Aborted(f"cannot {what}: its GPU memory changed while it was being opened; try again")
            end = page.end_allocation
            # A page without fds has no VMM allocation to give them to (one that names chunks
            # anyway is refused before anything is mapped: _checked_opens).
            for k in range(first, min(end, len(page.allocations)) if got else first):
                a = page.allocations[k]
                if a.WhichOneof("source") != "vmm":
                    continue
                bad = [c.fd_index for c in a.vmm.chunks if c.fd_index >= len(got)]
                if bad:
                    raise DataLoss(f"cannot {what}: allocation {k} names fd #{bad[0]}, but the answer carried "
                                   f"{len(got)} fds")
                vmm_fds[k] = [got[c.fd_index] for c in a.vmm.chunks]
            if end >= len(page.allocations):
                return (body, fds, vmm_fds, first_payload) if raw else (body, fds, vmm_fds)
            if end <= first:
                raise DataLoss(f"cannot {what}: the daemon's answer for allocations from {first} made no progress")
            first = end
    except BaseException:
        _close_fds(fds)
        raise
