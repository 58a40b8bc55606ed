"""The Python client's CUDA data plane against a real CUDA-built tensorregd (not run by CI; the
GPU machine runs it). Exits 77 when there is no CUDA device, 0 when every check passes, 1 when
one fails.

    python3 tests/python/gpu_client_check.py [--daemon PATH] [--cli PATH]

(default: .device-daemon/tensorregd and .device-daemon/tensorreg_cli, the CUDA builds). It
starts the daemon on a temp socket, then, in one producer process per allocator mode
(expandable_segments off, then on: PYTORCH_CUDA_ALLOC_CONF is set before torch starts CUDA):

1. builds a realistic state dict on the GPU (228 tensors: bf16/fp16/fp32/int64/int32/int8/bool,
   a tied weight, a slice, a transposed view, tensors over several VMM pages);
2. register()s it in place; its id must equal `tensorreg_cli digest` of the canonical bytes;
3. a second process open()s it by id: every tensor equals the original (dtype, shape, stride,
   values, ties), it maps each allocation of the answer exactly once, and unmaps them all when
   its tensors are freed;
4. put()s it (the coalesced plan): the same id; a put-only state dict opened from the daemon's
   VRAM copy reads back equal;
5. with expandable_segments on, 800 tensors packed across more than 250 VMM pages: register()
   cuts them into overlapping windows, and its id, a second process's read-back and put() agree;
and both modes must give the same ids. Last, a Hugging Face LlamaForCausalLM built from a small
config (random weights, no download) saved with safetensors: the C++ CLI's `put` of the file,
`python -m tensorreg put` of it and register() of the live model's state dict give one id;
open() of that file's artifact is refused (host memory only), open(place=True) maps a copy the
daemon makes on the GPU, and another process then opens that copy.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(REPO, "python"))

SKIP = 77


def log(*parts) -> None:
    print(*parts, flush=True)


# ---- the state dict -------------------------------------------------------------------------


def realistic_state_dict(torch, seed: int, layers: int = 24):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, generator=g, device="cuda").to(dtype)

    sd = {}
    embed = randn(8000, 256)
    sd["model.embed_tokens.weight"] = embed
    sd["lm_head.weight"] = embed  # tied: one storage, two names
    for i in range(layers):
        p = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            sd[p + f"self_attn.{name}.weight"] = randn(256, 256)
        sd[p + "mlp.gate_proj.weight"] = randn(704, 256)
        sd[p + "mlp.up_proj.weight"] = randn(704, 256)
        sd[p + "mlp.down_proj.weight"] = randn(256, 704, dtype=torch.float16)
        sd[p + "input_layernorm.weight"] = randn(256, dtype=torch.float32)
        sd[p + "post_attention_layernorm.weight"] = randn(256, dtype=torch.float32)
    sd["model.norm.weight"] = randn(256, dtype=torch.float32)
    big = randn(12, 1024, 1024, dtype=torch.float32)  # 48 MiB: several 20 MiB VMM pages
    sd["vision.patch.weight"] = big
    sd["vision.patch.weight_t"] = big[0].t()  # a transposed view of the same storage
    base = torch.arange(4096, device="cuda", dtype=torch.int64)
    sd["position_ids"] = base[100:612].view(1, 512)  # a slice: storage_offset 100
    sd["quant.scales_int8"] = torch.randint(-128, 127, (4096,), generator=g, device="cuda", dtype=torch.int8)
    sd["quant.counts"] = torch.randint(0, 1 << 30, (333,), generator=g, device="cuda", dtype=torch.int32)
    sd["attention.mask"] = randn(77, dtype=torch.float32) > 0
    return sd


def canonical_bytes(torch, layout) -> bytes:
    out = bytearray(layout.total_size)
    from tensorreg import _layout
    for s in layout.storages:
        if s.nbytes:
            out[s.offset:s.offset + s.nbytes] = _layout.storage_bytes(torch, s.source).cpu().numpy().tobytes()
    return bytes(out)


def cli_digest(cli: str, index_json: bytes, data: bytes) -> str:
    with tempfile.TemporaryDirectory() as d:
        index_path, data_path = os.path.join(d, "index.json"), os.path.join(d, "data.bin")
        with open(index_path, "wb") as f:
            f.write(index_json)
        with open(data_path, "wb") as f:
            f.write(data)
        out = subprocess.run([cli, "digest", "--index", index_path, "--data", data_path], check=True,
                             capture_output=True, text=True).stdout
    for line in out.splitlines():
        if line.startswith("id "):
            return line[3:].strip()
    raise RuntimeError(f"tensorreg digest printed no id: {out!r}")


# ---- checks ---------------------------------------------------------------------------------


class Checks:
    def __init__(self, label: str) -> None:
        self.label = label
        self.failed = 0

    def check(self, ok: bool, what: str) -> bool:
        log(f"{'PASS' if ok else 'FAIL'} [{self.label}] {what}")
        if not ok:
            self.failed += 1
        return ok


def run_reader(socket_path: str, artifact_id: str, expected_path: str, ties: list) -> dict:
    out = subprocess.run([sys.executable, __file__, "reader", socket_path, artifact_id, expected_path,
                          json.dumps(ties)], capture_output=True, text=True, timeout=240)
    if out.returncode != 0:
        return {"error": f"reader exited {out.returncode}: {out.stderr[-3000:]}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def reader(socket_path: str, artifact_id: str, expected_path: str, ties_json: str) -> None:
    """A second process: open() the artifact and compare with the producer's CPU copy."""
    import torch

    import tensorreg
    from tensorreg import _cuda, _messages
    from tensorreg._wire import _close_fds

    expected = torch.load(expected_path)
    result = {}
    with tensorreg.Store(socket_path) as store:
        # What the daemon answers (to count the allocations), then the real open.
        request = _messages.Request()
        request.open_artifact_device.artifact_id = artifact_id
        answer, fds = store._conn.call(request)
        _close_fds(fds)
        body = answer.open_artifact_device
        result["allocations"] = len(body.allocations)
        result["kinds"] = sorted({a.WhichOneof("source") for a in body.allocations})
        result["vmm_chunks"] = sum(len(a.vmm.chunks) for a in body.allocations)
        before = _cuda.mapping_stats()
        allocated = torch.cuda.memory_allocated()
        started = time.perf_counter()
        tensors = store.open(artifact_id)
        torch.cuda.synchronize()
        result["open_ms"] = (time.perf_counter() - started) * 1e3
        # Zero-copy: the views point into the mappings, so torch's allocator gave out nothing.
        result["allocated_by_open"] = torch.cuda.memory_allocated() - allocated
        after = _cuda.mapping_stats()
        result["opened"] = (after["ipc_opened"] - before["ipc_opened"]) + (after["vmm_mapped"] - before["vmm_mapped"])
        result["daemon_open_mappings"] = store.stats()["open_mappings"]
        bad = []
        for name, t in expected.items():
            g = tensors.get(name)
            if g is None or g.dtype != t.dtype or tuple(g.shape) != tuple(t.shape) or g.stride() != t.stride() \
                    or g.device.type != "cuda" or not torch.equal(g.cpu(), t):
                bad.append(name)
        result["tensors"] = len(tensors)
        result["mismatched"] = bad[:10]
        result["extra"] = sorted(set(tensors) - set(expected))[:10]
        result["ties_kept"] = all(tensors[a].data_ptr() == tensors[b].data_ptr() for a, b in json.loads(ties_json))
        del tensors, g
        gc.collect()
        torch.cuda.synchronize()
        done = _cuda.mapping_stats()
        result["closed_after_gc"] = (done["ipc_closed"] - before["ipc_closed"]) + \
            (done["vmm_unmapped"] - before["vmm_unmapped"])
    print(json.dumps(result))


