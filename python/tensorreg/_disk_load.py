"""Loading an artifact that the daemon holds on disk only straight into this process's memory:
the direct path of a CUDA get (issue #16; docs/wire-format.md §17).

OpenPersistedArtifact hands over a read-only fd of the persisted canonical bytes and the XXH3-128
of every 4 MiB leaf. `threads` threads each take leaf-aligned chunks in turn, read each with
os.preadv into one of their two staging buffers (page-locked for a CUDA destination), check
each leaf's XXH3-128 (libxxhash through ctypes, which drops the GIL, so the threads hash in
parallel) and copy the chunk to the destination: on a CUDA stream of the thread's own,
non_blocking, with an event that says when the buffer may be read into again. One pass, file →
staging → destination: the daemon loads nothing into its memory, and nothing is copied twice.

A leaf that does not match is DataLoss naming the leaf and its offset (the daemon's own
background check quarantines the copy); a file that ends early is DataLoss, never a wait. Where
the direct path does not apply (no libxxhash, a daemon without the RPC, an artifact not on the
disk or also in the daemon's memory), get_tensors() answers None and the caller takes the
daemon's restore path (_reads.get_tensors).

The core, load_into(), takes any destination: a CPU tensor (plain staging buffers, no streams)
is how the tests exercise chunking, threads, short reads and damaged leaves without a GPU.

Thread-safety: each call runs one load and starts and joins its own threads. Ownership: the fd
received is closed before get_tensors() returns; staging buffers live for one load (torch's
pinned-memory cache keeps them for the next).
"""

from __future__ import annotations

import ctypes
import itertools
import json
import logging
import os
import struct
import threading

from . import _device, _layout, _requests
from ._wire import Connection, _close_fds
from .errors import DataLoss, FailedPrecondition, NotFound, Unavailable, Unimplemented

_log = logging.getLogger("tensorreg")

DEFAULT_CHUNK_LEAVES = 4  # 16 MiB a staging buffer; two a thread

# What the last get_tensors() did, for benchmarks and tests: "direct", or "fallback: <why>".
last_path = None


class _Hash128(ctypes.Structure):
    _fields_ = [("low64", ctypes.c_uint64), ("high64", ctypes.c_uint64)]


_xxh3 = None  # XXH3_128bits once loaded; False when libxxhash cannot be loaded
_xxh3_error = ""


def xxh3_function():
    """libxxhash's XXH3_128bits (seed 0) through ctypes, or None when the library cannot be
    loaded (then the direct path is not taken)."""
    global _xxh3, _xxh3_error
    if _xxh3 is None:
        try:
            lib = ctypes.CDLL("libxxhash.so.0")
            f = lib.XXH3_128bits
            f.restype = _Hash128
            f.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
            _xxh3 = f
        except (OSError, AttributeError) as e:
            _xxh3, _xxh3_error = False, str(e)
    return _xxh3 or None


def xxh3_canonical(data) -> bytes:
    """XXH3-128 of a bytes-like object in the canonical form the daemon sends (high64 then low64,
    big-endian): the MANIFEST's hex digits as bytes."""
    f = xxh3_function()
    if f is None:
        raise FailedPrecondition(f"cannot hash with XXH3-128: libxxhash cannot be loaded: {_xxh3_error}")
    data = bytes(data)
    h = f(data, len(data))
    return struct.pack(">QQ", h.high64, h.low64)


def default_threads() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def _as_buffer(tensor, length: int):
    """A writable memoryview of the first `length` bytes of a contiguous CPU uint8 tensor."""
    return memoryview((ctypes.c_ubyte * length).from_address(tensor.data_ptr())).cast("B")


