"""The Python client against a real tensorregd on a temp socket: put/get round trips, idempotent
puts, register (lease-in-place) with keepalive and revoke, errors, and ids that match the C++
`tensorreg digest` / `tensorreg index`."""

import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _support  # noqa: E402  (exits 77 without torch / protobuf)

# isort: split
import unittest  # noqa: E402
import unittest.mock  # noqa: E402

import torch  # noqa: E402

import tensorreg  # noqa: E402
from tensorreg import _buffers, _hash, _layout, _requests  # noqa: E402


def sample_state_dict(seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(6, 5, generator=g)
    base = torch.arange(40, dtype=torch.int64)
    return {
        "f32": torch.randn(3, 4, generator=g),
        "bf16": torch.randn(7, generator=g).to(torch.bfloat16),
        "f16": torch.randn(2, 3, generator=g).to(torch.float16),
        "f64": torch.randn(3, generator=g).to(torch.float64),
        "i64": torch.randint(-2**40, 2**40, (5,), generator=g),
        "i32": torch.randint(-2**20, 2**20, (3, 3), generator=g, dtype=torch.int32),
        "i8": torch.randint(-128, 127, (9,), generator=g, dtype=torch.int8),
        "u8": torch.randint(0, 255, (11,), generator=g, dtype=torch.uint8),
        "mask": torch.rand(13, generator=g) > 0.5,
        "embed.weight": w,
        "lm_head.weight": w,                # tied: one storage, two names
        "slice": base[10:30].view(4, 5),    # storage_offset 10 of a 320-byte storage
        "transposed": w.t(),                # non-contiguous view of the tied storage
        "strided": base[::3],               # stride 3
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
    }


def canonical_bytes(layout):
    out = bytearray(layout.total_size)
    for s in layout.storages:
        if s.nbytes:
            out[s.offset:s.offset + s.nbytes] = _layout.storage_bytes(torch, s.source).numpy().tobytes()
    return bytes(out)


class StoreTest(_support.StoreTestCase):
    def assert_same_tensors(self, got, expected):
        self.assertEqual(list(got), sorted(expected))
        for name, t in expected.items():
            g = got[name]
            self.assertEqual(g.dtype, t.dtype, name)
            self.assertEqual(tuple(g.shape), tuple(t.shape), name)
            self.assertEqual(g.stride(), t.stride(), name)
            self.assertTrue(torch.equal(g, t), name)

    # ---- put / get ----

    def test_put_then_get_gives_the_same_tensors_as_zero_copy_views(self):
        sd = sample_state_dict(1)
        art = self.store.put(sd)
        self.assertTrue(art.artifact_id.startswith("mi2:"))
        self.assertFalse(art.existed)
        self.assertEqual(art.registration_kind, "stable_dram")
        self.assertEqual(art.total_size, _layout.build(_layout.state_dict_descs(torch, sd, "x")[0]).total_size)
        self.assertEqual(art.local_stable_tier.status, "skipped")
        got = self.store.get(art.artifact_id)
        self.assert_same_tensors(got, sd)
        # Tied names come back over the same bytes; the slice keeps its offset in the storage.
        self.assertEqual(got["embed.weight"].data_ptr(), got["lm_head.weight"].data_ptr())
        self.assertEqual(got["transposed"].data_ptr(), got["embed.weight"].data_ptr())
        self.assertEqual(got["slice"].data_ptr() - got["strided"].data_ptr(), 10 * 8)

    def test_a_put_on_many_cores_writes_through_a_mapping_the_daemon_can_still_keep(self):
        sd = {"big": torch.randn(3 << 20), "odd": torch.arange(1001, dtype=torch.int16),
              "strided": torch.arange(64, dtype=torch.float64).reshape(8, 8).t()}
        copied = self.bytes_copied()
        # More threads than _PWRITE_UP_TO_THREADS: the mapped copy, whatever this machine has.
        threads = _buffers._PWRITE_UP_TO_THREADS + 4
        with unittest.mock.patch.object(_buffers.os, "cpu_count", return_value=threads):
            art = self.store.put(sd)
        self.assertFalse(art.existed)
        self.assert_same_tensors(self.store.get(art.artifact_id), sd)
        # Kept as written: no writable mapping was left for the daemon to copy around.
        self.assertEqual(self.bytes_copied(), copied)
        # The same tensors put with pwrite() give the same id (and join it).
        with unittest.mock.patch.object(_buffers.os, "cpu_count", return_value=1):
            again = self.store.put({k: v.clone() for k, v in sd.items()})
        self.assertEqual(again.artifact_id, art.artifact_id)
        self.assertTrue(again.existed)

    def bytes_copied(self) -> int:
        answer, _ = self.store._conn.call(_requests.stats())
        return answer.get_stats.bytes_copied

    def test_writes_to_gotten_tensors_stay_in_this_process(self):
        sd = {"w": torch.arange(16, dtype=torch.float32)}
        art = self.store.put(sd)
        first = self.store.get(art.artifact_id)
        first["w"].fill_(-1)
        again = self.store.get(art.artifact_id)
        self.assertTrue(torch.equal(again["w"], sd["w"]))

    def test_a_second_put_of_the_same_tensors_exists_already(self):
        sd = sample_state_dict(2)
        first = self.store.put(sd)
        second = self.store.put({k: v.clone() if k == "f32" else v for k, v in sd.items()})
        self.assertEqual(second.artifact_id, first.artifact_id)
        self.assertTrue(second.existed)

    def test_get_of_an_unknown_artifact_is_not_found(self):
        with self.assertRaises(tensorreg.NotFound) as ctx:
            self.store.get("mi2:unknown")
        self.assertEqual(ctx.exception.message, "cannot open the stable replica of mi2:unknown: not held here")

    @unittest.skipIf(torch.cuda.is_available(), "a CUDA device is present")
    def test_get_on_cuda_without_a_gpu_is_a_failed_precondition_before_any_call(self):
        with self.assertRaises(tensorreg.FailedPrecondition) as ctx:
            self.store.get("mi2:unknown", device="cuda")  # not NOT_FOUND: the daemon is not asked
        self.assertIn("cannot get mi2:unknown on cuda: torch", ctx.exception.message)
        self.assertIn("sees no CUDA device", ctx.exception.message)

    def test_open_without_a_gpu_or_on_cpu_is_refused_before_any_call(self):
        with self.assertRaises(tensorreg.InvalidArgument) as ctx:
            self.store.open("mi2:unknown", device="cpu")
        self.assertIn("cannot open mi2:unknown on cpu: open() maps GPU memory; use get() for cpu",
                      ctx.exception.message)
        if tensorreg._cuda._driver is not None or torch.cuda.is_available():
            self.skipTest("a CUDA driver is present")
        old = os.environ.get("TENSORREG_LIBCUDA")
        os.environ["TENSORREG_LIBCUDA"] = "/nonexistent/libcuda.so.1"
        try:
            with self.assertRaises(tensorreg.FailedPrecondition) as ctx:
                self.store.open("mi2:unknown")
        finally:
            if old is None:
                os.environ.pop("TENSORREG_LIBCUDA")
            else:
                os.environ["TENSORREG_LIBCUDA"] = old
        self.assertIn("cannot use CUDA: cannot load the NVIDIA driver library", ctx.exception.message)

    def test_a_device_torch_cannot_parse_is_invalid_for_get_and_open(self):
        for call, verb in ((self.store.get, "get"), (self.store.open, "open")):
            with self.assertRaises(tensorreg.InvalidArgument) as ctx:
                call("mi2:unknown", device="not-a-device")
            self.assertIn(f"cannot {verb} mi2:unknown: bad device 'not-a-device'", ctx.exception.message)

    def test_open_artifact_device_of_an_unknown_artifact_is_answered_by_the_daemon(self):
        request = tensorreg._messages.Request()
        request.open_artifact_device.artifact_id = "mi2:unknown"
        with self.assertRaises(tensorreg.Error) as ctx:
            self.store._conn.call(request)
        # NOT_FOUND from a daemon with the RPC; UNIMPLEMENTED from one that predates it.
        self.assertIn(ctx.exception.code, (5, 12))
        if ctx.exception.code == 5:
            self.assertIn("mi2:unknown", ctx.exception.message)

    def test_publish_without_cluster_is_failed_precondition_and_arguments_are_checked(self):
        art = self.store.put({"p": torch.arange(3, dtype=torch.int16)})
        with self.assertRaises(tensorreg.FailedPrecondition) as ctx:
            self.store.publish(art.artifact_id, replicas=2, timeout=1.0)
        self.assertEqual(ctx.exception.message,
                         f"cannot publish {art.artifact_id}: the daemon runs without --cluster")
        for kwargs in ({}, {"replicas": 2, "all": True}, {"replicas": 0}, {"replicas": True},
                       {"replicas": 2, "timeout": 0}):
            with self.assertRaises(tensorreg.InvalidArgument, msg=repr(kwargs)) as ctx:
                self.store.publish(art.artifact_id, **kwargs)
            self.assertIn(f"cannot publish {art.artifact_id}: ", ctx.exception.message)

    def test_remote_replicas_without_cluster_are_degraded_and_must_is_refused(self):
        # docs/cluster.md §5: a policy asking for copies on other hosts, on a daemon without --cluster.
        art = self.store.put({"r": torch.arange(5, dtype=torch.int16)}, policy="should:stable_dram:remote:2")
        self.assertIsNotNone(art.remote_stable_tier)
        self.assertEqual(art.remote_stable_tier.status, "degraded")
        self.assertEqual(art.remote_stable_tier.message,
                         "the policy asks for 3 hosts and the daemon runs without --cluster")
        plain = self.store.put({"r": torch.arange(6, dtype=torch.int16)})
        self.assertIsNone(plain.remote_stable_tier)
        with self.assertRaises(tensorreg.FailedPrecondition) as ctx:
            self.store.put({"r": torch.arange(7, dtype=torch.int16)}, policy="must:stable_dram:remote:1")
        self.assertIn("runs without --cluster", ctx.exception.message)
        for bad in ("should:stable_dram:remote:x", "often:stable_dram", "should:vram:any"):
            with self.assertRaises(tensorreg.InvalidArgument, msg=bad) as ctx:
                self.store.put({"r": torch.arange(3, dtype=torch.int16)}, policy=bad)
            self.assertIn("cannot parse policy", ctx.exception.message)
        # A commit's own wait for the copies on other hosts: carried on the wire, checked here.
        waited = self.store.put({"r": torch.arange(8, dtype=torch.int16)}, policy="should:stable_dram:remote:2",
                                replica_timeout=0.25)
        self.assertEqual(waited.remote_stable_tier.status, "degraded")
        request = tensorreg._requests.commit("reg-1", replica_timeout_ms=250)
        self.assertEqual(request.commit_registered_artifact.replica_timeout_ms, 250)
        self.assertFalse(tensorreg._requests.commit("reg-1").commit_registered_artifact.replica_timeout_ms)
        for bad in (0, -1, True, "1"):
            with self.assertRaises(tensorreg.InvalidArgument, msg=repr(bad)) as ctx:
                self.store.put({"r": torch.arange(3, dtype=torch.int16)}, replica_timeout=bad)
            self.assertIn("cannot put state dict: replica_timeout", ctx.exception.message)

    # ---- pipelining ----

    def test_pipelined_requests_get_their_own_answers_and_fds(self):
        small = self.store.put({"p": torch.arange(3, dtype=torch.int16)})
        large = self.store.put({"q": torch.arange(5000, dtype=torch.float64)})
        calls = []
        for artifact_id in (small.artifact_id, "mi2:unknown", large.artifact_id, small.artifact_id):
            request = tensorreg._messages.Request()
            request.get_artifact_memfd.artifact_id = artifact_id
            calls.append((request, ()))
        stats = tensorreg._messages.Request()
        stats.get_stats.SetInParent()
        calls.append((stats, ()))
        answers = self.store._conn.call_many(calls)
        self.assertIsInstance(answers[1], tensorreg.NotFound)
        self.assertIn("mi2:unknown", answers[1].message)
        for k, art in ((0, small), (2, large), (3, small)):
            response, fds = answers[k]
            try:
                self.assertEqual(response.get_artifact_memfd.artifact_descriptor.artifact_id, art.artifact_id)
                self.assertEqual(len(fds), 1)
                self.assertEqual(os.fstat(fds[0]).st_size >= art.total_size, True)
                with open(f"/proc/self/fd/{fds[0]}", "rb") as f:
                    head = f.read(art.total_size)
                self.assertEqual(head, canonical_bytes(_layout.build(_layout.state_dict_descs(
                    torch, {"p": torch.arange(3, dtype=torch.int16)} if art is small else
                    {"q": torch.arange(5000, dtype=torch.float64)}, "x")[0])))
            finally:
                for fd in fds:
                    os.close(fd)
        self.assertEqual(answers[4][1], [])
        self.assertGreaterEqual(answers[4][0].get_stats.artifacts, 2)
        # The connection is still in step: a plain call after the batch gets its own answer.
        self.assertIn(small.artifact_id, self.artifact_ids())

    def test_work_done_meanwhile_overlaps_the_daemon_and_may_send_more_requests(self):
        art = self.store.put({"m": torch.arange(7, dtype=torch.int32)})
        first = tensorreg._messages.Request()
        first.get_stats.SetInParent()
        ran = []

        def meanwhile():
            # Runs after the first batch is sent and before any answer is read.
            ran.append(self.store._conn._next_id)
            later = tensorreg._messages.Request()
            later.get_artifact_index_by_id.artifact_id = art.artifact_id
            unknown = tensorreg._messages.Request()
            unknown.get_artifact_index_by_id.artifact_id = "mi2:unknown"
            return [(later, ()), (unknown, ())]

        answers = self.store._conn.call_many([(first, ())], meanwhile=meanwhile)
        self.assertEqual(len(ran), 1)
        self.assertEqual(len(answers), 3)
        self.assertGreaterEqual(answers[0][0].get_stats.artifacts, 1)
        self.assertEqual(answers[1][0].get_artifact_index_by_id.artifact_descriptor.artifact_id, art.artifact_id)
        self.assertIsInstance(answers[2], tensorreg.NotFound)
        self.assertIn(art.artifact_id, self.artifact_ids())  # still in step

    # ---- register ----

    def test_register_gives_the_put_id_and_close_revokes_the_lease(self):
        sd = sample_state_dict(3)
        art = self.store.register(sd, ttl_ms=2000)
        self.assertEqual(art.registration_kind, "lease_in_place")
        self.assertIsNotNone(art.lease)
        self.assertEqual(art.artifact_id, self.store.put(sd).artifact_id)
        self.assertTrue(_support.wait_for(lambda: art.lease.keepalives_sent >= 1, timeout=5))
        self.assertIn("leased", self.tiers_of(art.artifact_id))
        art.close()
        self.assertTrue(art.lease.closed)
        self.assertNotIn("leased", self.tiers_of(art.artifact_id))
        art.close()  # idempotent

    def test_the_leases_of_a_connection_share_one_keepalive_thread(self):
        arts = [self.store.register(sample_state_dict(40 + k), ttl_ms=2000) for k in range(3)]
        threads = {a.lease._state.thread for a in arts}
        self.assertEqual(len(threads), 1)
        self.assertTrue(_support.wait_for(lambda: all(a.lease.keepalives_sent >= 1 for a in arts), timeout=5))
        arts[0].close()
        stopped = arts[0].lease.keepalives_sent
        others = [a.lease.keepalives_sent for a in arts[1:]]
        self.assertTrue(_support.wait_for(
            lambda: all(a.lease.keepalives_sent > n for a, n in zip(arts[1:], others)), timeout=5))
        self.assertEqual(arts[0].lease.keepalives_sent, stopped)  # a closed lease gets none more
        self.assertIsNone(arts[1].lease.last_keepalive_error)
        for a in arts[1:]:
            a.close()
        (thread,) = {a.lease._state.thread for a in arts}
        self.assertTrue(_support.wait_for(lambda: not thread.is_alive(), timeout=5))  # none left: it ends

    def test_a_lease_only_artifact_has_no_replica_to_get(self):
        art = self.store.register({"only_leased": torch.arange(5, dtype=torch.int16)})
        try:
            with self.assertRaises(tensorreg.FailedPrecondition) as ctx:
                self.store.get(art.artifact_id)
            self.assertIn("no stable DRAM replica", ctx.exception.message)
        finally:
            art.close()

    def test_garbage_collection_of_a_registered_artifact_revokes_its_lease(self):
        art = self.store.register({"gc": torch.arange(9, dtype=torch.float64)})
        artifact_id = art.artifact_id
        del art
        gc.collect()
        self.assertTrue(_support.wait_for(lambda: artifact_id not in self.artifact_ids()))

    def test_a_client_artifact_id_makes_a_cgid_artifact(self):
        with self.store.register({"c": torch.ones(3)}, client_artifact_id="cgid:python-client-test") as art:
            self.assertEqual(art.artifact_id, "cgid:python-client-test")
            self.assertEqual(art.descriptor["id_kind"], "ARTIFACT_ID_KIND_CGID")

    # ---- background hash (docs/registration.md §4.8) ----

    def test_hash_in_background_gives_the_put_mi2_id_later_and_an_alias(self):
        sd = sample_state_dict(21)
        with self.store.register(sd, client_artifact_id="cgid:python-bg~1", hash_in_background=True) as art:
            self.assertEqual(art.artifact_id, "cgid:python-bg~1")
            # Usable by its cgid whether or not the hash is done.
            self.assertIn("leased", self.tiers_of("cgid:python-bg~1"))
            state, mi2_id = self.store.wait_hash("cgid:python-bg~1")
            self.assertEqual(state, "done")
            self.assertEqual(mi2_id, self.store.put(sd).artifact_id)
            listed = [a for a in self.store.list() if a["artifact_id"] == "cgid:python-bg~1"]
            self.assertEqual(listed[0]["verified_id"], mi2_id)
            # The mi2 id names the same artifact while it lives, and answers done itself.
            self.assertEqual(self.store.wait_hash(mi2_id), ("done", mi2_id))
        with self.assertRaises(tensorreg.NotFound) as ctx:
            self.store.wait_hash("cgid:python-bg~1", timeout=0.01)
        self.assertEqual(ctx.exception.message, "cannot wait for the hash of cgid:python-bg~1: no such artifact")

    def test_hash_in_background_needs_a_client_artifact_id(self):
        before = self.store.stats()["leases"]
        with self.assertRaises(tensorreg.InvalidArgument) as ctx:
            self.store.register({"x": torch.ones(4)}, hash_in_background=True)
        self.assertIn("hash_in_background needs a client_artifact_id (a cgid)", ctx.exception.message)
        self.assertEqual(self.store.stats()["leases"], before)

    def test_wait_hash_of_a_plain_cgid_is_none_and_a_bad_timeout_is_invalid(self):
        with self.store.register({"p": torch.ones(2)}, client_artifact_id="cgid:python-bg~plain"):
            self.assertEqual(self.store.wait_hash("cgid:python-bg~plain", timeout=0), ("none", ""))
            with self.assertRaises(tensorreg.InvalidArgument) as ctx:
                self.store.wait_hash("cgid:python-bg~plain", timeout=-1)
            self.assertEqual(ctx.exception.message, "cannot wait for the hash of cgid:python-bg~plain: timeout -1 is "
                             "not a number of seconds >= 0")

    # ---- bad input ----

    def test_an_unsupported_dtype_is_invalid_and_nothing_is_sent(self):
        before = self.store.stats()["pending_registrations"]
        for call in (self.store.put, self.store.register):
            with self.assertRaises(tensorreg.InvalidArgument) as ctx:
                call({"ok": torch.ones(2), "z": torch.zeros(2, dtype=torch.complex64)})
            self.assertIn("tensor 'z' has unsupported dtype torch.complex64", ctx.exception.message)
        self.assertEqual(self.store.stats()["pending_registrations"], before)

    def test_an_unknown_policy_is_invalid(self):
        with self.assertRaises(tensorreg.InvalidArgument) as ctx:
            self.store.put({"a": torch.ones(1)}, policy="forever")
        self.assertIn("unknown policy profile 'forever'", ctx.exception.message)

    def test_a_daemon_that_is_gone_is_unavailable(self):
        other = _support.Daemon()
        store = tensorreg.Store(other.socket)
        try:
            store.put({"a": torch.ones(4)})
            other.stop()
            with self.assertRaises(tensorreg.Unavailable):
                store.put({"a": torch.ones(4)})
            with self.assertRaises(tensorreg.Unavailable):
                store.get("mi2:x")
        finally:
            store.close()
            other.stop()

    def test_a_call_after_the_daemon_closed_an_idle_connection_reconnects(self):
        other = _support.Daemon("--idle-timeout-ms", "200")
        store = tensorreg.Store(other.socket)
        try:
            store.stats()
            time.sleep(0.6)  # past the idle timeout: the daemon has closed this connection
            self.assertIn("pending_registrations", store.stats())
        finally:
            store.close()
            other.stop()

    def test_an_idempotent_call_cut_off_is_retried_once_and_others_are_not(self):
        import socket
        import struct

        from tensorreg import _messages, _wire
        d = tempfile.mkdtemp(prefix="tensorreg-py-fake-")
        path = os.path.join(d, "fake.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(8)
        seen = []

        def read_request(conn):
            n = struct.unpack("<I", conn.recv(4, socket.MSG_WAITALL))[0]
            request = _messages.Request()
            request.ParseFromString(conn.recv(n, socket.MSG_WAITALL))
            seen.append(request.WhichOneof("body"))
            return request

        def serve():
            first, _ = listener.accept()
            read_request(first)
            first.close()  # cut off: no answer (a daemon handing over, or dying)
            second, _ = listener.accept()
            request = read_request(second)
            answer = _messages.Response()
            answer.request_id = request.request_id
            answer.get_stats.SetInParent()
            payload = answer.SerializeToString()
            second.sendall(struct.pack("<I", len(payload)) + payload)
            read_request(second)
            second.close()  # cut off again, under a call that changes things

        server = threading.Thread(target=serve)
        server.start()
        conn = _wire.Connection(path)
        try:
            stats = _messages.Request()
            stats.get_stats.SetInParent()
            response, _ = conn.call(stats)
            self.assertEqual(response.WhichOneof("body"), "get_stats")
            begin = _messages.Request()
            begin.begin_register_artifact.SetInParent()
            with self.assertRaises(tensorreg.Unavailable) as ctx:
                conn.call(begin)
            self.assertIn("begin_register_artifact is not idempotent and was not retried: it may or may not have "
                          "taken effect", ctx.exception.message)
        finally:
            conn.close()
            server.join()
            listener.close()
            shutil.rmtree(d, ignore_errors=True)
        self.assertEqual(seen, ["get_stats", "get_stats", "begin_register_artifact"])

    def test_a_takeover_keeps_the_artifacts_and_a_get_reconnects(self):
        other = _support.Daemon()
        store = tensorreg.Store(other.socket)
        successor = None
        try:
            sd = sample_state_dict(7)
            art = store.put(sd)
            successor = subprocess.Popen([_support.PATHS["daemon"], "--socket", other.socket, "--takeover",
                                          "--log-level", "warn"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                         text=True)
            seen = []
            while True:
                line = successor.stdout.readline()
                seen.append(line)
                if "ready" in line or not line:
                    break
            self.assertIn("ready", "".join(seen))
            threading.Thread(target=successor.stdout.read, daemon=True).start()
            self.assertEqual(other.proc.wait(timeout=10), 0)  # the old daemon handed over and left
            got = store.get(art.artifact_id)
            for name, t in sd.items():
                self.assertTrue(torch.equal(got[name], t), name)
        finally:
            store.close()
            if successor is not None and successor.poll() is None:
                successor.terminate()
                successor.wait(timeout=10)
            other.stop()

    # ---- identity ----

    def test_ids_match_the_cli_digest_of_the_canonical_bytes(self):
        cli = self.cli()
        sd = sample_state_dict(4)
        sd["naïve ünïcode 名前 😀"] = torch.arange(3, dtype=torch.int32)
        art = self.store.put(sd)
        layout = _layout.build(_layout.state_dict_descs(torch, sd, "x")[0])
        self.assertEqual(art.index_json, json.dumps(art.index, separators=(",", ":"), sort_keys=True,
                                                    ensure_ascii=True).encode())
        self.assertIn(b"\\u540d\\u524d \\ud83d\\ude00", art.index_json)
        with tempfile.TemporaryDirectory() as d:
            index_path, data_path = os.path.join(d, "index.json"), os.path.join(d, "data.bin")
            with open(index_path, "wb") as f:
                f.write(art.index_json)
            with open(data_path, "wb") as f:
                f.write(canonical_bytes(layout))
            out = subprocess.run([cli, "digest", "--index", index_path, "--data", data_path], check=True,
                                 capture_output=True, text=True)
        self.assertNotIn("re-emitted", out.stderr)  # our bytes are canonical already
        self.assertIn(f"id {art.artifact_id}\n", out.stdout)
        _, served = self.store.index(art.artifact_id)
        self.assertEqual(tensorreg.canonical_json(served), art.index_json)

    def test_python_m_tensorreg_put_of_a_safetensors_file_has_the_cli_id(self):
        cli = self.cli()
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "model.safetensors")
            write_safetensors(path, {"b.weight": ("F32", [2, 3], bytes(range(24))), "tied": ("F32", [6], None),
                                     "a": ("BOOL", [3], b"\1\0\1"), "é": ("I64", [1], bytes(range(8)))})
            expected = subprocess.run([cli, "index", path], check=True, capture_output=True, text=True).stdout
            env = dict(os.environ, PYTHONPATH=os.path.join(_support.REPO, "python"))
            if os.environ.get("TENSORREG_TEST_INSTALLED") == "1":
                env.pop("PYTHONPATH")
            out = subprocess.run([sys.executable, "-m", "tensorreg", "put", path, "--socket", self.daemon.socket,
                                  "--json"], check=True, capture_output=True, text=True, env=env).stdout
        artifact_id = json.loads(out)["artifact_id"]
        self.assertIn(f"id {artifact_id}\n", expected)
        ls = subprocess.run([sys.executable, "-m", "tensorreg", "ls", "--socket", self.daemon.socket],
                            check=True, capture_output=True, text=True, env=env).stdout
        self.assertIn(artifact_id, ls)

    # ---- threads ----

    def test_one_store_serves_several_threads(self):
        ids, errors = [None] * 6, []

        def work(k):
            try:
                sd = {"t": torch.full((1000,), float(k % 3))}
                ids[k] = self.store.put(sd).artifact_id
                self.assertTrue(torch.equal(self.store.get(ids[k])["t"], sd["t"]))
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=work, args=(k,)) for k in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(errors, [])
        self.assertEqual(len(set(ids)), 3)

    # ---- helpers ----

    def cli(self):
        if not _support.PATHS["cli"]:
            self.skipTest("no tensorreg CLI given (--cli PATH or TENSORREG_CLI)")
        return _support.PATHS["cli"]

    def artifact_ids(self):
        return {a["artifact_id"] for a in self.store.list()}

    def tiers_of(self, artifact_id):
        for a in self.store.list():
            if a["artifact_id"] == artifact_id:
                return a["tiers"]
        return []


def write_safetensors(path, tensors):
    """name -> (dtype, shape, bytes or None for an alias of the previous tensor's bytes)."""
    import struct
    header, data, last = {}, b"", None
    for name, (dtype, shape, raw) in tensors.items():
        if raw is None:
            header[name] = {"dtype": dtype, "shape": shape, "data_offsets": last}
            continue
        last = [len(data), len(data) + len(raw)]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": last}
        data += raw
    header["__metadata__"] = {"format": "pt"}
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + data)