def packed_check(torch, store, c, cli: str, work: str, summary: dict) -> None:
    """More than 250 expandable-segments pages, tensors packed across every page boundary (800
    of ~780 KiB in the small pool's 2 MiB pages): register() cuts them into overlapping
    windows of at most 250 pages, and the id, a second process's read-back and put() agree."""
    from tensorreg import _layout

    g = torch.Generator(device="cuda").manual_seed(99)
    packed = {f"packed.{k}": torch.randn(390_000 + 64 * (k % 7), generator=g, device="cuda").to(torch.float16)
              for k in range(800)}
    torch.cuda.synchronize()
    regions_before = store.stats()["regions"]
    with store.register(packed) as art:
        regions = store.stats()["regions"] - regions_before
        c.check(regions > 1, f"{len(packed)} packed tensors over many VMM pages register as {regions} regions")
        layout = _layout.build(_layout.state_dict_descs(torch, packed, "x")[0])
        digest = cli_digest(cli, art.index_json, canonical_bytes(torch, layout))
        c.check(digest == art.artifact_id, f"packed register id {art.artifact_id} == tensorreg digest {digest}")
        expected_path = os.path.join(work, "expected-packed.pt")
        torch.save({k: v.cpu() for k, v in packed.items()}, expected_path)
        got = run_reader(store.socket_path, art.artifact_id, expected_path, [])
        summary["reader_packed"] = {k: v for k, v in got.items() if k != "mismatched"}
        if c.check("error" not in got, f"reader opened the packed lease: {got.get('error', '')}"):
            c.check(got["tensors"] == len(packed) and not got["mismatched"],
                    f"all {got['tensors']} packed tensors read back equal ({got['vmm_chunks']} VMM chunks in "
                    f"{got['allocations']} allocations, opened {got['opened']})")
            c.check(got["kinds"] == ["vmm"] and got["vmm_chunks"] > 250 and got["opened"] == got["allocations"] > 1,
                    f"they were VMM pages, more than one region holds ({got['kinds']})")
        c.check(store.put(packed).artifact_id == art.artifact_id, "put() of the packed tensors gives the same id")