def load_into(torch, fd: int, size: int, leaf_bytes: int, fingerprints: list, dst, what: str, *,
              threads: int | None = None, chunk_leaves: int = DEFAULT_CHUNK_LEAVES) -> None:
    """Reads bytes [0, size) of `fd` into `dst` (a contiguous uint8 tensor of `size` bytes, CPU
    or CUDA), checking leaf i (bytes [i * leaf_bytes, ...)) against fingerprints[i] ((high64,
    low64) of its XXH3-128). When it returns, the bytes are in `dst` (CUDA copies synchronised).
    Errors: DataLoss (a leaf that does not match, a file that ends early), Unavailable (a read
    fails), FailedPrecondition (a copy to the device fails, libxxhash missing)."""
    xxh3 = xxh3_function()
    if xxh3 is None:
        raise FailedPrecondition(f"cannot {what}: libxxhash cannot be loaded: {_xxh3_error}")
    if size == 0:
        return
    chunk = leaf_bytes * max(1, chunk_leaves)
    chunks = (size + chunk - 1) // chunk
    threads = max(1, min(threads or default_threads(), chunks))
    cuda = dst.device.type == "cuda"
    taken = itertools.count()  # next(): atomic under the GIL, so each chunk goes to one thread
    stop = threading.Event()
    errors: list = []

    def read_exact(view, length: int, offset: int) -> None:
        got = 0
        while got < length:
            try:
                n = os.preadv(fd, [view[got:length]], offset + got)
            except InterruptedError:
                continue
            except OSError as e:
                raise Unavailable(f"cannot {what}: cannot read the persisted file at byte {offset + got}: "
                                  f"{e.strerror or e}") from None
            if n == 0:
                # Where the file ends, not where this read stopped: threads read different
                # chunks, and one past the end stops at its own offset.
                try:
                    ends = min(offset + got, os.fstat(fd).st_size)
                except OSError:
                    ends = offset + got
                raise DataLoss(f"cannot {what}: the persisted file ends at byte {ends}, before its "
                               f"{size} bytes")
            got += n

    def check(buf, offset: int, length: int) -> None:
        base = buf.data_ptr()
        for at in range(0, length, leaf_bytes):
            i = (offset + at) // leaf_bytes
            n = min(leaf_bytes, length - at)
            h = xxh3(base + at, n)
            if (h.high64, h.low64) != fingerprints[i]:
                raise DataLoss(f"cannot {what}: leaf {i} (bytes {offset + at}..{offset + at + n}) of the persisted "
                               f"copy does not match its XXH3-128")

    def work() -> None:
        stream = None
        try:
            if cuda:
                torch.cuda.set_device(dst.device)  # the current device is per thread
                stream = torch.cuda.Stream(device=dst.device)
            staging = [torch.empty(chunk, dtype=torch.uint8, pin_memory=cuda) for _ in range(2)]
            views = [_as_buffer(b, chunk) for b in staging]
            sent = [None, None]  # the event after the last copy out of each buffer
            for k in itertools.count():
                c = next(taken)
                if c >= chunks or stop.is_set():
                    break
                slot = k % 2
                if sent[slot] is not None:
                    sent[slot].synchronize()
                offset = c * chunk
                length = min(chunk, size - offset)
                ahead = offset + threads * chunk  # a round ahead: the disk is kept busy past readahead
                if ahead < size:
                    try:
                        os.posix_fadvise(fd, ahead, min(chunk, size - ahead), os.POSIX_FADV_WILLNEED)
                    except OSError:
                        pass  # advice only
                read_exact(views[slot], length, offset)
                check(staging[slot], offset, length)
                try:
                    if cuda:
                        with torch.cuda.stream(stream):
                            dst[offset:offset + length].copy_(staging[slot][:length], non_blocking=True)
                        sent[slot] = torch.cuda.Event()
                        sent[slot].record(stream)
                    else:
                        dst[offset:offset + length].copy_(staging[slot][:length])
                except RuntimeError as e:
                    raise FailedPrecondition(f"cannot {what} on {dst.device}: cannot copy bytes {offset}.."
                                             f"{offset + length} there: {e}") from None
            if stream is not None:
                stream.synchronize()
        except BaseException as e:  # noqa: B902 - handed to the calling thread, which raises it
            errors.append(e)
            stop.set()
            if stream is not None:
                try:
                    stream.synchronize()  # no copy may still read a buffer that is freed
                except RuntimeError:
                    pass

    workers = [threading.Thread(target=work, name=f"tensorreg-load-{t}", daemon=True) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    if errors:
        # The first damage found in the file, where there is one, rather than the first thread's.
        damage = [e for e in errors if isinstance(e, DataLoss)]
        raise (damage or errors)[0]


def fingerprints_of(blob: bytes, leaves: int, what: str) -> list:
    """(high64, low64) of each leaf from the answer's leaf_xxh3 (16 bytes a leaf, canonical)."""
    if len(blob) != 16 * leaves:
        raise DataLoss(f"cannot {what}: the daemon sent {len(blob)} bytes of leaf fingerprints for {leaves} leaves")
    return [struct.unpack_from(">QQ", blob, 16 * i) for i in range(leaves)]


def open_persisted(conn: Connection, artifact_id: str, what: str):
    """OpenPersistedArtifact with unless_in_memory: (answer body, fd), or None with the reason
    where the daemon has no such copy to hand over (the caller goes through the daemon)."""
    global last_path
    try:
        answer, fds = conn.call(_requests.open_persisted_artifact(artifact_id, unless_in_memory=True))
    except (FailedPrecondition, NotFound, Unimplemented) as e:
        # Not on the disk, also in the daemon's memory, an older daemon, or an id the daemon may
        # still fetch from its cluster: the restore path answers all of those.
        last_path = f"fallback: {e}"
        _log.debug("%s: not from the persisted file (%s): through the daemon's memory", what, e)
        return None
    if len(fds) != 1:
        _close_fds(fds)
        raise DataLoss(f"cannot {what}: the daemon sent {len(fds)} fds with the persisted copy, not 1")
    return answer.open_persisted_artifact, fds[0]


def get_tensors(conn: Connection, artifact_id: str, dev, torch, threads: int | None = None) -> dict | None:
    """Store.get on a CUDA device of an artifact held on the daemon's disk only: one allocation
    on `dev`, filled from the persisted file, and the tensors views of it (tied names tied).
    None where the direct path does not apply (the caller takes the restore path)."""
    global last_path
    what = f"get {artifact_id}"
    if xxh3_function() is None:
        last_path = f"fallback: libxxhash cannot be loaded: {_xxh3_error}"
        _log.debug("%s: libxxhash cannot be loaded (%s): through the daemon's memory", what, _xxh3_error)
        return None
    opened = open_persisted(conn, artifact_id, what)
    if opened is None:
        return None
    body, fd = opened
    try:
        size, leaf_bytes = body.size_bytes, body.leaf_bytes
        # The leaf size sets the staging buffers' size: a page multiple, and no more than 64 MiB.
        if size != body.artifact_descriptor.total_size or leaf_bytes <= 0 or leaf_bytes % 4096 or \
                leaf_bytes > 64 << 20:
            raise DataLoss(f"cannot {what}: the daemon's answer has size {size}, total_size "
                           f"{body.artifact_descriptor.total_size} and leaf_bytes {leaf_bytes}")
        fingerprints = fingerprints_of(body.leaf_xxh3, (size + leaf_bytes - 1) // leaf_bytes, what)
        try:
            index = json.loads(body.tensor_index_data)
        except ValueError as e:
            raise DataLoss(f"cannot {what}: the daemon's index is not json: {e}") from None
        held = os.fstat(fd).st_size
        if held != size:
            raise DataLoss(f"cannot {what}: the persisted file holds {held} bytes, not its {size}")
        try:
            base = torch.empty(size, dtype=torch.uint8, device=dev)
        except RuntimeError as e:
            raise FailedPrecondition(f"cannot {what} on {dev}: cannot allocate {size} bytes there: {e}") from None
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        except OSError:
            pass  # advice only
        load_into(torch, fd, size, leaf_bytes, fingerprints, base, what, threads=threads)
    finally:
        os.close(fd)
    last_path = "direct"

    def locate(offset, nbytes, name):
        if offset + nbytes > size:
            raise DataLoss(f"cannot {what}: storage of tensor {_layout.quote(name)} [{offset}, "
                           f"{offset + nbytes}) does not fit the artifact of {size} bytes")
        return base, offset

    return _device.build_views(torch, index, locate, what, empty_device=base.device)
