"""The Store's parts alone, without a daemon or a GPU: the wire requests (_requests), the lease
release (_leases) and the CUDA register flow (_register.CudaRegistration) over a fake
connection and a fake driver: regions sent first, the layout, Begin and Feed built while the
daemon answers, region refs filled in from the answers, and everything made released when one
region fails."""

import contextlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _support  # noqa: E402  (exits 77 without torch / protobuf)

# isort: split
import unittest  # noqa: E402
from unittest import mock  # noqa: E402

import torch  # noqa: E402

import tensorreg  # noqa: E402
from tensorreg import _cuda, _device, _leases, _messages, _register, _requests  # noqa: E402

MiB = 1 << 20
UUID = "GPU-02ad0eca-905c-d3d5-53ed-04fc6d6d50d6"


def body_of(request) -> str:
    return request.WhichOneof("body")


class FakeConnection:
    """Answers every request as the daemon would when all goes well (or with `fail_region`'s
    error for that RegisterRegion), and records what was sent, in order."""

    def __init__(self, fail_region=None):
        self.sent = []  # (body name, request, number of fds)
        self.sent_before_meanwhile = None
        self.fail_region = fail_region
        self.regions = 0
        self.closed = False

    def held_by_current_thread(self):
        return False

    def _answer(self, request):
        body = body_of(request)
        response = _messages.Response()
        if body == "register_region":
            self.regions += 1
            if self.regions == self.fail_region:
                return tensorreg.ResourceExhausted("cannot register region: the VRAM budget is full")
            ref = response.register_region.region
            ref.region_id = f"region:{self.regions}"
            ref.size_bytes = request.register_region.size_bytes
        elif body == "begin_register_artifact":
            response.begin_register_artifact.registration_id = "reg:1"
        elif body == "commit_registered_artifact":
            d = response.commit_registered_artifact.artifact_descriptor
            d.artifact_id = "mi2:fake"
            d.total_size = 64
        return response, []

    def call(self, request, fds=()):
        self.sent.append((body_of(request), request, len(fds)))
        answer = self._answer(request)
        if isinstance(answer, tensorreg.Error):
            raise answer
        return answer

    def call_many(self, calls, meanwhile=None):
        batch = list(calls)
        for request, fds in batch:
            self.sent.append((body_of(request), request, len(fds)))
        if meanwhile is not None:
            self.sent_before_meanwhile = len(self.sent)
            more = list(meanwhile() or ())
            for request, fds in more:
                self.sent.append((body_of(request), request, len(fds)))
            batch += more
        return [self._answer(request) for request, _ in batch]

    def feed(self, frames):
        for frame in frames:
            self.sent.append(("feed", frame, 0))
        return _messages.Response(), []

    def bodies(self):
        return [name for name, _, _ in self.sent]


class FakeDriver:
    """Two cudaMalloc allocations and one VMM page; exported fds are real (of /dev/null) so that
    the test sees them closed."""

    allocations = [(0x1000000, 20 * MiB, False), (0x8000000, 4 * MiB, False), (0x300000000, 2 * MiB, True)]

    def __init__(self):
        self.retained = 0
        self.released = 0
        self.exported = []

    def _find(self, ptr):
        for a in self.allocations:
            if a[0] <= ptr < a[0] + a[1]:
                return a
        raise tensorreg.FailedPrecondition(f"cannot find the allocation of device address {ptr:#x}")

    def address_range(self, ptr):
        base, size, _ = self._find(ptr)
        return base, size

    def try_ipc_handle(self, base):
        return None if self._find(base)[2] else base.to_bytes(8, "little") * 8

    def ipc_handle(self, base):
        return self.try_ipc_handle(base)

    def retain_allocation(self, ptr):
        base, _, vmm = self._find(ptr)
        if not vmm:
            return None
        self.retained += 1
        return base

    def release(self, handle):
        self.released += 1

    def handle_types(self, handle):
        return _device.POSIX_FD

    def device_uuid(self, ordinal):
        return UUID

    def on(self, ordinal):
        return contextlib.nullcontext()

    def export_fd(self, handle, what):
        fd = os.open(os.devnull, os.O_RDONLY)
        self.exported.append(fd)
        return fd