def producer(socket_path: str, cli: str, work: str, label: str) -> None:
    """One allocator mode: register, read back from another process, put; prints a JSON line."""
    import torch

    import tensorreg
    from tensorreg import _layout

    c = Checks(label)
    summary = {"label": label, "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")}
    sd = realistic_state_dict(torch, seed=1234)
    torch.cuda.synchronize()
    expected_path = os.path.join(work, f"expected-{label}.pt")
    torch.save({k: v.cpu() for k, v in sd.items()}, expected_path)
    ties = [["model.embed_tokens.weight", "lm_head.weight"]]
    summary["tensors"] = len(sd)
    with tensorreg.Store(socket_path) as store:
        art = store.register(sd)
        summary["register_id"] = art.artifact_id
        summary["register_timings_ms"] = {k: round(v * 1e3, 2) for k, v in art.timings.items()}
        c.check(art.registration_kind == "lease_in_place", f"register() leases in place ({len(sd)} tensors, "
                f"{art.total_size} bytes)")
        layout = _layout.build(_layout.state_dict_descs(torch, sd, "x")[0])
        digest = cli_digest(cli, art.index_json, canonical_bytes(torch, layout))
        c.check(digest == art.artifact_id, f"register id {art.artifact_id} == tensorreg digest {digest}")

        got = run_reader(socket_path, art.artifact_id, expected_path, ties)
        summary["reader_lease"] = got
        if c.check("error" not in got, f"reader opened the lease: {got.get('error', '')}"):
            c.check(got["tensors"] == len(sd) and not got["mismatched"] and not got["extra"],
                    f"all {got['tensors']} tensors read back equal (mismatched {got['mismatched']})")
            c.check(got["ties_kept"], "tied names are views of one mapping in the reader")
            c.check(got["opened"] == got["allocations"], f"opens {got['opened']} == allocations "
                    f"{got['allocations']} ({got['kinds']}, {got['vmm_chunks']} VMM chunks)")
            c.check(got["closed_after_gc"] == got["opened"], f"mappings closed after gc: {got['closed_after_gc']}")
            c.check(got["allocated_by_open"] == 0, f"open() copied nothing (caching allocator grew by "
                    f"{got['allocated_by_open']} bytes)")
            expect_kind = "vmm" if "expandable_segments:True" in summary["alloc_conf"] else "cuda_ipc_handle"
            c.check(got["kinds"] == [expect_kind], f"allocations are {expect_kind}")

        put = store.put(sd)
        summary["put_id"] = put.artifact_id
        summary["put_timings_ms"] = {k: round(v * 1e3, 2) for k, v in put.timings.items()}
        c.check(put.registration_kind == "coalesced" and put.artifact_id == art.artifact_id,
                f"put() (coalesced) id {put.artifact_id} == register id")

        only = {"w": torch.arange(1 << 20, device="cuda", dtype=torch.float32).view(1024, 1024),
                "b": torch.full((3,), 7, device="cuda", dtype=torch.int16)}
        only["w_t"] = only["w"].t()
        only_path = os.path.join(work, f"only-{label}.pt")
        torch.save({k: v.cpu() for k, v in only.items()}, only_path)
        put_only = store.put(only)
        got = run_reader(socket_path, put_only.artifact_id, only_path, [["w", "w_t"]])
        summary["reader_put_only"] = got
        if c.check("error" not in got, f"reader opened a put-only artifact: {got.get('error', '')}"):
            c.check(not got["mismatched"] and got["tensors"] == 3 and got["ties_kept"],
                    "the daemon's VRAM copy reads back equal")
            c.check(got["opened"] == got["allocations"] == 1, f"one mapping of the daemon's buffer "
                    f"(opened {got['opened']})")
        # get() on cuda: the DRAM replica of a CPU put, copied to the GPU once, ties kept.
        host = {k: v.cpu() for k, v in only.items()}
        host["w_t"] = host["w"].t()
        got_cuda = store.get(store.put(host).artifact_id, device="cuda")
        c.check(all(got_cuda[k].device.type == "cuda" and torch.equal(got_cuda[k].cpu(), v) for k, v in host.items())
                and got_cuda["w"].data_ptr() == got_cuda["w_t"].data_ptr(), "get(device='cuda') of a CPU put")
        # Above the 64 MiB staging buffers: the pipelined copy, with a tail shorter than a buffer.
        big = {"a": torch.randint(-128, 127, ((150 << 20) + 12,), dtype=torch.int8),
               "b": torch.randn(3, 5, dtype=torch.float32)}
        got_big = store.get(store.put(big).artifact_id, device="cuda")
        c.check(all(torch.equal(got_big[k].cpu(), v) for k, v in big.items()),
                "get(device='cuda') of 150 MiB through the pinned staging buffers")
        art.close()
        c.check(art.lease.closed, "close() revoked the lease")
        if "expandable_segments:True" in summary["alloc_conf"]:
            packed_check(torch, store, c, cli, work, summary)
    summary["failed"] = c.failed
    print("SUMMARY " + json.dumps(summary), flush=True)


