#!/usr/bin/env python3
"""Writes the seed corpora of fuzz/corpus/<target>/: a handful of small, valid inputs each.

Run from anywhere: python3 fuzz/corpus/make_corpus.py. Deterministic; the files it writes are
committed, so CI never runs it. The protobuf envelopes are encoded by hand (field numbers of
proto/tensorreg/wire/v1/frame.proto) so that only the standard library is needed.
"""
import base64
import hashlib
import json
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def write(target, name, data):
    os.makedirs(os.path.join(HERE, target), exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(HERE, target, name), "wb") as f:
        f.write(data)


# ---- protobuf, by hand -------------------------------------------------------------------
def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def field_varint(num, value):
    return varint(num << 3) + varint(value)


def field_bytes(num, data):
    if isinstance(data, str):
        data = data.encode()
    return varint((num << 3) | 2) + varint(len(data)) + data


def request(request_id, body_field, body=b"", end_of_stream=False):
    out = field_varint(1, request_id)
    if end_of_stream:
        out += field_varint(2, 1)
    if body_field:
        out += field_bytes(body_field, body)
    return out


def frame(payload):
    return struct.pack("<I", len(payload)) + payload


# ---- the canonical index and ids ---------------------------------------------------------
INDEX = {"a": [0, 16, [4], [1], "torch.float32", 0], "b": [16, 8, [2], [1], "torch.float32", 0]}


def canonical_json(index):
    return json.dumps(index, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def multihash(digest):
    return "b" + base64.b32encode(b"\x12\x20" + digest).decode().lower().rstrip("=")


def b64u(value):
    return "b64u." + base64.urlsafe_b64encode(value.encode()).decode().rstrip("=")


def main():
    index_json = canonical_json(INDEX)
    index_mh = multihash(hashlib.sha256(index_json.encode()).digest())
    data_mh = multihash(hashlib.sha256(b"data").digest())
    mi2 = "mi2:%s:%s" % (index_mh, data_mh)
    cgid = "cgid:byte_artifact~ns~eng~%s~%s~layout-v1~%s" % (b64u("model"), b64u("v1"), b64u("k1"))

    # framing: byte 0 max_frame_bytes (0 = default), byte 1 plan length, plan, stream.
    get_stats = request(1, 41)
    list_artifacts = request(2, 40)
    begin = request(3, 10, field_varint(2, 24) + field_varint(6, 1) + field_bytes(13, b""))
    commit = request(4, 13, field_bytes(1, "reg_0"))
    stream = frame(get_stats) + frame(list_artifacts) + frame(begin) + frame(commit)
    write("framing", "one_read", b"\x00\x00" + stream)
    write("framing", "byte_at_a_time", b"\x00\x01\x01" + stream)
    write("framing", "fds_split", b"\x00\x03\x43\x05\x81" + stream)
    write("framing", "small_cap", b"\x01\x02\x07\x4d" + stream)
    write("framing", "zero_length", b"\x00\x00" + frame(get_stats) + b"\x00\x00\x00\x00" + frame(get_stats))
    write("framing", "partial", b"\x00\x00" + frame(get_stats) + frame(list_artifacts)[:-2])

    # canonical_index: client index JSON, canonical and not.
    write("canonical_index", "two_tensors", index_json)
    write("canonical_index", "spaced", json.dumps(INDEX, indent=1))
    write("canonical_index", "aliases", canonical_json(
        {"w": [0, 64, [4, 4], [4, 1], "torch.float32", 0], "w.T": [0, 64, [4, 4], [1, 4], "torch.float32", 0],
         "row": [0, 64, [4], [1], "torch.float32", 4]}))
    write("canonical_index", "unicode", '{"\\u00e9\\ud83d\\ude00":[8,2,[],[],"torch.bfloat16",0]}')
    write("canonical_index", "negative_stride", canonical_json({"x": [0, 24, [3, 2], [-2, 1], "torch.float32", 0]}))

    # safetensors: whole files.
    def safetensors(tensors, metadata=None):
        header, data = {}, b""
        for name, dtype, shape, size in tensors:
            header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + size]}
            data += bytes((i * 7 + 3) & 0xFF for i in range(size))
        if metadata is not None:
            header["__metadata__"] = metadata
        text = json.dumps(header, separators=(",", ":")).encode()
        return struct.pack("<Q", len(text)) + text + data

    write("safetensors", "two_tensors", safetensors([("a", "F32", [2, 2], 16), ("b", "BF16", [4], 8)]))
    write("safetensors", "metadata", safetensors([("w", "F16", [3], 6)], {"format": "pt"}))
    write("safetensors", "scalar_and_empty", safetensors([("s", "I64", [], 8), ("e", "U8", [0, 5], 0)]))
    write("safetensors", "many_dtypes", safetensors(
        [("t%d" % i, d, [2], 2 * n) for i, (d, n) in enumerate(
            [("BOOL", 1), ("U8", 1), ("I8", 1), ("I16", 2), ("I32", 4), ("F64", 8), ("F8_E4M3", 1)])]))

    # identity: ids as text (the view spec reads the same bytes structurally).
    write("identity", "mi2", mi2)
    write("identity", "cgid_byte_artifact", cgid)
    write("identity", "cgid_plain", "cgid:my-model.v1_~x")
    write("identity", "b64u_segment", b64u("meta-llama/Llama-3.1-8B"))
    write("identity", "multihash", index_mh)
    write("identity", "hex_digest", hashlib.sha256(b"x").hexdigest())


if __name__ == "__main__":
    main()
