#!/usr/bin/env python3
"""Writes a small but real multi-tensor .safetensors file for the demo (standard library only).

Several dtypes (F32, BF16, F16, I64, U8, BOOL), a tied weight (two names, one range of bytes:
an alias), and more than 4 MiB in all, so the data tree hash has several 4 MiB leaves.
Usage: make-demo-model.py OUT.safetensors
"""
import json
import os
import struct
import sys


def main(path):
    rng = os.urandom
    tensors = [  # name, dtype, shape, element size
        ("model.embed_tokens.weight", "BF16", [2048, 640], 2),
        ("model.layers.0.mlp.up_proj.weight", "F32", [640, 1024], 4),
        ("model.layers.0.input_layernorm.weight", "F16", [640], 2),
        ("model.position_ids", "I64", [1, 77], 8),
        ("model.layers.0.attn.mask", "BOOL", [77], 1),
        ("model.quant.zero_points", "U8", [333], 1),
    ]
    header, blobs, offset = {}, [], 0
    for name, dtype, shape, size in tensors:
        n = size
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        blobs.append(rng(n))
        offset += n
    # A tied output head: the same bytes as the embedding, under a second name.
    header["lm_head.weight"] = dict(header["model.embed_tokens.weight"])
    header["__metadata__"] = {"format": "pt", "producer": "tensorreg demo"}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors pads the header to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for b in blobs:
            f.write(b)
    print(f"wrote {path}: {len(header) - 1} tensors (one tied), {offset} data bytes")


if __name__ == "__main__":
    main(sys.argv[1])
