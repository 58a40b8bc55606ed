#!/usr/bin/env python3
"""The GPU plans of ./scripts/demo, through the Python client (python/tensorreg).

    demo-gpu.py --socket SOCK MODEL.safetensors OFFLINE_ID

Loads the file's tensors onto the GPU (one CUDA storage per distinct byte range, so tied
weights stay tied), then: lease-in-place of the live CUDA tensors (IPC handles, regions where
one allocation backs several storages), a coalesced put (the daemon's own GPU buffer), and a
second process that opens the lease by id and checks every tensor against the file. Prints
each id with its time and fails unless all equal OFFLINE_ID. Exits 77 when torch cannot see a
GPU (the demo then says it skipped these plans).
"""

import argparse
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "python"))


def load(torch, path):
    from tensorreg import _layout

    tensors, data_offset = _layout.read_safetensors_header(path)
    with open(path, "rb") as f:
        blob = f.read()
    by_range, state = {}, {}
    for name, dtype, shape, begin, end in tensors:
        if (begin, end) not in by_range:
            raw = torch.frombuffer(bytearray(blob[data_offset + begin:data_offset + end]), dtype=torch.uint8)
            by_range[(begin, end)] = raw.cuda()
        state[name] = by_range[(begin, end)].view(getattr(torch, dtype.split(".", 1)[1])).reshape(shape)
    return state


def reader(socket, artifact_id, path):
    """The second process: open the lease by id, compare with the file."""
    import torch

    import tensorreg

    expected = load(torch, path)
    with tensorreg.Store(socket) as store:
        start = time.perf_counter()
        opened = store.open(artifact_id, device="cuda")
        took = time.perf_counter() - start
        same = all(torch.equal(opened[k].view(torch.uint8), expected[k].view(torch.uint8)) for k in expected)
        print(f"open (second process)   : {len(opened)} tensors in {took * 1e3:.1f} ms, values equal: {same}")
        return 0 if same and set(opened) == set(expected) else 1


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--socket", required=True)
    parser.add_argument("--reader", action="store_true")
    parser.add_argument("model")
    parser.add_argument("offline_id")
    args = parser.parse_args()
    try:
        import torch
    except ImportError:
        print("skipped: torch is not importable here")
        return 77
    if not torch.cuda.is_available():
        print("skipped: torch sees no GPU")
        return 77
    if args.reader:
        return reader(args.socket, args.offline_id, args.model)

    import tensorreg

    state = load(torch, args.model)
    ids = {}
    with tensorreg.Store(args.socket) as store:
        start = time.perf_counter()
        lease = store.register(state, ttl_ms=60_000)
        print(f"lease-in-place (CUDA)   : {lease.artifact_id}  {(time.perf_counter() - start) * 1e3:.1f} ms")
        ids["lease-in-place (CUDA)"] = lease.artifact_id
        start = time.perf_counter()
        put = store.put(state)
        print(f"coalesced put           : {put.artifact_id}  {(time.perf_counter() - start) * 1e3:.1f} ms "
              f"(existed={put.existed})")
        ids["coalesced put"] = put.artifact_id
        opened = subprocess.run([sys.executable, os.path.abspath(__file__), "--socket", args.socket, "--reader",
                                 args.model, lease.artifact_id])
        lease.close()
    wrong = {k: v for k, v in ids.items() if v != args.offline_id}
    if wrong or opened.returncode != 0:
        print(f"demo-gpu: ids differ from the offline id {args.offline_id}: {wrong}" if wrong else
              "demo-gpu: the second process did not read the same tensors", file=sys.stderr)
        return 1
    print("GPU plans: every id equals the offline id")
    return 0


if __name__ == "__main__":
    sys.exit(main())
