"""The Python client's GPU logic without a GPU: the registration plan over a fake CUDA driver
(allocations looked up once, IPC regions vs handles, VMM pages merged into runs and cut into
windows of at most 250 pages that overlap where a storage crosses), the wire messages with
device_uuid / cuda_vmm / OpenArtifactDevice, rebuilding tensors from device segments (on CPU
tensors standing in for mappings), the frame reader's fd attribution, and the errors when there
is no GPU."""

import array
import os
import socket
import struct
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _support  # noqa: E402  (exits 77 without torch / protobuf)

# isort: split
import unittest  # noqa: E402

import torch  # noqa: E402

import tensorreg  # noqa: E402
from tensorreg import _cuda, _device, _layout, _messages, _wire  # noqa: E402

MiB = 1 << 20
UUID = "GPU-02ad0eca-905c-d3d5-53ed-04fc6d6d50d6"


class FakeDriver:
    """Device memory as a list of allocations: (base, size, vmm, handle types). It counts every
    query, and the VMM handles retained and released, so tests can check both."""

    def __init__(self, allocations):
        self.allocations = sorted(allocations)
        self.range_queries = 0
        self.ipc_exports = []
        self.retained = 0
        self.released = 0
        self.ipc_refused = 0
        self.retain_refused = 0

    def _find(self, ptr):
        for a in self.allocations:
            if a[0] <= ptr < a[0] + a[1]:
                return a
        raise tensorreg.FailedPrecondition(f"cannot find the allocation of device address {ptr:#x}: "
                                           f"CUDA_ERROR_NOT_FOUND")

    def address_range(self, ptr):
        self.range_queries += 1
        base, size, _, _ = self._find(ptr)
        return base, size

    def retain_allocation(self, ptr):
        base, _, vmm, _ = self._find(ptr)
        if vmm is not True:  # False: cudaMalloc memory; "pool": neither (cudaMallocAsync)
            self.retain_refused += 1
            return None
        self.retained += 1
        return base  # the handle is the page's base, so tests can read it back

    def release(self, handle):
        self.released += 1

    def handle_types(self, handle):
        return self._find(handle)[3]

    def try_ipc_handle(self, base):
        if self._find(base)[2]:
            self.ipc_refused += 1
            return None  # the driver refuses VMM memory
        self.ipc_exports.append(base)
        return base.to_bytes(8, "little") * 8

    def ipc_handle(self, base):
        handle = self.try_ipc_handle(base)
        if handle is None:
            raise tensorreg.FailedPrecondition(f"cannot export an IPC handle for the allocation at {base:#x}: "
                                               f"CUDA_ERROR_INVALID_VALUE")
        return handle


def vmm_pages(base, count, size=2 * MiB, types=_device.POSIX_FD):
    return [(base + k * size, size, True, types) for k in range(count)]


