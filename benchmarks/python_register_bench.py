"""The Python client's CUDA register and open on a 1 000-tensor, >= 8 GiB state dict (GPU
machine; not built or run by CI).

    python3 benchmarks/python_register_bench.py [--daemon PATH] [--cpp PATH] [--tensors 1000]
        [--gib 8] [--repeats 5] [--expandable 1]

(defaults: .device-daemon/tensorregd, a CUDA build, and .device-build/cuda_client_register_bench).
It starts the daemon on a temp socket and, in this process, builds the state dict with the
caching allocator (expandable_segments off unless --expandable 1), then:

- register(): wall time split into the metadata (the state dict, the driver queries, the
  region messages), the RPCs before commit (RegisterRegion pipelined; meanwhile the canonical
  layout, Begin and the Feed are built; then the Feed) and commit (the daemon opens the
  mappings and hashes on the GPU). The Python overhead is the Python work on the critical path
  (the metadata, plus the build made meanwhile if the daemon had nothing left to do by then)
  less the client-side work of the C++ client on the same allocations and tensors:
  cuda_client_register_bench (--cpp), given the structure in a JSON file, allocates the same
  sizes with cudaMalloc in its own process and does the same work (canonical index, one address
  range and one IPC export per allocation, the same messages) through the C++ client. Without
  that binary it falls back to the engine's metadata time for 1 000 tensors (RESULTS.md).
- open() in a second process next to today's practice, one CUDA IPC handle per tensor
  (torch.multiprocessing.reductions.reduce_tensor in the producer, its rebuild function in the
  reader), on the same 1 000 tensors; the reader's opens against the allocations; and the time
  of each step of open().

Goals (issue 8): Python overhead <= 10 ms over the C++ client for 1 000 tensors; open >= 5x
faster than the per-tensor rebuild; opens = allocations.
"""

from __future__ import annotations

import json
import os
import pickle
import statistics
import subprocess
import sys
import tempfile
import time

CPP_METADATA_1000 = 2.03e-3  # RESULTS.md: register_bench --metadata-only, 1 000 tensors, H100 host
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "python"))
sys.path.insert(0, HERE)

from bench_state_dicts import checksum, rebuild_state_dict, reduce_state_dict, varied_state_dict  # noqa: E402
from weight_sync_bench import stop_daemon  # noqa: E402


def log(*parts) -> None:
    print(*parts, flush=True)


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms"


def write_layout(path: str, layout, plan) -> None:
    """The structure of the registered state dict for cuda_client_register_bench (the C++
    client on the same tensors): allocations by size, storages by allocation and offset, and the
    tensors on them."""
    import bisect

    allocations = sorted(plan.allocations, key=lambda a: a.base)
    bases = [a.base for a in allocations]
    storages = []
    for s in layout.storages:
        ptr = layout.descs[s.first_name].storage_key[0]
        k = max(0, bisect.bisect_right(bases, ptr) - 1)
        offset = ptr - bases[k] if s.nbytes else 0
        storages.append({"allocation": k, "offset": offset, "nbytes": s.nbytes})
    tensors = []
    for name in sorted(layout.index):
        d = layout.descs[name]
        tensors.append({"name": name, "storage": layout.storage_of[name], "shape": list(d.shape),
                        "stride": list(d.stride), "dtype": d.dtype, "storage_offset": d.storage_offset})
    with open(path, "w") as f:
        json.dump({"allocations": [{"size": a.size} for a in allocations], "storages": storages, "tensors": tensors}, f)


def run_cpp_client(path: str, socket_path: str, layout_path: str, repeats: int):
    """cuda_client_register_bench on the same structure: its medians (ms), or None without it."""
    if not path or not os.path.exists(path):
        return None
    out = subprocess.run([path, "--socket", socket_path, "--layout", layout_path, "--repeats", str(repeats)],
                         capture_output=True, text=True, timeout=300)
    log("  " + "\n  ".join(line for line in out.stdout.strip().splitlines() if not line.startswith("{")))
    if out.returncode != 0:
        log(f"  cuda_client_register_bench failed ({out.returncode}): {out.stderr[-2000:]}")
        return None
    for line in reversed(out.stdout.strip().splitlines()):
        if line.startswith("{") and "client_work_ms" in line:
            return json.loads(line)
    return None