def place_check(torch, store, c, socket_path: str, cli: str, expected: dict, work: str) -> None:
    """An artifact in host memory only (the CLI's put of a file): open() refuses it, open(place=True)
    makes the daemon copy it to this GPU and maps that copy, and another process then opens the
    same copy without asking."""
    from safetensors.torch import save_file

    import tensorreg

    path = os.path.join(work, "next.safetensors")
    save_file(expected, path)
    out = subprocess.run([cli, "put", path, "--socket", socket_path, "--json"], capture_output=True, text=True)
    if not c.check(out.returncode == 0, f"CLI put of a second file: {out.stderr.strip()}"):
        return
    artifact_id = json.loads(out.stdout)["artifact_id"]
    try:
        store.open(artifact_id)
        c.check(False, "open() of a host-only artifact is refused")
    except tensorreg.errors.FailedPrecondition as e:
        c.check("no copy in GPU memory" in str(e), f"open() of a host-only artifact is refused: {e}")
    started = time.perf_counter()
    opened = store.open(artifact_id, place=True)
    torch.cuda.synchronize()
    took = time.perf_counter() - started
    bad = [k for k, v in expected.items() if k not in opened or not torch.equal(opened[k].cpu(), v)]
    size = sum(v.numel() * v.element_size() for v in expected.values())
    c.check(not bad and len(opened) == len(expected), f"open(place=True) maps the daemon's GPU copy: "
            f"{len(opened)} tensors equal ({size / 2**20:.0f} MiB in {took * 1e3:.0f} ms), mismatched {bad[:3]}")
    again = store.open(artifact_id, place=True)
    c.check(all(again[k].data_ptr() - again[next(iter(again))].data_ptr() ==
                opened[k].data_ptr() - opened[next(iter(opened))].data_ptr() for k in expected),
            "a second open(place=True) maps the same copy's layout")
    del opened, again
    expected_path = os.path.join(work, "placed.pt")
    torch.save(expected, expected_path)
    got = run_reader(socket_path, artifact_id, expected_path, [])
    if c.check("error" not in got, f"another process opened the placed copy: {got.get('error', '')}"):
        c.check(got["tensors"] == len(expected) and not got["mismatched"],
                f"its tensors equal the file's ({got['tensors']})")
        c.check(got["opened"] == got["allocations"] == 1 and got["kinds"] == ["cuda_ipc_handle"],
                f"one IPC mapping of the daemon's buffer ({got['opened']} opened, kinds {got['kinds']})")


