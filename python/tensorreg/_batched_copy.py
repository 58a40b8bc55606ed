"""Many device-to-device copies in one kernel launch: WeightSubscriber.load_into()'s copy of a
version into the reader's own tensors.

The kernel (python/kernels/batched_copy.cu, shipped as PTX that the driver JIT-compiles once
per process and device) walks a table of chunks, each at most CHUNK_BYTES of one (src, dst)
pair. A `CopyPlan` builds that table for a list of pairs and keeps it on the device: a reader
copying successive versions over the same mappings into the same tensors builds it once and then
launches one kernel per version.

Only pairs of contiguous tensors of one CUDA device, of equal size, take the kernel; plan()
leaves the others to the caller (torch's own copy). Where the driver cannot load the PTX (older
than the CUDA that wrote it), plan() answers None and the caller copies with torch.

Thread-safety: plan() and CopyPlan.launch() may run on any thread; a CopyPlan is used by one
thread at a time. Ownership: a CopyPlan owns its device table (a torch tensor).
"""

from __future__ import annotations

import ctypes
import os
import struct
import threading

from . import _cuda

CHUNK_BYTES = 1 << 20
THREADS_PER_BLOCK = 256
BLOCKS_PER_SM = 8
_ENTRY = struct.Struct("<QQQQ")  # copy_chunk: src, dst, bytes, unit

_lock = threading.Lock()
_functions: dict = {}  # ordinal -> CUfunction handle, or None where loading failed
_launch = None


def _load(drv, ordinal: int):
    """The kernel's CUfunction on `ordinal`, loaded once; None where the driver refuses it."""
    global _launch
    with _lock:
        if ordinal in _functions:
            return _functions[ordinal]
        fn = None
        try:
            lib = drv.lib
            load_data = lib.cuModuleLoadData
            load_data.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_char_p]
            get_function = lib.cuModuleGetFunction
            get_function.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p, ctypes.c_char_p]
            launch = lib.cuLaunchKernel
            launch.argtypes = [ctypes.c_void_p] + [ctypes.c_uint] * 7 + [ctypes.c_void_p,
                                                                        ctypes.POINTER(ctypes.c_void_p),
                                                                        ctypes.c_void_p]
            with open(os.path.join(os.path.dirname(__file__), "_batched_copy.ptx"), "rb") as f:
                ptx = f.read() + b"\0"
            module, function = ctypes.c_void_p(), ctypes.c_void_p()
            with drv.on(ordinal):
                if load_data(ctypes.byref(module), ptx) == _cuda.CUDA_SUCCESS and \
                        get_function(ctypes.byref(function), module, b"tensorreg_batched_copy") == _cuda.CUDA_SUCCESS:
                    fn = function.value
            _launch = launch
        except (OSError, AttributeError):
            fn = None
        _functions[ordinal] = fn
        return fn


def _unit(src: int, dst: int, nbytes: int) -> int:
    bits = src | dst | nbytes
    for unit in (16, 8, 4, 2):
        if bits % unit == 0:
            return unit
    return 1


class CopyPlan:
    """One launch copying `pairs` [(dst, src)] of contiguous same-size tensors on `ordinal`.
    `key` is what it was built for: (dst pointer, src pointer, bytes) of every pair."""

    def __init__(self, torch, drv, ordinal: int, function, key: tuple) -> None:
        self.key = key
        self._drv, self._ordinal, self._function = drv, ordinal, function
        table = bytearray()
        count = 0
        for dst_ptr, src_ptr, nbytes in key:
            for at in range(0, nbytes, CHUNK_BYTES):
                n = min(CHUNK_BYTES, nbytes - at)
                table += _ENTRY.pack(src_ptr + at, dst_ptr + at, n, _unit(src_ptr + at, dst_ptr + at, n))
                count += 1
        self.count = count
        device = torch.device("cuda", ordinal)
        self._table = torch.frombuffer(table, dtype=torch.uint8).to(device) if count else None
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        self._grid = max(1, min(count, sms * BLOCKS_PER_SM))
        self._torch = torch

    def launch(self) -> None:
        """Copies every pair on the device's current torch stream (asynchronous, as torch's own
        copies are). Errors: FailedPrecondition (the driver refused the launch)."""
        if not self.count:
            return
        stream = self._torch.cuda.current_stream(self._ordinal).cuda_stream
        table = ctypes.c_uint64(self._table.data_ptr())
        count = ctypes.c_uint64(self.count)
        params = (ctypes.c_void_p * 2)(ctypes.addressof(table), ctypes.addressof(count))
        with self._drv.on(self._ordinal):
            code = _launch(self._function, self._grid, 1, 1, THREADS_PER_BLOCK, 1, 1, 0, stream, params, None)
        self._drv.check(code, f"launch the batched copy of {self.count} chunks")


def plan(torch, dsts: list, srcs: list, last: CopyPlan | None = None):
    """(CopyPlan or None, [indices the plan does not copy]). The plan copies every pair of
    contiguous tensors of one CUDA device with equal byte sizes; `last` is reused when it was
    built for the same pointers and sizes. None: no pair qualifies, or the kernel cannot be
    loaded (then every index is left to the caller)."""
    key, rest, ordinal = [], [], None
    for k, (d, s) in enumerate(zip(dsts, srcs)):
        nbytes = d.numel() * d.element_size()
        if d.device.type != "cuda" or s.device != d.device or not d.is_contiguous() or not s.is_contiguous() or \
                s.numel() * s.element_size() != nbytes or (ordinal is not None and d.device.index != ordinal):
            rest.append(k)
            continue
        ordinal = d.device.index
        key.append((d.data_ptr(), s.data_ptr(), nbytes))
    if not key:
        return None, rest
    key = tuple(key)
    if last is not None and last.key == key:
        return last, rest
    drv = _cuda.driver()
    function = _load(drv, ordinal)
    if function is None:
        return None, list(range(len(dsts)))
    return CopyPlan(torch, drv, ordinal, function, key), rest