class HeldPutTest(_support.StoreTestCase):
    """Store.put of content the daemon holds already (reuse_held, issue #20): answered from the
    list after a hash here, with no Begin and nothing copied."""

    def test_put_safetensors_hands_the_daemon_its_file(self):
        # docs/wire-format.md §18: the daemon reads the file; nothing is copied by this process.
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "model.safetensors")
            big = bytes(range(256)) * ((9 << 20) // 256)
            write_safetensors(path, {"big": ("U8", [len(big)], big), "a": ("BF16", [3], bytes(range(6))),
                                     "tied": ("BF16", [3], None)})
            before = self.daemon_stats()
            art = self.store.put_safetensors(path)
            after = self.daemon_stats()
            self.assertFalse(art.existed)
            self.assertTrue(art.registration_id.startswith("reg"))
            data = len(big) + 6  # "tied" shares the bytes of "a"
            self.assertEqual(after["copied"] - before["copied"], data)
            self.assertEqual(after["hashed"] - before["hashed"], art.total_size)
            self.assertEqual(after["pending"], 0)
            again = self.store.put_safetensors(path)
            held = self.daemon_stats()
            self.assertTrue(again.existed)
            self.assertEqual(again.artifact_id, art.artifact_id)
            self.assertEqual(held["copied"], after["copied"])  # held: hashed, not copied
            if _support.PATHS["cli"]:
                expected = subprocess.run([_support.PATHS["cli"], "index", path], check=True, capture_output=True,
                                          text=True).stdout
                self.assertIn(f"id {art.artifact_id}\n", expected)

    def big_state_dict(self, seed):
        # Over two 4 MiB leaves, with pads between storages and leaves that span storages.
        sd = sample_state_dict(seed)
        g = torch.Generator().manual_seed(seed)
        sd["big"] = torch.randn(5 << 20 >> 2, generator=g)
        sd["big2"] = torch.randn(3, (3 << 20) + 7, generator=g).to(torch.bfloat16)
        return sd

    def daemon_stats(self):
        answer, _ = self.store._conn.call(_requests.stats())
        s = answer.get_stats
        return {"hashed": s.bytes_hashed, "copied": s.bytes_copied, "pending": s.pending_registrations,
                "artifacts": s.artifacts}

    def put_recording(self, sd, **kwargs):
        """(artifact, names of the requests it sent, daemon stats before, after)."""
        sent, conn = [], self.store._conn
        plain = conn.call

        def call(request, *args, **kw):
            sent.extend(f.name for f, _ in request.ListFields() if f.message_type is not None)
            return plain(request, *args, **kw)

        before = self.daemon_stats()
        conn.call = call
        try:
            art = self.store.put(sd, **kwargs)
        finally:
            del conn.call
        return art, sent, before, self.daemon_stats()

    def test_a_held_put_sends_no_begin_and_answers_the_same_descriptor_existed(self):
        sd = self.big_state_dict(10)
        first = self.store.put(sd)
        self.assertFalse(first.existed)
        art, sent, before, after = self.put_recording(self.big_state_dict(10))  # other memory, same bytes
        self.assertEqual(sent, ["list_artifacts"])
        self.assertTrue(art.existed)
        self.assertEqual(art.artifact_id, first.artifact_id)
        self.assertEqual(art.descriptor, first.descriptor)
        self.assertEqual(art.index_json, first.index_json)
        self.assertEqual(art.registration_id, "")
        self.assertEqual(after["hashed"], before["hashed"])  # the daemon hashed nothing
        self.assertEqual(after["copied"], before["copied"])
        self.assertEqual(after["artifacts"], before["artifacts"])
        self.assertEqual(after["pending"], 0)
        self.assert_gets(art.artifact_id, sd)

    def test_a_new_put_is_kept_without_a_copy_and_leaves_nothing_of_the_memfd_here(self):
        sd = self.big_state_dict(14)
        art, _, before, after = self.put_recording(sd)
        self.assertFalse(art.existed)
        self.assertEqual(after["copied"], before["copied"])  # the publish memfd became the replica
        self.assertEqual(after["hashed"] - before["hashed"], art.total_size)
        with open("/proc/self/maps") as f:
            self.assertEqual([line for line in f if "memfd:tensorreg-publish" in line], [])
        fds = [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
               if os.path.exists(f"/proc/self/fd/{fd}")]
        self.assertEqual([t for t in fds if t.startswith("/memfd:tensorreg-publish")], [])
        self.assert_gets(art.artifact_id, sd)

    def test_the_same_index_with_other_bytes_is_a_normal_put_with_a_new_id(self):
        sd = self.big_state_dict(11)
        first = self.store.put(sd)
        other = self.big_state_dict(11)  # the same layout (clone() would untie and unslice)
        other["big"][-1] += 1  # in the last leaf of "big": only the hash tells them apart
        art, sent, before, after = self.put_recording(other)
        self.assertEqual(sent, ["list_artifacts", "begin_register_artifact", "commit_registered_artifact"])
        self.assertFalse(art.existed)
        self.assertNotEqual(art.artifact_id, first.artifact_id)
        self.assertEqual(art.descriptor["index_multihash"], first.descriptor["index_multihash"])
        self.assertEqual(after["hashed"] - before["hashed"], art.total_size)
        self.assertEqual(after["artifacts"], before["artifacts"] + 1)
        self.assert_gets(art.artifact_id, other)

    def test_a_new_index_is_put_without_hashing_here(self):
        sd = {"only": torch.arange(1 << 20, dtype=torch.float32)}
        art, sent, _, _ = self.put_recording(sd)
        self.assertEqual(sent, ["list_artifacts", "begin_register_artifact", "commit_registered_artifact"])
        self.assertFalse(art.existed)
        self.assertNotIn("hash", art.timings)

    def test_reuse_held_false_copies_held_content(self):
        sd = self.big_state_dict(12)
        first = self.store.put(sd)
        art, sent, before, after = self.put_recording(sd, reuse_held=False)
        self.assertEqual(sent, ["begin_register_artifact", "commit_registered_artifact"])
        self.assertTrue(art.existed)  # the daemon's commit found it
        self.assertEqual(art.artifact_id, first.artifact_id)
        self.assertNotEqual(art.registration_id, "")
        self.assertEqual(after["hashed"] - before["hashed"], art.total_size)

    def test_a_policy_other_than_cache_copies_as_the_cpp_client_does(self):
        sd = self.big_state_dict(13)
        self.store.put(sd)
        art, sent, _, _ = self.put_recording(sd, policy="warm")
        self.assertNotIn("list_artifacts", sent)
        self.assertIn("begin_register_artifact", sent)
        self.assertTrue(art.existed)
        art, sent, _, _ = self.put_recording(sd, policy=None)  # None is the daemon's default: cache
        self.assertEqual(sent, ["list_artifacts"])
        self.assertTrue(art.existed)

    def test_the_client_hash_gives_the_spec_vectors_and_reads_pads_as_zeros(self):
        # registration.md §3.4
        self.assertEqual(_hash.index_multihash(b'{"weights":[0,16,[2,2],[2,1],"torch.float32",0]}'),
                         "bciqj5lwemn5gwbuwhk5mgn2iadmjuk3eu4qwaka5dwagpr5obv4kzei")
        self.assertEqual(_hash.data_multihash([(0, memoryview(bytes(range(32))))], 32),
                         "bciqggdonfftmim3gsejfisf3wjnu75asusohglnszcv4docydplrbxi")
        # Pieces with gaps over three leaves = the whole buffer with the gaps zeroed.
        leaf = _hash.LEAF_BYTES
        a, b = os.urandom(leaf + 5), os.urandom(leaf)
        whole = bytes(3) + a + bytes(leaf - 20) + b + bytes(9)
        pieces = [(3, memoryview(a)), (3 + len(a) + leaf - 20, memoryview(b))]
        expected = _hash.data_multihash([(0, memoryview(whole))], len(whole), threads=1)
        # Up to _STAGED_UP_TO_THREADS threads stage the bytes, more hash them in place.
        in_place = _hash._STAGED_UP_TO_THREADS + 1
        for threads in (1, in_place):
            self.assertEqual(_hash.data_multihash(pieces, len(whole), threads), expected)
        # Writable pieces (tensor memory) are staged by address, read-only ones through slices.
        writable = [(3, memoryview(bytearray(a))), (3 + len(a) + leaf - 20, memoryview(bytearray(b))[:])]
        self.assertIsNotNone(_hash._address(writable[0][1]))
        self.assertIsNone(_hash._address(pieces[0][1]))
        for threads in (1, in_place):
            self.assertEqual(_hash.data_multihash(writable, len(whole), threads), expected)

    def assert_gets(self, artifact_id, sd):
        got = self.store.get(artifact_id)
        for name, t in sd.items():
            self.assertTrue(torch.equal(got[name], t), name)


if __name__ == "__main__":
    _support.main()
