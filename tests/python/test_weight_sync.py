"""The weight-sync loop's Python side: the Registrar (a registration of the same tensors again
sends only Begin, the kept Feed and Commit, and keeps its regions until closed), open() with
kept mappings (the next version over the same allocations maps nothing and gives back the same
tensors; over a fake driver, CPU tensors standing in for mappings), and WeightPublisher /
WeightSubscriber against a real daemon with CPU tensors."""

import contextlib
import os
import sys
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _support  # noqa: E402  (exits 77 without torch / protobuf)

# isort: split
import unittest  # noqa: E402

import torch  # noqa: E402

import tensorreg  # noqa: E402
from tensorreg import _cuda, _device, _layout, _messages, _reads, _registrar, _requests  # noqa: E402

MiB = 1 << 20
UUID = "GPU-02ad0eca-905c-d3d5-53ed-04fc6d6d50d6"


def model(seed: int = 0, layers: int = 20) -> dict:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k in range(layers):
        sd[f"layers.{k}.w"] = torch.randn(16, 8, generator=g)
        sd[f"layers.{k}.norm"] = torch.randn(8, generator=g).to(torch.bfloat16)
    sd["lm_head.weight"] = sd["layers.0.w"]  # tied
    return sd


class Messages(unittest.TestCase):
    def test_a_feed_sent_from_kept_bytes_is_the_message_built_for_it(self):
        sd = model()
        layout = _layout.build(_layout.state_dict_descs(torch, sd, "register")[0])

        def source(entry, k):
            entry.device_id = -1
            entry.region_ref.region_id = "region:" + "ab" * 16
            entry.mapping_base_offset = layout.storages[k].offset

        built = _requests.lease_feed(layout, source)
        body = built.feed_register_artifact_stream.SerializeToString()
        for request_id, registration_id in ((1, "reg:1"), (300, "reg:" + "f" * 200), (2**40, "r")):
            built.request_id = request_id
            built.feed_register_artifact_stream.registration_id = registration_id
            raw = _registrar.RawFeed(registration_id, body)
            raw.request_id = request_id
            parsed = _messages.Request()
            parsed.ParseFromString(raw.SerializeToString())
            self.assertEqual(parsed, built)
            self.assertEqual(parsed.WhichOneof("body"), "feed_register_artifact_stream")

    def test_every_allocation_becomes_a_region_and_its_key_names_the_memory(self):
        from test_device import FakeDriver, vmm_pages

        drv = FakeDriver([(0x1000000, 20 * MiB, False, 0), (0x8000000, 4 * MiB, False, 0)]
                         + vmm_pages(0x300000000, 3))
        spans = [(0x1000000 + 512, 1000), (0x8000000, 4 * MiB), (0x1000000 + 2 * MiB, 4096),
                 (0x300000000 + 100, 3 * MiB)]
        plan = _device.every_storage_in_a_region(_device.plan(drv, spans, "register state dict"))
        self.assertTrue(all(s.region is not None for s in plan.sources))
        self.assertEqual(sorted((r.base, r.size) for r in plan.regions),
                         [(0x1000000, 20 * MiB), (0x8000000, 4 * MiB), (0x300000000, 4 * MiB)])
        lone = plan.regions[plan.sources[1].region]
        self.assertEqual((lone.ipc_handle, lone.storages, plan.sources[1].mapping_base_offset),
                         (drv.ipc_handle(0x8000000), [1], 0))
        keys = [_device.region_key(r) for r in plan.regions]
        self.assertIn(("ipc", 0x8000000, 4 * MiB, drv.ipc_handle(0x8000000)), keys)
        self.assertIn(("vmm", (0x300000000, 2 * MiB), (0x300000000 + 2 * MiB, 2 * MiB)), keys)
        self.assertEqual(len(set(keys)), 3)


