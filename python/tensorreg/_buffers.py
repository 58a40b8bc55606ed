"""The canonical bytes in and out of the daemon's memfds: shared mappings to write into (the
HOST_SHARED region of a register), the publish memfd of a put (pwrite() on a few cores; on
more, stores through a shared mapping on every core, closed before the Commit: either way no
writable mapping is left, so the daemon can seal the memfd and keep it as its replica with no
second copy), a private mapping to read a replica from (get), and the copy of a layout's
storages to their canonical offsets.

Thread-safety: pure functions; a mapping belongs to the caller, who closes it with close_map().
"""

from __future__ import annotations

import ctypes
import mmap
import os
from concurrent.futures import ThreadPoolExecutor

from . import _layout
from ._wire import _close_fds
from .errors import DataLoss


def map_shared(fd: int, offset: int, length: int) -> tuple:
    """Maps [offset, offset + length) of `fd` shared and writable; returns (mmap, start in it)."""
    base = offset - offset % mmap.ALLOCATIONGRANULARITY
    mm = mmap.mmap(fd, length + (offset - base), flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE,
                   offset=base)
    return mm, offset - base


def map_received(fds: list, offset: int, length: int, failure: str) -> tuple:
    """map_shared() of the first fd a daemon answer carried, then closes them all and empties
    `fds` (so a caller's cleanup cannot close them twice). A mapping that fails is DataLoss,
    its message `failure` followed by the reason."""
    try:
        return map_shared(fds[0], offset, length)
    except (OSError, ValueError) as e:
        raise DataLoss(f"{failure}: {e}") from None
    finally:
        _close_fds(fds)
        fds.clear()


def map_private(fd: int, length: int):
    """Maps the first `length` bytes of `fd` copy-on-write: writes stay in this process."""
    return mmap.mmap(fd, length, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)


def close_map(mm) -> None:
    try:
        mm.close()
    except BufferError:
        pass  # a view still exports it; it closes when that goes


def write_storages(torch, dst, layout) -> None:
    """Copies every non-empty storage of `layout` into the uint8 tensor `dst` at its canonical
    offset (on the device `dst` and the storages are on: the caller picks the current one)."""
    with torch.no_grad():
        for s in layout.storages:
            if s.nbytes:
                dst[s.offset:s.offset + s.nbytes].copy_(_layout.storage_bytes(torch, s.source))


# pwrite() moves at most about 2 GiB per call on Linux; a piece of this size keeps each call
# well under that and still amortises the call.
_PWRITE_PIECE = 1 << 30
# Bytes read from a file per pread(): small enough to stay in cache before the pwrite().
_FILE_PIECE = 1 << 20


def pwrite_all(fd: int, data, offset: int) -> None:
    """Writes every byte of the buffer `data` at `offset` of `fd`."""
    with memoryview(data) as whole, whole.cast("B") as view:
        done = 0
        while done < len(view):
            with view[done:done + _PWRITE_PIECE] as piece:
                n = os.pwrite(fd, piece, offset + done)
            if n <= 0:
                raise OSError(f"pwrite wrote nothing at offset {offset + done}")
            done += n


def storage_sources(torch, layout):
    """(storage, its bytes as a contiguous uint8 tensor) for every non-empty storage of `layout`
    (CPU tensors); a tensor's data_ptr() stays valid while the caller holds it."""
    for s in layout.storages:
        if not s.nbytes:
            continue
        src = _layout.storage_bytes(torch, s.source)
        if not src.is_contiguous():
            src = src.contiguous()
        yield s, src
        del src  # a caller that let go of it frees a copy before the next one is made


def pwrite_storages(torch, fd: int, start: int, layout) -> None:
    """Writes every non-empty storage of `layout` (CPU tensors) into `fd` at `start` + its
    canonical offset: one copy, from the tensor's memory straight into the memfd."""
    for s, src in storage_sources(torch, layout):
        # The tensor's own memory, seen as bytes (no numpy needed); `src` keeps it alive.
        view = (ctypes.c_ubyte * s.nbytes).from_address(src.data_ptr())
        pwrite_all(fd, view, start + s.offset)
        del view, src


# The most cores on which the publish memfd is written with pwrite(): the memfd's inode lock
# admits one writer at a time, while stores through a mapping fault its fresh pages in on every
# core at once, which wins beyond this many (the daemon's memory::max_pwrite_fill_threads;
# benchmarks/RESULTS.md, session 18).
_PWRITE_UP_TO_THREADS = 4
# Bytes one thread copies per job through the mapping.
_MAPPED_PIECE = 4 << 20


def write_publish_memfd(torch, fd: int, start: int, layout, threads: int | None = None) -> None:
    """Writes every non-empty storage of `layout` (CPU tensors) into the publish memfd `fd` at
    `start` + its canonical offset: pwrite_storages() on up to _PWRITE_UP_TO_THREADS threads,
    else a copy through a shared mapping on `threads` (default: one per core), unmapped before
    this returns."""
    threads = threads or os.cpu_count() or 1
    if threads <= _PWRITE_UP_TO_THREADS or layout.total_size == 0:
        pwrite_storages(torch, fd, start, layout)
        return
    sources, jobs = [], []
    for s, src in storage_sources(torch, layout):
        sources.append(src)  # alive until every copy is done
        jobs += [(s.offset + at, src.data_ptr() + at, min(_MAPPED_PIECE, s.nbytes - at))
                 for at in range(0, s.nbytes, _MAPPED_PIECE)]
    if not jobs:
        return  # no bytes to write: the memfd reads as zeros already
    mm, at = map_shared(fd, start, layout.total_size)
    anchor = None
    try:
        anchor = ctypes.c_char.from_buffer(mm)  # exports the mapping while it lives
        base = ctypes.addressof(anchor) + at
        # ctypes.memmove releases the GIL: the copies run on every thread at once.
        with ThreadPoolExecutor(min(threads, len(jobs)), thread_name_prefix="tensorreg-put") as pool:
            list(pool.map(lambda job: ctypes.memmove(base + job[0], job[1], job[2]), jobs))
    finally:
        # A writable mapping left open would keep the daemon from sealing the memfd (it then
        # copies it): the export goes first, so that the mapping can close.
        anchor = None
        mm.close()


def pwrite_file_range(fd: int, at: int, path_fd: int, offset: int, length: int, buffer: bytearray) -> None:
    """Copies `length` bytes of the file `path_fd` from `offset` into `fd` at `at`, through
    `buffer` (pread/pwrite: no mapping of either file)."""
    with memoryview(buffer) as view:
        while length > 0:
            want = min(length, len(buffer))
            n = os.preadv(path_fd, [view[:want]], offset)
            if n <= 0:
                raise OSError(f"the file ended at offset {offset}, {length} bytes short (truncated?)")
            pwrite_all(fd, view[:n], at)
            at += n
            offset += n
            length -= n