class Plans(unittest.TestCase):
    def test_a_cudamalloc_allocation_backing_several_storages_becomes_one_region(self):
        drv = FakeDriver([(0x1000000, 20 * MiB, False, 0), (0x8000000, 4 * MiB, False, 0)])
        spans = [(0x1000000 + 512, 1000), (0x8000000, 4 * MiB), (0x1000000 + 2 * MiB, 4096), (0x1000000, 0)]
        plan = _device.plan(drv, spans, "register state dict")
        self.assertEqual(len(plan.regions), 1)
        r = plan.regions[0]
        self.assertEqual((r.base, r.size, r.pages, sorted(r.storages)), (0x1000000, 20 * MiB, [], [0, 2]))
        self.assertEqual(r.ipc_handle, drv.ipc_handle(0x1000000))
        self.assertEqual(plan.sources[0], _device.Source(0, None, 512))
        self.assertEqual(plan.sources[2], _device.Source(0, None, 2 * MiB))
        # The lone storage of the other allocation names its handle directly.
        self.assertEqual(plan.sources[1], _device.Source(None, drv.ipc_handle(0x8000000), 0))
        # Each allocation was looked up and exported once, whatever the number of storages, and
        # cudaMalloc memory was never asked for a VMM handle.
        self.assertEqual(drv.range_queries, 2)
        self.assertEqual(sorted(drv.ipc_exports[:2]), [0x1000000, 0x8000000])
        self.assertEqual((drv.retained, drv.retain_refused), (0, 0))
        # The empty storage borrows a source: nothing is read from it.
        self.assertIn(plan.sources[3], plan.sources[:3])

    def test_vmm_pages_of_all_storages_merge_into_runs_of_adjacent_pages(self):
        pages = vmm_pages(0x300000000, 6) + vmm_pages(0x400000000, 2, 20 * MiB)
        drv = FakeDriver(pages)
        spans = [
            (0x300000000 + 1024, 3 * MiB),          # pages 0-1
            (0x300000000 + 2 * MiB + 3 * MiB, 100),  # page 2 (adjacent to the run)
            (0x300000000 + 5 * MiB + 1, 1),          # page 2 again
            (0x400000000 + 19 * MiB, 2 * MiB),       # pages 0-1 of the other reservation
        ]
        plan = _device.plan(drv, spans, "register state dict")
        self.assertEqual([(r.base, r.size, [p.size for p in r.pages]) for r in plan.regions],
                         [(0x300000000, 6 * MiB, [2 * MiB] * 3), (0x400000000, 40 * MiB, [20 * MiB] * 2)])
        self.assertTrue(all(r.ipc_handle is None for r in plan.regions))
        self.assertEqual(plan.sources[0], _device.Source(0, None, 1024))
        self.assertEqual(plan.sources[1], _device.Source(0, None, 5 * MiB))
        self.assertEqual(plan.sources[3], _device.Source(1, None, 19 * MiB))
        # Pages 3-5 of the first reservation back no storage: they are not looked up or sent.
        self.assertEqual(drv.range_queries, 5)
        self.assertEqual(drv.retained, 5)
        # Only the first page was asked for an IPC handle: after it, VMM is asked first.
        self.assertEqual((drv.ipc_refused, drv.retain_refused), (1, 0))
        plan.release(drv)
        self.assertEqual(drv.released, drv.retained)

    def test_a_gap_between_pages_starts_a_new_run(self):
        pages = vmm_pages(0x300000000, 1) + vmm_pages(0x300000000 + 4 * MiB, 1)
        plan = _device.plan(FakeDriver(pages), [(0x300000000, 8), (0x300000000 + 4 * MiB, 8)], "register")
        self.assertEqual([r.base for r in plan.regions], [0x300000000, 0x300000000 + 4 * MiB])
        self.assertEqual([s.region for s in plan.sources], [0, 1])

    def test_runs_longer_than_250_pages_are_cut_where_no_storage_crosses(self):
        drv = FakeDriver(vmm_pages(0x300000000, 300))
        # One storage per page, except one that spans pages 249-250: the cut moves before it.
        spans = [(0x300000000 + k * 2 * MiB, 2 * MiB) for k in range(300) if k not in (249, 250)]
        spans.append((0x300000000 + 249 * 2 * MiB + 8, 2 * MiB))
        plan = _device.plan(drv, spans, "register state dict")
        self.assertEqual([len(r.pages) for r in plan.regions], [249, 51])
        self.assertEqual(plan.sources[-1], _device.Source(1, None, 8))
        self.assertTrue(all(len(r.pages) <= _device.MAX_CHUNKS_PER_REGION for r in plan.regions))

    def test_windows_start_at_the_first_storage_left_and_take_every_storage_that_ends_inside(self):
        # (first page, last page, storage)
        self.assertEqual(_device.windows([(p, p, p) for p in range(600)], 250, "x"),
                         [(0, 249, list(range(250))), (250, 499, list(range(250, 500))),
                          (500, 599, list(range(500, 600)))])
        # Storage 2 crosses from page 4 into page 5: the second window starts at its first page.
        self.assertEqual(_device.windows([(0, 1, 0), (2, 4, 1), (4, 5, 2), (6, 8, 3), (8, 9, 4)], 5, "x"),
                         [(0, 4, [0, 1]), (4, 8, [2, 3]), (8, 9, [4])])
        # A storage that ends inside the window but starts before a longer one is still taken.
        self.assertEqual(_device.windows([(0, 6, 0), (1, 2, 1)], 8, "x"), [(0, 6, [0, 1])])
        with self.assertRaises(tensorreg.Unimplemented) as ctx:
            _device.windows([(0, 3, 0), (3, 9, 7)], 5, "register state dict")
        self.assertIn("cannot register state dict: storage 7 spans 7 VMM pages, more than one region may hold",
                      ctx.exception.message)

    def test_storages_packed_across_every_page_boundary_get_overlapping_windows(self):
        # PyTorch's expandable segments pack tensors back to back over 20 MiB pages, so nearly
        # every page boundary is crossed: 1 200 storages of 1.5 pages over 1 800 pages.
        page = 2 * MiB
        drv = FakeDriver(vmm_pages(0x300000000, 1800, page))
        spans = [(0x300000000 + k * 3 * MiB, 3 * MiB) for k in range(1200)]
        plan = _device.plan(drv, spans, "register state dict")
        self.assertTrue(all(len(r.pages) <= _device.MAX_CHUNKS_PER_REGION for r in plan.regions))
        self.assertEqual(sorted(k for r in plan.regions for k in r.storages), list(range(1200)))
        for k, (ptr, nbytes) in enumerate(spans):
            r = plan.regions[plan.sources[k].region]
            self.assertEqual(r.base + plan.sources[k].mapping_base_offset, ptr)
            self.assertLessEqual(plan.sources[k].mapping_base_offset + nbytes, r.size)
        # Consecutive windows share at most the one page a storage crosses.
        for a, b in zip(plan.regions, plan.regions[1:]):
            self.assertIn(b.base - (a.base + a.size), (0, -page))
        self.assertEqual(drv.retained, 1800)  # each page looked up once, however many windows hold it
        plan.release(drv)
        self.assertEqual(drv.released, drv.retained)

    def test_vmm_pages_without_the_posix_fd_handle_type_name_the_fix(self):
        drv = FakeDriver(vmm_pages(0x300000000, 2, types=_cuda.CU_MEM_HANDLE_TYPE_FABRIC))
        with self.assertRaises(tensorreg.FailedPrecondition) as ctx:
            _device.plan(drv, [(0x300000000, 3 * MiB)], "register state dict")
        message = ctx.exception.message
        self.assertIn("cannot register state dict: the VMM allocation at 0x300000000 cannot be exported as a POSIX "
                      "fd (its handle types are 0x8)", message)
        self.assertIn("expandable_segments:False", message)
        self.assertEqual(drv.released, drv.retained)  # nothing leaks on the error path

    def test_cudamalloc_memory_after_vmm_pages_is_found_either_way(self):
        drv = FakeDriver(vmm_pages(0x300000000, 2) + [(0x400000000, 2 * MiB, False, 0)])
        plan = _device.plan(drv, [(0x300000000, 3 * MiB), (0x400000000 + 64, 8)], "register state dict")
        self.assertEqual(plan.sources[1], _device.Source(None, drv.ipc_handle(0x400000000), 64))
        self.assertEqual([len(r.pages) for r in plan.regions], [2])
        self.assertEqual((drv.ipc_refused, drv.retain_refused), (1, 1))  # one wrong guess at each switch

    def test_memory_neither_cudamalloc_nor_vmm_is_refused_with_the_drivers_reason(self):
        drv = FakeDriver([(0x1000000, 2 * MiB, "pool", 0)])
        with self.assertRaises(tensorreg.FailedPrecondition) as ctx:
            _device.plan(drv, [(0x1000000, 8)], "register state dict")
        self.assertIn("cannot export an IPC handle for the allocation at 0x1000000: CUDA_ERROR_INVALID_VALUE",
                      ctx.exception.message)

    def test_a_cudamalloc_storage_past_its_allocation_is_a_driver_inconsistency(self):
        drv = FakeDriver([(0x1000000, 2 * MiB, False, 0)])
        with self.assertRaises(tensorreg.DataLoss) as ctx:
            _device.plan(drv, [(0x1000000 + MiB, 2 * MiB)], "register state dict")
        self.assertIn("storage 0 at 0x1100000 of 2097152 bytes ends past its allocation", ctx.exception.message)


