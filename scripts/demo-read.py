#!/usr/bin/env python3
"""The demo's second process: reads an artifact the daemon holds, on the CPU, with the Python
client (python/tensorreg), and checks every tensor against the file it was put from.

    demo-read.py --socket SOCK ARTIFACT_ID MODEL.safetensors
    demo-read.py --compare MODEL.safetensors EXPORTED.safetensors

Store.get() maps the daemon's stable DRAM copy (its memfd) into this process: no GPU, no copy
of the bytes. Exits 77 when torch or protobuf is missing (the demo then says so).
--compare (standard library only) checks that `tensorreg export` wrote every tensor of the
model with the same bytes (a tied weight becomes two copies, as safetensors files share none,
and BOOL comes back as U8, the canonical index's torch.uint8 for both).
"""

import argparse
import json
import os
import struct
import sys
import time


def file_tensors(path):
    with open(path, "rb") as f:
        blob = f.read()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    data = blob[8 + n:]
    return {name: ("U8" if meta["dtype"] == "BOOL" else meta["dtype"], meta["shape"],
                   data[meta["data_offsets"][0]:meta["data_offsets"][1]])
            for name, meta in header.items() if name != "__metadata__"}


def compare(model, exported):
    want, got = file_tensors(model), file_tensors(exported)
    same = want == got
    print(f"{os.path.basename(exported)}: {len(got)} tensors, "
          + ("each with the dtype, shape and bytes of the original" if same else "NOT the same as the original"))
    return 0 if same else 1


HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "python"))


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "--compare":
        return compare(sys.argv[2], sys.argv[3])
    parser = argparse.ArgumentParser()
    parser.add_argument("--socket", required=True)
    parser.add_argument("artifact_id")
    parser.add_argument("model")
    args = parser.parse_args()
    try:
        import torch

        import tensorreg
        from tensorreg import _layout
    except ImportError as e:
        print(f"skipped: this Python ({sys.executable}) cannot import {e.name} "
              "(Debian: apt-get install python3-torch python3-protobuf)")
        return 77
    tensors, data_offset = _layout.read_safetensors_header(args.model)
    with open(args.model, "rb") as f:
        blob = f.read()
    with tensorreg.Store(args.socket) as store:
        start = time.perf_counter()
        got = store.get(args.artifact_id)
        took = time.perf_counter() - start
        wrong = [name for name, _, _, begin, end in tensors
                 if got[name].reshape(-1).view(torch.uint8).numpy().tobytes()
                 != blob[data_offset + begin:data_offset + end]]
    total = sum(end - begin for _, _, _, begin, end in tensors)
    print(f"pid {os.getpid()} read {len(got)} tensors ({total} bytes) from the daemon's memory on the CPU "
          f"in {took * 1e3:.1f} ms, zero-copy; "
          + ("every byte equals the file" if not wrong else f"these differ from the file: {wrong}"))
    return 0 if not wrong and set(got) == {t[0] for t in tensors} else 1


if __name__ == "__main__":
    sys.exit(main())
