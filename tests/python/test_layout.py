"""The Python client without a daemon: canonical index bytes, layout rules, input checks, the
message classes and the frame bytes of docs/wire-format.md §10."""

import json
import os
import struct
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _support  # noqa: E402  (exits 77 without torch / protobuf)

# isort: split
import unittest  # noqa: E402

import torch  # noqa: E402

import tensorreg  # noqa: E402
from tensorreg import _layout, _messages  # noqa: E402


def layout_of(sd):
    descs, _ = _layout.state_dict_descs(torch, sd, "put state dict")
    return _layout.build(descs)


class CanonicalIndex(unittest.TestCase):
    def test_names_with_non_ascii_characters_are_escaped_as_the_sdk_does(self):
        sd = {"z": torch.zeros(1), "é": torch.zeros(2), "日本": torch.zeros(1), "a\"b\\c\n": torch.zeros(1),
              "😀": torch.zeros(1)}
        lay = layout_of(sd)
        expected = json.dumps(lay.index, separators=(",", ":"), sort_keys=True, ensure_ascii=True).encode()
        self.assertEqual(lay.json, expected)
        text = lay.json.decode("ascii")
        self.assertIn('"\\u00e9"', text)
        self.assertIn('"\\u65e5\\u672c"', text)
        self.assertIn('"\\ud83d\\ude00"', text)  # above U+FFFF: a surrogate pair
        self.assertIn('"a\\"b\\\\c\\n"', text)
        # Keys by code point: 'z' before 'é' (not by the escaped text, where '\\u' < 'z').
        self.assertLess(text.index('"z"'), text.index('"\\u00e9"'))

    def test_storages_are_laid_out_by_name_8_byte_aligned_with_whole_storage_sizes(self):
        w = torch.arange(12, dtype=torch.float32).view(3, 4)
        sd = {"c": torch.ones(3, dtype=torch.uint8), "b": w, "a_tied": w, "d_slice": w[1:], "e_t": w.t(),
              "f": torch.ones(1, dtype=torch.float16)}
        lay = layout_of(sd)
        self.assertEqual(lay.index["a_tied"], [0, 48, [3, 4], [4, 1], "torch.float32", 0])
        self.assertEqual(lay.index["b"], [0, 48, [3, 4], [4, 1], "torch.float32", 0])
        self.assertEqual(lay.index["c"], [48, 3, [3], [1], "torch.uint8", 0])
        self.assertEqual(lay.index["d_slice"], [0, 48, [2, 4], [4, 1], "torch.float32", 4])
        self.assertEqual(lay.index["e_t"], [0, 48, [4, 3], [1, 4], "torch.float32", 0])
        self.assertEqual(lay.index["f"], [56, 2, [1], [1], "torch.float16", 0])
        self.assertEqual(lay.total_size, 58)
        self.assertEqual(len(lay.storages), 3)

    def test_a_slice_registers_its_whole_storage(self):
        base = torch.arange(10, dtype=torch.int64)
        lay = layout_of({"s": base[3:7]})
        self.assertEqual(lay.index["s"], [0, 80, [4], [1], "torch.int64", 3])

    def test_bool_keeps_its_dtype_string(self):
        lay = layout_of({"m": torch.tensor([True, False])})
        self.assertEqual(lay.index["m"][4], "torch.bool")

    def test_the_canonical_json_helper_is_exported(self):
        self.assertEqual(tensorreg.canonical_json({"b": [1], "a": [2]}), b'{"a":[2],"b":[1]}')


