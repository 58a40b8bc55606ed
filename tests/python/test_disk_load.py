"""Disk → memory straight from the persisted file (issue #16; docs/wire-format.md §17): the
OpenPersistedArtifact answer and its refusals, the loader's CPU path (chunks, threads, a file cut
short under it, a flipped byte), the fingerprints' byte order against the MANIFEST, and on a
machine with CUDA a get(device="cuda") after a restart that loads nothing into the daemon."""

import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _support  # noqa: E402  (exits 77 without torch / protobuf)

# isort: split
import fcntl  # noqa: E402
import unittest  # noqa: E402

import torch  # noqa: E402

import tensorreg  # noqa: E402
from tensorreg import _disk_load, _layout, _requests  # noqa: E402
from tensorreg.errors import DataLoss, FailedPrecondition, NotFound  # noqa: E402

LEAF = 4 << 20


def state_dict(seed: int, leaves: float = 5.25) -> dict:
    """Some 4 MiB leaves of random floats, a tied pair and an odd-sized tail."""
    g = torch.Generator().manual_seed(seed)
    n = int(leaves * LEAF) // 4
    w = torch.randn(n - 1000, generator=g)
    return {"big": w, "tied": w, "small": torch.randn(997, generator=g), "half": torch.randn(3, generator=g).half()}


def canonical_bytes(sd) -> bytes:
    layout = _layout.build(_layout.state_dict_descs(torch, sd, "x")[0])
    out = bytearray(layout.total_size)
    for s in layout.storages:
        if s.nbytes:
            out[s.offset:s.offset + s.nbytes] = _layout.storage_bytes(torch, s.source).numpy().tobytes()
    return bytes(out)


def persisted(store, artifact_id: str) -> bool:
    return any(a["artifact_id"] == artifact_id and "shared_disk" in a["tiers"] for a in store.list())


def data_file(persist: str, artifact_id: str) -> str:
    name = "".join(c if c.isalnum() or c in "-.~" else f"%{ord(c):02X}" for c in artifact_id)
    return os.path.join(persist, name, "data.bin")