def profile_open() -> dict:
    """Wraps the steps of Store.open with timers; returns {step: seconds so far}."""
    from tensorreg import _cuda, _device, _reads

    spent: dict = {}

    def timed(owner, name, label):
        fn = getattr(owner, name)

        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[label] = spent.get(label, 0.0) + time.perf_counter() - started

        setattr(owner, name, wrapper)

    timed(_reads, "open_pages", "daemon answer (OpenArtifactDevice pages)")
    timed(_reads.json, "loads", "index json")
    timed(_cuda.IpcMapping, "__init__", "IPC opens")
    timed(_cuda.VmmMapping, "__init__", "VMM imports + maps")
    timed(_cuda, "as_tensor", "torch.as_tensor per allocation")
    timed(_device, "build_views", "build_views (a view per tensor)")
    return spent


def reader(socket_path: str, artifact_id: str, reductions_path: str) -> None:
    """The second process: open() next to the per-tensor rebuild; prints one JSON line."""
    import torch

    import tensorreg
    from tensorreg import _cuda

    torch.cuda.init()
    torch.zeros(1, device="cuda")  # CUDA context start-up is not part of either number
    spent = profile_open()
    torch.cuda.synchronize()
    out = {}
    with tensorreg.Store(socket_path) as store:
        _cuda.driver()
        # The allocations the daemon names (to check that open() maps each once).
        from tensorreg import _messages
        from tensorreg._wire import _close_fds
        request = _messages.Request()
        request.open_artifact_device.artifact_id = artifact_id
        answer, fds = store._conn.call(request)
        _close_fds(fds)
        out["allocations"] = len(answer.open_artifact_device.allocations)
        opens = []
        for _ in range(3):
            before = _cuda.mapping_stats()
            started = time.perf_counter()
            tensors = store.open(artifact_id)
            torch.cuda.synchronize()
            opens.append(time.perf_counter() - started)
            after = _cuda.mapping_stats()
            out["opened"] = after["ipc_opened"] + after["vmm_mapped"] - before["ipc_opened"] - before["vmm_mapped"]
            out["tensors"] = len(tensors)
            out["checksum_open"] = checksum(torch, tensors)
            del tensors
        out["open_s"] = opens
        out["open_parts_ms"] = {k: round(v * 1e3 / 3, 2) for k, v in spent.items()}  # per open, mean of 3
    with open(reductions_path, "rb") as f:
        reduced = pickle.load(f)
    rebuilds = []
    started = time.perf_counter()
    rebuilt = rebuild_state_dict(reduced)
    torch.cuda.synchronize()
    rebuilds.append(time.perf_counter() - started)
    out["checksum_rebuild"] = checksum(torch, rebuilt)
    out["rebuild_s"] = rebuilds
    del rebuilt
    print(json.dumps(out), flush=True)