class BadInput(unittest.TestCase):
    def check(self, sd, cls, *parts):
        with self.assertRaises(cls) as ctx:
            layout_of(sd)
        for p in parts:
            self.assertIn(p, ctx.exception.message)
        return ctx.exception

    def test_an_unsupported_dtype_names_the_tensor_and_the_dtype(self):
        e = self.check({"ok": torch.zeros(1), "c": torch.zeros(2, dtype=torch.complex64)}, tensorreg.InvalidArgument,
                       "'c'", "torch.complex64")
        self.assertIsInstance(e, ValueError)
        self.assertEqual(e.code, 3)

    def test_an_empty_dict_is_invalid(self):
        self.check({}, tensorreg.InvalidArgument, "empty tensor dict")

    def test_all_empty_tensors_make_total_size_0(self):
        self.check({"a": torch.zeros(0)}, tensorreg.InvalidArgument, "total_size would be 0")

    def test_check_refuses_what_build_refuses_before_anything_is_laid_out(self):
        for names, nbytes, part in (([], [], "empty tensor dict"), (["a", "b"], [0, 0], "total_size would be 0"),
                                    (["b", "a", "b"], [4, 4, 8], "duplicate tensor name 'b'")):
            with self.assertRaises(tensorreg.InvalidArgument) as ctx:
                _layout.check(names, nbytes)
            self.assertIn(part, ctx.exception.message)
            with self.assertRaises(tensorreg.InvalidArgument) as built:
                _layout.build([_layout.Desc(n, (k, b), b, [b], [1], "torch.uint8", 0, None)
                               for k, (n, b) in enumerate(zip(names, nbytes))])
            self.assertEqual(ctx.exception.message, built.exception.message)
        _layout.check(["a", "b"], [8, 0])  # fine: no exception

    def test_describing_in_two_halves_is_describing_at_once(self):
        w = torch.randn(6, 5)
        sd = {"w": w, "t": w.t(), "s": torch.arange(10)[3:7]}
        items, storages, device = _layout.state_dict_storages(torch, sd, "register state dict")
        self.assertEqual(device, "cpu")
        self.assertEqual([(d.name, d.storage_key, d.shape, d.stride, d.dtype, d.storage_offset)
                          for d in _layout.describe(items, storages)],
                         [(d.name, d.storage_key, d.shape, d.stride, d.dtype, d.storage_offset)
                          for d in _layout.state_dict_descs(torch, sd, "x")[0]])
        self.assertEqual(storages[0][1:], (w.untyped_storage().data_ptr() if hasattr(w, "untyped_storage")
                                           else w.storage().data_ptr(), 120, "torch.float32"))

    def test_non_tensor_values_and_non_str_names_are_invalid(self):
        self.check({"a": [1, 2]}, tensorreg.InvalidArgument, "'a'", "not a torch.Tensor")
        self.check({1: torch.zeros(1)}, tensorreg.InvalidArgument, "not a str")
        self.check({"\ud800": torch.zeros(1)}, tensorreg.InvalidArgument, "not valid UTF-8")

    def test_sparse_and_meta_tensors_are_invalid(self):
        self.check({"s": torch.zeros(2, 2).to_sparse()}, tensorreg.InvalidArgument, "layout")
        self.check({"m": torch.zeros(2, device="meta")}, tensorreg.InvalidArgument, "meta")

    @unittest.skipUnless(torch.cuda.is_available(), "no CUDA device")
    def test_cpu_and_cuda_tensors_together_are_invalid(self):
        e = self.check({"a": torch.zeros(1), "b": torch.zeros(1, device="cuda")}, tensorreg.InvalidArgument,
                       "several devices", "cpu ('a')", "cuda:0 ('b')")
        self.assertIsInstance(e, ValueError)

    @unittest.skipUnless(torch.cuda.is_available(), "no CUDA device")
    def test_cuda_tensors_lay_out_as_their_cpu_copies_do(self):
        def sd(device):
            w = torch.arange(12, dtype=torch.float32, device=device).view(3, 4)
            return {"b": w, "a_tied": w, "t": w.t(), "s": torch.arange(10, device=device)[3:7]}

        descs, device = _layout.state_dict_descs(torch, sd("cuda"), "put state dict")
        self.assertEqual(device, "cuda:0")
        self.assertEqual(_layout.build(descs).json, layout_of(sd("cpu")).json)

    def test_tensors_on_other_devices_are_invalid(self):
        self.check({"m": torch.zeros(1, device="meta")}, tensorreg.InvalidArgument, "only cpu and cuda tensors")

    def test_mixed_devices_are_invalid(self):
        self.check({"a": torch.zeros(1), "m": torch.zeros(1, device="meta")}, tensorreg.InvalidArgument,
                   "several devices")