class CudaRegistrar(unittest.TestCase):
    """The CUDA flow of the Registrar over test_client_modules' fake connection and driver:
    "a" and "b" share a cudaMalloc allocation, "c" is alone in another, "d" in a VMM page."""

    def setUp(self):
        from test_client_modules import FakeConnection, FakeDriver, cuda_state_dict

        self.conn, self.drv = FakeConnection(), FakeDriver()
        self.items, self.storages = cuda_state_dict()
        self.patch = mock.patch.object(_cuda, "driver", lambda: self.drv)
        self.patch.start()
        self.reg = _registrar.Registrar(self.conn, 0)

    def tearDown(self):
        self.patch.stop()

    def full(self, storages=None):
        return self.reg._full_cuda(torch, self.items, storages or self.storages, torch.device("cuda", 0), [],
                                   None, False, 0.0)

    def test_every_allocation_is_a_region_kept_across_registrations(self):
        art = self.full()
        rest = ["begin_register_artifact", "feed", "commit_registered_artifact"]
        self.assertEqual(self.conn.bodies(), ["register_region"] * 3 + rest)
        feed = _messages.Request()
        feed.ParseFromString(self.conn.sent[4][1].SerializeToString())
        entries = feed.feed_register_artifact_stream.storage_entries
        self.assertEqual([e.WhichOneof("storage_source") for e in entries], ["region_ref"] * 4)
        self.assertEqual(feed.feed_register_artifact_stream.registration_id, "reg:1")
        self.assertEqual(art.lease.region_ids, [])  # the lease does not unregister them
        art.close()
        self.assertEqual(self.conn.bodies()[6:], ["revoke_registered_artifact"])
        del self.conn.sent[:]
        again = self.full()  # the same memory: every region is reused
        self.assertEqual(self.conn.bodies(), ["begin_register_artifact", "feed", "commit_registered_artifact"])
        self.assertEqual(self.reg.counts["regions_reused"], 3)
        again.close()

    def test_the_fast_path_sends_begin_by_index_key_the_kept_feed_and_commit(self):
        self.full().close()
        del self.conn.sent[:]
        art = self.reg._fast(None, False, 0.0)
        self.assertEqual(self.conn.bodies(), ["begin_register_artifact", "feed", "commit_registered_artifact"])
        b = self.conn.sent[0][1].begin_register_artifact
        self.assertEqual((b.device_id, b.device_uuid, b.total_size), (0, UUID, 64))
        self.assertEqual(b.tensor_index_key, __import__("hashlib").sha256(art.index_json).hexdigest())
        self.assertTrue(art.timings["reused"])
        self.assertIn("client_work", art.timings)
        art.close()

    def test_a_snapshot_registrar_asks_for_snapshot_leases_on_both_paths(self):
        self.reg = _registrar.Registrar(self.conn, 0, None, snapshot=True)
        self.full().close()
        self.reg._fast(None, False, 0.0).close()
        begins = [r.begin_register_artifact for name, r, _ in self.conn.sent if name == "begin_register_artifact"]
        self.assertEqual([b.lease.in_place for b in begins], [False, False])
        self.assertTrue(_registrar.Registrar(self.conn, 0)._lease_begin(None).begin_register_artifact.lease.in_place)

    def test_a_publish_copy_registrar_puts_on_both_paths_and_leaves_no_lease(self):
        self.reg = _registrar.Registrar(self.conn, 0, None, publish_copy=True)
        arts = [self.full(), self.reg._fast(None, False, 0.0)]
        with mock.patch.object(self.reg, "_full", lambda *args: arts[0]):  # register() keeps no lease of it
            self.assertIs(self.reg._register({}, None, False, None), arts[0])
        begins = [r.begin_register_artifact for name, r, _ in self.conn.sent if name == "begin_register_artifact"]
        self.assertEqual([(b.lease.in_place, b.lease.publish_copy) for b in begins], [(False, True), (False, True)])
        self.assertEqual([(a.registration_kind, a.lease) for a in arts], [("coalesced", None), ("coalesced", None)])
        # The regions stay the registrar's: the second put sent no region, and nothing is revoked.
        self.assertEqual(self.conn.bodies().count("register_region"), 3)
        del self.conn.sent[:]
        self.reg.close()
        self.assertNotIn("revoke_registered_artifact", self.conn.bodies())
        self.assertEqual(self.conn.bodies().count("unregister_region"), 3)

    def test_a_storage_in_another_allocation_drops_the_region_it_left(self):
        self.full().close()
        del self.conn.sent[:]
        moved = list(self.storages)
        s = moved[2]
        moved[2] = (s[0], 0x1000000 + 1024, s[2], s[3])  # "c" now shares the first allocation
        self.full(moved).close()
        self.assertEqual(self.conn.bodies(), ["begin_register_artifact", "feed", "commit_registered_artifact",
                                              "unregister_region", "revoke_registered_artifact"])
        # Regions were made in plan order: (a, b)'s allocation, d's page, then c's lone allocation.
        self.assertEqual(self.conn.sent[3][1].unregister_region.region_id, "region:3")
        self.assertEqual(self.reg.counts["regions_released"], 1)
        self.reg.close()
        self.assertEqual(sorted(r.unregister_region.region_id for name, r, _ in self.conn.sent
                                if name == "unregister_region")[:2], ["region:1", "region:2"])


