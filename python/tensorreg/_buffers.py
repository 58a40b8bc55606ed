"""The canonical bytes in and out of the daemon's memfds: shared mappings to write into (the
publish memfd of a put, the HOST_SHARED region of a register), a private one to read a replica
from (get), and the copy of a layout's storages to their canonical offsets.

Thread-safety: pure functions; a mapping belongs to the caller, who closes it with close_map().
"""

from __future__ import annotations

import mmap

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