class Messages(unittest.TestCase):
    def test_the_worked_example_of_the_wire_format_encodes_to_its_bytes(self):
        r = _messages.Request()
        r.request_id = 1
        k = r.keep_alive_register_artifact
        k.registration_id = "reg_1"
        k.ttl_ms = 30000
        k.epoch = 2
        k.owner_pid = 4242
        payload = r.SerializeToString()
        self.assertEqual(struct.pack("<I", len(payload)) + payload, bytes.fromhex(
            "14000000 0801 6210 0a057265675f31 10b0ea01 1802 209221".replace(" ", "")))
        end = _messages.Request()
        end.request_id = 2
        end.end_of_stream = True
        self.assertEqual(end.SerializeToString(), bytes.fromhex("08021001"))
        cfg = _messages.Request()
        cfg.request_id = 3
        cfg.get_server_config.SetInParent()
        self.assertEqual(cfg.SerializeToString(), bytes.fromhex("0803a20100"))

    def test_our_get_artifact_memfd_rpc_is_body_42(self):
        r = _messages.Request()
        r.request_id = 1
        r.get_artifact_memfd.artifact_id = "x"
        # field 42, length-delimited: key 42 << 3 | 2 = 338 = varint d2 02
        self.assertEqual(r.SerializeToString(), bytes.fromhex("0801" + "d202" + "03" + "0a0178"))

    def test_enums_resolve_by_name(self):
        self.assertEqual(_messages.enum_value("tensorcast.common.v1.PolicyProfile", "POLICY_PROFILE_CACHE"), 1)
        self.assertEqual(_messages.enum_name("tensorreg.wire.v1.Tier", 3), "TIER_STABLE_DRAM")

    def test_status_codes_map_to_error_classes(self):
        e = tensorreg.errors.error_for_code(5, "cannot find x: not held here")
        self.assertIsInstance(e, tensorreg.NotFound)
        self.assertEqual((e.code, e.message), (5, "cannot find x: not held here"))
        self.assertIsInstance(tensorreg.errors.error_for_code(12, "m"), NotImplementedError)
        self.assertIsInstance(tensorreg.errors.error_for_code(99, "m"), tensorreg.Unknown)

    def test_the_default_socket_path_is_the_daemons(self):
        old = {k: os.environ.get(k) for k in ("XDG_RUNTIME_DIR", "TENSORREG_SOCKET")}
        try:
            os.environ.pop("TENSORREG_SOCKET", None)
            os.environ["XDG_RUNTIME_DIR"] = "/run/user/7"
            self.assertEqual(tensorreg.default_socket_path(), "/run/user/7/tensorreg/tensorregd.sock")
            os.environ["XDG_RUNTIME_DIR"] = ""
            self.assertEqual(tensorreg.default_socket_path(), f"/tmp/tensorreg-{os.getuid()}/tensorregd.sock")
            os.environ["TENSORREG_SOCKET"] = "/run/tensorreg/tensorregd.sock"  # the system unit's
            self.assertEqual(tensorreg.default_socket_path(), "/run/tensorreg/tensorregd.sock")
            os.environ["TENSORREG_SOCKET"] = ""
            self.assertEqual(tensorreg.default_socket_path(), f"/tmp/tensorreg-{os.getuid()}/tensorregd.sock")
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def test_no_daemon_is_unavailable(self):
        with self.assertRaises(tensorreg.Unavailable) as ctx:
            tensorreg.Store("/nonexistent/tensorregd.sock")
        self.assertIn("cannot connect to tensorregd at /nonexistent/tensorregd.sock", ctx.exception.message)
        self.assertEqual(ctx.exception.code, 14)


if __name__ == "__main__":
    _support.main()
