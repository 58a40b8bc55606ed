"""The CUDA driver API through ctypes: what the Python client needs to share GPU memory.

Nothing here is loaded until first used: importing tensorreg works on machines without CUDA or
an NVIDIA driver, and `driver()` then raises FailedPrecondition ("cannot use CUDA: ..."). The
library is `libcuda.so.1` (the driver, not the runtime), or `$TENSORREG_LIBCUDA` where a
container mounts it elsewhere.

Why the driver and not torch: torch exposes neither cuMemGetAddressRange (the allocation that
backs a storage, to export each allocation once), nor the VMM calls (PyTorch's
expandable_segments memory, docs/wire-format.md §12), nor a way to map another process's
memory without its own pidfd_getfd-based protocol. Every call runs in the device's *primary*
context, the one the CUDA runtime (and so torch) uses, so pointers made here are usable by
torch and the other way round.

Owners: `IpcMapping` and `VmmMapping` own one mapping each and close it on close(), on garbage
collection or at interpreter exit (whichever comes first); `CudaArray` exposes a mapping to
torch through `__cuda_array_interface__` and keeps it alive for as long as a tensor made from it
lives (torch holds the object until the storage is freed).

Thread-safety: `driver()` is built once under a lock; the driver calls are thread-safe, and
each thread pushes and pops the primary context itself.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
import weakref

from .errors import FailedPrecondition, InvalidArgument, ResourceExhausted

# cuda.h values (stable ABI since CUDA 10.2).
CUDA_SUCCESS = 0
CUDA_ERROR_INVALID_VALUE = 1
CUDA_ERROR_OUT_OF_MEMORY = 2
CUDA_ERROR_NOT_INITIALIZED = 3
CUDA_ERROR_DEINITIALIZED = 4
CUDA_ERROR_NO_DEVICE = 100
CUDA_ERROR_NOT_SUPPORTED = 801
CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS = 1
CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR = 1
CU_MEM_HANDLE_TYPE_FABRIC = 8
CU_MEM_ALLOCATION_TYPE_PINNED = 1
CU_MEM_LOCATION_TYPE_DEVICE = 1
CU_MEM_ACCESS_FLAGS_PROT_READWRITE = 3
CU_MEM_ALLOC_GRANULARITY_MINIMUM = 0
IPC_HANDLE_BYTES = 64

CUdeviceptr = ctypes.c_uint64
CUmemGenericAllocationHandle = ctypes.c_uint64


class CUipcMemHandle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_char * IPC_HANDLE_BYTES)]


class CUuuid(ctypes.Structure):
    _fields_ = [("bytes", ctypes.c_ubyte * 16)]


class CUmemLocation(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class _AllocFlags(ctypes.Structure):
    _fields_ = [("compressionType", ctypes.c_ubyte), ("gpuDirectRDMACapable", ctypes.c_ubyte),
                ("usage", ctypes.c_ushort), ("reserved", ctypes.c_ubyte * 4)]


class CUmemAllocationProp(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("requestedHandleTypes", ctypes.c_int), ("location", CUmemLocation),
                ("win32HandleMetaData", ctypes.c_void_p), ("allocFlags", _AllocFlags)]


class CUmemAccessDesc(ctypes.Structure):
    _fields_ = [("location", CUmemLocation), ("flags", ctypes.c_int)]


_P = ctypes.POINTER
# name -> (argtypes, alternatives tried first, e.g. the _v2 entry points cuda.h maps the names to)
_SIGNATURES = {
    "cuInit": ([ctypes.c_uint], ()),
    "cuGetErrorName": ([ctypes.c_int, _P(ctypes.c_char_p)], ()),
    "cuGetErrorString": ([ctypes.c_int, _P(ctypes.c_char_p)], ()),
    "cuDeviceGetCount": ([_P(ctypes.c_int)], ()),
    "cuDeviceGet": ([_P(ctypes.c_int), ctypes.c_int], ()),
    "cuDeviceGetUuid": ([_P(CUuuid), ctypes.c_int], ("cuDeviceGetUuid_v2",)),
    "cuDevicePrimaryCtxRetain": ([_P(ctypes.c_void_p), ctypes.c_int], ()),
    "cuCtxPushCurrent": ([ctypes.c_void_p], ("cuCtxPushCurrent_v2",)),
    "cuCtxPopCurrent": ([_P(ctypes.c_void_p)], ("cuCtxPopCurrent_v2",)),
    "cuCtxSynchronize": ([], ()),
    "cuMemGetAddressRange": ([_P(CUdeviceptr), _P(ctypes.c_size_t), CUdeviceptr], ("cuMemGetAddressRange_v2",)),
    "cuIpcGetMemHandle": ([_P(CUipcMemHandle), CUdeviceptr], ()),
    "cuIpcOpenMemHandle": ([_P(CUdeviceptr), CUipcMemHandle, ctypes.c_uint], ("cuIpcOpenMemHandle_v2",)),
    "cuIpcCloseMemHandle": ([CUdeviceptr], ()),
    "cuMemRetainAllocationHandle": ([_P(CUmemGenericAllocationHandle), ctypes.c_void_p], ()),
    "cuMemRelease": ([CUmemGenericAllocationHandle], ()),
    "cuMemGetAllocationPropertiesFromHandle": ([_P(CUmemAllocationProp), CUmemGenericAllocationHandle], ()),
    "cuMemExportToShareableHandle": ([ctypes.c_void_p, CUmemGenericAllocationHandle, ctypes.c_int,
                                      ctypes.c_ulonglong], ()),
    "cuMemImportFromShareableHandle": ([_P(CUmemGenericAllocationHandle), ctypes.c_void_p, ctypes.c_int], ()),
    "cuMemGetAllocationGranularity": ([_P(ctypes.c_size_t), _P(CUmemAllocationProp), ctypes.c_int], ()),
    "cuMemAddressReserve": ([_P(CUdeviceptr), ctypes.c_size_t, ctypes.c_size_t, CUdeviceptr, ctypes.c_ulonglong],
                            ()),
    "cuMemAddressFree": ([CUdeviceptr, ctypes.c_size_t], ()),
    "cuMemMap": ([CUdeviceptr, ctypes.c_size_t, ctypes.c_size_t, CUmemGenericAllocationHandle, ctypes.c_ulonglong],
                 ()),
    "cuMemUnmap": ([CUdeviceptr, ctypes.c_size_t], ()),
    "cuMemSetAccess": ([CUdeviceptr, ctypes.c_size_t, _P(CUmemAccessDesc), ctypes.c_size_t], ()),
}

_lock = threading.Lock()
_driver: Driver | None = None
_stats_lock = threading.Lock()
_stats = {"ipc_opened": 0, "ipc_closed": 0, "vmm_mapped": 0, "vmm_unmapped": 0}


def _count(key: str) -> None:
    with _stats_lock:
        _stats[key] += 1


def mapping_stats() -> dict:
    """How many mappings this process opened and closed so far (ipc_opened, ipc_closed,
    vmm_mapped, vmm_unmapped): a reader checks that it opened each allocation once."""
    with _stats_lock:
        return dict(_stats)


class Driver:
    """The loaded driver: the raw entry points as attributes, plus checked helpers."""

    def __init__(self, lib) -> None:
        self.lib = lib
        for name, (argtypes, alternatives) in _SIGNATURES.items():
            fn = None
            for candidate in alternatives + (name,):
                fn = getattr(lib, candidate, None)
                if fn is not None:
                    break
            if fn is None:
                raise FailedPrecondition(f"cannot use CUDA: the driver has no {name} (it is older than CUDA 11.3)")
            fn.argtypes = argtypes
            fn.restype = ctypes.c_int
            setattr(self, name, fn)
        self._contexts: dict = {}
        self._contexts_lock = threading.Lock()
        self._uuids: list | None = None
        self._ordinals: dict = {}  # UUID as asked -> ordinal or None
        self._tls = threading.local()  # .scratch: see _scratch()
        self._current = threading.local()  # .stack: the ordinals on() made current on this thread

    # ---- errors ----

    def error_text(self, code: int) -> str:
        name, text = ctypes.c_char_p(), ctypes.c_char_p()
        self.cuGetErrorName(code, ctypes.byref(name))
        self.cuGetErrorString(code, ctypes.byref(text))
        n = name.value.decode() if name.value else f"CUresult {code}"
        t = text.value.decode() if text.value else "unknown error"
        return f"{n}: {t}"

    def check(self, code: int, what: str) -> None:
        """Raises for a failed call: "cannot <what>: CUDA_ERROR_X: text"."""
        if code == CUDA_SUCCESS:
            return
        message = f"cannot {what}: {self.error_text(code)}"
        if code == CUDA_ERROR_OUT_OF_MEMORY:
            raise ResourceExhausted(message)
        raise FailedPrecondition(message)

    # ---- devices and contexts ----

    def device_count(self) -> int:
        n = ctypes.c_int()
        self.check(self.cuDeviceGetCount(ctypes.byref(n)), "count CUDA devices")
        return n.value

    def device_uuid(self, ordinal: int) -> str:
        """"GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx", as nvidia-smi -L prints it."""
        return self._all_uuids()[self._valid(ordinal)]

    def ordinal_of_uuid(self, uuid: str):
        """This process's ordinal of the device `uuid` (with or without "GPU-", any case), or None."""
        try:
            return self._ordinals[uuid]
        except KeyError:
            pass
        found = self._find_uuid(uuid)
        self._ordinals[uuid] = found  # devices do not change while the process runs
        return found

    def _find_uuid(self, uuid: str):
        want = uuid.lower()
        if not want.startswith("gpu-"):
            want = "gpu-" + want
        for i, u in enumerate(self._all_uuids()):
            if u.lower() == want:
                return i
        return None

    def _all_uuids(self) -> list:
        if self._uuids is None:
            out = []
            for i in range(self.device_count()):
                dev = ctypes.c_int()
                self.check(self.cuDeviceGet(ctypes.byref(dev), i), f"get CUDA device {i}")
                u = CUuuid()
                self.check(self.cuDeviceGetUuid(ctypes.byref(u), dev), f"read the UUID of CUDA device {i}")
                h = bytes(u.bytes).hex()
                out.append(f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}")
            self._uuids = out
        return self._uuids

    def _valid(self, ordinal: int) -> int:
        n = len(self._all_uuids())
        if not isinstance(ordinal, int) or not 0 <= ordinal < n:
            raise InvalidArgument(f"cannot use CUDA device {ordinal!r}: this process sees {n} device(s)")
        return ordinal

    def primary_context(self, ordinal: int):
        with self._contexts_lock:
            ctx = self._contexts.get(ordinal)
            if ctx is None:
                dev = ctypes.c_int()
                self.check(self.cuDeviceGet(ctypes.byref(dev), self._valid(ordinal)), f"get CUDA device {ordinal}")
                c = ctypes.c_void_p()
                # Retained for the life of the process, as the runtime does: torch uses it too.
                self.check(self.cuDevicePrimaryCtxRetain(ctypes.byref(c), dev),
                           f"retain the primary context of CUDA device {ordinal}")
                ctx = c.value
                self._contexts[ordinal] = ctx
        return ctx

    @contextlib.contextmanager
    def on(self, ordinal: int):
        """Makes the primary context of `ordinal` current on this thread for the block. Nested
        blocks of the ordinal already current cost nothing (one push for a batch of opens)."""
        stack = getattr(self._current, "stack", None)
        if stack is None:
            stack = self._current.stack = []
        if stack and stack[-1] == ordinal:
            yield
            return
        self.check(self.cuCtxPushCurrent(self.primary_context(ordinal)),
                   f"make the primary context of CUDA device {ordinal} current")
        stack.append(ordinal)
        try:
            yield
        finally:
            stack.pop()
            self.cuCtxPopCurrent(ctypes.byref(ctypes.c_void_p()))

    # ---- producer side ----

    def _scratch(self):
        """This thread's reusable out-arguments for the per-allocation calls (register makes
        two a cudaMalloc allocation: not building them each time saves ~30 % of that time)."""
        try:
            return self._tls.scratch
        except AttributeError:
            base, size, handle = CUdeviceptr(), ctypes.c_size_t(), CUipcMemHandle()
            scratch = self._tls.scratch = (base, size, handle, ctypes.byref(base), ctypes.byref(size),
                                           ctypes.byref(handle))
            return scratch

    def address_range(self, ptr: int) -> tuple:
        """(base, size) of the allocation holding device address `ptr`: the cudaMalloc block, or
        for VMM memory the one physical allocation mapped there. REQUIRES: a context of its device."""
        base, size, _, base_out, size_out, _ = self._scratch()
        code = self.cuMemGetAddressRange(base_out, size_out, ptr)
        if code:  # the message is built only on failure: this runs once per allocation registered
            self.check(code, f"find the allocation of device address {ptr:#x}")
        return base.value, size.value

    def ipc_handle(self, base: int) -> bytes:
        """The cudaIpcMemHandle of the allocation starting at `base`."""
        h = CUipcMemHandle()
        code = self.cuIpcGetMemHandle(ctypes.byref(h), base)
        if code:
            self.check(code, f"export an IPC handle for the allocation at {base:#x}")
        return bytes(h)

    def try_ipc_handle(self, base: int):
        """ipc_handle(base), or None where the driver refuses (memory that is not cudaMalloc's:
        VMM pages, pool memory)."""
        _, _, handle, _, _, handle_out = self._scratch()
        if self.cuIpcGetMemHandle(handle_out, base) != CUDA_SUCCESS:
            return None
        return bytes(handle)

    def retain_allocation(self, ptr: int):
        """The VMM allocation handle mapped at `ptr`, or None when `ptr` is not VMM memory
        (cudaMalloc memory: the driver refuses). The caller releases it with release()."""
        h = CUmemGenericAllocationHandle()
        if self.cuMemRetainAllocationHandle(ctypes.byref(h), ctypes.c_void_p(ptr)) != CUDA_SUCCESS:
            return None
        return h.value

    def release(self, handle: int) -> None:
        self.cuMemRelease(handle)

    def handle_types(self, handle: int) -> int:
        prop = CUmemAllocationProp()
        self.check(self.cuMemGetAllocationPropertiesFromHandle(ctypes.byref(prop), handle),
                   "read the properties of a VMM allocation")
        return prop.requestedHandleTypes

    def export_fd(self, handle: int, what: str) -> int:
        fd = ctypes.c_int(-1)
        self.check(self.cuMemExportToShareableHandle(ctypes.byref(fd), handle,
                                                     CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0), what)
        return fd.value

    # ---- reader side ----

    def granularity(self, ordinal: int) -> int:
        prop = CUmemAllocationProp()
        prop.type = CU_MEM_ALLOCATION_TYPE_PINNED
        prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE
        prop.location.id = ordinal
        g = ctypes.c_size_t()
        self.check(self.cuMemGetAllocationGranularity(ctypes.byref(g), ctypes.byref(prop),
                                                      CU_MEM_ALLOC_GRANULARITY_MINIMUM),
                   f"read the VMM granularity of CUDA device {ordinal}")
        return g.value


