"""Where the Python client's time goes, call by call, on the GPU machine (not run by CI).

    python3 benchmarks/python_client_profile.py [--tensors 1000] [--gib 8] [--quick 1]

Measures, on the same caching-allocator state dict as python_register_bench.py:
- torch's per-tensor attribute calls (what state_dict_descs pays per tensor);
- the CUDA driver queries per allocation, one by one and in one cuPointerGetAttributes call,
  and cuIpcGetMemHandle on one thread and on several;
- the reader's side in a child process: cuIpcOpenMemHandle with and without lazy peer access,
  and the VMM import / map / access split (chunks of this process's own VMM allocations,
  imported back from their fds), access granted per chunk or once per run.
Prints one line per measurement (µs per call).
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "python"))

from python_register_bench import build_state_dict  # noqa: E402

CU_POINTER_ATTRIBUTE_BUFFER_ID = 7
CU_POINTER_ATTRIBUTE_RANGE_START_ADDR = 11
CU_POINTER_ATTRIBUTE_RANGE_SIZE = 12
CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE = 14
CU_POINTER_ATTRIBUTE_ALLOWED_HANDLE_TYPES = 16


def per_call(label: str, n: int, seconds: float) -> None:
    print(f"{label}: {seconds * 1e6 / max(n, 1):.2f} us per call ({n} calls, {seconds * 1e3:.2f} ms)", flush=True)


def timed(fn, items) -> float:
    started = time.perf_counter()
    for x in items:
        fn(x)
    return time.perf_counter() - started


def producer(tensors: int, gib: float, quick: bool = False) -> None:
    import torch

    from tensorreg import _cuda, _layout

    sd = build_state_dict(torch, tensors, gib)
    ts = list(sd.values())
    for label, fn in [("t.untyped_storage()", lambda t: t.untyped_storage()),
                      ("t.data_ptr()", lambda t: t.data_ptr()),
                      ("t.untyped_storage().data_ptr()+nbytes()",
                       lambda t: (lambda s: (s.data_ptr(), s.nbytes()))(t.untyped_storage())),
                      ("list(t.shape)", lambda t: list(t.shape)),
                      ("t.stride()", lambda t: t.stride()),
                      ("t.storage_offset()", lambda t: t.storage_offset()),
                      ("t.dtype", lambda t: t.dtype),
                      ("t.device", lambda t: t.device),
                      ("t.layout", lambda t: t.layout),
                      ("t.is_cuda", lambda t: t.is_cuda),
                      ("isinstance(t, Tensor)", lambda t: isinstance(t, torch.Tensor))]:
        timed(fn, ts)
        per_call(f"torch {label}", len(ts), timed(fn, ts))
    started = time.perf_counter()
    descs, _ = _layout.state_dict_descs(torch, sd, "profile")
    per_call("state_dict_descs per tensor", len(ts), time.perf_counter() - started)
    started = time.perf_counter()
    layout = _layout.build(descs)
    per_call("layout.build per tensor", len(ts), time.perf_counter() - started)
    started = time.perf_counter()
    _layout.canonical_json(layout.index)
    per_call("canonical_json per tensor", len(ts), time.perf_counter() - started)

    from tensorreg import _messages, _requests
    R = _messages.message(_messages.DAEMON + ".RegionRef")
    ref = R(region_id="region:" + "0" * 32, memory_kind=2, device_id=0, size_bytes=20 << 20)
    uuid = "GPU-02ad0eca-905c-d3d5-53ed-04fc6d6d50d6"

    def feed():
        def source(e, k):
            e.device_id = 0
            e.device_uuid = uuid
            if k % 2:
                e.region_ref.CopyFrom(ref)
            else:
                e.cuda_ipc_handle = b"h" * 64
            e.mapping_base_offset = 4096

        return _requests.lease_feed(layout, source)

    for _ in range(2):
        started = time.perf_counter()
        message = feed()
        built = time.perf_counter()
        message.SerializeToString()
        per_call("Feed message build per tensor", len(ts), built - started)
        per_call("Feed message serialize per tensor", len(ts), time.perf_counter() - built)

    drv = _cuda.driver()
    lib = drv.lib
    bases = sorted({drv.address_range(t.data_ptr())[0] for t in ts})
    print(f"{len(bases)} allocations", flush=True)
    with drv.on(0):
        per_call("cuMemGetAddressRange", len(bases), timed(lambda b: drv.address_range(b + 8), bases))
        per_call("cuMemRetainAllocationHandle (cudaMalloc: fails)", len(bases),
                 timed(lambda b: drv.retain_allocation(b), bases))
        per_call("cuIpcGetMemHandle (first)", len(bases), timed(lambda b: drv.ipc_handle(b), bases))
        per_call("cuIpcGetMemHandle (again)", len(bases), timed(lambda b: drv.ipc_handle(b), bases))
        fn = lib.cuPointerGetAttributes
        fn.argtypes = [ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint64]
        fn.restype = ctypes.c_int
        attrs = (ctypes.c_int * 5)(CU_POINTER_ATTRIBUTE_RANGE_START_ADDR, CU_POINTER_ATTRIBUTE_RANGE_SIZE,
                                   CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE,
                                   CU_POINTER_ATTRIBUTE_ALLOWED_HANDLE_TYPES, CU_POINTER_ATTRIBUTE_BUFFER_ID)
        start, size, legacy, types, buffer_id = (ctypes.c_uint64(), ctypes.c_uint64(), ctypes.c_int(),
                                                 ctypes.c_uint64(), ctypes.c_uint64())
        data = (ctypes.c_void_p * 5)(*[ctypes.addressof(x) for x in (start, size, legacy, types, buffer_id)])

        def attributes(b):
            code = fn(5, attrs, data, b + 8)
            assert code == 0, code
            return start.value, size.value, legacy.value, types.value

        print(f"cuPointerGetAttributes of the first: {attributes(bases[0])}", flush=True)
        per_call("cuPointerGetAttributes (5 attributes)", len(bases), timed(attributes, bases))

    plan_costs(torch, drv, sd, layout, bases)

    def ipc_threads(k: int) -> float:
        parts = [bases[i::k] for i in range(k)]

        def work(part):
            with drv.on(0):
                for b in part:
                    drv.ipc_handle(b)

        return on_threads(work, parts)

    for k in (2, 4, 8):
        per_call(f"cuIpcGetMemHandle on {k} threads (wall per allocation)", len(bases), ipc_threads(k))

    if quick:
        return
    # The reader side, in a child (a process cannot open its own IPC handles).
    with drv.on(0):
        handles = [drv.ipc_handle(b).hex() for b in bases]
    out = subprocess.run([sys.executable, __file__, "reader"], input=json.dumps(handles), capture_output=True,
                         text=True, timeout=300)
    print(out.stdout, out.stderr[-3000:], flush=True)
    vmm_split(drv)


def median_ms(fn, n: int = 7) -> float:
    times = []
    for _ in range(n):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    times.sort()
    return times[len(times) // 2] * 1e3


def plan_costs(torch, drv, sd, layout, bases) -> None:
    """The register's critical-path pieces, medians of 7: with the cyclic GC on and off, the
    plan against the real driver and against a dict (its Python cost alone), and the driver
    calls through the Driver methods and through bare ctypes calls on reused arguments."""
    import gc

    from tensorreg import _cuda, _device, _layout

    spans = [(s.source[0].data_ptr(), s.nbytes) for s in layout.storages]

    def plan_real():
        with drv.on(0):
            _device.plan(drv, spans, "x").release(drv)

    with drv.on(0):
        ranges = {b: drv.address_range(b) for b in bases}
        handles = {b: drv.ipc_handle(b) for b in bases}
    import bisect
    starts = sorted(ranges)

    class DictDriver:
        def address_range(self, ptr):
            return ranges[starts[bisect.bisect_right(starts, ptr) - 1]]

        def try_ipc_handle(self, base):
            return handles[base]

        def retain_allocation(self, base):
            return None

        def release(self, handle):
            pass

    fake = DictDriver()
    for label, gc_on in (("GC on", True), ("GC off", False)):
        if not gc_on:
            gc.disable()
        try:
            print(f"[{label}] state_dict_descs {median_ms(lambda: _layout.state_dict_descs(torch, sd, 'x')):.2f} ms, "
                  f"plan (real driver) {median_ms(plan_real):.2f} ms, plan (dict driver: Python only) "
                  f"{median_ms(lambda: _device.plan(fake, spans, 'x')):.2f} ms", flush=True)
        finally:
            gc.enable()

    def methods():
        with drv.on(0):
            for b in bases:
                drv.address_range(b + 8)
                drv.try_ipc_handle(b)

    base_out, size_out, handle_out = _cuda.CUdeviceptr(), ctypes.c_size_t(), _cuda.CUipcMemHandle()
    pb, ps, ph = ctypes.byref(base_out), ctypes.byref(size_out), ctypes.byref(handle_out)
    get_range, get_handle = drv.cuMemGetAddressRange, drv.cuIpcGetMemHandle

    def bare():
        with drv.on(0):
            for b in bases:
                get_range(pb, ps, b + 8)
                get_handle(ph, b)
                bytes(handle_out)

    n = ctypes.c_int()
    pn = ctypes.byref(n)
    count = drv.cuDeviceGetCount
    print(f"driver calls for {len(bases)} allocations: Driver methods {median_ms(methods):.2f} ms, bare ctypes on "
          f"reused arguments {median_ms(bare):.2f} ms; one trivial ctypes call (cuDeviceGetCount) "
          f"{median_ms(lambda: [count(pn) for _ in range(10000)]) / 10:.2f} us", flush=True)


def reader() -> None:
    from tensorreg import _cuda

    handles = [bytes.fromhex(h) for h in json.loads(sys.stdin.read())]
    drv = _cuda.driver()
    for flags in (1, 1):
        ptrs = []
        with drv.on(0):
            started = time.perf_counter()
            for h in handles:
                raw = _cuda.CUipcMemHandle()
                ctypes.memmove(ctypes.byref(raw), h, 64)
                p = _cuda.CUdeviceptr()
                assert drv.cuIpcOpenMemHandle(ctypes.byref(p), raw, flags) == 0
                ptrs.append(p.value)
            per_call(f"reader cuIpcOpenMemHandle flags={flags}", len(handles), time.perf_counter() - started)
            import torch

            class Owner:
                pass

            owners = []
            for p in ptrs:
                o = Owner()
                o.ptr = p
                owners.append(o)
            started = time.perf_counter()
            made = [_cuda.as_tensor(torch, o, 0, 1 << 20) for o in owners]
            per_call("reader torch.as_tensor(__cuda_array_interface__)", len(owners), time.perf_counter() - started)
            started = time.perf_counter()
            views = [m[4096:8192].view(torch.float16).as_strided((16, 64), (64, 1), 8) for m in made]
            per_call("reader slice+view+as_strided", len(made), time.perf_counter() - started)
            typed = [m.view(torch.float16) for m in made]
            started = time.perf_counter()
            views = [t.as_strided((16, 64), (64, 1), 8) for t in typed for _ in range(2)]
            per_call("reader as_strided", len(views), time.perf_counter() - started)
            del made, views, typed
            started = time.perf_counter()
            for p in ptrs:
                drv.cuIpcCloseMemHandle(p)
            per_call("reader cuIpcCloseMemHandle", len(handles), time.perf_counter() - started)


def vmm_split(drv) -> None:
    """Import / map / set-access costs of VMM chunks (this process's own, imported back)."""
    lib = drv.lib
    create = lib.cuMemCreate
    create.argtypes = [ctypes.POINTER(_c().CUmemGenericAllocationHandle), ctypes.c_size_t,
                       ctypes.POINTER(_c().CUmemAllocationProp), ctypes.c_ulonglong]
    create.restype = ctypes.c_int
    C = _c()
    chunk = 20 << 20
    n = 400
    prop = C.CUmemAllocationProp()
    prop.type = C.CU_MEM_ALLOCATION_TYPE_PINNED
    prop.location.type = C.CU_MEM_LOCATION_TYPE_DEVICE
    prop.location.id = 0
    prop.requestedHandleTypes = C.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
    access = C.CUmemAccessDesc()
    access.location.type = C.CU_MEM_LOCATION_TYPE_DEVICE
    access.location.id = 0
    access.flags = C.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
    with drv.on(0):
        made, fds = [], []
        for _ in range(n):
            h = C.CUmemGenericAllocationHandle()
            assert create(ctypes.byref(h), chunk, ctypes.byref(prop), 0) == 0
            made.append(h.value)
            fds.append(drv.export_fd(h.value, "export"))
        for per_chunk_access in (True, False, True, False):
            imported = []
            started = time.perf_counter()
            for fd in fds:
                h = C.CUmemGenericAllocationHandle()
                assert drv.cuMemImportFromShareableHandle(ctypes.byref(h), ctypes.c_void_p(fd),
                                                          C.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR) == 0
                imported.append(h.value)
            t_import = time.perf_counter() - started
            va = C.CUdeviceptr()
            assert drv.cuMemAddressReserve(ctypes.byref(va), n * chunk, 0, 0, 0) == 0
            started = time.perf_counter()
            for k, h in enumerate(imported):
                assert drv.cuMemMap(va.value + k * chunk, chunk, 0, h, 0) == 0
            t_map = time.perf_counter() - started
            started = time.perf_counter()
            if per_chunk_access:
                for k in range(n):
                    assert drv.cuMemSetAccess(va.value + k * chunk, chunk, ctypes.byref(access), 1) == 0
            else:
                assert drv.cuMemSetAccess(va.value, n * chunk, ctypes.byref(access), 1) == 0
            t_access = time.perf_counter() - started
            started = time.perf_counter()
            drv.cuMemUnmap(va.value, n * chunk)
            t_unmap = time.perf_counter() - started
            drv.cuMemAddressFree(va.value, n * chunk)
            for h in imported:
                drv.cuMemRelease(h)
            print(f"VMM {n} chunks of 20 MiB: import {t_import * 1e6 / n:.2f} us, map {t_map * 1e6 / n:.2f} us, "
                  f"access {'per chunk' if per_chunk_access else 'once'} {t_access * 1e6 / n:.2f} us per chunk, "
                  f"unmap {t_unmap * 1e6 / n:.2f} us per chunk", flush=True)
        # The same on several threads: imports split by chunk, access by sub-range.
        for k in (2, 4, 8):
            imported = [None] * n

            def import_part(part):
                with drv.on(0):
                    for i in part:
                        h = C.CUmemGenericAllocationHandle()
                        assert drv.cuMemImportFromShareableHandle(ctypes.byref(h), ctypes.c_void_p(fds[i]),
                                                                  C.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR) == 0
                        imported[i] = h.value

            t_import = on_threads(import_part, [range(i, n, k) for i in range(k)])
            va = C.CUdeviceptr()
            assert drv.cuMemAddressReserve(ctypes.byref(va), n * chunk, 0, 0, 0) == 0
            for i, h in enumerate(imported):
                assert drv.cuMemMap(va.value + i * chunk, chunk, 0, h, 0) == 0

            def access_part(part):
                with drv.on(0):
                    lo, hi = part
                    assert drv.cuMemSetAccess(va.value + lo * chunk, (hi - lo) * chunk, ctypes.byref(access), 1) == 0

            step = (n + k - 1) // k
            t_access = on_threads(access_part, [(i, min(n, i + step)) for i in range(0, n, step)])
            drv.cuMemUnmap(va.value, n * chunk)
            drv.cuMemAddressFree(va.value, n * chunk)
            for h in imported:
                drv.cuMemRelease(h)
            print(f"VMM {n} chunks on {k} threads: import {t_import * 1e6 / n:.2f} us, access by sub-range "
                  f"{t_access * 1e6 / n:.2f} us per chunk (wall)", flush=True)
        for fd in fds:
            os.close(fd)
        for h in made:
            drv.cuMemRelease(h)


def on_threads(fn, parts) -> float:
    threads = [threading.Thread(target=fn, args=(p,)) for p in parts]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - started


def _c():
    from tensorreg import _cuda
    return _cuda


if __name__ == "__main__":
    if sys.argv[1:2] == ["reader"]:
        reader()
    else:
        opts = dict(zip(sys.argv[1::2], sys.argv[2::2]))
        producer(int(opts.get("--tensors", 1000)), float(opts.get("--gib", 8)), opts.get("--quick", "0") != "0")
