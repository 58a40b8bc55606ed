"""Store.put of a CUDA state dict (the coalesced plan: a daemon-owned buffer on the GPU) next to
Store.register of the same dict (a lease in place), each to its mi2 id: issue #17's goal put
<= 1.2x register. GPU machine; not built or run by CI.

    python3 benchmarks/put_register_bench.py --daemon PATH [--shape moe|dense] [--gib 16]
        [--repeats 5] [--expandable 1]

It starts the daemon (a CUDA build) on a temp socket and builds the state dict in this process
(the shapes of weight_sync_bench.py; caching allocator unless --expandable 1). Each repeat
first changes every tensor in place (add_ of a small bf16 delta, not timed), so that both ids
are of bytes the daemon has not seen, then times:

- register: Store.register(sd) until its mi2 id is answered; then the lease is closed;
- put: Store.put(sd, policy=None) until its mi2 id is answered (the daemon allocates the
  buffer, the client copies every tensor into it on the GPU, the daemon hashes it); then the
  artifact is deregistered, which frees the buffer;
- registrar put: register() of a Registrar made with publish_copy=True (docs/registration.md
  §5.5): the daemon copies the bytes on the GPU from the regions the registrar keeps and keeps
  the copy as the artifact's GPU replica; then the artifact is deregistered.

The three ids of one repeat must be equal (the same bytes). Medians of --repeats after one
warm-up repeat, with the client's own split of each (artifact.timings) and their ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "python"))
sys.path.insert(0, HERE)

from bench_state_dicts import model_state_dict  # noqa: E402
from weight_sync_bench import start_daemon, stop_daemon  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--daemon", required=True, help="a CUDA build of tensorregd")
    p.add_argument("--shape", default="moe", choices=("moe", "dense"))
    p.add_argument("--gib", type=float, default=16.0)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--expandable", default="0")
    args = p.parse_args()
    if args.expandable != "0":
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"  # before torch reads it
    import torch

    import tensorreg

    if not torch.cuda.is_available():
        print("skipped: no CUDA device")
        return 77
    work = tempfile.mkdtemp(prefix="tensorreg-put-register-")
    daemon, socket_path, daemon_log = start_daemon(args.daemon, work)
    rows: dict = {"register": [], "put": [], "registrar": []}
    splits: dict = {"register": [], "put": [], "registrar": []}
    try:
        sd = model_state_dict(torch, args.shape, args.gib, "cuda")
        total = sum(t.numel() * t.element_size() for t in sd.values())
        print(f"{torch.cuda.get_device_name(0)}; torch {torch.__version__}; {args.shape}: {len(sd)} bf16 tensors, "
              f"{total / (1 << 30):.2f} GiB; expandable_segments {'on' if args.expandable != '0' else 'off'}")
        with tensorreg.Store(socket_path, timeout=300) as store:
            putter = store.registrar(publish_copy=True)
            for k in range(args.repeats + 1):
                with torch.no_grad():
                    for t in sd.values():
                        t.add_(2.0 ** -8)
                torch.cuda.synchronize()
                started = time.perf_counter()
                registered = store.register(sd)
                took_register = time.perf_counter() - started
                registered_id = registered.artifact_id
                register_split = dict(registered.timings)
                registered.close()
                started = time.perf_counter()
                put = store.put(sd, policy=None)
                took_put = time.perf_counter() - started
                put_id = put.artifact_id
                put_split = dict(put.timings)
                store.deregister(put_id)
                started = time.perf_counter()
                copied = putter.register(sd)
                took_registrar = time.perf_counter() - started
                copied_id = copied.artifact_id
                registrar_split = dict(copied.timings)
                store.deregister(copied_id)
                if not (put_id == registered_id == copied_id) or not put_id.startswith("mi2:"):
                    raise RuntimeError(f"repeat {k}: put answered {put_id}, register {registered_id}, registrar put "
                                       f"{copied_id}")
                print(f"repeat {k}{' (warm-up)' if k == 0 else ''}: register {took_register * 1e3:.1f} ms "
                      f"{fmt_split(register_split)}; put {took_put * 1e3:.1f} ms {fmt_split(put_split)}; "
                      f"registrar put {took_registrar * 1e3:.1f} ms {fmt_split(registrar_split)}", flush=True)
                if k > 0:
                    for key, took, split in (("register", took_register, register_split),
                                             ("put", took_put, put_split),
                                             ("registrar", took_registrar, registrar_split)):
                        rows[key].append(took)
                        splits[key].append(split)
            putter.close()
        medians = {key: statistics.median(values) for key, values in rows.items()}
        print("| what | ms (median) | split (medians, ms) |\n|---|---|---|")
        for key, what in (("register", "register -> mi2 id"), ("put", "put -> mi2 id"),
                          ("registrar", "registrar put (publish_copy) -> mi2 id")):
            print(f"| {what} | {medians[key] * 1e3:.1f} | {fmt_split(median_split(splits[key]))} |")
        print(f"put / register = {medians['put'] / medians['register']:.2f}, registrar put / register = "
              f"{medians['registrar'] / medians['register']:.2f} (goal <= 1.2); ids equal in every repeat")
    finally:
        stop_daemon(daemon, daemon_log, work)
    return 0


def fmt_split(split: dict) -> str:
    return "(" + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in split.items() if isinstance(v, float)) + ")"


def median_split(splits: list) -> dict:
    keys = [k for k, v in splits[0].items() if isinstance(v, float)] if splits else []
    return {k: statistics.median(s[k] for s in splits if k in s) for k in keys}


if __name__ == "__main__":
    sys.exit(main())