def driver() -> Driver:
    """The CUDA driver, loaded and initialised on first use.
    Errors: FailedPrecondition when there is no driver or no device."""
    global _driver
    if _driver is not None:
        return _driver
    with _lock:
        if _driver is None:
            path = os.environ.get("TENSORREG_LIBCUDA") or "libcuda.so.1"
            try:
                lib = ctypes.CDLL(path)
            except OSError as e:
                raise FailedPrecondition(f"cannot use CUDA: cannot load the NVIDIA driver library {path} ({e}); "
                                         f"this needs a machine with an NVIDIA GPU and its driver") from None
            d = Driver(lib)
            code = d.cuInit(0)
            if code != CUDA_SUCCESS:
                raise FailedPrecondition(f"cannot use CUDA: cuInit failed: {d.error_text(code)}")
            _driver = d
    return _driver


# ---- mappings of another process's memory ---------------------------------------------------


def _close_ipc(drv: Driver, ordinal: int, ptr: int) -> None:
    # Kernels reading the mapping may still be in flight when the last tensor is freed (torch
    # frees without waiting for the stream): finish them first. Errors are ignored: at exit the
    # driver may already be shutting down, and the OS reclaims the mapping then anyway.
    try:
        with drv.on(ordinal):
            drv.cuCtxSynchronize()
            if drv.cuIpcCloseMemHandle(ptr) == CUDA_SUCCESS:
                _count("ipc_closed")
    except Exception:  # noqa: BLE001 - a release path must not raise
        pass