class DiskLoadTest(unittest.TestCase):
    """One artifact put with policy durable; each case starts a daemon on its own copy of that
    persist directory (a restart: the artifact is on disk only), so damage stays in its case."""

    @classmethod
    def setUpClass(cls):
        if _disk_load.xxh3_function() is None:
            raise unittest.SkipTest("libxxhash.so.0 cannot be loaded")
        cls.dir = tempfile.mkdtemp(prefix="tensorreg-d2g-")
        cls.pristine = os.path.join(cls.dir, "pristine")
        cls.sd = state_dict(1)
        cls.bytes = canonical_bytes(cls.sd)
        d = _support.Daemon("--persist-dir", cls.pristine)
        try:
            with tensorreg.Store(d.socket) as store:
                cls.id = store.put(cls.sd, policy="durable").artifact_id
                if not _support.wait_for(lambda: persisted(store, cls.id), timeout=60):
                    raise RuntimeError(f"{cls.id} was not persisted")
        finally:
            d.stop()

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.dir, ignore_errors=True)

    def setUp(self):
        self.persist = os.path.join(self.dir, self._testMethodName)
        shutil.copytree(self.pristine, self.persist)  # modes too: the daemon wants its root 0700
        self.daemon = _support.Daemon("--persist-dir", self.persist)
        self.store = tensorreg.Store(self.daemon.socket)

    def tearDown(self):
        self.store.close()
        self.daemon.stop()
        shutil.rmtree(self.persist, ignore_errors=True)

    def open(self, artifact_id=None, unless_in_memory=True):
        answer, fds = self.store._conn.call(
            _requests.open_persisted_artifact(artifact_id or self.id, unless_in_memory=unless_in_memory))
        return answer.open_persisted_artifact, fds

    def stable_bytes(self) -> int:
        return self.store.stats()["tiers"].get("stable_dram", {}).get("bytes", 0)

    def test_the_answer_carries_a_read_only_fd_the_index_and_one_fingerprint_a_leaf(self):
        body, fds = self.open()
        self.assertEqual(len(fds), 1)
        fd = fds[0]
        try:
            size = len(self.bytes)
            self.assertEqual(body.size_bytes, size)
            self.assertEqual(body.artifact_descriptor.artifact_id, self.id)
            self.assertEqual(body.artifact_descriptor.total_size, size)
            self.assertEqual(body.leaf_bytes, LEAF)
            leaves = (size + LEAF - 1) // LEAF
            self.assertEqual(leaves, 6)
            self.assertEqual(len(body.leaf_xxh3), 16 * leaves)
            _, index = self.store.index(self.id)
            self.assertEqual(json.loads(body.tensor_index_data), index)
            self.assertEqual(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE, os.O_RDONLY)
            self.assertEqual(os.fstat(fd).st_size, size)
            self.assertEqual(os.pread(fd, size, 0), self.bytes)
            with self.assertRaises(OSError):
                os.pwrite(fd, b"x", 0)
            # Opening the file loads nothing into the daemon's memory.
            self.assertEqual(self.stable_bytes(), 0)
        finally:
            os.close(fd)

    def test_the_fingerprints_are_xxh3_128_in_the_manifests_byte_order(self):
        body, fds = self.open()
        os.close(fds[0])
        with open(os.path.join(os.path.dirname(data_file(self.persist, self.id)), "MANIFEST")) as f:
            manifest = json.load(f)
        self.assertEqual(b"".join(bytes.fromhex(sha_and_xxh3[1]) for sha_and_xxh3 in manifest["leaves"]),
                         body.leaf_xxh3)
        for i in range(len(manifest["leaves"])):
            leaf = self.bytes[i * LEAF:(i + 1) * LEAF]
            self.assertEqual(_disk_load.xxh3_canonical(leaf), body.leaf_xxh3[16 * i:16 * (i + 1)], f"leaf {i}")
        # XXH3-128 of nothing (seed 0), as xxhsum -H2 prints it.
        self.assertEqual(_disk_load.xxh3_canonical(b"").hex(), "99aa06d3014798d86001c324468d497f")

    def test_the_loader_reads_every_chunk_on_any_number_of_threads(self):
        body, fds = self.open()
        fd = fds[0]
        try:
            size = body.size_bytes
            fps = _disk_load.fingerprints_of(body.leaf_xxh3, (size + LEAF - 1) // LEAF, "test")
            for threads, chunk_leaves in ((1, 1), (3, 1), (4, 2), (8, 4), (2, 64)):
                dst = torch.full((size,), 0xAB, dtype=torch.uint8)
                _disk_load.load_into(torch, fd, size, LEAF, fps, dst, "test", threads=threads,
                                     chunk_leaves=chunk_leaves)
                self.assertEqual(dst.numpy().tobytes(), self.bytes, f"threads {threads}, chunk_leaves {chunk_leaves}")
        finally:
            os.close(fd)

    def test_get_tensors_on_cpu_takes_the_direct_path_and_keeps_tied_names_tied(self):
        got = _disk_load.get_tensors(self.store._conn, self.id, torch.device("cpu"), torch, threads=3)
        self.assertIsNotNone(got)
        self.assertEqual(_disk_load.last_path, "direct")
        self.assertEqual(sorted(got), sorted(self.sd))
        for name, t in self.sd.items():
            self.assertTrue(torch.equal(got[name], t), name)
        self.assertEqual(got["big"].data_ptr(), got["tied"].data_ptr())
        self.assertEqual(self.stable_bytes(), 0)  # the daemon restored nothing

    def test_a_flipped_byte_in_the_persisted_file_is_data_loss_naming_the_leaf(self):
        body, fds = self.open()
        fd = fds[0]
        path = data_file(self.persist, self.id)
        try:
            at = 3 * LEAF + 12345
            with open(path, "r+b") as f:
                f.seek(at)
                saved = f.read(1)
                f.seek(at)
                f.write(bytes([saved[0] ^ 0x01]))
            size = body.size_bytes
            fps = _disk_load.fingerprints_of(body.leaf_xxh3, (size + LEAF - 1) // LEAF, "test")
            with self.assertRaises(DataLoss) as caught:
                _disk_load.load_into(torch, fd, size, LEAF, fps, torch.empty(size, dtype=torch.uint8),
                                     f"get {self.id}", threads=4, chunk_leaves=1)
            self.assertEqual(caught.exception.message,
                             f"cannot get {self.id}: leaf 3 (bytes {3 * LEAF}..{4 * LEAF}) of the persisted copy does "
                             f"not match its XXH3-128")
        finally:
            os.close(fd)
        # The whole path: the daemon's background check may have quarantined the copy by now,
        # else the loader finds the leaf; either way DataLoss naming it.
        with self.assertRaises(DataLoss) as caught:
            _disk_load.get_tensors(self.store._conn, self.id, torch.device("cpu"), torch)
        self.assertIn(f"leaf 3 (bytes {3 * LEAF}..", caught.exception.message)

    def test_a_file_cut_short_under_the_loader_is_data_loss_not_a_hang(self):
        body, fds = self.open()
        fd = fds[0]
        path = data_file(self.persist, self.id)
        size = body.size_bytes
        try:
            os.truncate(path, 2 * LEAF + 100)
            fps = _disk_load.fingerprints_of(body.leaf_xxh3, (size + LEAF - 1) // LEAF, "test")
            started = time.monotonic()
            with self.assertRaises(DataLoss) as caught:
                _disk_load.load_into(torch, fd, size, LEAF, fps, torch.empty(size, dtype=torch.uint8), "get x",
                                     threads=2, chunk_leaves=1)
            self.assertLess(time.monotonic() - started, 30)
            self.assertEqual(caught.exception.message,
                             f"cannot get x: the persisted file ends at byte {2 * LEAF + 100}, before its {size} bytes")
        finally:
            os.close(fd)

    def test_refusals_name_the_artifact_and_say_why(self):
        with self.assertRaises(NotFound) as caught:
            self.open("mi2:unknown")
        self.assertEqual(caught.exception.message, "cannot open the persisted copy of mi2:unknown: not held here")
        # Held in the daemon's memory only: not on the disk.
        other = self.store.put(state_dict(2, leaves=0.5), policy="cache").artifact_id
        with self.assertRaises(FailedPrecondition) as caught:
            self.open(other, unless_in_memory=False)
        self.assertEqual(caught.exception.message,
                         f"cannot open the persisted copy of {other}: it is not on the shared disk (held in memory "
                         f"only: read it with GetArtifactMemfd or OpenArtifactDevice)")
        # On the disk and, once a CPU get restored it, in memory too: refused only when asked.
        self.store.get(self.id)
        with self.assertRaises(FailedPrecondition) as caught:
            self.open()
        self.assertEqual(caught.exception.message,
                         f"cannot open the persisted copy of {self.id}: it has a stable DRAM replica (read it with "
                         f"GetArtifactMemfd)")
        body, fds = self.open(unless_in_memory=False)
        os.close(fds[0])
        self.assertEqual(body.size_bytes, len(self.bytes))
        # A CUDA get would go through the daemon's replica then.
        self.assertIsNone(_disk_load.get_tensors(self.store._conn, self.id, torch.device("cpu"), torch))
        self.assertTrue(_disk_load.last_path.startswith("fallback: cannot open the persisted copy"))

    def test_a_data_file_of_the_wrong_size_is_data_loss_and_quarantined(self):
        path = data_file(self.persist, self.id)
        os.truncate(path, LEAF)  # under the running daemon, which checked the size at its start
        reason = f"bad data '{path}': {LEAF} bytes, the manifest says {len(self.bytes)}"
        with self.assertRaises(DataLoss) as caught:
            self.open()
        first = caught.exception.message
        with self.assertRaises(DataLoss) as caught:
            self.open()
        # Found by the first call, unless the daemon's start-up check of every leaf got there
        # first (then with the reason that check gave).
        if first == f"cannot open {self.id} in the persist directory: {reason}":
            self.assertEqual(caught.exception.message,
                             f"cannot open {self.id} in the persist directory: it was quarantined: {reason}")
        else:
            self.assertTrue(first.startswith(f"cannot open {self.id} in the persist directory: it was quarantined: "),
                            first)
            self.assertEqual(caught.exception.message, first)
        self.assertEqual(len(os.listdir(os.path.join(self.persist, "quarantine"))), 1)

    def test_without_libxxhash_the_direct_path_is_not_taken(self):
        saved = _disk_load._xxh3
        _disk_load._xxh3, _disk_load._xxh3_error = False, "test: no libxxhash"
        try:
            self.assertIsNone(_disk_load.get_tensors(self.store._conn, self.id, torch.device("cpu"), torch))
            self.assertEqual(_disk_load.last_path, "fallback: libxxhash cannot be loaded: test: no libxxhash")
        finally:
            _disk_load._xxh3 = saved

    @unittest.skipUnless(torch.cuda.is_available(), "no CUDA device")
    def test_cuda_get_after_a_restart_reads_the_file_straight_to_the_gpu(self):
        got = self.store.get(self.id, device="cuda")
        self.assertEqual(_disk_load.last_path, "direct")
        self.assertEqual(sorted(got), sorted(self.sd))
        for name, t in self.sd.items():
            self.assertEqual(got[name].device.type, "cuda")
            self.assertTrue(torch.equal(got[name].cpu(), t), name)
        self.assertEqual(got["big"].data_ptr(), got["tied"].data_ptr())
        self.assertEqual(self.stable_bytes(), 0)  # the daemon restored nothing
        # Once restored for a CPU get, the daemon's replica is read instead.
        self.store.get(self.id)
        again = self.store.get(self.id, device="cuda", load_threads=2)
        self.assertTrue(_disk_load.last_path.startswith("fallback: "))
        self.assertTrue(torch.equal(again["small"].cpu(), self.sd["small"]))


if __name__ == "__main__":
    _support.main()