class Messages(unittest.TestCase):
    def test_region_requests_carry_the_device_uuid_and_the_vmm_chunks(self):
        region = _device.Region(0x300000000, 6 * MiB, None, [_device.Allocation(0x300000000 + k * 2 * MiB, 2 * MiB, 1)
                                                               for k in range(3)], [0])
        r = _device.region_request(region, 1, UUID, 4242).register_region
        self.assertEqual(r.memory_kind, _messages.enum_value("tensorcast.daemon.v2.RegionMemoryKind",
                                                            "REGION_MEMORY_KIND_VRAM"))
        self.assertEqual((r.owner_pid, r.size_bytes, r.device_id, r.device_uuid), (4242, 6 * MiB, 1, UUID))
        self.assertEqual(r.WhichOneof("region_source"), "cuda_vmm")
        self.assertEqual(list(r.cuda_vmm.chunk_bytes), [2 * MiB] * 3)
        raw = r.SerializeToString()
        # device_uuid is field 2001 (key 2001 << 3 | 2 = varint 8a 7d), cuda_vmm field 2002 (92 7d).
        self.assertIn(bytes.fromhex("8a7d") + bytes([len(UUID)]) + UUID.encode(), raw)
        self.assertIn(bytes.fromhex("927d"), raw)
        ipc = _device.region_request(_device.Region(0x1000, 4096, b"h" * 64, [], [0, 1]), 0, UUID, 1).register_region
        self.assertEqual((ipc.WhichOneof("region_source"), ipc.cuda_ipc_handle), ("cuda_ipc_handle", b"h" * 64))

    def test_open_artifact_device_is_body_43_and_the_uuid_fields_are_2001(self):
        r = _messages.Request()
        r.request_id = 1
        r.open_artifact_device.artifact_id = "x"
        self.assertEqual(r.SerializeToString(), bytes.fromhex("0801" + "da02" + "03" + "0a0178"))
        b = _messages.Request().begin_register_artifact
        b.device_uuid = "GPU-1"
        self.assertEqual(b.SerializeToString(), bytes.fromhex("8a7d05") + b"GPU-1")
        e = _messages.FeedRequest().storage_entries.add()
        e.device_uuid = "GPU-1"
        self.assertEqual(e.SerializeToString(), bytes.fromhex("8a7d05") + b"GPU-1")


