"""The canonical bytes in and out of the daemon's memfds: shared mappings to write into (the
HOST_SHARED region of a register), pwrite() into the publish memfd of a put (never mapped, so
the daemon can seal it and keep it as its replica with no second copy; stores through a fresh
shared mapping would also fault in and zero every page first), a private mapping to read a
replica from (get), and the copy of a layout's storages to their canonical offsets.

Thread-safety: pure functions; a mapping belongs to the caller, who closes it with close_map().
"""

from __future__ import annotations

import ctypes
import mmap
import os

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


def pwrite_storages(torch, fd: int, start: int, layout) -> None:
    """Writes every non-empty storage of `layout` (CPU tensors) into `fd` at `start` + its
    canonical offset: one copy, from the tensor's memory straight into the memfd."""
    for s in layout.storages:
        if not s.nbytes:
            continue
        src = _layout.storage_bytes(torch, s.source)
        if not src.is_contiguous():
            src = src.contiguous()
        # The tensor's own memory, seen as bytes (no numpy needed); `src` keeps it alive.
        view = (ctypes.c_ubyte * s.nbytes).from_address(src.data_ptr())
        pwrite_all(fd, view, start + s.offset)
        del view, src


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