def hf_check(socket_path: str, cli: str, work: str) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    import tensorreg

    c = Checks("hf")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(device="cuda", dtype=torch.bfloat16)
    sd = model.state_dict()
    path = os.path.join(work, "model.safetensors")
    save_file({k: v.contiguous().cpu() for k, v in sd.items()}, path)
    out = subprocess.run([cli, "put", path, "--socket", socket_path, "--json"], capture_output=True, text=True)
    cli_id = json.loads(out.stdout)["artifact_id"] if out.returncode == 0 else f"error {out.stderr}"
    env = dict(os.environ, PYTHONPATH=os.path.join(REPO, "python"))
    out = subprocess.run([sys.executable, "-m", "tensorreg", "put", path, "--socket", socket_path, "--json"],
                         capture_output=True, text=True, env=env)
    py_id = json.loads(out.stdout)["artifact_id"] if out.returncode == 0 else f"error {out.stderr}"
    with tensorreg.Store(socket_path) as store:
        art = store.register(sd)
        c.check(cli_id == art.artifact_id, f"C++ CLI put of the safetensors file {cli_id} == register of the live "
                f"model ({len(sd)} tensors) {art.artifact_id}")
        c.check(py_id == art.artifact_id, f"python -m tensorreg put {py_id} == register")
        put = store.put(sd)
        c.check(put.artifact_id == art.artifact_id, "put() of the live model has the same id")
        art.close()
        place_check(torch, store, c, socket_path, cli, {f"{k}.next": (v.float() + 1).to(v.dtype).contiguous().cpu()
                                                        for k, v in sd.items()}, work)
    print("SUMMARY " + json.dumps({"label": "hf", "failed": c.failed, "id": cli_id}), flush=True)


# ---- driver ---------------------------------------------------------------------------------