def sample_state_dict():
    g = torch.Generator().manual_seed(7)
    w = torch.randn(6, 5, generator=g)
    base = torch.arange(40, dtype=torch.int64)
    return {
        "embed.weight": w, "lm_head.weight": w, "transposed": w.t(),
        "slice": base[10:30].view(4, 5), "strided": base[::3],
        "bf16": torch.randn(7, generator=g).to(torch.bfloat16), "i8": torch.arange(9, dtype=torch.int8),
        "mask": torch.tensor([True, False, True]), "empty": torch.zeros(0, 4), "scalar": torch.tensor(2.5),
    }


class Views(unittest.TestCase):
    def test_segments_find_the_one_segment_holding_a_storage(self):
        segs = _device.Segments([(100, 50, 1, 0), (0, 100, 0, 4096), (200, 10, 0, 0)], "open x")
        self.assertEqual(segs.find(0, 100, "a"), (0, 4096))
        self.assertEqual(segs.find(40, 8, "a"), (0, 4136))
        self.assertEqual(segs.find(120, 30, "b"), (1, 20))
        for offset, nbytes in ((90, 20), (150, 8), (300, 1)):
            with self.assertRaises(tensorreg.DataLoss) as ctx:
                segs.find(offset, nbytes, "c")
            self.assertIn(f"cannot open x: the storage of tensor 'c' at [{offset}, {offset + nbytes}) lies in no "
                          f"single device segment", ctx.exception.message)

    def test_a_registration_plan_read_back_through_segments_gives_the_same_tensors(self):
        # register: the storages live at fake device addresses, some in one cudaMalloc block,
        # others in VMM pages; open: the daemon's segments name the regions and handles the plan
        # made, and CPU tensors stand in for the mappings of those allocations.
        sd = sample_state_dict()
        layout = _layout.build(_layout.state_dict_descs(torch, sd, "register")[0])
        block, pages = 0x1000000, 0x300000000
        addresses, memory = [], {}
        for k, s in enumerate(layout.storages):
            # Odd storages share one cudaMalloc block; even ones end 64 bytes into the next VMM page.
            addresses.append((block + 512 * k if k % 2 else pages + 2 * MiB * (k + 1) - s.nbytes + 64, s.nbytes))
        drv = FakeDriver([(block, 2 * MiB, False, 0)] + vmm_pages(pages, 2 * len(layout.storages)))
        plan = _device.plan(drv, addresses, "register")
        allocations = []  # (base, size) the reader maps: regions, then lone handles
        index_of = {}
        for r in plan.regions:
            index_of[("region", r.base)] = len(allocations)
            allocations.append((r.base, r.size))
        segments = []
        for k, (s, src) in enumerate(zip(layout.storages, plan.sources)):
            if src.region is not None:
                which = index_of[("region", plan.regions[src.region].base)]
            else:
                key = ("handle", src.ipc_handle)
                if key not in index_of:
                    index_of[key] = len(allocations)
                    allocations.append((block, 2 * MiB))
                which = index_of[key]
            if s.nbytes:
                segments.append((s.offset, s.nbytes, which, src.mapping_base_offset))
        self.assertTrue(any(r.ipc_handle for r in plan.regions) and any(r.pages for r in plan.regions))
        for which, (base, size) in enumerate(allocations):
            memory[which] = torch.zeros(size, dtype=torch.uint8)
        # The producer's bytes sit at their own addresses, whatever offsets the plan computed.
        for k, s in enumerate(layout.storages):
            for (offset, nbytes, which, _) in segments:
                if offset == s.offset and s.nbytes:
                    at = addresses[k][0] - allocations[which][0]
                    memory[which][at:at + nbytes] = _layout.storage_bytes(torch, s.source)
        found = _device.Segments(segments, "open x")

        def locate(offset, nbytes, name):
            which, at = found.find(offset, nbytes, name)
            return memory[which], at

        got = _device.build_views(torch, layout.index, locate, "open x")
        self.assertEqual(sorted(got), sorted(sd))
        for name, t in sd.items():
            self.assertEqual((got[name].dtype, tuple(got[name].shape), got[name].stride()),
                             (t.dtype, tuple(t.shape), t.stride()), name)
            self.assertTrue(torch.equal(got[name], t), name)
        self.assertEqual(got["embed.weight"].data_ptr(), got["lm_head.weight"].data_ptr())
        self.assertEqual(got["transposed"].data_ptr(), got["embed.weight"].data_ptr())
        # Views, not copies: a write through one name is seen through its tie.
        got["embed.weight"][0, 0] = 123.0
        self.assertEqual(float(got["transposed"][0, 0]), 123.0)

    def test_a_malformed_index_entry_is_data_loss(self):
        with self.assertRaises(tensorreg.DataLoss) as ctx:
            _device.build_views(torch, {"a": [0, 4, [2], [1], "torch.float32", 0]}, None, "open x")
        self.assertIn("cannot open x: tensor 'a' reaches past its storage of 4 bytes", ctx.exception.message)
        with self.assertRaises(tensorreg.DataLoss):
            _device.build_views(torch, {"a": [0, 4]}, None, "open x")
        memory = torch.zeros(64, dtype=torch.uint8)
        with self.assertRaises(tensorreg.DataLoss) as ctx:
            _device.build_views(torch, {"a": [0, 4, [2], [1], "torch.int16", 0]}, lambda o, n, name: (memory, 3),
                                "open x")
        self.assertIn("cannot open x: the storage of tensor 'a' lies at byte 3 of its memory, not on a 2-byte "
                      "torch.int16 boundary", ctx.exception.message)