class IpcMapping:
    """Another process's cudaMalloc allocation, opened with cuIpcOpenMemHandle on `ordinal`.
    Errors: FailedPrecondition (the driver refused the handle), ResourceExhausted."""

    def __init__(self, drv: Driver, ordinal: int, handle: bytes, size: int, what: str) -> None:
        if len(handle) != IPC_HANDLE_BYTES:
            raise InvalidArgument(f"cannot open {what}: the IPC handle has {len(handle)} bytes, not "
                                  f"{IPC_HANDLE_BYTES}")
        h = CUipcMemHandle()
        ctypes.memmove(ctypes.byref(h), handle, IPC_HANDLE_BYTES)
        ptr = CUdeviceptr()
        with drv.on(ordinal):
            code = drv.cuIpcOpenMemHandle(ctypes.byref(ptr), h, CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS)
            if code != CUDA_SUCCESS:
                # The usual cause is worth naming: CUDA refuses a process its own IPC handles.
                drv.check(code, f"open {what} (a CUDA IPC handle; the process that exported it cannot open it, "
                                f"it already has the memory)")
        _count("ipc_opened")
        self.ordinal = ordinal
        self.ptr = ptr.value
        self.size = size
        self._finalizer = weakref.finalize(self, _close_ipc, drv, ordinal, self.ptr)

    def close(self) -> None:
        """Unmaps now. REQUIRES: no tensor over it is used afterwards."""
        self._finalizer()


