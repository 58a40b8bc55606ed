"""The weight-sync loop (issue 17): a trainer hands each new version of its weights to an
inference process on the same GPU, which copies them into its own parameters. GPU machine; not
run by CI (the --device cpu and --device fake modes run anywhere).

    python3 benchmarks/weight_sync_bench.py [--shape moe|dense] [--gib G] [--steps 12]
        [--warmup 3] [--expandable 0|1] [--daemon PATH] [--device cuda|cpu|fake] [--paths 1,2,3,4]
        [--trace 0|1]

The trainer (this process) holds the state dict (bench_state_dicts.model_state_dict: "moe" is
995 bf16 tensors, 16.1 GiB, 868 caching-allocator allocations; "dense" 291 tensors, 15.0 GiB;
--gib scales them); a second process (spawned) holds preallocated parameters of the same
shapes. Each step the trainer adds a small bf16 delta to every tensor in place (not timed),
then the clock runs from handing the version over until the consumer has copied every tensor
into its parameters and synchronised. Paths, side by side in one run, each over the same
steps (median of --steps after --warmup):

1. torch per-tensor IPC (verl / vLLM): reduce_tensor of every tensor (ForkingPickler), the
   bytes to the consumer, which rebuilds every tensor and copies it;
2. flattened 1 GiB buckets (slime / SkyRL): the trainer copies every tensor into reused
   buckets, shared once (one IPC handle per bucket, opened once); the consumer copies out;
3. tensorreg, usable views: WeightPublisher.publish() (no wait for the hash), the consumer's
   WeightSubscriber.load_into() (open with kept mappings, one _foreach_copy_);
4. tensorreg, verified: publish(verify=True) (hash_in_background); the step ends when the
   consumer has copied and the trainer has the version's mi2 id (Version.mi2()); "time to mi2"
   is publish to mi2 id.

On the first and last measured step the consumer's parameters are compared with the trainer's
tensors (exact per-tensor sums of the bits), and in (4) the consumer's verified() id with the
trainer's. A path that fails prints its error in its row and the run goes on. Printed: a
markdown table, (3) against the better of (1) and (2) (goal >= 2x), (4)'s time to mi2 (goal
<= 125 ms), (3)'s per-step breakdown, the driver opens on both sides, and for (3) on a GPU the
consumer's copy alone three ways (load_into's batched kernel, torch._foreach_copy_, one plain
device copy of the same bytes). --trace 1 adds, for (3) and (4), every RPC's wall time in
both processes and the daemon's own time per method (its Prometheus histogram).

--device cpu: paths 3 and 4 on CPU tensors (the consumer reads a stable DRAM copy: the
publisher uses policy "warm"), a smoke test of the loop. --device fake: no daemon and no GPU:
the Python client's own work per step for this shape (Registrar fast path, re-open with kept
mappings) over a fake connection and driver.
"""

from __future__ import annotations

import math
import os
import pickle
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import weakref

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "python"))
sys.path.insert(0, HERE)

from bench_state_dicts import exact_checksums, model_state_dict  # noqa: E402

BUCKET = 1 << 30
NAME = "bench"
LABELS = {
    1: "(1) torch per-tensor reduce_tensor → rebuild → copy",
    2: "(2) flattened 1 GiB buckets, one IPC handle each",
    3: "(3) tensorreg, usable views (no hash wait)",
    4: "(4) tensorreg, verified mi2 id",
}


def log(*parts) -> None:
    print(*parts, flush=True)


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms"