class Frames(unittest.TestCase):
    def test_fds_go_to_the_frame_they_were_sent_with_when_answers_arrive_together(self):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        # The constructor connects to a path; give the frame reader the state it would have.
        conn = _wire.Connection.__new__(_wire.Connection)
        conn.path, conn.timeout, conn._sock, conn._closed = "socketpair", 5, ours, False
        conn._rbuf, conn._rfds = bytearray(), {}

        def frame(request_id):
            r = _messages.Response()
            r.request_id = request_id
            r.status.SetInParent()
            r.get_stats.SetInParent()
            payload = r.SerializeToString()
            return struct.pack("<I", len(payload)) + payload

        r, w = os.pipe()
        try:
            theirs.sendall(frame(1))
            theirs.sendmsg([frame(2)], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [r]))])
            theirs.sendall(frame(3))
            answers = [conn._receive(ours, k) for k in (1, 2, 3)]
            self.assertEqual([a[0].request_id for a in answers], [1, 2, 3])
            self.assertEqual([len(a[1]) for a in answers], [0, 1, 0])
            os.write(w, b"x")
            self.assertEqual(os.read(answers[1][1][0], 1), b"x")  # the very pipe we sent
            os.close(answers[1][1][0])
        finally:
            for fd in (r, w):
                os.close(fd)
            ours.close()
            theirs.close()


