"""GPU planning without the GPU: which allocations back a state dict's CUDA storages and how to
name them to the daemon (register), and how to rebuild tensors from an artifact's segments
(open, get).

Pure logic over a *driver* object, so that the CPU-only tests run it against a fake one; the
real driver is `_cuda.Driver`. A driver provides `address_range(ptr) -> (base, size)` (the
allocation holding ptr: the cudaMalloc block, or one physical page of VMM memory),
`try_ipc_handle(base) -> bytes | None` (None: not cudaMalloc memory), `ipc_handle(base)` (the
same, raising the driver's error), `retain_allocation(ptr) -> handle | None` (None: not VMM
memory), `release(handle)` and `handle_types(handle) -> int`.

Registration rules (docs/wire-format.md §12, the issue's plan):
- every non-empty storage is found in its allocation; each allocation is looked up once: its
  range, then its IPC handle (cudaMalloc memory) or its retained allocation handle (VMM pages),
  asking first for the kind the previous allocation was (the other call fails), so a run of one
  kind costs two driver calls an allocation;
- cudaMalloc memory: one IPC handle per allocation; a VRAM region (RegisterRegion with that
  handle, the allocation's size) where the allocation backs several storages, else the handle
  in the storage's own entry; both with mapping_base_offset = storage address - base;
- VMM memory (PyTorch's expandable_segments): the physical pages covering the storages, each
  looked up once, merged into runs of address-adjacent pages; a run becomes windows of at most
  250 pages (one fd per page, at most 250 a frame), each one cuda_vmm VRAM region. A window
  starts at the first page of the first storage no earlier window holds and takes every
  following storage that ends inside it; so windows overlap only on pages where a storage
  crosses from one into the next (such a page is sent, and mapped, twice), and each storage lies
  in exactly one window;
- empty storages borrow the source of a non-empty one with length 0 (nothing is read).

Thread-safety: pure functions; the plan owns the VMM handles it retained until release().
"""

from __future__ import annotations

import bisect
from typing import NamedTuple

from . import _layout, _messages
from .errors import DataLoss, FailedPrecondition, InvalidArgument, Unimplemented

MAX_CHUNKS_PER_REGION = 250
POSIX_FD = 1

FIX_HANDLE_TYPE = (
    "PyTorch creates its expandable_segments pages with the POSIX fd handle type unless fabric handles work "
    "on this machine (then it uses those, and they cannot be sent over a Unix socket); allocate these tensors "
    "with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:False (or torch.cuda.memory._set_allocator_settings("
    "'expandable_segments:False') before allocating them), or put() them instead")


class Allocation(NamedTuple):
    base: int
    size: int
    vmm_handle: int | None  # retained VMM handle; None for cudaMalloc memory
    ipc_handle: bytes | None = None  # cudaMalloc memory: its IPC handle


class Region(NamedTuple):
    """One RegisterRegion call: an IPC allocation (ipc_handle set) or a run of VMM pages."""

    base: int
    size: int
    ipc_handle: bytes | None
    pages: list  # [Allocation] for VMM, in address order; [] for IPC
    storages: list  # positions in layout.storages that reference it


class Source(NamedTuple):
    """Where a storage's entry points: region index, or the allocation's IPC handle."""

    region: int | None
    ipc_handle: bytes | None
    mapping_base_offset: int


class Plan(NamedTuple):
    regions: list  # [Region]
    sources: list  # [Source], one per layout storage
    allocations: list  # [Allocation], every allocation looked up (release() frees their VMM handles)

    def release(self, drv) -> None:
        for a in self.allocations:
            if a.vmm_handle is not None:
                drv.release(a.vmm_handle)


_new = tuple.__new__  # _new(Source, (...)): a NamedTuple without its Python-level __new__ (hot loops)


