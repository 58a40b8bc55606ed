"""Tensor-parallel pieces and views from Python (issue #18): Store.register_piece of every
rank's narrow, and Store.register_view of a transposed copy, against a put of the same bytes,
measured side by side in one run.

    /usr/bin/python3 benchmarks/python_view_bench.py [--build build] [--gib 1] [--ranks 4]
        [--repeat 3] [--python DIR] [--device cpu|cuda]

(/usr/bin/python3: it sees Debian's torch.) A state dict of --gib GiB (8 float32 matrices, on
the CPU or, with --device cuda, on the GPU: the ranks' pieces then come from CUDA tensors) goes
to a fresh daemon each repeat, four ways, each timed alone:

- `Store.put(sd)` of new content: the yardstick, the same canonical bytes from the same
  process through the daemon's publish memfd;
- `Store.register_piece` of --ranks pieces narrowing every matrix on dim 0 (rows), one after
  another as the ranks of one host would send them, then the same on dim 1 (columns): the
  time to the sealed id, whose id must equal the put's;
- `Store.register_view(sd, {every matrix: transpose})`, SERVER placement: the client uploads
  the transposed bytes (torch's transpose made contiguous) and the daemon transposes them back
  into the canonical buffer (its id must equal the put's too).

The best repeat of each is kept, with the CPU seconds of client and daemon. --python points at
another copy of the package (its parent dir), to compare clients against the same daemon.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from put_bench import best, daemon, load, log, process_cpu  # noqa: E402


def state_dict(torch, total: int, seed: int, device: str) -> dict:
    matrices = 8
    cols = 1024
    rows = total // matrices // cols // 4
    g = torch.Generator().manual_seed(seed)
    return {f"layers.{i}.weight": torch.randn(rows, cols, generator=g).to(device) for i in range(matrices)}


def pieces(sd: dict, ranks: int, dim: int) -> list:
    """Each rank's (tensors, rank_spec): its narrow of every matrix on `dim`, made contiguous as
    a rank holds it."""
    out = []
    for r in range(ranks):
        local, spec = {}, {}
        for name, t in sd.items():
            n = t.shape[dim] // ranks
            local[name] = t.narrow(dim, r * n, n).contiguous()
            spec[name] = (dim, r * n, t.shape[dim])
        out.append((local, spec))
    return out


def timed(d: daemon, fn) -> tuple:
    """(seconds, client + daemon CPU seconds, fn's result)."""
    daemon_cpu, cpu = process_cpu(d.proc.pid), time.process_time()
    started = time.perf_counter()
    out = fn()
    s = time.perf_counter() - started
    return s, time.process_time() - cpu + process_cpu(d.proc.pid) - daemon_cpu, out


def one_round(args, cli: str, daemon_bin: str, total: int, seed: int, work: str, results: dict) -> None:
    import torch

    import tensorreg

    sd = state_dict(torch, total, seed, args.device)
    size = sum(t.numel() * t.element_size() for t in sd.values())
    rounds = {"rows": pieces(sd, args.ranks, 0), "columns": pieces(sd, args.ranks, 1)}
    d = daemon(daemon_bin, work, 8 * size)
    try:
        d.wait_ready(cli)
        with tensorreg.Store(d.socket) as store:
            s, cpu, put = timed(d, lambda: store.put(sd, policy="cache"))
            best(results, "put_s", s)
            best(results, "put_cpu_s", cpu)
            for what, ranked in rounds.items():
                cgid = f"cgid:bench-{what}-{seed}"

                def assemble():
                    for local, spec in ranked:
                        done = store.register_piece(cgid, local, spec)
                    return done

                s, cpu, done = timed(d, assemble)
                if done.artifact_id != put.artifact_id:
                    raise RuntimeError(f"{what}: the sealed id {done.artifact_id} is not the put's {put.artifact_id}")
                best(results, f"{what}_s", s)
                best(results, f"{what}_cpu_s", cpu)
            spec = {name: ("transpose", 0, 1) for name in sd}
            s, cpu, view = timed(d, lambda: store.register_view(sd, spec, "server"))
            if view.artifact_id != put.artifact_id:
                raise RuntimeError(f"transposed view: id {view.artifact_id} is not the put's {put.artifact_id}")
            best(results, "transpose_s", s)
            best(results, "transpose_cpu_s", cpu)
    finally:
        d.stop()
    results["size"] = size


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--build", default=os.path.join(REPO, "build"))
    p.add_argument("--gib", type=float, default=1.0)
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--python", default=os.path.join(REPO, "python"), help="the tensorreg package's parent dir")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = p.parse_args()
    sys.path.insert(0, args.python)
    cli = os.path.join(args.build, "cli", "tensorreg")
    daemon_bin = os.path.join(args.build, "daemon", "tensorregd")
    work = tempfile.mkdtemp(prefix="python_view_bench.")
    total = int(args.gib * (1 << 30))
    log(f"{args.gib} GiB on {args.device}, {args.ranks} ranks, {os.cpu_count()} cores, package {args.python}, "
        f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    results: dict = {}
    for r in range(args.repeat):
        log(f"repeat {r + 1}: load {load()}")
        one_round(args, cli, daemon_bin, total, r + 1, work, results)
    log(f"after: load {load()}")
    size, put = results["size"], results["put_s"]
    log(f"| what ({size / 2**30:.2f} GiB) | best s | GiB/s | x put | CPU s (client + daemon) |")
    log("|---|---|---|---|---|")
    for key, what in (("put", "Store.put (yardstick)"), ("rows", f"{args.ranks} pieces, rows (dim 0)"),
                      ("columns", f"{args.ranks} pieces, columns (dim 1)"),
                      ("transpose", "register_view, every matrix transposed (SERVER)")):
        s = results[f"{key}_s"]
        log(f"| {what} | {s:.3f} | {size / s / 2**30:.2f} | {s / put:.2f} | {results[f'{key}_cpu_s']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
