"""The weight-sync loop on a GPU, against a real CUDA-built tensorregd (not run by CI; the GPU
machine runs it). Exits 77 when there is no CUDA device, 0 when every check passes, 1 when one
fails.

    python3 tests/python/gpu_weight_sync_check.py [--daemon PATH] [--device cuda|cpu]

(default daemon: .device-build/tensorregd, else .device-daemon/tensorregd). For each allocator
mode (expandable_segments off, then on), a trainer process publishes versions of a realistic
state dict (gpu_client_check.realistic_state_dict: ties, a slice, a transposed view, several
dtypes) to a consumer process, which copies them into its own tensors:

1. version 1: the consumer's copy equals the trainer's tensors;
2. version 2, every tensor changed in place: the publisher's fast path (one RepublishLease
   that also ends version 1's lease; no region registered, the daemon's region count
   unchanged), the consumer maps nothing (0 IPC opens / VMM imports), the daemon answers its
   open "layout unchanged", and it gets the same tensor objects back, values equal;
3. version 3 with verify=True: Version.mi2() equals put()'s id of the same bytes, and the
   consumer's verified(3) equals it;
4. version 4 with one tensor replaced by a new allocation: the full path again, regions made
   only for the new memory (the others reused), and the consumer maps only that allocation.

--device cpu runs the same loop on CPU tensors (policy "warm", the consumer reading stable DRAM
copies; the mapping checks are skipped): a smoke test of this script anywhere.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(REPO, "python"))
sys.path.insert(0, HERE)

SKIP = 77
NAME = "gpu-check"


def log(*parts) -> None:
    print(*parts, flush=True)


class Checks:
    def __init__(self, label: str) -> None:
        self.label = label
        self.failed = 0

    def check(self, ok: bool, what: str) -> bool:
        log(f"{'PASS' if ok else 'FAIL'} [{self.label}] {what}")
        self.failed += 0 if ok else 1
        return ok


def cpu_state_dict(torch, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    embed = torch.randn(800, 64, generator=g).to(torch.bfloat16)
    sd = {"embed": embed, "lm_head": embed, "t": torch.randn(64, 32, generator=g).t()}
    for k in range(40):
        sd[f"layers.{k}.w"] = torch.randn(64, 64, generator=g).to(torch.float16)
    base = torch.arange(1000, dtype=torch.int64)
    sd["slice"] = base[10:510].view(5, 100)
    return sd


def exact_sums(torch, tensors: dict) -> dict:
    """name -> (dtype, position-weighted sum of the bytes in logical order): equal for equal
    tensors on any device and in any memory layout (integers: no rounding)."""
    out = {}
    for name, t in tensors.items():
        b = t.detach().contiguous().view(-1).view(torch.uint8).to(torch.int64)
        w = torch.arange(b.numel(), device=b.device, dtype=torch.int64) % 65521 + 1
        out[name] = (str(t.dtype), int((b * w).sum()))
    return out


def consumer(conn, socket_path: str, device: str) -> None:
    import torch

    import tensorreg
    from tensorreg import _cuda

    store = tensorreg.Store(socket_path, timeout=120)
    sub = tensorreg.WeightSubscriber(store, NAME, device=device)
    mine: dict = {}
    last: dict = {}
    while True:
        msg = conn.recv()
        try:
            if msg["op"] == "quit":
                break
            version = msg["version"]
            if not mine:
                mine = {n: torch.zeros(s, dtype=getattr(torch, d[len("torch."):]), device=device)
                        for n, (s, d) in msg["shapes"].items()}
            cuda = device.startswith("cuda")
            before = _cuda.mapping_stats() if cuda else None
            by_token = store._kept_mappings.by_token
            got = sub.tensors(version)
            by_token = store._kept_mappings.by_token > by_token  # this version's first open
            same = bool(last) and all(got[n] is last[n] for n in got)
            mine = {n: torch.zeros_like(t) for n, t in got.items()} if set(got) != set(mine) else mine
            sub.load_into(mine, version)
            after = _cuda.mapping_stats() if cuda else None
            opens = (after["ipc_opened"] + after["vmm_mapped"] - before["ipc_opened"] - before["vmm_mapped"]) \
                if cuda else None
            answer = {"sums": exact_sums(torch, mine), "equal_views": all(torch.equal(mine[n], got[n]) for n in got),
                      "opens": opens, "same_objects": same, "by_token": by_token}
            if msg.get("verify"):
                answer["mi2"] = sub.verified(version, timeout=60)
            last = got
            conn.send(answer)
        except Exception as e:  # noqa: BLE001 - reported as a failed check
            conn.send({"error": f"{type(e).__name__}: {e}"})
    store.close()


def trainer(socket_path: str, label: str, device: str) -> int:
    import torch
    import torch.multiprocessing as mp

    import tensorreg

    c = Checks(label)
    cuda = device == "cuda"
    if cuda:
        from gpu_client_check import realistic_state_dict

        sd = realistic_state_dict(torch, 3)
    else:
        sd = cpu_state_dict(torch, 3)
    ctx = mp.get_context("spawn")
    here, there = ctx.Pipe()
    proc = ctx.Process(target=consumer, args=(there, socket_path, device), daemon=True)
    proc.start()

    def hand_over(version: int, verify: bool = False) -> dict:
        here.send({"op": "load", "version": version, "verify": verify,
                   "shapes": {n: (tuple(t.shape), str(t.dtype)) for n, t in sd.items()}})
        if not here.poll(300):
            raise RuntimeError("the consumer did not answer in 300 s")
        got = here.recv()
        if "error" in got:
            raise RuntimeError(got["error"])
        return got

    def equal(got: dict) -> bool:
        return got["sums"] == exact_sums(torch, sd) and got["equal_views"]

    try:
        with tensorreg.Store(socket_path, timeout=120) as store:
            pub = tensorreg.WeightPublisher(store, NAME, policy=None if cuda else "warm")
            v1 = pub.publish(sd)
            c.check(v1.artifact_id == f"cgid:wsync~{NAME}~1" and not v1.timings["reused"], f"version 1 is {v1}")
            got = hand_over(1)
            c.check(equal(got), "version 1: the consumer's copy equals the trainer's tensors")
            regions = store.stats()["regions"]
            with torch.no_grad():
                for t in sd.values():
                    if t.is_floating_point():
                        t.add_(1)
                    elif t.dtype == torch.bool:
                        t.logical_not_()
                    else:
                        t.add_(3)
            v2 = pub.publish(sd)
            c.check(v2.timings["reused"] and pub.registrar.counts["fast"] == 1,
                    f"version 2 took the fast path (client work {v2.timings.get('client_work', 0) * 1e3:.2f} ms)")
            c.check(store.stats()["regions"] == regions, f"no region made for version 2 ({regions} held)")
            c.check(pub.registrar.counts["republished"] == 1 and v1.artifact.lease.closed,
                    "version 2 was one RepublishLease, which ended version 1's lease")
            got = hand_over(2)
            c.check(equal(got), "version 2: the consumer's copy has the changed values")
            if cuda:
                c.check(got["opens"] == 0, f"version 2: the consumer mapped nothing ({got['opens']} opens)")
                c.check(got["same_objects"], "version 2: the consumer got the same tensor objects back")
                c.check(got["by_token"], "version 2: the daemon answered its first open 'layout unchanged'")
            v3 = pub.publish(sd, verify=True)
            mi2 = v3.mi2(timeout=60)
            got = hand_over(3, verify=True)
            if cuda:
                c.check(got["by_token"], "version 3 (republished, verified): its first open was 'layout unchanged'")
            put_id = store.put(sd).artifact_id
            c.check(mi2 == put_id, f"version 3's mi2 id {mi2} == put() of the same bytes {put_id}")
            c.check(got.get("mi2") == mi2, f"the consumer's verified(3) {got.get('mi2')} == {mi2}")
            made = pub.registrar.counts["regions_registered"]
            moved = "vision.patch.weight" if cuda else "embed"
            # One tensor in new memory (48 MiB on the GPU: an allocation of its own with the
            # caching allocator, new pages with expandable segments); its view stays on the old.
            sd[moved] = sd[moved].clone()
            v4 = pub.publish(sd)
            new = pub.registrar.counts["regions_registered"] - made
            c.check(not v4.timings["reused"] and new >= 1 and (pub.registrar.counts["regions_reused"] > 0 or not cuda),
                    f"version 4 (one tensor moved) took the full path: {new} region(s) made, "
                    f"{pub.registrar.counts['regions_reused']} reused so far")
            if label == "caching":
                c.check(new == 1, f"with the caching allocator exactly one region is new ({new})")
            got = hand_over(4)
            c.check(equal(got), "version 4: the consumer's copy equals the trainer's tensors")
            if cuda:
                c.check(got["opens"] == new, f"version 4: the consumer mapped only the new memory ({got['opens']} "
                        f"opens for {new} new regions)")
                c.check(not got["by_token"], "version 4 (a new layout): its first open was a whole answer")
            pub.close()
            c.check(store.stats()["regions"] == 0, "close() unregistered the publisher's regions")
    except Exception as e:  # noqa: BLE001 - reported as a failed check
        c.check(False, f"raised {type(e).__name__}: {e}")
    finally:
        here.send({"op": "quit"})
        proc.join(timeout=30)
    return c.failed


def check_batched_copy(torch) -> int:
    """load_into()'s batched copy kernel against torch's copy: aligned and unaligned pointers,
    sizes that are no multiple of 16 or span many chunks, empty and non-contiguous tensors
    (left to torch); a plan is reused for the same pointers and rebuilt for others."""
    from tensorreg import _batched_copy

    c = Checks("batched copy")
    g = torch.Generator(device="cuda").manual_seed(7)
    pool = torch.randint(0, 256, (3 << 20,), dtype=torch.uint8, device="cuda", generator=g)
    big = torch.randn(1 << 20, device="cuda", generator=g).to(torch.bfloat16)  # 2 MiB: 8 chunks
    srcs = [big, pool[1:1 + 999], pool[3:3 + 4097], pool[16:16 + 4096].view(torch.int32), pool[:0],
            torch.randn(64, 48, device="cuda", generator=g).t(), pool[2:2 + 600].view(torch.int16)]
    dsts = [torch.empty_like(s, memory_format=torch.contiguous_format) for s in srcs]
    dsts[1] = torch.empty(1000, dtype=torch.uint8, device="cuda")[1:]  # unaligned destination
    plan, rest = _batched_copy.plan(torch, dsts, srcs)
    if not c.check(plan is not None, "the driver loaded the kernel's PTX"):
        return c.failed
    c.check(rest == [5], f"only the transposed (non-contiguous) pair is left to torch, got {rest}")
    plan.launch()
    for k in rest:
        dsts[k].copy_(srcs[k])
    torch.cuda.synchronize()
    c.check(all(torch.equal(d, s) for d, s in zip(dsts, srcs)), "every copy is bit-equal to its source")
    again, _ = _batched_copy.plan(torch, dsts, srcs, plan)
    c.check(again is plan, "the same pointers reuse the plan")
    other = [torch.empty_like(d) for d in dsts]
    moved, _ = _batched_copy.plan(torch, other, srcs, plan)
    c.check(moved is not plan and moved is not None, "other pointers make a new plan")
    return c.failed


def main() -> int:
    args = sys.argv[1:]
    daemon = os.path.join(REPO, ".device-build", "tensorregd")
    if not os.path.exists(daemon):
        daemon = os.path.join(REPO, ".device-daemon", "tensorregd")
    device = "cuda"
    if args and args[0] == "trainer":
        return 1 if trainer(args[1], args[2], args[3]) else 0
    while args:
        a = args.pop(0)
        if a == "--daemon" and args:
            daemon = os.path.abspath(args.pop(0))
        elif a == "--device" and args:
            device = args.pop(0)
    try:
        import torch
    except ImportError as e:
        log(f"skipped: {e}")
        return SKIP
    if device == "cuda" and not torch.cuda.is_available():
        log("skipped: no CUDA device")
        return SKIP
    work = tempfile.mkdtemp(prefix="tensorreg-wsync-check-")
    socket_path = os.path.join(work, "d.sock")
    out = open(os.path.join(work, "tensorregd.log"), "w+")
    proc = subprocess.Popen([daemon, "--socket", socket_path, "--log-level", "warn"], stdout=out,
                            stderr=subprocess.STDOUT)
    failed = 0
    try:
        deadline = time.monotonic() + 60
        while "ready" not in open(out.name).read():
            if proc.poll() is not None or time.monotonic() > deadline:
                log(f"tensorregd did not start: {open(out.name).read()}")
                return 1
            time.sleep(0.05)
        if device == "cuda":
            failed += check_batched_copy(torch)
        modes = [("caching", ""), ("expandable", "expandable_segments:True")] if device == "cuda" else [("cpu", "")]
        for label, conf in modes:
            env = dict(os.environ)
            env.pop("PYTORCH_CUDA_ALLOC_CONF", None)
            if conf:
                env["PYTORCH_CUDA_ALLOC_CONF"] = conf  # before torch starts CUDA in both processes
            run = subprocess.run([sys.executable, __file__, "trainer", socket_path, label, device], env=env,
                                 timeout=600)
            failed += run.returncode != 0
    finally:
        said = open(out.name).read().strip()
        if said.count("\n") > 0:
            log("tensorregd said:\n" + "\n".join(said.splitlines()[-30:]))
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(work, ignore_errors=True)
    log(f"gpu_weight_sync_check: {'OK' if failed == 0 else f'{failed} FAILED'}")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