class _Allocations:
    """The allocations looked up so far, by address (each one queried once)."""

    def __init__(self, drv) -> None:
        self.drv = drv
        self.bases: list = []
        self.by_base: dict = {}
        self.vmm_last = False  # the last allocation found was VMM memory

    def at(self, ptr: int) -> Allocation:
        k = bisect.bisect_right(self.bases, ptr) - 1
        if k >= 0:
            a = self.by_base[self.bases[k]]
            if ptr < a.base + a.size:
                return a
        drv = self.drv
        base, size = drv.address_range(ptr)
        # Each kind of memory refuses the other's export, and allocations of one kind come in
        # runs (a state dict is all cudaMalloc blocks or all expandable-segments pages): ask
        # first as the last allocation answered, so that each costs two driver calls.
        vmm = drv.retain_allocation(base) if self.vmm_last else None
        handle = drv.try_ipc_handle(base) if vmm is None else None
        if vmm is None and handle is None and not self.vmm_last:
            vmm = drv.retain_allocation(base)
        if handle is not None:
            a = _new(Allocation, (base, size, None, handle))
        elif vmm is not None:
            a = Allocation(base, size, vmm)
        else:
            drv.ipc_handle(base)  # raises the driver's own reason (e.g. cudaMallocAsync pool memory)
            raise FailedPrecondition(f"cannot export the allocation at {base:#x}: it is neither cudaMalloc nor VMM "
                                     f"memory")
        self.vmm_last = vmm is not None
        bisect.insort(self.bases, base)
        self.by_base[base] = a
        return a


def plan(drv, storages: list, what: str) -> Plan:
    """Plans the registration of `storages`: (device address, nbytes) per layout storage.
    Errors: FailedPrecondition (VMM pages without the POSIX fd handle type), Unimplemented (a
    storage over more than 250 pages of one run), DataLoss (a cudaMalloc storage that runs past
    its allocation: a driver or allocator inconsistency)."""
    found = _Allocations(drv)
    covers: list = [None] * len(storages)  # VMM storage -> [page] in address order
    users: dict = {}  # cudaMalloc allocation base -> [storage], in address order
    try:
        # In address order, a storage lies in the allocation of the one before it or in one not
        # seen yet: the common case costs a comparison, not a lookup (this loop is most of the
        # register's Python time after the driver calls).
        current, current_end = None, -1
        for k in sorted(range(len(storages)), key=lambda i: storages[i][0]):
            ptr, nbytes = storages[k]
            if nbytes == 0:
                continue
            if current is None or not current.base <= ptr < current_end:
                current = found.at(ptr)
                current_end = current.base + current.size
            end = ptr + nbytes
            if current.vmm_handle is None:
                if end > current_end:
                    raise DataLoss(f"cannot {what}: storage {k} at {ptr:#x} of {nbytes} bytes ends past its "
                                   f"allocation [{current.base:#x}, {current_end:#x})")
                ks = users.get(current.base)
                if ks is None:
                    users[current.base] = [k]
                else:
                    ks.append(k)
                continue
            pages = [current]
            while pages[-1].base + pages[-1].size < end:
                nxt = found.at(pages[-1].base + pages[-1].size)
                if nxt.vmm_handle is None:
                    raise DataLoss(f"cannot {what}: storage {k} at {ptr:#x} of {nbytes} bytes runs from VMM "
                                   f"memory into a cudaMalloc allocation at {nxt.base:#x}")
                pages.append(nxt)
            covers[k] = pages
        allocations = [found.by_base[b] for b in found.bases]
        for a in allocations:
            if a.vmm_handle is not None and not drv.handle_types(a.vmm_handle) & POSIX_FD:
                raise FailedPrecondition(f"cannot {what}: the VMM allocation at {a.base:#x} cannot be exported as "
                                         f"a POSIX fd (its handle types are {drv.handle_types(a.vmm_handle):#x}); "
                                         f"{FIX_HANDLE_TYPE}")
        regions, sources = _regions(storages, covers, users, found.by_base, allocations, what)
    except BaseException:
        for b in found.bases:
            h = found.by_base[b].vmm_handle
            if h is not None:
                drv.release(h)
        raise
    return Plan(regions, sources, allocations)


def _regions(storages, covers, users, by_base, allocations, what):
    sources: list = [None] * len(storages)
    regions: list = []
    # cudaMalloc allocations: a region when several storages share one, else a handle each.
    for base, ks in users.items():
        a = by_base[base]
        if len(ks) > 1:
            r = len(regions)
            for k in ks:
                sources[k] = _new(Source, (r, None, storages[k][0] - base))
            regions.append(Region(base, a.size, a.ipc_handle, [], ks))
        else:
            sources[ks[0]] = _new(Source, (None, a.ipc_handle, storages[ks[0]][0] - base))
    # VMM pages: runs of adjacent pages, in windows of at most 250 pages.
    vmm = [a for a in allocations if a.vmm_handle is not None]
    for run in merge_runs(vmm):
        position = {a.base: p for p, a in enumerate(run)}
        members = []  # (first page, last page, storage) of the storages in this run
        for k, pages in enumerate(covers):
            if pages is not None and pages[0].base in position:
                first = position[pages[0].base]
                members.append((first, first + len(pages) - 1, k))
        for lo, hi, inside in windows(members, MAX_CHUNKS_PER_REGION, what):
            pages = run[lo:hi + 1]
            base = pages[0].base
            for k in inside:
                sources[k] = Source(len(regions), None, storages[k][0] - base)
            regions.append(Region(base, sum(p.size for p in pages), None, pages, inside))
    # Empty storages borrow a source (length 0 is in bounds anywhere).
    if None in sources:
        borrowed = next((s for s in sources if s is not None), None)
        if borrowed is None:
            raise DataLoss(f"cannot {what}: every storage is empty")
        sources = [borrowed if s is None else s for s in sources]
    return regions, sources