class FakeMapping:
    opened = 0

    def __init__(self, drv, ordinal, handle, size, what):
        FakeMapping.opened += 1
        self.memory = drv.memory[handle]


class FakeReaderDriver:
    def __init__(self, memory):
        self.memory = memory  # IPC handle -> uint8 CPU tensor standing in for the allocation

    def ordinal_of_uuid(self, uuid):
        return 0

    @contextlib.contextmanager
    def on(self, ordinal):
        yield


class FakeOpenConnection:
    """Answers OpenArtifactDevice as the daemon would for a lease of `layout` whose storages lie
    in the allocations `placed` names: storage k -> (IPC handle, offset in that allocation)."""

    def __init__(self):
        self.answers = {}
        self.known = []  # each request's known_layout

    def serve(self, artifact_id, layout, placed, sizes, token=0):
        answer = _messages.Response()
        body = answer.open_artifact_device
        body.artifact_descriptor.artifact_id = artifact_id
        body.layout_token = token
        body.tensor_index_data = layout.json
        body.total_size = layout.total_size
        handles = []
        for k, s in enumerate(layout.storages):
            handle, _ = placed[k]
            if handle not in handles:
                handles.append(handle)
                a = body.allocations.add()
                a.device_uuid = UUID
                a.size_bytes = sizes[handle]
                a.cuda_ipc_handle = handle
        for k, s in enumerate(layout.storages):
            handle, at = placed[k]
            seg = body.segments.add()
            seg.artifact_offset = s.offset
            seg.length = s.nbytes
            seg.allocation = handles.index(handle)
            seg.allocation_offset = at
        body.end_allocation = len(handles)
        self.answers[artifact_id] = answer.SerializeToString()

    def call(self, request, fds=(), raw=False):
        payload = self.answers[request.open_artifact_device.artifact_id]
        answer = _messages.Response()
        answer.ParseFromString(payload)
        known = request.open_artifact_device.known_layout
        self.known.append(known)
        if known and known == answer.open_artifact_device.layout_token:  # the daemon's short answer
            short = _messages.Response()
            body = short.open_artifact_device
            body.artifact_descriptor.CopyFrom(answer.open_artifact_device.artifact_descriptor)
            body.layout_token, body.layout_unchanged = known, True
            answer, payload = short, short.SerializeToString()
        return (answer, [], payload) if raw else (answer, [])