class OpenPaging(unittest.TestCase):
    """OpenArtifactDevice answers carry at most 250 fds: the client asks page after page and
    gives each VMM allocation the fds of its own page (docs/wire-format.md §13)."""

    class FakeConnection:
        def __init__(self, pages):
            self.pages = pages  # first_allocation -> (end_allocation, fds per allocation in the page)
            self.asked = []

        def call(self, request):
            first = request.open_artifact_device.first_allocation
            self.asked.append(first)
            end, per_allocation = self.pages[first]
            answer = _messages.Response()
            body = answer.open_artifact_device
            body.end_allocation = end
            fds = []
            for k in range(3):
                a = body.allocations.add()
                a.device_uuid = UUID
                a.size_bytes = 2 * MiB * (k + 1)
                for _ in range(k + 1):
                    chunk = a.vmm.chunks.add()
                    chunk.size_bytes = 2 * MiB
                    if first <= k < end:
                        r, w = os.pipe()
                        os.close(w)
                        chunk.fd_index = len(fds)
                        fds.append(r)
                    else:
                        chunk.fd_index = 0xFFFFFFFF
            return answer, fds

    def test_every_vmm_allocation_gets_its_own_fds_across_pages(self):
        conn = self.FakeConnection({0: (2, None), 2: (3, None)})
        store = tensorreg.Store.__new__(tensorreg.Store)
        store._conn = conn
        body, fds, vmm_fds = store._open_pages("mi2:x", "open mi2:x")
        try:
            self.assertEqual(conn.asked, [0, 2])
            self.assertEqual(len(fds), 1 + 2 + 3)
            self.assertEqual(sorted(vmm_fds), [0, 1, 2])
            self.assertEqual([len(vmm_fds[k]) for k in range(3)], [1, 2, 3])
            self.assertEqual(len(set(fd for k in vmm_fds for fd in vmm_fds[k])), 6)
        finally:
            _wire._close_fds(fds)

    def test_a_page_that_makes_no_progress_is_data_loss_and_closes_what_came(self):
        conn = self.FakeConnection({0: (1, None), 1: (1, None)})
        store = tensorreg.Store.__new__(tensorreg.Store)
        store._conn = conn
        before = len(os.listdir("/proc/self/fd"))
        with self.assertRaises(tensorreg.DataLoss):
            store._open_pages("mi2:x", "open mi2:x")
        self.assertEqual(len(os.listdir("/proc/self/fd")), before)


class NoGpu(unittest.TestCase):
    def setUp(self):
        if _cuda._driver is not None:
            self.skipTest("a CUDA driver is loaded")
        self.old = os.environ.get("TENSORREG_LIBCUDA")
        os.environ["TENSORREG_LIBCUDA"] = "/nonexistent/libcuda.so.1"

    def tearDown(self):
        if self.old is None:
            os.environ.pop("TENSORREG_LIBCUDA", None)
        else:
            os.environ["TENSORREG_LIBCUDA"] = self.old

    def test_the_driver_is_a_clear_failed_precondition_without_a_gpu(self):
        with self.assertRaises(tensorreg.FailedPrecondition) as ctx:
            _cuda.driver()
        self.assertIn("cannot use CUDA: cannot load the NVIDIA driver library /nonexistent/libcuda.so.1",
                      ctx.exception.message)

    def test_importing_tensorreg_does_not_load_the_driver(self):
        self.assertIsNone(_cuda._driver)


if __name__ == "__main__":
    _support.main()