def every_storage_in_a_region(plan: Plan) -> Plan:
    """`plan` with no lone handles: the allocation of a storage that names its IPC handle
    directly becomes a region of its own. A Registrar keeps its regions across versions (the
    daemon keeps a region's mapping while it lives), so every allocation must be one; a lone
    handle would be opened again at every commit."""
    if all(s.region is not None for s in plan.sources):
        return plan
    regions = list(plan.regions)
    by_handle = {a.ipc_handle: a for a in plan.allocations if a.ipc_handle is not None}
    made: dict = {}  # IPC handle -> its new region
    sources = []
    for k, s in enumerate(plan.sources):
        if s.region is None:
            r = made.get(s.ipc_handle)
            if r is None:
                a = by_handle[s.ipc_handle]
                r = made[s.ipc_handle] = len(regions)
                regions.append(Region(a.base, a.size, a.ipc_handle, [], []))
            regions[r].storages.append(k)
            s = _new(Source, (r, None, s.mapping_base_offset))
        sources.append(s)
    return Plan(regions, sources, plan.allocations)


def region_key(region: Region) -> tuple:
    """What a region is made of, to find it again at the next registration: the allocation and
    its IPC handle, or the VMM pages (address, size) of the window. Equal keys name the same
    memory only while the memory stayed allocated in between (the Registrar holds the storages
    in it until the next registration has committed)."""
    if region.ipc_handle is not None:
        return ("ipc", region.base, region.size, region.ipc_handle)
    return ("vmm",) + tuple((p.base, p.size) for p in region.pages)


def merge_runs(pages: list) -> list:
    """Address-adjacent pages merged into runs ([[page, ...], ...], in address order)."""
    runs: list = []
    for p in sorted(pages, key=lambda a: a.base):
        if runs and runs[-1][-1].base + runs[-1][-1].size == p.base:
            runs[-1].append(p)
        else:
            runs.append([p])
    return runs


def windows(members: list, limit: int, what: str) -> list:
    """The regions of one run of pages: `members` are (first page, last page, storage) of the
    storages in it; returns (first page, last page, [storage, ...]) windows of at most `limit`
    pages, each storage in exactly one (see the module's rules). Errors: Unimplemented when one
    storage alone needs more than `limit` pages."""
    members = sorted(members)
    out = []
    i = 0
    while i < len(members):
        lo, last, k = members[i]
        if last - lo + 1 > limit:
            raise Unimplemented(f"cannot {what}: storage {k} spans {last - lo + 1} VMM pages, more than one region "
                                f"may hold (at most {limit} fds a frame)")
        hi = last
        j = i + 1
        while j < len(members) and members[j][1] < lo + limit:
            hi = max(hi, members[j][1])
            j += 1
        out.append((lo, hi, [m[2] for m in members[i:j]]))
        i = j
    return out


def region_request(region: Region, ordinal: int, uuid: str, pid: int):
    """The RegisterRegion request of `region`: VRAM on the device `uuid` (this process's
    `ordinal`), no TTL (it lives until unregistered or its owner exits), from the allocation's
    IPC handle, or from its VMM pages (their fds ride on the frame, in page order)."""
    request = _messages.Request()
    rr = request.register_region
    rr.memory_kind = _messages.enum_value(_messages.DAEMON + ".RegionMemoryKind", "REGION_MEMORY_KIND_VRAM")
    rr.owner_pid = pid
    rr.size_bytes = region.size
    rr.device_id = ordinal
    rr.device_uuid = uuid
    if region.ipc_handle is not None:
        rr.cuda_ipc_handle = region.ipc_handle
    else:
        rr.cuda_vmm.chunk_bytes.extend(p.size for p in region.pages)
    return request


# ---- rebuilding tensors ---------------------------------------------------------------------