def parse(argv: list) -> dict:
    default_daemon = os.path.join(REPO, ".device-build", "tensorregd")
    if not os.path.exists(default_daemon):
        default_daemon = os.path.join(REPO, ".device-daemon", "tensorregd")
    opts = {"shape": "moe", "gib": None, "steps": "12", "warmup": "3", "expandable": "0", "daemon": default_daemon,
            "device": "cuda", "paths": None, "trace": "0"}
    while argv:
        a = argv.pop(0)
        if a.startswith("--") and a[2:] in opts and argv:
            opts[a[2:]] = argv.pop(0)
        else:
            raise SystemExit(f"unknown argument {a}")
    opts["gib"] = float(opts["gib"]) if opts["gib"] is not None else None
    opts["steps"], opts["warmup"] = int(opts["steps"]), int(opts["warmup"])
    default = "3,4" if opts["device"] == "cpu" else "1,2,3,4"
    opts["paths"] = [int(p) for p in (opts["paths"] or default).split(",")]
    return opts


# ---- the consumer (a spawned process) -----------------------------------------------------


def consumer_main(conn, socket_path: str, device: str) -> None:
    """Serves the trainer's requests, one at a time; every answer is a dict ("error" on failure)."""
    import torch

    import tensorreg
    from tensorreg import _cuda

    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.init()
        torch.zeros(1, device=device)  # context start-up is no path's cost
    store = tensorreg.Store(socket_path, timeout=120)
    sub = tensorreg.WeightSubscriber(store, NAME, device=device)
    rpcs: dict = {}
    params: dict = {}
    views: list = []
    params_in_order: list = []
    held = None  # the buckets, opened once

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def copy(dst: list, src: list) -> None:
        with torch.no_grad():
            if hasattr(torch, "_foreach_copy_"):
                torch._foreach_copy_(dst, src)
            else:
                for d, s in zip(dst, src):
                    d.copy_(s)

    while True:
        msg = conn.recv()
        op = msg["op"]
        try:
            if op == "quit":
                conn.send({})
                break
            if op == "setup":
                params = {n: torch.zeros(s, dtype=torch.bfloat16, device=device) for n, s in msg["shapes"]}
                sync()
                conn.send({})
            elif op == "torch":
                started = time.perf_counter()
                rebuilt = pickle.loads(msg["data"])
                sync()
                done = time.perf_counter()
                copy([params[n] for n in rebuilt], list(rebuilt.values()))
                sync()
                del rebuilt
                conn.send({"rebuild": done - started, "copy": time.perf_counter() - done})
            elif op == "buckets_setup":
                held = pickle.loads(msg["data"])
                views = [held[b][o:o + n].view(torch.bfloat16).view(params[name].shape)
                         for name, b, o, n in msg["placement"]]
                params_in_order = [params[name] for name, _, _, _ in msg["placement"]]
                conn.send({})
            elif op == "buckets":
                copy(params_in_order, views)
                sync()
                conn.send({})
            elif op == "tensorreg":
                before = _cuda.mapping_stats()
                timings: dict = {}
                sub.load_into(params, msg["version"], timings=timings)
                after = _cuda.mapping_stats()
                timings["opens"] = (after["ipc_opened"] + after["vmm_mapped"]
                                    - before["ipc_opened"] - before["vmm_mapped"])
                conn.send(timings)
            elif op == "trace":
                if not rpcs:
                    trace_rpcs(rpcs)
                rpcs.clear()
                conn.send({})
            elif op == "rpcs":
                conn.send({"rpcs": {k: list(v) for k, v in rpcs.items()}})
            elif op == "copy_rates":
                conn.send(copy_rates(torch, sub, params, msg["version"]))
            elif op == "verified":
                conn.send({"mi2": sub.verified(msg["version"], timeout=60)})
            elif op == "checksum":
                sync()
                conn.send({"sums": exact_checksums(torch, params)})
            elif op == "drop":
                views, held, params_in_order = [], None, []
                store._kept_mappings.close()
                if cuda:
                    torch.cuda.empty_cache()
                conn.send({})
            else:
                conn.send({"error": f"unknown op {op}"})
        except Exception as e:  # noqa: BLE001 - the row shows it, the run goes on
            conn.send({"error": f"{type(e).__name__}: {e}"})
    store.close()


