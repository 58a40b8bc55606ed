"""Shared by the Python client's tests (tests/python/test_*.py).

Each test file runs as `/usr/bin/python3 tests/python/test_X.py [--daemon PATH] [--cli PATH]`
(ctest passes the built tensorregd and tensorreg). It exits 77, which ctest counts as skipped,
when torch or google.protobuf cannot be imported. The package is taken from the repository's
python/ directory unless TENSORREG_TEST_INSTALLED=1 (then from wherever it is installed).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import unittest

SKIP = 77
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))

if os.environ.get("TENSORREG_TEST_INSTALLED") != "1":
    sys.path.insert(0, os.path.join(REPO, "python"))

try:
    import google.protobuf  # noqa: F401
    import torch  # noqa: F401
except ImportError as e:
    print(f"skipped: {e} (install python3-torch and python3-protobuf, or run with /usr/bin/python3)")
    sys.exit(SKIP)

PATHS = {"daemon": os.environ.get("TENSORREGD"), "cli": os.environ.get("TENSORREG_CLI")}


def main() -> None:
    """Takes --daemon/--cli off argv, then runs unittest."""
    argv = [sys.argv[0]]
    args = sys.argv[1:]
    while args:
        a = args.pop(0)
        if a in ("--daemon", "--cli") and args:
            PATHS[a[2:]] = args.pop(0)
        else:
            argv.append(a)
    unittest.main(argv=argv, verbosity=2)


class Daemon:
    """A tensorregd on a fresh socket in a temp dir; stop() ends it."""

    def __init__(self, *extra: str) -> None:
        path = PATHS["daemon"]
        if not path:
            raise unittest.SkipTest("no tensorregd given (--daemon PATH or TENSORREGD)")
        self.dir = tempfile.mkdtemp(prefix="tensorreg-py-")
        self.socket = os.path.join(self.dir, "d.sock")
        self.proc = subprocess.Popen([path, "--socket", self.socket, "--log-level", "warn", "--workers", "2", *extra],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        # "ready" is printed only once the socket is bound; notes may come first (a CUDA build
        # on a machine without a GPU says it runs without GPU memory).
        seen = []
        while True:
            line = self.proc.stdout.readline()
            seen.append(line)
            if "ready" in line:
                break
            if not line:
                self.stop()
                raise RuntimeError(f"tensorregd did not start: {''.join(seen)!r}")
        # Keep reading what it logs, so that a full pipe never blocks the daemon.
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class StoreTestCase(unittest.TestCase):
    """Tests that share one daemon, and one tensorreg.Store on it, for the whole class."""

    @classmethod
    def setUpClass(cls):
        import tensorreg  # importable once main() has put the repository's package first

        cls.daemon = Daemon()
        cls.store = tensorreg.Store(cls.daemon.socket)

    @classmethod
    def tearDownClass(cls):
        cls.store.close()
        cls.daemon.stop()


def wait_for(predicate, timeout: float = 10.0, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()