class Segments:
    """The DATA segments of an artifact: canonical [artifact_offset, +length) lies at
    [allocation_offset, +length) of allocation `allocation`."""

    def __init__(self, segments: list, what: str) -> None:
        # (artifact_offset, length, allocation, allocation_offset), sorted by artifact_offset
        self.items = sorted(segments)
        self.starts = [s[0] for s in self.items]
        self.what = what

    def find(self, offset: int, nbytes: int, name: str) -> tuple:
        """(allocation, allocation_offset) of canonical bytes [offset, offset + nbytes), which
        must lie inside one segment. Errors: DataLoss."""
        k = bisect.bisect_right(self.starts, offset) - 1
        if k >= 0:
            start, length, allocation, at = self.items[k]
            if offset + nbytes <= start + length:
                return allocation, at + (offset - start)
        raise DataLoss(f"cannot {self.what}: the storage of tensor {_layout.quote(name)} at [{offset}, "
                       f"{offset + nbytes}) lies in no single device segment")


def torch_dtype(torch, name: str, tensor: str, what: str):
    dtype = getattr(torch, name[len("torch."):], None) if name.startswith("torch.") else None
    if name not in _layout.DTYPE_SIZES or not isinstance(dtype, torch.dtype):
        raise InvalidArgument(f"cannot {what}: tensor {_layout.quote(tensor)} has dtype {name}, which this torch "
                              f"cannot view")
    return dtype


def build_views(torch, index, locate, what: str, empty_device=None) -> dict:
    """Every tensor of `index` (name -> [offset, nbytes, shape, stride, dtype, storage_offset]) as
    a view: locate(offset, nbytes, name) -> (uint8 tensor, start) gives the bytes of a storage;
    storages of one (tensor, start, nbytes, dtype) are viewed once, so tied names share memory.
    Empty storages become empty tensors on `empty_device` (they have no bytes to point at).
    Errors: DataLoss (a malformed index or an entry that does not fit), InvalidArgument (a dtype
    this torch lacks)."""
    if not isinstance(index, dict):
        raise DataLoss(f"cannot {what}: the daemon's index is not a json object")
    typed_cache: dict = {}  # (id(base), dtype name) -> (typed view, its storage_offset)
    dtypes: dict = {}  # dtype name -> (torch dtype, element size)
    extent = _layout.extent_bytes
    out = {}
    for name, entry in index.items():
        try:
            offset, nbytes, shape, stride, dtype_name, storage_offset = entry
        except (TypeError, ValueError):
            raise DataLoss(f"cannot {what}: index entry {_layout.quote(name)} is not "
                           f"[offset, size, shape, stride, dtype, storage_offset]") from None
        known = dtypes.get(dtype_name)
        if known is None:
            known = dtypes[dtype_name] = (torch_dtype(torch, dtype_name, name, what), _layout.DTYPE_SIZES[dtype_name])
        dtype, element = known
        if nbytes % element or offset < 0 or nbytes < 0:
            raise DataLoss(f"cannot {what}: storage of tensor {_layout.quote(name)} [{offset}, {offset + nbytes}) "
                           f"is not a whole number of {dtype_name}s")
        if storage_offset < 0 or storage_offset * element + extent(shape, stride, element) > nbytes or \
                any(s < 0 for s in stride):
            raise DataLoss(f"cannot {what}: tensor {_layout.quote(name)} reaches past its storage of {nbytes} bytes")
        if nbytes == 0:
            out[name] = torch.empty_strided(shape, stride, dtype=dtype, device=empty_device)
            continue
        base, start = locate(offset, nbytes, name)
        # One typed view per (mapping, dtype), then one as_strided per tensor: the per-tensor
        # cost of open() (1 000 tensors: ~5 ms rather than ~15 ms with a slice and a view each).
        key = (id(base), dtype_name)
        typed = typed_cache.get(key)
        if typed is None:
            usable = base.numel() - base.numel() % element
            view = (base if usable == base.numel() else base[:usable]).view(dtype)
            typed = typed_cache[key] = (view, view.storage_offset(), view.numel() * element)
        view, view_offset, view_bytes = typed
        if start % element or start + nbytes > view_bytes:
            raise DataLoss(f"cannot {what}: the storage of tensor {_layout.quote(name)} lies at byte {start} of its "
                           f"memory, not on a {element}-byte {dtype_name} boundary, or past its end")
        out[name] = view.as_strided(shape, stride, view_offset + start // element + storage_offset)
    return out