def start_daemon(path: str, work: str):
    """Starts tensorregd on a socket in `work`; returns (process, socket path, its output lines).
    A thread keeps reading its output, so that its warnings can never fill the pipe and stall it."""
    import threading
    socket_path = os.path.join(work, "d.sock")
    proc = subprocess.Popen([path, "--socket", socket_path, "--log-level", "warn"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: list = []
    ready = threading.Event()

    def drain():
        for line in proc.stdout:
            lines.append(line)
            if "ready" in line:
                ready.set()
        ready.set()

    threading.Thread(target=drain, daemon=True).start()
    ready.wait(60)
    if proc.poll() is not None or not any("ready" in line for line in lines):
        raise RuntimeError(f"tensorregd did not start: {''.join(lines)!r}")
    return proc, socket_path, lines


def main() -> int:
    args = sys.argv[1:]
    if args and args[0] == "reader":
        reader(*args[1:5])
        return 0
    if args and args[0] in ("producer", "hf"):
        socket_path, cli, work = args[1:4]
        try:
            producer(socket_path, cli, work, args[4]) if args[0] == "producer" else hf_check(socket_path, cli, work)
        except Exception:  # noqa: BLE001 - reported as a failed check
            traceback.print_exc()
            print("SUMMARY " + json.dumps({"label": args[-1], "failed": 1, "exception": True}), flush=True)
        return 0
    paths = {"daemon": os.path.join(REPO, ".device-daemon", "tensorregd"),
             "cli": os.path.join(REPO, ".device-daemon", "tensorreg_cli")}
    while args:
        a = args.pop(0)
        if a in ("--daemon", "--cli") and args:
            paths[a[2:]] = os.path.abspath(args.pop(0))
    try:
        import torch
    except ImportError as e:
        log(f"skipped: {e}")
        return SKIP
    if not torch.cuda.is_available():
        log("skipped: no CUDA device")
        return SKIP
    work = tempfile.mkdtemp(prefix="tensorreg-gpu-")
    proc, socket_path, daemon_log = start_daemon(paths["daemon"], work)
    summaries = []
    try:
        runs = [("producer", "caching", ""), ("producer", "expandable", "expandable_segments:True"),
                ("hf", "hf", "")]
        for mode, label, conf in runs:
            env = dict(os.environ)
            env.pop("PYTORCH_CUDA_ALLOC_CONF", None)
            if conf:
                env["PYTORCH_CUDA_ALLOC_CONF"] = conf  # before torch starts CUDA in that process
            started = time.monotonic()
            out = subprocess.run([sys.executable, __file__, mode, socket_path, paths["cli"], work, label],
                                 capture_output=True, text=True, env=env, timeout=400)
            sys.stdout.write(out.stdout)
            if out.returncode != 0 or "SUMMARY" not in out.stdout:
                sys.stdout.write(out.stderr[-4000:])
                summaries.append({"label": label, "failed": 1})
                continue
            if "Traceback" in out.stderr:
                sys.stdout.write(out.stderr[-4000:])
            summaries.append(json.loads(out.stdout.split("SUMMARY ", 1)[1].splitlines()[0]))
            log(f"({label}: {time.monotonic() - started:.1f} s)")
    finally:
        if len(daemon_log) > 1:
            log("tensorregd said:\n" + "".join(daemon_log[-40:]))
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(work, ignore_errors=True)
    failed = sum(s.get("failed", 1) for s in summaries)
    by = {s["label"]: s for s in summaries}
    ids = {by[k].get("register_id") for k in ("caching", "expandable") if k in by}
    same = len(ids) == 1 and None not in ids
    log(f"{'PASS' if same else 'FAIL'} [modes] expandable_segments off and on give one id: {sorted(map(str, ids))}")
    failed += 0 if same else 1
    for s in summaries:
        if "register_timings_ms" in s:
            log(f"[{s['label']}] register {s['register_timings_ms']} put {s['put_timings_ms']} "
                f"open {s.get('reader_lease', {}).get('open_ms', float('nan')):.1f} ms")
    log(f"gpu_client_check: {'OK' if failed == 0 else f'{failed} FAILED'}")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
