#!/usr/bin/env python3
"""Independent reference for the data tree hash (registration.md §3.3, DECISIONS §5.1).

Writes files of several sizes into a temporary directory, computes the tree-hash multihash of
each with nothing but hashlib and base64, and compares with what the C++ tool prints
(`tree_hash_file [--threads N] FILE`) for 1 and 4 threads.

Rules: leaves are SHA-256 of consecutive 4 MiB chunks (the last may be short); parent =
SHA-256(left || right); an odd last node is promoted unchanged; one leaf is the root; zero
leaves give 32 zero bytes (the tool and this script agree on that sentinel). The root is
printed as a multihash: bytes 0x12 0x20 + digest, multibase 'b' = base32 lower case, no
padding.

Usage: tree_hash_reference.py PATH_TO_tree_hash_file
Exit status 0 when every case agrees.
"""
import base64
import hashlib
import os
import subprocess
import sys
import tempfile

LEAF = 4 << 20
MIB = 1 << 20


def multihash(digest: bytes) -> str:
    assert len(digest) == 32
    return "b" + base64.b32encode(b"\x12\x20" + digest).decode("ascii").lower().rstrip("=")


def tree_root(leaves):
    if not leaves:
        return bytes(32)
    level = list(leaves)
    while len(level) > 1:
        nxt = [hashlib.sha256(level[i] + level[i + 1]).digest() for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]


def leaf_digests(data: bytes):
    return [hashlib.sha256(data[i:i + LEAF]).digest() for i in range(0, len(data), LEAF)]


def write_random(path: str, size: int) -> str:
    """Writes `size` random bytes; returns the expected multihash, computed from memory."""
    data = os.urandom(size)
    with open(path, "wb") as f:
        f.write(data)
    return multihash(tree_root(leaf_digests(data)))


def write_sparse_pattern(path: str, size: int) -> str:
    """Cheap for ~4 GB: a sparse file (holes read as zeros, no disk used) with one random
    64 KiB block written into every 7th leaf at a shifting offset, some straddling a leaf
    boundary, so leaves differ and the tree is not one of identical nodes. Returns the
    expected multihash, computed from the layout (each distinct leaf hashed once) rather than
    by reading 4 GB back."""
    block = os.urandom(64 << 10)
    patches = []
    with open(path, "wb") as f:
        f.truncate(size)
        for leaf in range(0, size // LEAF, 7):
            offset = leaf * LEAF + (leaf * 104729) % LEAF
            piece = block[:min(len(block), size - offset)]
            f.seek(offset)
            f.write(piece)
            patches.append((offset, piece))
    zero_leaf = hashlib.sha256(bytes(LEAF)).digest()
    leaves = []
    for start in range(0, size, LEAF):
        end = min(start + LEAF, size)
        touching = [(o, p) for o, p in patches if o < end and o + len(p) > start]
        if not touching and end - start == LEAF:
            leaves.append(zero_leaf)
            continue
        leaf = bytearray(end - start)
        for o, p in touching:
            lo, hi = max(o, start), min(o + len(p), end)
            leaf[lo - start:hi - start] = p[lo - o:hi - o]
        leaves.append(hashlib.sha256(leaf).digest())
    assert len(leaves) == (size + LEAF - 1) // LEAF
    return multihash(tree_root(leaves))


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    tool = sys.argv[1]

    # Self-check of the encoder against registration.md §3.4: data 0x00..0x1f, one leaf.
    expected = "bciqggdonfftmim3gsejfisf3wjnu75asusohglnszcv4docydplrbxi"
    got = multihash(tree_root([hashlib.sha256(bytes(range(32))).digest()]))
    if got != expected:
        print(f"reference self-check failed: {got} != {expected}", file=sys.stderr)
        return 1

    cases = [
        ("empty", 0, write_random),
        ("one_byte", 1, write_random),
        ("leaf_minus_1", LEAF - 1, write_random),
        ("leaf", LEAF, write_random),
        ("leaf_plus_1", LEAF + 1, write_random),
        ("three_leaves", 2 * LEAF + 5, write_random),
        ("12MiB_plus_5", 12 * MIB + 5, write_random),
        ("thousand_leaves", 1000 * LEAF - 12345, write_sparse_pattern),  # 1000 leaves, last short
    ]
    failures = 0
    with tempfile.TemporaryDirectory(prefix="tensorreg-tree-hash-") as tmp:
        for name, size, writer in cases:
            path = os.path.join(tmp, name)
            want = writer(path, size)
            if size == 0 and want != multihash(bytes(32)):
                print("reference: size 0 must give the zero root", file=sys.stderr)
                failures += 1
            for threads in (1, 4):
                run = subprocess.run([tool, "--threads", str(threads), path],
                                     capture_output=True, text=True)
                got = run.stdout.strip()
                ok = run.returncode == 0 and got == want
                print(f"{'ok  ' if ok else 'FAIL'} {name:16} size={size:<11} threads={threads} {want}")
                if not ok:
                    print(f"     tool rc={run.returncode} stdout={got!r} stderr={run.stderr.strip()!r}",
                          file=sys.stderr)
                    failures += 1
            os.remove(path)
    if failures:
        print(f"{failures} mismatches", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
