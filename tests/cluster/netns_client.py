#!/usr/bin/env python3
"""The netns harness's client (tests/cluster/netns_cluster.sh); Debian's python3, stdlib and
the repository's python/ package only.

  netns_client.py make FILE SIZE SEED   write a safetensors file of one U8 tensor of SIZE bytes
  netns_client.py digest SOCKET ID      get ID (GetArtifactMemfd: a daemon of a cluster pulls an
                                        id it does not hold) and print "<size> <sha256>"; on a
                                        refusal print "ERROR <code name>: <message>", exit 1
"""
import hashlib
import json
import os
import random
import struct
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "python"))


def make(path, size, seed):
    header = json.dumps({"w": {"dtype": "U8", "shape": [size], "data_offsets": [0, size]}}).encode()
    header += b" " * (-len(header) % 8)
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        left = size
        while left > 0:  # randbytes takes at most 2^31 bits at once
            n = min(left, 16 << 20)
            f.write(rng.randbytes(n))
            left -= n


def digest(socket_path, artifact_id):
    from tensorreg import _requests
    from tensorreg._wire import Connection, _close_fds
    from tensorreg.errors import Error

    try:
        answer, fds = Connection(socket_path, timeout=120).call(_requests.get_artifact_memfd(artifact_id))
    except Error as e:
        print(f"ERROR {type(e).__name__}: {e}")
        return 1
    try:
        size = answer.get_artifact_memfd.size_bytes
        h = hashlib.sha256()
        done = 0
        while done < size:
            chunk = os.pread(fds[0], min(8 << 20, size - done), done)
            if not chunk:
                break
            h.update(chunk)
            done += len(chunk)
        print(f"{done} {h.hexdigest()}")
    finally:
        _close_fds(fds)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "make":
        make(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
        sys.exit(0)
    if len(sys.argv) == 4 and sys.argv[1] == "digest":
        sys.exit(digest(sys.argv[2], sys.argv[3]))
    print(__doc__, file=sys.stderr)
    sys.exit(2)