class KeptMappings(unittest.TestCase):
    def setUp(self):
        self.sd = model(1)
        self.layout = _layout.build(_layout.state_dict_descs(torch, self.sd, "register")[0])
        # Two "allocations": even storages in A, odd ones in B, at their canonical offsets.
        self.memory = {b"A" * 64: torch.zeros(self.layout.total_size, dtype=torch.uint8),
                       b"B" * 64: torch.zeros(self.layout.total_size, dtype=torch.uint8),
                       b"C" * 64: torch.zeros(self.layout.total_size, dtype=torch.uint8)}
        self.sizes = {h: m.numel() for h, m in self.memory.items()}
        self.place(b"A" * 64, b"B" * 64)
        self.conn = FakeOpenConnection()
        self.drv = FakeReaderDriver(self.memory)
        FakeMapping.opened = 0
        self.patches = [mock.patch.object(_cuda, "driver", lambda: self.drv),
                        mock.patch.object(_cuda, "IpcMapping", FakeMapping),
                        mock.patch.object(_cuda, "as_tensor", lambda torch, m, here, size: m.memory)]
        for p in self.patches:
            p.start()

    def tearDown(self):
        for p in self.patches:
            p.stop()

    def place(self, even, odd):
        self.placed = {}
        for k, s in enumerate(self.layout.storages):
            handle = even if k % 2 == 0 else odd
            self.placed[k] = (handle, s.offset)
            self.memory[handle][s.offset:s.offset + s.nbytes] = _layout.storage_bytes(torch, s.source)

    def open(self, kept, artifact_id):
        return _reads.open_tensors(self.conn, artifact_id, "cuda", kept)

    def test_the_next_version_over_the_same_memory_maps_nothing_and_gives_the_same_tensors(self):
        kept = _reads.KeptMappings()
        self.conn.serve("cgid:v~1", self.layout, self.placed, self.sizes)
        self.conn.serve("cgid:v~2", self.layout, self.placed, self.sizes)
        first = self.open(kept, "cgid:v~1")
        self.assertEqual(FakeMapping.opened, 2)
        for name, t in self.sd.items():
            self.assertTrue(torch.equal(first[name], t), name)
        second = self.open(kept, "cgid:v~2")
        self.assertEqual(FakeMapping.opened, 2)  # no driver open
        self.assertEqual(kept.reopened, 1)
        self.assertEqual(sorted(second), sorted(first))
        self.assertTrue(all(second[n] is first[n] for n in first))
        # Without kept mappings every open maps again.
        self.open(None, "cgid:v~2")
        self.assertEqual(FakeMapping.opened, 4)

    def test_a_layout_the_daemon_says_is_unchanged_gives_the_same_tensors_from_a_short_answer(self):
        kept = _reads.KeptMappings()
        for v in (1, 2):
            self.conn.serve(f"cgid:v~{v}", self.layout, self.placed, self.sizes, token=41)
        self.conn.serve("cgid:v~3", self.layout, self.placed, self.sizes, token=42)  # registered apart
        first = self.open(kept, "cgid:v~1")
        second = self.open(kept, "cgid:v~2")
        self.assertEqual(self.conn.known, [0, 41])
        self.assertEqual((FakeMapping.opened, kept.reopened, kept.by_token), (2, 1, 1))
        self.assertTrue(all(second[n] is first[n] for n in first))
        # Another token: the full answer, whose bytes but the token equal the last one's.
        third = self.open(kept, "cgid:v~3")
        self.assertEqual(self.conn.known, [0, 41, 41])
        self.assertEqual((FakeMapping.opened, kept.reopened, kept.by_token), (2, 2, 1))
        self.assertTrue(all(third[n] is first[n] for n in first))
        self.assertEqual(kept.layout, ("cuda", 42))
        # Asked on another device, the token is not offered.
        kept.layout = ("cuda:1", 42)
        self.open(kept, "cgid:v~3")
        self.assertEqual(self.conn.known[-1], 0)

    def test_an_allocation_not_seen_before_is_the_only_one_mapped(self):
        kept = _reads.KeptMappings()
        self.conn.serve("cgid:v~1", self.layout, self.placed, self.sizes)
        first = self.open(kept, "cgid:v~1")
        self.place(b"A" * 64, b"C" * 64)  # the odd storages moved to another allocation
        self.conn.serve("cgid:v~2", self.layout, self.placed, self.sizes)
        second = self.open(kept, "cgid:v~2")
        self.assertEqual(FakeMapping.opened, 3)
        self.assertEqual(kept.reopened, 0)
        self.assertEqual(set(kept.ipc), {(0, b"A" * 64, self.sizes[b"A" * 64]), (0, b"C" * 64, self.sizes[b"C" * 64])})
        for name, t in self.sd.items():
            self.assertTrue(torch.equal(second[name], t), name)
        self.assertIsNot(second["layers.0.w"], first["layers.0.w"])

    def test_a_changed_layout_builds_new_views_over_the_kept_mappings(self):
        kept = _reads.KeptMappings()
        self.conn.serve("cgid:v~1", self.layout, self.placed, self.sizes)
        self.open(kept, "cgid:v~1")
        smaller = dict(list(self.sd.items())[:10])
        self.layout = _layout.build(_layout.state_dict_descs(torch, smaller, "register")[0])
        self.place(b"A" * 64, b"B" * 64)
        self.conn.serve("cgid:v~2", self.layout, self.placed, self.sizes)
        second = self.open(kept, "cgid:v~2")
        self.assertEqual(FakeMapping.opened, 2)
        self.assertEqual(sorted(second), sorted(smaller))
        for name, t in smaller.items():
            self.assertTrue(torch.equal(second[name], t), name)

    def test_the_answer_signature_leaves_out_only_the_request_id_and_the_descriptor(self):
        self.conn.serve("cgid:v~1", self.layout, self.placed, self.sizes)
        self.conn.serve("cgid:other-name~22", self.layout, self.placed, self.sizes)
        one, other = self.conn.answers["cgid:v~1"], self.conn.answers["cgid:other-name~22"]
        answer = _messages.Response()
        answer.ParseFromString(other)
        answer.request_id = 77
        self.assertEqual(_reads.answer_signature(one), _reads.answer_signature(answer.SerializeToString()))
        self.assertNotIn(b"cgid:v~1", _reads.answer_signature(one))
        answer.open_artifact_device.segments[3].allocation_offset += 8
        self.assertNotEqual(_reads.answer_signature(one), _reads.answer_signature(answer.SerializeToString()))
        self.assertIsNone(_reads.answer_signature(b"\xda\x02\x05\x0a\x80"))  # cut short

    def test_vmm_fds_are_the_same_allocation_only_when_they_are_the_same_open_file(self):
        r, w = os.pipe()
        try:
            other = os.dup(r)
            third = os.open(os.devnull, os.O_RDONLY)
            if _reads.same_open_file(r, other) is None:
                self.skipTest("kcmp(2) is not available here")
            self.assertTrue(_reads.same_open_file(r, other))
            self.assertFalse(_reads.same_open_file(r, w))
            self.assertFalse(_reads.same_open_file(r, third))
            os.close(other)
            os.close(third)
        finally:
            os.close(r)
            os.close(w)


