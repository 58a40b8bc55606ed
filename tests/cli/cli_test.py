#!/usr/bin/env python3
"""End-to-end checks of the `tensorreg` CLI against an independent Python reference.

The reference builds canonical indices and tree hashes from the rules of registration.md
§2–§3 with hashlib/json/base64 only, so a bug shared by the C++ code and its unit tests
still shows here. Usage: cli_test.py PATH/TO/tensorreg [PATH/TO/tensorregd]
With the daemon: `put` and `lease` through a real tensorregd give the id that
`tensorreg digest` computes from the same canonical bytes.
"""
import base64
import hashlib
import json
import os
import signal
import struct
import subprocess
import time
import sys
import tempfile

LEAF = 4 << 20


def multihash(digest: bytes) -> str:
    return "b" + base64.b32encode(b"\x12\x20" + digest).decode().lower().rstrip("=")


def tree_hash(data: bytes) -> bytes:
    if not data:
        return bytes(32)
    nodes = [hashlib.sha256(data[i:i + LEAF]).digest() for i in range(0, len(data), LEAF)]
    while len(nodes) > 1:
        nxt = [hashlib.sha256(nodes[i] + nodes[i + 1]).digest() for i in range(0, len(nodes) - 1, 2)]
        if len(nodes) % 2:
            nxt.append(nodes[-1])
        nodes = nxt
    return nodes[0]


DTYPES = {"F32": ("torch.float32", 4), "F16": ("torch.float16", 2), "BF16": ("torch.bfloat16", 2),
          "I64": ("torch.int64", 8), "U8": ("torch.uint8", 1), "BOOL": ("torch.uint8", 1),
          "F8_E4M3": ("torch.float8_e4m3fn", 1), "U32": ("torch.uint32", 4)}


def write_safetensors(path, tensors):
    """tensors: name -> (dtype, shape, bytes). Writes them in the given order."""
    header, blobs, offset = {}, [], 0
    for name, (dtype, shape, blob) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    header["__metadata__"] = {"format": "pt"}
    text = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def reference_index(tensors):
    """The coalesced canonical index and buffer of registration.md §2.4 (names in byte order, 8-aligned)."""
    index, cursor, placed = {}, 0, []
    for name in sorted(tensors, key=lambda n: n.encode()):
        dtype, shape, blob = tensors[name]
        cursor = (cursor + 7) // 8 * 8
        stride, acc = [], 1
        for dim in reversed(shape):
            stride.insert(0, acc)
            acc *= max(dim, 1)
        index[name] = [cursor, len(blob), shape, stride, DTYPES[dtype][0], 0]
        placed.append((cursor, blob))
        cursor += len(blob)
    total = max(o + s for o, s, *_ in index.values())
    buf = bytearray(total)
    for off, blob in placed:
        buf[off:off + len(blob)] = blob
    text = json.dumps(index, separators=(",", ":"), sort_keys=True, ensure_ascii=True)
    return text, bytes(buf)


def run(tool, *args, expect_ok=True):
    p = subprocess.run([tool, *args], capture_output=True, text=True)
    if expect_ok and p.returncode != 0:
        raise AssertionError(f"{args} failed: {p.stderr}")
    return p


def main():
    tool = sys.argv[1]
    failures = 0

    def check(cond, what):
        nonlocal failures
        print(("ok   " if cond else "FAIL ") + what)
        failures += 0 if cond else 1
        return 0 if cond else 1

    rnd = lambda n: os.urandom(n)
    with tempfile.TemporaryDirectory() as d:
        # Two files, several dtypes, odd sizes (PAD between storages), > 4 MiB in all.
        a = {"model.layers.0.weight": ("F32", [1024, 1025], rnd(1024 * 1025 * 4)),
             "model.embed": ("BF16", [3, 5], rnd(30)), "é-norm": ("F16", [7], rnd(14))}
        b = {"lm_head.bias": ("I64", [3], rnd(24)), "mask": ("BOOL", [5], rnd(5)),
             "scale": ("F8_E4M3", [9], rnd(9)), "z": ("U32", [0, 4], b"")}
        write_safetensors(os.path.join(d, "b.safetensors"), b)
        write_safetensors(os.path.join(d, "a.safetensors"), a)
        text, buf = reference_index({**a, **b})
        expected_id = f"mi2:{multihash(hashlib.sha256(text.encode()).digest())}:{multihash(tree_hash(buf))}"

        out = run(tool, "index", os.path.join(d, "b.safetensors"), os.path.join(d, "a.safetensors")).stdout.splitlines()
        check(out == [text, f"total_size {len(buf)}", f"id {expected_id}"], "index of two safetensors files matches the reference")
        out1 = run(tool, "index", "--threads", "1", os.path.join(d, "a.safetensors"), os.path.join(d, "b.safetensors")).stdout
        check(out1.splitlines()[-1] == f"id {expected_id}", "index is independent of file order and thread count")

        # digest of the same canonical bytes gives the same id.
        with open(os.path.join(d, "index.json"), "w") as f:
            f.write(text)
        with open(os.path.join(d, "canonical.bin"), "wb") as f:
            f.write(buf)
        out = run(tool, "digest", "--index", os.path.join(d, "index.json"), "--data", os.path.join(d, "canonical.bin")).stdout
        check(out.splitlines()[-1] == f"id {expected_id}", "digest of the canonical bytes equals index's id")
        check(len(out.splitlines()) == 3 and out.startswith("index bciq"), "digest prints three lines")
        only = run(tool, "digest", "--index", os.path.join(d, "index.json")).stdout.splitlines()
        check(only == [f"index {multihash(hashlib.sha256(text.encode()).digest())}"], "digest without data prints the index line only")

        n = 3 * LEAF + 11
        out = run(tool, "digest", "--index", os.path.join(d, "index.json"), "--zeros", str(n)).stdout.splitlines()
        check(out[1] == f"data {multihash(tree_hash(bytes(n)))}", "--zeros N hashes N zero bytes")

        # Non-canonical index text is re-emitted canonically before hashing (DECISIONS §5.13).
        with open(os.path.join(d, "loose.json"), "w") as f:
            f.write('{ "b": [8,8,[2],[1],"torch.float32",0], "a":[0,8,[2],[1],"torch.float32",0] }')
        canon = json.dumps(json.loads(open(os.path.join(d, "loose.json")).read()), separators=(",", ":"), sort_keys=True)
        out = run(tool, "digest", "--index", os.path.join(d, "loose.json")).stdout.splitlines()
        check(out == [f"index {multihash(hashlib.sha256(canon.encode()).digest())}"], "loose index text is canonicalized")

        # Bad input: non-zero exit and one line on stderr.
        with open(os.path.join(d, "bad.safetensors"), "wb") as f:
            f.write(struct.pack("<Q", 1 << 40) + b"{}")
        for args, what in [(["index", os.path.join(d, "bad.safetensors")], "huge header length"),
                           (["index", os.path.join(d, "missing.safetensors")], "missing file"),
                           (["digest", "--index", os.path.join(d, "bad.safetensors")], "index that is not JSON"),
                           (["digest"], "digest without --index"),
                           (["frobnicate"], "unknown command")]:
            p = run(tool, *args, expect_ok=False)
            check(p.returncode != 0 and len(p.stderr.strip().splitlines()) >= 1 and p.stderr.startswith("tensorreg: "),
                  f"bad input exits non-zero with an error: {what}")
            check(len(p.stderr.strip().splitlines()) == 1 or args == ["frobnicate"], f"the error is one line: {what}")
        if len(sys.argv) > 2:
            failures += daemon_checks(tool, sys.argv[2], d, check)
    sys.exit(1 if failures else 0)