def cuda_state_dict():
    """(items, storages) as _layout.state_dict_storages gives them, the CPU tensors standing in
    for CUDA ones at the fake driver's addresses: "a" and "b" in one cudaMalloc allocation (one
    region), "c" alone in another (its IPC handle), "d" in the VMM page (a region with one fd)."""
    tensors = {name: torch.zeros(4) for name in "abcd"}
    where = {"a": 0x1000000, "b": 0x1000000 + 512, "c": 0x8000000, "d": 0x300000000}
    items = sorted(tensors.items())
    storages = [(t.untyped_storage() if hasattr(t, "untyped_storage") else t.storage(), where[name], 16,
                 "torch.float32") for name, t in items]
    return items, storages


def fd_count():
    return len(os.listdir("/proc/self/fd"))


class Requests(unittest.TestCase):
    def test_a_lease_begin_names_no_device_until_the_flow_knows_it(self):
        b = _requests.lease_begin(5000, "my-model", 3).begin_register_artifact
        self.assertEqual((b.device_id, b.ttl_ms, b.owner_pid, b.lease.in_place), (-1, 5000, os.getpid(), True))
        self.assertEqual((b.client_artifact_id, b.policy.profile, b.total_size), ("my-model", 3, 0))
        self.assertFalse(_requests.lease_begin(0, None, None).begin_register_artifact.HasField("policy"))

    def test_a_stable_dram_feed_writes_every_byte_and_completes_the_upload(self):
        feed = _requests.stable_dram_feed("reg:7", 4096).feed_register_artifact_stream
        self.assertEqual(feed.registration_id, "reg:7")
        ranges = [(r.canonical_offset, r.length) for r in feed.stable_dram_write_progress.ranges]
        self.assertEqual(ranges, [(0, 4096)])
        self.assertTrue(feed.stable_dram_write_progress.upload_complete)

    def test_an_unknown_policy_profile_names_the_known_ones(self):
        with self.assertRaises(tensorreg.InvalidArgument) as caught:
            _requests.policy_profile("fast", "put state dict")
        self.assertEqual(caught.exception.code_name, "INVALID_ARGUMENT")
        self.assertEqual(caught.exception.message, "cannot put state dict: unknown policy profile 'fast': expected "
                                                   "one of cache, durable, ha, cold, warm, pinned")
        self.assertIsNone(_requests.policy_profile("", "put state dict"))
        self.assertIsNone(_requests.policy_profile(None, "put state dict"))

    def test_regions_are_unregistered_by_force_and_keepalives_carry_their_epoch(self):
        u = _requests.unregister_region("region:9").unregister_region
        self.assertEqual((u.region_id, u.owner_pid, u.force), ("region:9", os.getpid(), True))
        k = _requests.keep_alive("reg:2", 8000, 3).keep_alive_register_artifact
        self.assertEqual((k.registration_id, k.ttl_ms, k.epoch, k.owner_pid), ("reg:2", 8000, 3, os.getpid()))


class Leases(unittest.TestCase):
    def test_closing_a_lease_revokes_it_then_unregisters_its_regions_once(self):
        conn = FakeConnection()
        lease = _leases.Lease(conn, "reg:1", ["region:1", "region:2"], 0)
        self.assertIsNone(lease._state.thread)  # ttl 0: no expiry, so no keepalive thread
        lease.close()
        lease.close()
        self.assertTrue(lease.closed)
        self.assertEqual(conn.bodies(), ["revoke_registered_artifact", "unregister_region", "unregister_region"])
        self.assertEqual(conn.sent[0][1].revoke_registered_artifact.reason, "lease released by its holder")

    def test_nothing_is_sent_over_a_closed_connection(self):
        conn = FakeConnection()
        conn.closed = True
        _leases.release_now(conn, "reg:1", ["region:1"])
        self.assertEqual(conn.sent, [])


