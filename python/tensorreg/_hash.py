"""Content ids computed here, as the daemon computes them (docs/registration.md §3.1–§3.3):
the mi2 id of a canonical buffer given as pieces at offsets (the gaps read as zero bytes).

The data hash is a tree of SHA-256 over 4 MiB leaves. The leaves are hashed by a pool of
threads, one per core: hashlib (OpenSSL) releases the GIL while it hashes a buffer of more
than a few KiB, so the threads run in parallel. Every call into hashlib or ctypes takes the GIL
back, so many threads hash each leaf where it lies, one call a leaf. One or two threads copy
the bytes into a small buffer of their own and hash them there instead: on a VM whose memory
stalls SHA-256 that costs a fifth less CPU, and with so few threads the GIL is not the
bottleneck (benchmarks/RESULTS.md has both measurements).

Thread-safety: pure functions; the pieces must not change while they are hashed.
"""

from __future__ import annotations

import base64
import ctypes
import hashlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor

LEAF_BYTES = 4 << 20  # never adaptive (§3.3)
# Bytes hashed per update: small enough to stay in a core's cache between copy and hash.
_PIECE = 256 << 10
_ZEROS = memoryview(bytes(_PIECE))
_staging = threading.local()  # each thread's _PIECE-byte buffer
# The most hashing threads that stage their bytes (module doc).
_STAGED_UP_TO_THREADS = 2


def multihash(digest: bytes) -> str:
    """The multibase-b multihash of a SHA-256 digest (§3.1): 'bciq' + 52 more characters."""
    return "b" + base64.b32encode(b"\x12\x20" + digest).decode().lower().rstrip("=")


def index_multihash(index_json: bytes) -> str:
    """§3.2: the multihash of SHA-256 over the canonical index bytes."""
    return multihash(hashlib.sha256(index_json).digest())


def _update_zeros(h, length: int) -> None:
    while length > 0:
        n = min(length, _PIECE)
        h.update(_ZEROS[:n])
        length -= n


def _address(view) -> int | None:
    """The address of a writable view's first byte (tensor memory is), else None."""
    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(view))
    except (TypeError, ValueError):
        return None


def _update_staged(h, view) -> None:
    """h.update(view), through this thread's cache-sized buffer (module doc). The copy into it is
    a ctypes call, which releases the GIL: a memoryview slice assignment holds it, and then the
    threads' copies run one at a time."""
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    stage = getattr(_staging, "buffer", None)
    if stage is None:
        raw = bytearray(_PIECE)
        stage = _staging.buffer = memoryview(raw)
        _staging.address = ctypes.addressof(ctypes.c_char.from_buffer(raw))
    source = _address(view) if len(view) else None
    for at in range(0, len(view), _PIECE):
        n = min(_PIECE, len(view) - at)
        if source is not None:
            ctypes.memmove(_staging.address, source + at, n)
        else:
            stage[:n] = view[at:at + n]
        h.update(stage[:n])


def _update_in_place(h, view) -> None:
    h.update(view)


def _leaf(pieces: list, start: int, end: int, update=_update_staged) -> bytes:
    """SHA-256 of [start, end) of the buffer; `pieces` sorted by offset, not overlapping; each
    piece's bytes hashed by update(h, view)."""
    h = hashlib.sha256()
    at = start
    for offset, view in pieces:
        last = offset + len(view)
        if last <= at:
            continue
        if offset >= end:
            break
        if offset > at:
            _update_zeros(h, offset - at)
            at = offset
        upto = min(last, end)
        update(h, view[at - offset:upto - offset])
        at = upto
    if at < end:
        _update_zeros(h, end - at)
    return h.digest()


def tree_root(leaves: list) -> bytes:
    """§3.3: parents SHA-256(left ‖ right), an odd last node promoted unchanged."""
    level = leaves
    while len(level) > 1:
        up = [hashlib.sha256(level[i] + level[i + 1]).digest() for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            up.append(level[-1])
        level = up
    return level[0]


def data_multihash(pieces: list, total_size: int, threads: int | None = None) -> str:
    """§3.3 over [0, total_size): `pieces` are (offset, memoryview of bytes), sorted by offset,
    not overlapping, within total_size. REQUIRES: total_size > 0."""
    starts = range(0, total_size, LEAF_BYTES)
    threads = max(1, min(threads or os.cpu_count() or 1, len(starts)))
    update = _update_staged if threads <= _STAGED_UP_TO_THREADS else _update_in_place

    def leaf(start: int) -> bytes:
        return _leaf(pieces, start, min(start + LEAF_BYTES, total_size), update)

    if threads == 1:
        leaves = [leaf(s) for s in starts]
    else:
        with ThreadPoolExecutor(threads, thread_name_prefix="tensorreg-hash") as pool:
            leaves = list(pool.map(leaf, starts))
    return multihash(tree_root(leaves))


def mi2_id(index_json: bytes, pieces: list, total_size: int) -> str:
    """§3.1: 'mi2:' + index multihash + ':' + data multihash."""
    return f"mi2:{index_multihash(index_json)}:{data_multihash(pieces, total_size)}"