def compare_open(torch, reduce_tensor, work: str, socket_path: str, sd: dict, art, label: str) -> int:
    """open() in a second process next to today's practice: one CUDA IPC handle per tensor
    (reduce_tensor here, its rebuild function there)."""
    reductions_path = os.path.join(work, "reduced.pkl")
    started = time.perf_counter()
    try:
        reduced = reduce_state_dict(reduce_tensor, sd)
    except RuntimeError as e:
        log(f"reduce_tensor refused these tensors ({e}); open() is timed alone")
        reduced = {}
    t_reduce = time.perf_counter() - started
    with open(reductions_path, "wb") as f:
        pickle.dump(reduced, f)
    out = subprocess.run([sys.executable, __file__, "reader", socket_path, art.artifact_id, reductions_path],
                         capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        log(f"reader failed: {out.stderr[-3000:]}")
        return 1
    got = json.loads(out.stdout.strip().splitlines()[-1])
    open_s = statistics.median(got["open_s"])
    log(f"  open() steps of {label}, ms per open: {got['open_parts_ms']}")
    if not reduced:
        log(f"open of {label} in a second process: {ms(open_s)} for {got['tensors']} tensors; {got['opened']} opens "
            f"for {got['allocations']} allocations")
        return 0
    rebuild_s = statistics.median(got["rebuild_s"])
    log(f"open of {label} in a second process: {ms(open_s)} (runs {[round(x * 1e3, 2) for x in got['open_s']]} ms) "
        f"for {got['tensors']} tensors; {got['opened']} opens for the {got['allocations']} allocations the daemon "
        f"names (opens = allocations: {'met' if got['opened'] == got['allocations'] else 'NOT met'})")

    log(f"  per-tensor rebuild (reduce_tensor in the producer {ms(t_reduce)}; rebuild in the reader): "
        f"{ms(rebuild_s)}")
    speedup = rebuild_s / open_s
    log(f"  open is {speedup:.1f}x faster (goal >= 5x: {'met' if speedup >= 5 else 'NOT met'}); "
        f"checksums equal: {got['checksum_open'] == got['checksum_rebuild']}")
    return 0


def main() -> int:
    args = sys.argv[1:]
    if args and args[0] == "reader":
        reader(*args[1:4])
        return 0
    opts = {"daemon": os.path.join(REPO, ".device-daemon", "tensorregd"), "tensors": "1000", "gib": "8",
            "repeats": "5", "expandable": "0",
            "cpp": os.path.join(REPO, ".device-build", "cuda_client_register_bench")}
    while args:
        a = args.pop(0)
        if a.startswith("--") and a[2:] in opts and args:
            opts[a[2:]] = args.pop(0)
        else:
            log(f"unknown argument {a}")
            return 2
    if opts["expandable"] != "0":
        # Before torch is imported: the allocator reads it once.
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    import torch
    from torch.multiprocessing.reductions import reduce_tensor

    import tensorreg
    from tensorreg import _cuda, _device, _layout, _requests

    if not torch.cuda.is_available():
        log("skipped: no CUDA device")
        return 77
    work = tempfile.mkdtemp(prefix="tensorreg-bench-")
    socket_path = os.path.join(work, "d.sock")
    # Its output goes to a file: a pipe nobody reads could fill with warnings and stall it.
    daemon_log = open(os.path.join(work, "tensorregd.log"), "w+")
    daemon = subprocess.Popen([opts["daemon"], "--socket", socket_path, "--log-level", "warn"],
                              stdout=daemon_log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while not os.path.exists(socket_path) or "ready" not in open(daemon_log.name).read():
        if daemon.poll() is not None or time.monotonic() > deadline:
            log(f"tensorregd did not start: {open(daemon_log.name).read()}")
            return 1
        time.sleep(0.05)
    try:
        n, gib, repeats = int(opts["tensors"]), float(opts["gib"]), int(opts["repeats"])
        sd = varied_state_dict(torch, n, gib)
        total = sum(t.untyped_storage().nbytes() for t in sd.values())
        log(f"device: {torch.cuda.get_device_name(0)}; torch {torch.__version__}; {n} tensors, "
            f"{total / (1 << 30):.2f} GiB; expandable_segments {'on' if opts['expandable'] != '0' else 'off'}")
        with tensorreg.Store(socket_path) as store:
            store.register({"warm": torch.ones(4, device="cuda")}).close()  # driver, messages, daemon CUDA
            parts = {"metadata": [], "rpc": [], "commit": [], "wall": [], "feed_build": [], "answer_wait": []}
            art = None
            for _ in range(repeats):
                if art is not None:
                    art.close()
                started = time.perf_counter()
                art = store.register(sd)
                parts["wall"].append(time.perf_counter() - started)
                for k, v in art.timings.items():
                    parts[k].append(v)
            # The Python-only pieces, without any RPC, on the same tensors (median of 3).
            pieces = {"descs": [], "layout": [], "plan": [], "feed": []}
            drv = _cuda.driver()
            for _ in range(3):
                started = time.perf_counter()
                descs = _layout.state_dict_descs(torch, sd, "x")[0]
                pieces["descs"].append(time.perf_counter() - started)
                started = time.perf_counter()
                layout = _layout.build(descs)
                pieces["layout"].append(time.perf_counter() - started)
                started = time.perf_counter()
                with drv.on(0):
                    plan = _device.plan(drv, [(s.source[0].data_ptr(), s.nbytes) for s in layout.storages], "x")
                pieces["plan"].append(time.perf_counter() - started)
                plan.release(drv)
                started = time.perf_counter()
                feed = _requests.lease_feed(layout, lambda e, k: setattr(e, "mapping_base_offset", k))
                feed.SerializeToString()
                pieces["feed"].append(time.perf_counter() - started)
            piece = {k: statistics.median(v) for k, v in pieces.items()}
            stats = store.stats()
            med = {k: statistics.median(v) for k, v in parts.items()}
            log(f"register ({repeats} runs, median): wall {ms(med['wall'])} = metadata {ms(med['metadata'])} + "
                f"RPCs before commit {ms(med['rpc'])} + commit (daemon: map + GPU hash) {ms(med['commit'])}")
            log(f"  first register: wall {ms(parts['wall'][0])}, metadata {ms(parts['metadata'][0])}")
            log(f"  inside the RPCs: canonical layout + Begin + Feed built in {ms(med['feed_build'])} while the daemon "
                f"imports the regions; it answered {ms(med['answer_wait'])} after they were built")
            log(f"  pieces alone: state dict {ms(piece['descs'])}, canonical layout {ms(piece['layout'])}, driver plan "
                f"{ms(piece['plan'])} ({len(plan.allocations)} allocations, {len(plan.regions)} regions, "
                f"{sum(1 for s in plan.sources if s.region is None)} lone handles), Feed build+serialize "
                f"{ms(piece['feed'])} ({len(feed.SerializeToString())} bytes)")
            # On the critical path: the metadata; the build made meanwhile only when the daemon
            # was done before it (no wait left).
            python_side = med["metadata"] + (med["feed_build"] if med["answer_wait"] < 0.5e-3 else 0.0)
            layout_path = os.path.join(work, "layout.json")
            write_layout(layout_path, layout, plan)
            expandable = opts["expandable"] != "0"
            # The C++ counterpart rebuilds the structure with cudaMalloc: cudaMalloc layouts only.
            cpp = None if expandable else run_cpp_client(opts["cpp"], socket_path, layout_path, repeats)
            if expandable:
                log(f"  Python work on the critical path: {ms(python_side)} (VMM pages: {len(plan.allocations)} of "
                    f"them retained and exported as fds; the goal is measured with expandable_segments off, where "
                    f"the C++ client can rebuild the same allocations)")
            elif cpp is None:
                cpp_work, cpp_label = CPP_METADATA_1000, ("the engine's metadata for 1 000 tensors, 2.03 ms "
                                                          "(RESULTS.md, register_bench --metadata-only; no C++ "
                                                          "client binary here)")
            else:
                cpp_work = cpp["client_work_ms"] / 1e3
                cpp_label = (f"the C++ client's work on the same allocations and tensors, "
                             f"{cpp['client_work_ms']:.2f} ms (index {cpp['index_ms']:.2f} + driver "
                             f"{cpp['driver_ms']:.2f} + messages {cpp['messages_ms']:.2f}; its RPCs "
                             f"{cpp['rpc_ms']:.2f}, commit {cpp['commit_ms']:.2f}; "
                             f"cuda_client_register_bench, this host)")
            if not expandable:
                overhead = python_side - cpp_work
                log(f"  Python work on the critical path: {ms(python_side)}, against {cpp_label}: the Python overhead "
                    f"is {ms(overhead)} (goal <= 10 ms: {'met' if overhead <= 0.010 else 'NOT met'})")
            log(f"  daemon: {stats['open_mappings']} open mappings, {stats['regions']} regions, "
                f"{stats['leases']} leases")

            if compare_open(torch, reduce_tensor, work, socket_path, sd, art, "the state dict above") != 0:
                return 1
            art.close()
            # Where open() pays off: the same number of tensors in few allocations (256 KiB each,
            # so the caching allocator packs them into 2 and 20 MiB segments).
            small = {f"small.{k}": torch.empty(64 * 1024, dtype=torch.float32, device="cuda").normal_()
                     for k in range(n)}
            with store.register(small) as art_small:
                if compare_open(torch, reduce_tensor, work, socket_path, small, art_small,
                                f"{n} tensors of 256 KiB") != 0:
                    return 1
    finally:
        stop_daemon(daemon, daemon_log, work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