class CudaRegister(unittest.TestCase):
    def run_registration(self, conn, drv):
        items, storages = cuda_state_dict()
        begin = _requests.lease_begin(0, None, None)
        with mock.patch.object(_cuda, "driver", lambda: drv):
            flow = _register.CudaRegistration(conn, torch, items, storages, torch.device("cuda", 0), begin)
            return flow.run(0, 0.0)

    def test_regions_go_first_and_the_feed_built_meanwhile_takes_their_refs(self):
        conn, drv = FakeConnection(), FakeDriver()
        before = fd_count()
        art = self.run_registration(conn, drv)
        try:
            self.assertEqual(conn.bodies(), ["register_region", "register_region", "begin_register_artifact",
                                             "feed", "commit_registered_artifact"])
            self.assertEqual(conn.sent_before_meanwhile, 2)  # both regions were out before the build
            self.assertEqual([n for _, _, n in conn.sent[:2]], [0, 1])  # the VMM page's fd rides along
            b = conn.sent[2][1].begin_register_artifact
            # Four 16-byte storages, 8-aligned: the layout's total_size, set while the regions were out.
            self.assertEqual((b.device_id, b.device_uuid, b.total_size), (0, UUID, 64))
            self.assertEqual(sorted(art.index), ["a", "b", "c", "d"])
            feed = conn.sent[3][1].feed_register_artifact_stream
            self.assertEqual(feed.registration_id, "reg:1")
            entries = {e.storage_id: e for e in feed.storage_entries}
            self.assertEqual(len(entries), 4)
            self.assertEqual([e.region_ref.region_id for e in (entries["s0"], entries["s1"])], ["region:1"] * 2)
            self.assertEqual([e.mapping_base_offset for e in (entries["s0"], entries["s1"])], [0, 512])
            self.assertEqual(entries["s2"].cuda_ipc_handle, (0x8000000).to_bytes(8, "little") * 8)
            self.assertFalse(entries["s2"].HasField("region_ref"))
            self.assertEqual(entries["s3"].region_ref.region_id, "region:2")
            self.assertTrue(all(e.device_uuid == UUID for e in entries.values()))
            self.assertEqual((art.artifact_id, art.registration_kind), ("mi2:fake", "lease_in_place"))
            self.assertEqual(art.lease.region_ids, ["region:1", "region:2"])
            self.assertEqual(set(art.timings), {"metadata", "rpc", "commit", "feed_build", "answer_wait"})
            self.assertEqual(fd_count(), before)  # the exported fd is closed once sent
            self.assertEqual((drv.retained, drv.released), (1, 1))
        finally:
            art.close()
        self.assertEqual(conn.bodies()[5:], ["revoke_registered_artifact", "unregister_region", "unregister_region"])

    def test_a_refused_region_releases_the_registration_and_the_regions_made(self):
        conn, drv = FakeConnection(fail_region=2), FakeDriver()
        before = fd_count()
        with self.assertRaises(tensorreg.ResourceExhausted) as caught:
            self.run_registration(conn, drv)
        self.assertEqual(caught.exception.code_name, "RESOURCE_EXHAUSTED")
        self.assertEqual(caught.exception.message, "cannot register region: the VRAM budget is full")
        self.assertEqual(conn.bodies()[3:], ["revoke_registered_artifact", "unregister_region"])
        self.assertEqual(conn.sent[3][1].revoke_registered_artifact.registration_id, "reg:1")
        self.assertEqual(conn.sent[4][1].unregister_region.region_id, "region:1")
        self.assertEqual(fd_count(), before)
        self.assertEqual((drv.retained, drv.released), (1, 1))


if __name__ == "__main__":
    _support.main()