class WithDaemon(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.daemon = _support.Daemon()

    @classmethod
    def tearDownClass(cls):
        cls.daemon.stop()

    def setUp(self):
        self.store = tensorreg.Store(self.daemon.socket, timeout=30)

    def tearDown(self):
        self.store.close()


class RegistrarTest(WithDaemon):
    def test_the_same_tensors_again_take_the_fast_path_and_keep_one_region(self):
        sd = model(2)
        regions = self.store.stats()["regions"]
        with self.store.registrar(policy="warm") as reg:
            first = reg.register(sd, client_artifact_id="cgid:reg-test~1")
            self.assertFalse(first.timings["reused"])
            for t in sd.values():
                t.add_(1)
            second = reg.register(sd, client_artifact_id="cgid:reg-test~2")
            self.assertTrue(second.timings["reused"])
            self.assertEqual(reg.counts["full"], 1)
            self.assertEqual(reg.counts["fast"], 1)
            self.assertEqual(self.store.stats()["regions"], regions + 1)
            self.assertEqual(second.index_json, first.index_json)
            # The second version holds the bytes as they were at its registration.
            got = self.store.get("cgid:reg-test~2")
            for name, t in sd.items():
                self.assertTrue(torch.equal(got[name], t), name)
            del got
            # A version's lease ends without unregistering the kept region.
            first.close()
            self.assertEqual(self.store.stats()["regions"], regions + 1)
            self.assertEqual(second.descriptor["id_kind"], "ARTIFACT_ID_KIND_CGID")
        stats = self.store.stats()
        self.assertEqual(stats["regions"], regions)  # close() unregistered it
        self.assertTrue(second.lease.closed)

    def test_a_changed_layout_takes_the_full_path_and_gives_the_new_tensors(self):
        sd = model(3)
        with self.store.registrar(policy="warm") as reg:
            reg.register(sd, client_artifact_id="cgid:reg-change~1")
            grown = dict(sd, extra=torch.arange(100000, dtype=torch.float32))  # needs a larger region
            art = reg.register(grown, client_artifact_id="cgid:reg-change~2")
            self.assertFalse(art.timings["reused"])
            self.assertEqual(reg.counts["regions_registered"], 2)
            self.assertEqual(reg.counts["regions_released"], 1)
            sd["layers.3.w"] = torch.zeros(16, 8)  # another storage, same shape
            art = reg.register(sd, client_artifact_id="cgid:reg-change~3")
            self.assertFalse(art.timings["reused"])
            self.assertEqual(reg.counts["regions_registered"], 2)  # the kept region is large enough
            got = self.store.get("cgid:reg-change~3")
            self.assertEqual(sorted(got), sorted(sd))
            for name, t in sd.items():
                self.assertTrue(torch.equal(got[name], t), name)
            self.assertEqual(reg.counts, {"full": 3, "fast": 0, "republished": 0, "regions_registered": 2,
                                          "regions_reused": 1, "regions_released": 1})

    def test_a_version_over_the_live_last_lease_is_one_republish_call(self):
        sd = model(11)
        with self.store.registrar(policy="warm") as reg:
            first = reg.register(sd, client_artifact_id="cgid:reg-re~1")
            leases = self.store.stats()["leases"]
            for t in sd.values():
                t.add_(3)
            calls = []
            real = self.store._conn.call
            with mock.patch.object(self.store._conn, "call", lambda r, *a, **k: calls.append(r.WhichOneof("body"))
                                   or real(r, *a, **k)):
                second = reg.register(sd, client_artifact_id="cgid:reg-re~2")
            self.assertEqual(calls, ["republish_lease"])
            self.assertEqual((reg.counts["republished"], second.timings["reused"]), (1, True))
            self.assertNotEqual(second.registration_id, first.registration_id)
            self.assertEqual(second.index_json, first.index_json)
            self.assertEqual(self.store.stats()["leases"], leases + 1)  # both versions held
            got = self.store.get("cgid:reg-re~2")  # its stable replica: the bytes at republish
            self.assertTrue(all(torch.equal(got[n], t) for n, t in sd.items()))
            # replaces=: the daemon ends the old lease in the same call, and the client knows.
            third = reg.register(sd, client_artifact_id="cgid:reg-re~3", replaces=second)
            self.assertTrue(second.lease.closed)
            self.assertEqual(reg.counts["republished"], 2)
            held = {a["artifact_id"]: a["lease_count"] for a in self.store.list()}
            self.assertEqual((held.get("cgid:reg-re~2", 0), held["cgid:reg-re~3"]), (0, 1))
            # The last lease ended (by its holder): the next version takes the Feed path again.
            third.close()
            fourth = reg.register(sd, client_artifact_id="cgid:reg-re~4")
            self.assertEqual((reg.counts["republished"], reg.counts["fast"]), (2, 3))
            self.assertTrue(fourth.timings["reused"])
            first.close()
        self.assertEqual(self.store.stats()["leases"], leases - 1)

    def test_an_unchanged_registration_gives_the_put_id_of_the_same_bytes(self):
        sd = model(4)
        with self.store.registrar() as reg:
            reg.register(sd).close()
            again = reg.register(sd)
            self.assertTrue(again.timings["reused"])
            self.assertEqual(again.artifact_id, self.store.put(sd).artifact_id)

    def test_a_kept_region_the_daemon_lost_is_registered_again(self):
        sd = model(10)
        with self.store.registrar(policy="warm") as reg:
            reg.register(sd, client_artifact_id="cgid:reg-lost~1").close()
            region = reg._kept.regions["host"].region_id
            self.store._conn.call(_requests.unregister_region(region))  # as if the daemon had restarted
            art = reg.register(sd, client_artifact_id="cgid:reg-lost~2")
            self.assertEqual((reg.counts["full"], reg.counts["fast"]), (2, 0))
            self.assertNotEqual(reg._kept.regions["host"].region_id, region)
            got = self.store.get(art.artifact_id)
            self.assertTrue(all(torch.equal(got[n], t) for n, t in sd.items()))

    def test_bad_input_is_refused_before_anything_is_sent_and_a_closed_registrar_refuses(self):
        reg = self.store.registrar()
        with self.assertRaises(tensorreg.InvalidArgument) as ctx:
            reg.register({"a": [1, 2]})
        self.assertIn("cannot register state dict: 'a' is a list, not a torch.Tensor", ctx.exception.message)
        with self.assertRaises(tensorreg.InvalidArgument) as ctx:
            self.store.registrar(ttl_ms=-1)
        self.assertIn("cannot make a registrar: ttl_ms -1 is not a uint32", ctx.exception.message)
        reg.close()
        with self.assertRaises(tensorreg.FailedPrecondition) as ctx:
            reg.register(model())
        self.assertEqual(ctx.exception.message, "cannot register state dict: the registrar is closed")


class WeightSyncTest(WithDaemon):
    def test_versions_are_numbered_the_latest_is_found_and_load_into_copies_it(self):
        sd = model(5)
        with tensorreg.WeightPublisher(self.store, "policy-a", policy="warm") as pub:
            sub = tensorreg.WeightSubscriber(self.store, "policy-a", device="cpu")
            self.assertIsNone(sub.latest())
            v1 = pub.publish(sd)
            self.assertEqual((v1.number, v1.artifact_id), (1, "cgid:wsync~policy-a~1"))
            self.assertEqual(sub.wait_for(1, timeout=5), 1)
            mine = {name: torch.zeros_like(t) for name, t in sd.items()}
            self.assertEqual(sub.load_into(mine), 1)
            for name, t in sd.items():
                self.assertTrue(torch.equal(mine[name], t), name)
            for t in sd.values():
                t.mul_(2)
            leases = self.store.stats()["leases"]
            v2 = pub.publish(sd)
            self.assertTrue(v2.timings["reused"])
            self.assertTrue(v1.artifact.lease.closed)  # keep=1: the older version's lease ended
            self.assertEqual(pub.registrar.counts["republished"], 1)  # in the call that made v2
            self.assertEqual(self.store.stats()["leases"], leases)
            held = {a["artifact_id"]: a["lease_count"] for a in self.store.list()}
            self.assertEqual(held.get(v1.artifact_id, 0), 0)  # its warm stable copy may stay; no lease
            self.assertEqual([v.number for v in pub.versions], [2])
            self.assertEqual(sub.latest(), 2)
            module = torch.nn.Module()
            for k, (name, t) in enumerate(sd.items()):
                module.register_buffer(f"b{k}", torch.zeros_like(t))
            renamed = {f"b{k}": t for k, t in enumerate(sd.values())}
            with self.assertRaises(tensorreg.InvalidArgument) as ctx:
                sub.load_into(module, 2)
            self.assertIn("cannot load version 2 of 'policy-a': the names differ", ctx.exception.message)
            self.assertTrue(all(float(b.abs().sum()) == 0 for b in module.buffers()))  # nothing copied
            self.assertEqual(sorted(renamed), sorted(dict(module.named_buffers())))

    def test_load_into_checks_again_whenever_the_tensors_or_their_memory_change(self):
        # A reader with kept mappings gets the same source tensors for each version: the check of
        # the last load then stands, but only while the target holds the same tensors at the
        # same addresses.
        sd = model(12)
        with tensorreg.WeightPublisher(self.store, "policy-f", policy="warm") as pub:
            pub.publish(sd)
            sub = tensorreg.WeightSubscriber(self.store, "policy-f", device="cpu")
            src = sub.tensors(1)
            mine = {name: torch.zeros_like(t) for name, t in sd.items()}
            with mock.patch.object(sub, "tensors", lambda version=None: src):
                sub.load_into(mine, 1)
                for t in src.values():
                    t.add_(3)
                sub.load_into(mine, 1)
                self.assertTrue(all(torch.equal(mine[n], t) for n, t in src.items()))
                name = next(iter(mine))
                mine[name].data = torch.zeros_like(mine[name])  # same tensor object, new memory
                sub.load_into(mine, 1)
                self.assertTrue(torch.equal(mine[name], src[name]))
                mine[name] = torch.zeros(3, 3)
                with self.assertRaises(tensorreg.InvalidArgument) as ctx:
                    sub.load_into(mine, 1)
                self.assertIn(f"tensor '{name}' is", ctx.exception.message)

    def test_a_new_publisher_goes_on_after_the_versions_held_and_wait_for_times_out(self):
        sd = model(6)
        with tensorreg.WeightPublisher(self.store, "policy-b", keep=2, policy="warm") as pub:
            pub.publish(sd)
            pub.publish(sd)
            self.assertEqual([v.number for v in pub.versions], [1, 2])
            with tensorreg.WeightPublisher(self.store, "policy-b", policy="warm") as again:
                self.assertEqual(again.publish(model(7)).number, 3)
            sub = tensorreg.WeightSubscriber(self.store, "policy-b", device="cpu")
            with self.assertRaises(tensorreg.DeadlineExceeded) as ctx:
                sub.wait_for(9, timeout=0.05)
            self.assertIn("cannot wait for version 9 of 'policy-b': after 0.05 s the latest is 3",
                          ctx.exception.message)

    def test_shapes_that_differ_are_refused_and_names_are_checked(self):
        sd = model(8)
        with tensorreg.WeightPublisher(self.store, "policy-c", policy="warm") as pub:
            pub.publish(sd)
            sub = tensorreg.WeightSubscriber(self.store, "policy-c", device="cpu")
            mine = {name: torch.zeros_like(t) for name, t in sd.items()}
            mine["layers.1.w"] = torch.zeros(8, 16)
            with self.assertRaises(tensorreg.InvalidArgument) as ctx:
                sub.load_into(mine)
            self.assertIn("cannot load version 1 of 'policy-c': tensor 'layers.1.w' is (16, 8) torch.float32 in the "
                          "version but (8, 16) torch.float32 in the target", ctx.exception.message)
        for bad in ("", "a~b", "x" * 161, 3):
            with self.assertRaises(tensorreg.InvalidArgument) as ctx:
                tensorreg.WeightSubscriber(self.store, bad)
            self.assertIn("cannot sync weights under name", ctx.exception.message)
        with self.assertRaises(tensorreg.InvalidArgument) as ctx:
            tensorreg.WeightPublisher(self.store, "ok", keep=0)
        self.assertIn("keep must be an int >= 1, got 0", ctx.exception.message)
        with self.assertRaises(tensorreg.NotFound) as ctx:
            tensorreg.WeightSubscriber(self.store, "nobody", device="cpu").tensors()
        self.assertEqual(ctx.exception.message, "cannot read weights of 'nobody': no version is published")

    def test_a_verified_version_gets_the_mi2_id_of_its_bytes_on_both_sides(self):
        sd = model(11)
        with tensorreg.WeightPublisher(self.store, "policy-e", policy="warm") as pub:
            sub = tensorreg.WeightSubscriber(self.store, "policy-e", device="cpu")
            for expect_reused in (False, True):
                for t in sd.values():
                    t.add_(1)
                v = pub.publish(sd, verify=True)
                self.assertEqual(v.timings["reused"], expect_reused)
                mi2 = v.mi2(timeout=30)
                self.assertEqual(mi2, self.store.put(sd).artifact_id)
                self.assertEqual(sub.verified(v.number, timeout=30), mi2)

    def test_a_version_published_without_verify_has_no_mi2_to_wait_for(self):
        with tensorreg.WeightPublisher(self.store, "policy-d", policy="warm") as pub:
            v = pub.publish(model(9))
            with self.assertRaises(tensorreg.FailedPrecondition) as ctx:
                v.mi2()
            self.assertEqual(ctx.exception.message,
                             "cannot verify cgid:wsync~policy-d~1: it was published without verify=True")

    def test_the_readme_example_runs(self):
        with open(os.path.join(_support.REPO, "python", "README.md")) as f:
            text = f.read()
        block = text.split("A runnable version on CPU tensors")[1].split("```python\n")[1].split("```")[0]
        socket = self.daemon.socket
        real = tensorreg.Store

        def store(path=None, **kwargs):
            return real(path or socket, **kwargs)

        printed = []
        with mock.patch.object(tensorreg, "Store", store):
            exec(block, {"print": lambda *a: printed.append(a)})
        self.assertEqual(printed, [("cgid:wsync~demo~1", False), ("cgid:wsync~demo~2", True),
                                   ("cgid:wsync~demo~3", True)])


if __name__ == "__main__":
    _support.main()