def copy_rates(torch, sub, params: dict, version: int) -> dict:
    """Seconds (median of 5) to copy version `version` into `params` three ways: load_into's
    batched kernel, torch._foreach_copy_ of the same pairs, and one plain device copy of a
    buffer of the same bytes (the copy's floor)."""
    from tensorreg import _batched_copy

    src = sub.tensors(version)
    dsts, srcs = list(params.values()), [src[n] for n in params]
    total = sum(t.numel() * t.element_size() for t in dsts)

    def timed(fn) -> float:
        fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(5):
            started = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
        return statistics.median(times)

    plan, rest = _batched_copy.plan(torch, dsts, srcs)
    out = {"bytes": total, "foreach": timed(lambda: torch._foreach_copy_(dsts, srcs))}
    if plan is not None and not rest:
        out["kernel"] = timed(plan.launch)
    chunk = 4 << 30
    a = torch.empty(min(total, chunk), dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    out["plain"] = timed(lambda: b.copy_(a)) * total / a.numel()
    del a, b
    torch.cuda.empty_cache()
    return out


# ---- the trainer --------------------------------------------------------------------------


class Consumer:
    def __init__(self, mp, socket_path: str, device: str) -> None:
        self.conn, child = mp.Pipe()
        self.proc = mp.Process(target=consumer_main, args=(child, socket_path, device), daemon=True)
        self.proc.start()

    def ask(self, **msg) -> dict:
        self.conn.send(msg)
        if not self.conn.poll(600):
            raise RuntimeError(f"the consumer did not answer {msg['op']} in 600 s")
        answer = self.conn.recv()
        if "error" in answer:
            raise RuntimeError(answer["error"])
        return answer

    def close(self) -> None:
        try:
            if self.proc.is_alive():
                self.ask(op="quit")
        except Exception:  # noqa: BLE001
            pass
        self.proc.join(timeout=30)
        if self.proc.is_alive():
            self.proc.kill()


def start_daemon(path: str, work: str):
    socket_path = os.path.join(work, "d.sock")
    # Its output goes to a file: a pipe nobody reads could fill and stall it.
    daemon_log = open(os.path.join(work, "tensorregd.log"), "w+")
    # A Registrar keeps a region per allocation (868 for the MoE dict): room above the default 1 024.
    daemon = subprocess.Popen([path, "--socket", socket_path, "--log-level", "warn", "--max-regions-per-uid", "4096",
                               "--metrics-addr", "127.0.0.1:0"], stdout=daemon_log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not os.path.exists(socket_path) or "ready" not in open(daemon_log.name).read():
        if daemon.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"tensorregd did not start: {open(daemon_log.name).read()}")
        time.sleep(0.05)
    return daemon, socket_path, daemon_log


def stop_daemon(daemon, daemon_log, work: str) -> None:
    """Prints the tail of what the daemon said beyond its ready line, stops it and removes `work`."""
    said = open(daemon_log.name).read().strip()
    if said.count("\n") > 0:
        log("tensorregd said:\n" + "\n".join(said.splitlines()[-20:]))
    daemon.terminate()
    try:
        daemon.wait(timeout=10)
    except subprocess.TimeoutExpired:
        daemon.kill()
    shutil.rmtree(work, ignore_errors=True)


def metrics_url(daemon_log) -> str | None:
    for line in open(daemon_log.name):
        if "metrics on " in line:
            return line.split("metrics on ", 1)[1].strip()
    return None


def rpc_seconds(url: str | None) -> dict:
    """{method: (count, seconds)} from the daemon's tensorreg_rpc_duration_seconds histogram
    (its _count and _sum, every code together): the daemon's time from a request frame to its
    answer."""
    import urllib.request

    out: dict = {}
    if not url:
        return out
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    for line in text.splitlines():
        for suffix, slot in (("_count{", 0), ("_sum{", 1)):
            head = "tensorreg_rpc_duration_seconds" + suffix
            if line.startswith(head):
                labels, value = line[len(head):].rsplit("} ", 1)
                method = dict(kv.split("=", 1) for kv in labels.split(",")).get("method", "?").strip('"')
                entry = out.setdefault(method, [0.0, 0.0])
                entry[slot] += float(value)
    return out


def trace_rpcs(totals: dict) -> None:
    """Times every Connection.call / call_many / feed of this process into `totals`
    ({what: [calls, seconds]}): the client's wall time per RPC, wait for the answer included."""
    from tensorreg import _wire

    def wrap(name, key_of):
        original = getattr(_wire.Connection, name)

        def timed(self, first, *args, **kwargs):
            started = time.perf_counter()
            try:
                return original(self, first, *args, **kwargs)
            finally:
                entry = totals.setdefault(key_of(first), [0, 0.0])
                entry[0] += 1
                entry[1] += time.perf_counter() - started

        setattr(_wire.Connection, name, timed)

    wrap("call", lambda r: r.WhichOneof("body") if hasattr(r, "WhichOneof") else type(r).__name__)
    wrap("call_many", lambda calls: "call_many")
    wrap("feed", lambda frames: "feed")


def per_call(totals: dict, steps: int) -> str:
    return ", ".join(f"{k} {n / steps:.1f}x {ms(t / n)}" for k, (n, t) in sorted(totals.items(), key=lambda e: -e[1][1])
                     if n)


def daemon_counters(store) -> dict:
    """The daemon's driver-open counters, where this daemon has them (GetStats)."""
    from tensorreg import _requests

    answer, _ = store._conn.call(_requests.stats())
    s = answer.get_stats
    return {k: getattr(s, k) for k in ("ipc_opens", "vmm_imports") if hasattr(s, k)}


class Run:
    """Steps of one path: the delta before each (not timed), the timed hand-over, the checks."""

    def __init__(self, torch, sd: dict, consumer: Consumer, opts: dict) -> None:
        self.torch, self.sd, self.consumer, self.opts = torch, sd, consumer, opts
        self.tensors = list(sd.values())
        self.cuda = opts["device"] == "cuda"

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def delta(self) -> None:
        with self.torch.no_grad():
            if hasattr(self.torch, "_foreach_add_"):
                self.torch._foreach_add_(self.tensors, 2.0 ** -8)
            else:
                for t in self.tensors:
                    t.add_(2.0 ** -8)
        self.sync()

    def bit_equal(self) -> bool:
        return self.consumer.ask(op="checksum")["sums"] == exact_checksums(self.torch, self.sd)

    def steps(self, step) -> dict:
        """Runs warmup + steps; `step()` hands one version over and returns its extras. Returns
        {"times": [...], "extras": [...], "equal": [first, last]}."""
        warmup, steps = self.opts["warmup"], self.opts["steps"]
        out = {"times": [], "extras": [], "equal": []}
        for k in range(warmup + steps):
            self.delta()
            started = time.perf_counter()
            extra = step(k) or {}
            took = time.perf_counter() - started
            if k >= warmup:
                out["times"].append(took)
                out["extras"].append(extra)
                if k in (warmup, warmup + steps - 1):
                    out["equal"].append(self.bit_equal())
        return out


def bucket_placement(sd: dict) -> tuple:
    """[(name, bucket, offset, nbytes)] with every tensor inside one bucket (256-byte aligned),
    and the bucket sizes (1 GiB, or one tensor's size when it is larger)."""
    placement, sizes = [], []
    for name, t in sd.items():
        n = t.numel() * t.element_size()
        if not sizes or (sizes[-1] + 255) // 256 * 256 + n > max(BUCKET, n):
            sizes.append(0)
        at = (sizes[-1] + 255) // 256 * 256
        placement.append((name, len(sizes) - 1, at, n))
        sizes[-1] = at + n
    return placement, [max(BUCKET, s) if s > BUCKET else BUCKET for s in sizes]


def path_torch(run: Run) -> dict:
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing  # noqa: F401 - registers torch's reductions (reduce_tensor)

    def step(k):
        data = bytes(ForkingPickler.dumps(run.sd))  # reduce_tensor of every tensor
        return run.consumer.ask(op="torch", data=data)

    return run.steps(step)


def path_buckets(run: Run) -> dict:
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing  # noqa: F401 - registers torch's reductions

    torch = run.torch  # noqa: F811 - the same module
    placement, sizes = bucket_placement(run.sd)
    held = {"buckets": [torch.empty(s, dtype=torch.uint8, device="cuda") for s in sizes]}
    buckets = held["buckets"]
    held["views"] = [buckets[b][o:o + n].view(torch.bfloat16).view(run.sd[name].shape) for name, b, o, n in placement]
    srcs = [run.sd[name] for name, _, _, _ in placement]
    del buckets
    run.consumer.ask(op="buckets_setup", data=bytes(ForkingPickler.dumps(held["buckets"])), placement=placement)

    def step(k):
        with torch.no_grad():
            if hasattr(torch, "_foreach_copy_"):
                torch._foreach_copy_(held["views"], srcs)
            else:
                for d, s in zip(held["views"], srcs):
                    d.copy_(s)
        torch.cuda.synchronize()
        return run.consumer.ask(op="buckets")

    try:
        return run.steps(step)
    finally:
        run.consumer.ask(op="drop")
        held.clear()
        torch.cuda.empty_cache()


def path_tensorreg(run: Run, pub, verify: bool, url: str | None = None) -> dict:
    trace = run.opts["trace"] != "0"
    rpcs: dict = {}
    if trace:
        if not run.opts.get("traced"):
            trace_rpcs(run.opts.setdefault("rpcs", {}))
            run.opts["traced"] = True
        run.opts["rpcs"].clear()
        run.consumer.ask(op="trace")
        daemon_before = rpc_seconds(url)

    def step(k):
        started = time.perf_counter()
        v = pub.publish(run.sd, verify=verify)
        published = time.perf_counter()
        run.consumer.conn.send({"op": "tensorreg", "version": v.number})
        extra = {"publish": published - started, "client_work": v.timings.get("client_work", float("nan")),
                 "reused": v.timings.get("reused")}
        if verify:
            mi2 = v.mi2(timeout=60)
            extra["to_mi2"] = time.perf_counter() - started
            extra["mi2"] = mi2
        if not run.consumer.conn.poll(600):
            raise RuntimeError("the consumer did not answer in 600 s")
        answer = run.consumer.conn.recv()
        if "error" in answer:
            raise RuntimeError(answer["error"])
        extra.update(answer)
        if verify and k in (run.opts["warmup"], run.opts["warmup"] + run.opts["steps"] - 1):
            extra["mi2_equal"] = run.consumer.ask(op="verified", version=v.number)["mi2"] == mi2
        return extra

    out = run.steps(step)
    if trace:
        daemon_after = rpc_seconds(url)
        n = run.opts["warmup"] + run.opts["steps"]
        daemon = {m: [c - daemon_before.get(m, [0, 0])[0], t - daemon_before.get(m, [0, 0])[1]]
                  for m, (c, t) in daemon_after.items()}
        out["trace"] = {"steps": n, "trainer": dict(run.opts["rpcs"]),
                        "consumer": run.consumer.ask(op="rpcs")["rpcs"], "daemon": daemon}
    if run.cuda and not verify:
        out["copy_rates"] = run.consumer.ask(op="copy_rates", version=pub.versions[-1].number)
    return out


def fake_client_work(opts: dict) -> int:
    """--device fake: the client's own work per step over a fake connection and driver."""
    import contextlib
    from unittest import mock

    import torch

    from tensorreg import _cuda, _layout, _messages, _reads, _registrar

    sd = model_state_dict(torch, opts["shape"], opts["gib"] if opts["gib"] is not None else 0.05, "cpu")
    spans = sorted((t.data_ptr(), t.numel() * t.element_size()) for t in sd.values())

    class Driver:
        def device_uuid(self, ordinal):
            return "GPU-00000000-0000-0000-0000-000000000000"

        def on(self, ordinal):
            return contextlib.nullcontext()

        def address_range(self, ptr):
            for base, n in spans:
                if base <= ptr < base + n:
                    return base, n
            raise RuntimeError(f"no allocation at {ptr:#x}")

        def try_ipc_handle(self, base):
            return base.to_bytes(8, "little") * 8

        ipc_handle = try_ipc_handle

        def retain_allocation(self, ptr):
            return None

        def release(self, handle):
            pass

        def ordinal_of_uuid(self, uuid):
            return 0

    class Conn:
        closed = False
        regions = 0
        republished = 0
        layout_token = 0

        def held_by_current_thread(self):
            return False

        def call(self, request, fds=(), raw=False):
            body = request.WhichOneof("body")
            response = _messages.Response()
            if body == "begin_register_artifact":
                response.begin_register_artifact.registration_id = "reg:" + "0" * 32
            elif body == "commit_registered_artifact":
                response.commit_registered_artifact.artifact_descriptor.artifact_id = "cgid:x"
            elif body == "republish_lease":
                self.republished += 1
                r = response.republish_lease
                r.registration_id = f"reg:{self.republished:032x}"
                r.commit.artifact_descriptor.artifact_id = request.republish_lease.client_artifact_id or "cgid:x"
                r.revoked_previous = request.republish_lease.revoke_previous
            elif body == "open_artifact_device":
                # The bytes as received: the daemon's descriptor differs by version (the id); a
                # reader naming the layout it holds gets the short answer (wire-format.md §20).
                artifact_id = request.open_artifact_device.artifact_id
                if self.layout_token and request.open_artifact_device.known_layout == self.layout_token:
                    body = response.open_artifact_device
                    body.artifact_descriptor.artifact_id = artifact_id
                    body.layout_token, body.layout_unchanged = self.layout_token, True
                    payload = response.SerializeToString()
                else:
                    payload = self.open_answers[artifact_id]
                    response.ParseFromString(payload)
                return (response, [], payload) if raw else (response, [])
            return response, []

        def call_many(self, calls, meanwhile=None):
            out = []
            for request, _ in calls:
                self.regions += 1
                response = _messages.Response()
                response.register_region.region.region_id = f"region:{self.regions:032x}"
                out.append((response, []))
            return out

        def feed(self, frames):
            for f in frames:
                f.SerializeToString()
            return _messages.Response(), []

    drv, conn = Driver(), Conn()
    with mock.patch.object(_cuda, "driver", lambda: drv):
        reg = _registrar.Registrar(conn, 0)
        items, storages, _ = _layout.state_dict_storages(torch, sd, "register")
        first = reg._full_cuda(torch, items, storages, torch.device("cuda", 0), _registrar.signature(sd), None,
                               False, time.perf_counter())
        reg._kept.lease = weakref.ref(first.lease)  # as register() leaves it
        client, wall = [], []
        last = first
        for k in range(opts["steps"]):
            started = time.perf_counter()
            art = reg.register(sd, client_artifact_id=f"cgid:x~{k + 2}", replaces=last)  # one RepublishLease
            wall.append(time.perf_counter() - started)
            client.append(art.timings["client_work"])
            last = art
        last.close()
        # The reader: the daemon's answer for these allocations (one each), then re-opens.
        layout = reg._kept.layout
        answer = _messages.Response()
        body = answer.open_artifact_device
        body.tensor_index_data = layout.json
        body.total_size = layout.total_size
        for k, s in enumerate(layout.storages):
            a = body.allocations.add()
            a.device_uuid = drv.device_uuid(0)
            a.size_bytes = max(1, s.nbytes)
            a.cuda_ipc_handle = k.to_bytes(8, "little") * 8
            seg = body.segments.add()
            seg.artifact_offset, seg.length, seg.allocation = s.offset, s.nbytes, k
        body.end_allocation = len(layout.storages)
        body.layout_token = conn.layout_token = 41  # the versions of one republished lease share it
        conn.open_answers = {}
        for k in range(opts["steps"] + 1):
            body.artifact_descriptor.artifact_id = f"cgid:x~{k + 1}"
            answer.request_id = k + 1
            conn.open_answers[f"cgid:x~{k + 1}"] = answer.SerializeToString()
        memory = {}

        class Mapping:
            def __init__(self, drv, ordinal, handle, size, what):
                self.memory = memory.setdefault(handle, torch.zeros(size, dtype=torch.uint8))

        kept = _reads.KeptMappings()
        reopen = []
        with mock.patch.object(_cuda, "IpcMapping", Mapping), \
                mock.patch.object(_cuda, "as_tensor", lambda torch, m, here, size: m.memory):
            _reads.open_tensors(conn, "cgid:x~1", "cuda", kept)
            for k in range(opts["steps"]):
                started = time.perf_counter()
                _reads.open_tensors(conn, f"cgid:x~{k + 2}", "cuda", kept)
                reopen.append(time.perf_counter() - started)
    log(f"{len(sd)} tensors ({opts['shape']}), {len(layout.storages)} storages, Feed {len(reg._kept.feed_body)} bytes, "
        f"index {len(layout.json)} bytes; medians of {opts['steps']}:")
    log(f"  register() of an unchanged dict (one RepublishLease: {conn.republished} of {opts['steps']}): client work "
        f"{ms(statistics.median(client))} (goal <= 2 ms), wall {ms(statistics.median(wall))} over a fake connection "
        f"(no daemon)")
    log(f"  open() of the next version, same allocations and layout: {ms(statistics.median(reopen))} (goal <= 5 ms; "
        f"the same tensors returned: {kept.reopened} of {opts['steps']}, from the 'layout unchanged' answer: "
        f"{kept.by_token})")
    return 0


def main() -> int:
    argv = sys.argv[1:]
    opts = parse(argv)
    if opts["device"] == "fake":
        return fake_client_work(opts)
    if opts["expandable"] != "0":
        # Before torch is imported (here and in the spawned consumer): the allocator reads it once.
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    import torch
    import torch.multiprocessing as mp

    import tensorreg

    cuda = opts["device"] == "cuda"
    if cuda and not torch.cuda.is_available():
        log("skipped: no CUDA device")
        return 77
    device = "cuda" if cuda else "cpu"
    work = tempfile.mkdtemp(prefix="tensorreg-wsync-")
    daemon, socket_path, daemon_log = start_daemon(opts["daemon"], work)
    consumer = None
    rows = {}
    try:
        sd = model_state_dict(torch, opts["shape"], opts["gib"], device)
        total = sum(t.numel() * t.element_size() for t in sd.values())
        where = torch.cuda.get_device_name(0) if cuda else "cpu"
        log(f"device: {where}; torch {torch.__version__}; {opts['shape']}: {len(sd)} bf16 tensors, "
            f"{total / (1 << 30):.2f} GiB; expandable_segments {'on' if opts['expandable'] != '0' else 'off'}; "
            f"{opts['steps']} steps after {opts['warmup']} warm-up")
        consumer = Consumer(mp.get_context("spawn"), socket_path, device)
        consumer.ask(op="setup", shapes=[(n, tuple(t.shape)) for n, t in sd.items()])
        run = Run(torch, sd, consumer, opts)
        with tensorreg.Store(socket_path, timeout=120) as store:
            pub = tensorreg.WeightPublisher(store, NAME, policy=None if cuda else "warm")
            counters = {}
            for p in sorted(opts["paths"], key=lambda p: {3: 0, 4: 1, 2: 2, 1: 3}[p]):  # torch's path last
                if p in (1, 2) and not cuda:
                    continue
                try:
                    before = daemon_counters(store)
                    if p == 1:
                        rows[p] = path_torch(run)
                    elif p == 2:
                        rows[p] = path_buckets(run)
                    else:
                        rows[p] = path_tensorreg(run, pub, verify=p == 4, url=metrics_url(daemon_log))
                    after = daemon_counters(store)
                    counters[p] = {k: after[k] - before.get(k, 0) for k in after}
                except Exception as e:  # noqa: BLE001 - its row says so; the others still run
                    rows[p] = {"error": f"{type(e).__name__}: {e}".strip()}
            pub.close()
        report(rows, counters, opts)
    finally:
        if consumer is not None:
            consumer.close()
        stop_daemon(daemon, daemon_log, work)
    return 0


def report(rows: dict, counters: dict, opts: dict) -> None:
    med = {p: statistics.median(r["times"]) for p, r in rows.items() if "times" in r}
    log("")
    log(f"| path | per step, median of {opts['steps']} | min – max | consumer bit-equal (first, last step) |")
    log("|---|---|---|---|")
    for p in sorted(rows):
        r = rows[p]
        if "error" in r:
            log(f"| {LABELS[p]} | failed: {r['error'][:300]} | | |")
            continue
        extra = ""
        if p == 4:
            to_mi2 = statistics.median(x["to_mi2"] for x in r["extras"])
            equal = all(x.get("mi2_equal", True) for x in r["extras"])
            extra = f"; time to mi2 {ms(to_mi2)} (reader's verified id equal: {equal})"
        log(f"| {LABELS[p]} | {ms(med[p])}{extra} | {ms(min(r['times']))} – {ms(max(r['times']))} | "
            f"{', '.join('yes' if e else 'NO' for e in r['equal'])} |")
    log("")
    others = [med[p] for p in (1, 2) if p in med]
    if 3 in med and others:
        ratio = min(others) / med[3]
        log(f"(3) against the better of (1) and (2): {ratio:.2f}x faster "
            f"(goal >= 2x: {'met' if ratio >= 2 else 'NOT met'})")
    if 4 in med:
        to_mi2 = statistics.median(x["to_mi2"] for x in rows[4]["extras"])
        log(f"(4) publish -> verified mi2 id: {ms(to_mi2)} (goal <= 125 ms: {'met' if to_mi2 <= 0.125 else 'NOT met'})")
    for p in (3, 4):
        if p in med:
            x = rows[p]["extras"]

            def m(key):
                values = [e[key] for e in x if isinstance(e.get(key), float) and not math.isnan(e[key])]
                return ms(statistics.median(values)) if values else "n/a"

            log(f"{LABELS[p][:3]} per step: publish (client register, RPCs, commit) {m('publish')}, of which client "
                f"work {m('client_work')}; consumer open {m('open')}, copy {m('copy')}; consumer driver opens over "
                f"the measured steps {sum(e.get('opens', 0) for e in x)}; fast path taken "
                f"{sum(1 for e in x if e.get('reused'))} of {len(x)}; daemon counters {counters.get(p, 'n/a')}")
        if p in rows and "trace" in rows[p]:
            t = rows[p]["trace"]
            n = t["steps"]
            log(f"{LABELS[p][:3]} RPCs per step (calls per step x mean wall): trainer {per_call(t['trainer'], n)}; "
                f"consumer {per_call(t['consumer'], n)}; daemon's own time {per_call(t['daemon'], n)}")
        if p in rows and "copy_rates" in rows[p]:
            c = rows[p]["copy_rates"]
            gb = c["bytes"] / 1e9
            parts = [f"{k} {ms(c[k])} ({gb / c[k]:.0f} GB/s, {c['plain'] / c[k]:.2f}x plain)"
                     for k in ("kernel", "foreach", "plain") if k in c]
            log(f"{LABELS[p][:3]} the consumer's copy of {gb:.2f} GB alone: " + "; ".join(parts))
    if 1 in rows and "extras" in rows[1]:
        x = rows[1]["extras"]
        log(f"(1) per step: consumer rebuild {ms(statistics.median(e['rebuild'] for e in x))}, copy "
            f"{ms(statistics.median(e['copy'] for e in x))}")


if __name__ == "__main__":
    sys.exit(main())