def _close_vmm(drv: Driver, ordinal: int, ptr: int, reserved: int, mapped: int) -> None:
    try:
        with drv.on(ordinal):
            drv.cuCtxSynchronize()
            if mapped:
                drv.cuMemUnmap(ptr, mapped)
            drv.cuMemAddressFree(ptr, reserved)
        _count("vmm_unmapped")
    except Exception:  # noqa: BLE001 - a release path must not raise
        pass


class VmmMapping:
    """CUDA VMM allocations imported from POSIX fds and mapped back to back on `ordinal`, in one
    reservation (their total, rounded up to the granularity), of which `size` bytes are used.
    The fds stay the caller's.
    Errors: FailedPrecondition (an fd that does not import, a map that fails), InvalidArgument
    (chunk sizes that do not add up), ResourceExhausted (no address space)."""

    def __init__(self, drv: Driver, ordinal: int, fds: list, chunk_bytes: list, size: int, what: str) -> None:
        total = sum(chunk_bytes)
        if len(fds) != len(chunk_bytes) or not chunk_bytes or size > total:
            raise InvalidArgument(f"cannot map {what}: {len(chunk_bytes)} chunks of {total} bytes with "
                                  f"{len(fds)} fds for {size} bytes")
        g = drv.granularity(ordinal)
        reserved = (total + g - 1) // g * g
        ptr = CUdeviceptr()
        handles = []
        mapped = 0
        with drv.on(ordinal):
            drv.check(drv.cuMemAddressReserve(ctypes.byref(ptr), reserved, 0, 0, 0),
                      f"reserve {reserved} bytes of address space for {what}")
            base = ptr.value
            try:
                for k, (fd, n) in enumerate(zip(fds, chunk_bytes)):
                    h = CUmemGenericAllocationHandle()
                    drv.check(drv.cuMemImportFromShareableHandle(ctypes.byref(h), ctypes.c_void_p(fd),
                                                                 CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR),
                              f"import chunk {k} (fd {fd}) of {what}")
                    handles.append(h.value)
                    drv.check(drv.cuMemMap(base + mapped, n, 0, h.value, 0),
                              f"map chunk {k} of {n} bytes at offset {mapped} of {what}")
                    mapped += n
                access = CUmemAccessDesc()
                access.location.type = CU_MEM_LOCATION_TYPE_DEVICE
                access.location.id = ordinal
                access.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE
                drv.check(drv.cuMemSetAccess(base, mapped, ctypes.byref(access), 1),
                          f"grant access to {what} on CUDA device {ordinal}")
            except BaseException:
                if mapped:
                    drv.cuMemUnmap(base, mapped)
                drv.cuMemAddressFree(base, reserved)
                raise
            finally:
                # A mapping keeps its allocation alive; the imported handles are not needed after.
                for h in handles:
                    drv.cuMemRelease(h)
        _count("vmm_mapped")
        self.ordinal = ordinal
        self.ptr = base
        self.size = size
        self._finalizer = weakref.finalize(self, _close_vmm, drv, ordinal, base, reserved, mapped)

    def close(self) -> None:
        """Unmaps now. REQUIRES: no tensor over it is used afterwards."""
        self._finalizer()


class CudaArray:
    """`size` bytes at `owner.ptr + offset` as a CUDA array for torch.as_tensor(). torch keeps
    this object (so `owner`) referenced until the tensor's storage is freed."""

    def __init__(self, owner, size: int, offset: int = 0) -> None:
        self.owner = owner
        self.__cuda_array_interface__ = {
            "shape": (size,),
            "typestr": "|u1",
            "data": (owner.ptr + offset, False),
            "version": 2,
            "strides": None,
        }


def as_tensor(torch, owner, ordinal: int, size: int, offset: int = 0):
    """A uint8 CUDA tensor over `size` bytes of `owner`'s mapping, keeping `owner` alive."""
    return torch.as_tensor(CudaArray(owner, size, offset), device=torch.device("cuda", ordinal))
