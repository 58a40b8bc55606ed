#!/usr/bin/env python3
"""Runs an example against a fresh tensorregd (standard library only).

Usage: with_daemon.py TENSORREGD EXAMPLE [ARGS...]
Starts TENSORREGD on a socket in a temporary directory, waits for its "ready" line, runs
EXAMPLE SOCKET ARGS..., stops the daemon and exits with the example's status.
"""
import os
import subprocess
import sys
import tempfile
import threading


def main(daemon, example, args):
    with tempfile.TemporaryDirectory() as tmp:
        socket = os.path.join(tmp, "run", "tensorregd.sock")
        proc = subprocess.Popen([daemon, "--socket", socket], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            seen = []
            for line in proc.stdout:  # it may log before it is ready
                seen.append(line)
                if "ready" in line:
                    break
            else:
                sys.stderr.write("with_daemon: tensorregd did not start:\n" + "".join(seen))
                return 1
            # Keep reading what the daemon logs, so that a full pipe never blocks it.
            threading.Thread(target=proc.stdout.read, daemon=True).start()
            return subprocess.call([example, socket] + args)
        finally:
            proc.terminate()
            proc.wait(timeout=30)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.stderr.write(__doc__)
        sys.exit(2)
    sys.exit(main(sys.argv[1], sys.argv[2], sys.argv[3:]))