def daemon_checks(tool, daemon, d, check):
    """put and lease through a real daemon give the id `tensorreg digest` gives."""
    sock = os.path.join(d, "run", "tensorregd.sock")
    log = open(os.path.join(d, "daemon.log"), "w+")
    proc = subprocess.Popen([daemon, "--socket", sock], stdout=log, stderr=subprocess.STDOUT)
    lease = None
    try:
        for _ in range(200):
            log.seek(0)
            if "ready" in log.read():
                break
            time.sleep(0.05)
        tensors = {"w": ("F32", [1025, 1024], os.urandom(1025 * 1024 * 4)), "b": ("BF16", [3], os.urandom(6))}
        model = os.path.join(d, "daemon-model.safetensors")
        write_safetensors(model, tensors)
        text, buf = reference_index(tensors)
        with open(os.path.join(d, "daemon-index.json"), "w") as f:
            f.write(text)
        with open(os.path.join(d, "daemon-canonical.bin"), "wb") as f:
            f.write(buf)
        digest = run(tool, "digest", "--index", os.path.join(d, "daemon-index.json"),
                     "--data", os.path.join(d, "daemon-canonical.bin")).stdout.splitlines()[-1].split()[1]
        put = json.loads(run(tool, "put", "--socket", sock, "--json", model).stdout)
        check(put["artifact_id"] == digest and not put["existed"], "put through tensorregd gives the digest id")
        again = json.loads(run(tool, "put", "--socket", sock, "--json", model).stdout)
        check(again["existed"], "a second put answers existed=true")
        lease = subprocess.Popen([tool, "lease", "--socket", sock, "--json", model], stdout=subprocess.PIPE,
                                 stderr=subprocess.DEVNULL, text=True)
        leased = json.loads(lease.stdout.readline())
        check(leased["artifact_id"] == digest, "lease through tensorregd gives the digest id")
        listed = json.loads(run(tool, "ls", "--socket", sock, "--json").stdout)
        check(len(listed) == 1 and set(listed[0]["tiers"]) == {"leased", "stable_dram"}, "ls shows both tiers")
        shown = json.loads(run(tool, "show", "--socket", sock, "--json", digest).stdout)
        check(shown["index"] == json.loads(text), "show returns the canonical index")
        check(run(tool, "index", "--socket", sock, digest).stdout.strip() == text, "index ID prints the canonical bytes")
        lease.send_signal(signal.SIGTERM)
        lease.wait(timeout=10)
        stats = json.loads(run(tool, "stats", "--socket", sock, "--json").stdout)
        # The second put's join went with its process too (owner exit), so nothing is leased.
        check(stats["leases"] == 0 and stats["regions"] == 0 and stats["artifacts"] == 1,
              "the lease and its region go when the holder stops; the stable copy stays")
        gone = run(tool, "show", "--socket", sock, "mi2:nope", expect_ok=False)
        check(gone.returncode != 0 and "NOT_FOUND" in gone.stderr, "show of an unknown id is NOT_FOUND")
        exported = os.path.join(d, "exported.safetensors")
        run(tool, "export", "--socket", sock, digest, "--out", exported)
        again_id = run(tool, "index", exported).stdout.splitlines()[-1].split()[1]
        check(again_id == digest, "export writes a safetensors file whose index gives the same id")
        dereg = json.loads(run(tool, "deregister", "--socket", sock, "--json", digest).stdout)
        check(dereg["removed"], "deregister removes the artifact")
    finally:
        if lease and lease.poll() is None:
            lease.kill()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=10)
    check(code == 0 and not os.path.exists(sock), "tensorregd stops cleanly on SIGTERM")
    return 0


if __name__ == "__main__":
    main()
