"""The Python client's views (registration.md §7) against a real tensorregd: every rule reachable
from the client with its status code and message, random views read back equal to torch's
narrow/transpose, and tensor-parallel assembly by 2, 4 and 8 processes registering their pieces
concurrently in random order."""

import base64
import hashlib
import json
import multiprocessing
import os
import random
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _support  # noqa: E402  (exits 77 without torch / protobuf)

# isort: split
import unittest  # noqa: E402

import torch  # noqa: E402

import tensorreg  # noqa: E402
from tensorreg import _messages, _put, _views  # noqa: E402


def small_model(seed=1):
    """b: bfloat16 [40]; w: float32 [32, 40] (5200 canonical bytes)."""
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(32, 40, generator=g), "b": torch.randn(40, generator=g).to(torch.bfloat16)}


def multihash(data: bytes) -> str:
    """The §3.3 tree of a view under one 256 MiB leaf: a sha2-256 multihash, base32 multibase."""
    return "b" + base64.b32encode(b"\x12\x20" + hashlib.sha256(data).digest()).decode().lower().rstrip("=")


def linearized(tensors) -> bytes:
    """The view bytes of §7.3: tensors in name order, each row-major at an 8-aligned offset."""
    out = bytearray()
    for _, t in sorted(tensors.items()):
        out.extend(bytes(-len(out) % 8))
        out.extend(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return bytes(out)


def llama_state_dict(seed=0, layers=2, hidden=64, intermediate=128, vocab=256):
    """A llama-shaped state dict with random weights: transformers' own when it imports (built
    from a config, nothing downloaded), else the same names and shapes made here."""
    torch.manual_seed(seed)
    try:
        import transformers
    except Exception:  # noqa: BLE001 - not installed here; the GPU machine has it
        transformers = None
    if transformers is not None:
        config = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=intermediate,
                                          num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=8,
                                          vocab_size=vocab, tie_word_embeddings=False)
        model = transformers.LlamaForCausalLM(config)
        return {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    sd = {"model.embed_tokens.weight": torch.randn(vocab, hidden, generator=g),
          "model.norm.weight": torch.randn(hidden, generator=g), "lm_head.weight": torch.randn(vocab, hidden, generator=g)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            sd[p + f"self_attn.{name}.weight"] = torch.randn(hidden, hidden, generator=g)
        sd[p + "mlp.gate_proj.weight"] = torch.randn(intermediate, hidden, generator=g)
        sd[p + "mlp.up_proj.weight"] = torch.randn(intermediate, hidden, generator=g)
        sd[p + "mlp.down_proj.weight"] = torch.randn(hidden, intermediate, generator=g)
        sd[p + "input_layernorm.weight"] = torch.randn(hidden, generator=g)
        sd[p + "post_attention_layernorm.weight"] = torch.randn(hidden, generator=g)
    return sd


def tp_dim(name, t):
    """Megatron's split: row-parallel o_proj/down_proj on dim 1, other matrices on dim 0,
    vectors whole (None)."""
    if t.dim() < 2:
        return None
    return 1 if ("o_proj" in name or "down_proj" in name) else 0


def rank_piece(sd, rank, world):
    """(tensors, rank_spec) of rank `rank` of `world`."""
    tensors, spec = {}, {}
    for name, t in sd.items():
        dim = tp_dim(name, t)
        if dim is None:
            tensors[name] = t
            continue
        n = t.shape[dim] // world
        tensors[name] = t.narrow(dim, rank * n, n).contiguous()
        spec[name] = (dim, rank * n, t.shape[dim])
    return tensors, spec


def _rank_main(socket, path, cgid, rank, world, delay, out):
    """One tensor-parallel rank (a spawned process): its piece of the model saved at `path`."""
    import time

    sd = torch.load(path)
    tensors, spec = rank_piece(sd, rank, world)
    time.sleep(delay)
    try:
        with tensorreg.Store(socket) as store:
            r = store.register_piece(cgid, tensors, spec)
            out.put((rank, r.registration_id, r.sealed, r.artifact_id, r.assembly.pieces, r.assembly.covered_bytes,
                     r.assembly.canonical_size_bytes, None))
    except tensorreg.Error as e:
        out.put((rank, "", False, "", 0, 0, 0, (e.code, e.message)))


class ViewsTest(_support.StoreTestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.model = small_model()
        cls.whole = cls.store.put(cls.model)

    def assert_fails(self, call, cls, code, message):
        with self.assertRaises(cls) as caught:
            call()
        self.assertEqual(caught.exception.code, code)
        if isinstance(message, re.Pattern):
            self.assertRegex(caught.exception.message, message)
        else:
            self.assertEqual(caught.exception.message, message)

    # ---- the rules of §7, table-driven ----

    def test_every_view_rule_reachable_from_the_client_answers_its_status_and_message(self):
        s, a = self.store, self.whole.artifact_id
        view = "cannot register view: "
        cases = [
            ({"w": ("transpose", 0, 1)}, {"tensor_names": ["b", "b"]}, view + "tensor 'b' is named twice"),
            ({"x": ("transpose", 0, 1)}, {}, view + "tensor 'x' is not in the canonical index"),
            ({"w": [("narrow", 0, 0, 32), ("narrow", 1, 0, 40)]}, {},
             view + "tensor 'w' has 2 narrow ops; at most one is allowed"),
            ({"w": [("narrow", 0, 0, 32), ("transpose", 0, 1)]}, {}, view + "tensor 'w' mixes narrow and transpose ops"),
            ({"w": ("transpose", 1, 1)}, {}, view + "tensor 'w': transpose dims must differ, got 1 and 1"),
            ({"w": ("transpose", 0, 2)}, {}, view + "tensor 'w': transpose dim 2 is out of range for rank 2"),
            ({"w": ("narrow", 2, 0, 1)}, {}, view + "tensor 'w': narrow dim 2 is out of range for rank 2"),
            ({"w": ("narrow", 0, 0, 0)}, {}, view + "tensor 'w': narrow length must be > 0"),
            ({"w": ("narrow", 0, -33, 1)}, {}, view + "tensor 'w': narrow start -33 is out of range for dim 0 of size 32"),
            ({"w": ("narrow", 0, 30, 3)}, {}, view + "tensor 'w': narrow [30, +3) runs past dim 0 of size 32"),
            ({"w": ("narrow", 0, 0, 16)}, {},
             view + "a CANONICAL view must cover every byte of every canonical tensor; bytes [2640, 5200) are not "
             "covered (register a PIECE instead)"),
            ({"w": ("transpose", 0, 1)}, {"view_id": "bciqnotit"},
             view + "view_id does not match view spec: provided 'bciqnotit', computed "
             "'bciqgyctoxh5u7fmvnv6nau52ywhmto5g54zyumjozukh7wrt5pnrm4i'"),
        ]
        for spec, extra, message in cases:
            for placement in ("server", "client"):
                with self.subTest(spec=spec, extra=extra, placement=placement):
                    self.assert_fails(lambda: s.register_view(a, spec, placement, **extra), tensorreg.InvalidArgument,
                                      3, message)
        # The same rules hold for a view of tensors (not yet held) as for one of an artifact.
        self.assert_fails(lambda: s.register_view(self.model, {"w": ("transpose", 0, 5)}), tensorreg.InvalidArgument,
                          3, view + "tensor 'w': transpose dim 5 is out of range for rank 2")

    def test_client_side_checks_come_before_anything_is_sent(self):
        s, a = self.store, self.whole.artifact_id
        self.assert_fails(lambda: s.register_view(a, {"w": ("flip", 0)}), tensorreg.InvalidArgument, 3,
                          "cannot register view: tensor 'w': op ('flip', 0) is not ('narrow', dim, start, length) or "
                          "('transpose', dim0, dim1)")
        self.assert_fails(lambda: s.register_view(a, {"w": ("transpose", 0, 1)}, "sideways"),
                          tensorreg.InvalidArgument, 3,
                          "cannot register view: unknown placement 'sideways': expected 'server' or 'client'")
        self.assert_fails(lambda: s.register_view(a, [("transpose", 0, 1)]), tensorreg.InvalidArgument, 3,
                          "cannot register view: the spec is a list, not a mapping of tensor names to ops")
        self.assert_fails(lambda: s.register_piece("", self.model, {}), tensorreg.InvalidArgument, 3,
                          "cannot register piece: cgid '' is not a non-empty str")
        self.assert_fails(lambda: s.register_piece("cgid:model-bad", self.model, {"w": (0, 0)}),
                          tensorreg.InvalidArgument, 3,
                          "cannot register piece: rank spec of 'w' is (0, 0), not (dim, start, canonical_size)")
        self.assert_fails(lambda: s.register_piece("cgid:model-bad", self.model, {"v": (0, 0, 4)}),
                          tensorreg.InvalidArgument, 3,
                          "cannot register piece: rank spec names 'v', which is not one of the tensors")

    def test_unknown_artifacts_and_views_are_not_found(self):
        s, a = self.store, self.whole.artifact_id
        self.assert_fails(lambda: s.register_view("mi2:nope", {"w": ("transpose", 0, 1)}), tensorreg.NotFound, 5,
                          "cannot find the index of mi2:nope: not held here")
        self.assert_fails(lambda: s.get(a, view="bciqnone"), tensorreg.NotFound, 5,
                          f"cannot find view bciqnone of {a}: no such view")
        self.assert_fails(lambda: s.view(a, "bciqnone"), tensorreg.NotFound, 5,
                          f"cannot find view bciqnone of {a}: no such view")

    def test_piece_rules_answer_their_status(self):
        s, m = self.store, self.model
        full = "cannot register view: a PIECE must not cover the whole canonical buffer (register it as CANONICAL)"
        self.assert_fails(lambda: s.register_piece("cgid:model-full", m, {}), tensorreg.InvalidArgument, 3, full)
        self.assert_fails(lambda: s.register_piece("cgid:model-full", m, {"w": (0, 0, 32)}), tensorreg.InvalidArgument,
                          3, full)
        self.assert_fails(lambda: s.register_piece("cgid:model-one", {"w": m["w"][:16]}, {"w": (0, 0, 32)},
                                                   canonical_index=b'{"w":[0,4,[1],[1],"torch.float32",0]}'),
                          tensorreg.InvalidArgument, 3,
                          "cannot register view: tensor 'w': narrow [0, +16) runs past dim 0 of size 1")

    def test_rules_only_a_hand_made_begin_reaches_answer_their_status(self):
        """Begins the Store never sends, built from _views' parts: the daemon's checks, not ours."""
        c, whole = self.store._conn, self.whole

        def begin(kind="canonical", placement="server", size=0, total=5200, cgid=None, edit=None):
            ops = {"w": [_views.Narrow(0, 0, 16)]} if kind == "piece" else {"w": [_views.Transpose(0, 1)]}
            o = _views.view_options(ops, ["b"], placement, kind, size)
            if edit:
                edit(o)
            return lambda: c.call(_views._begin(whole.index_json, total, o, cgid=cgid))

        def one_range(o):
            r = o.ranges.add()
            r.length = 100

        view = "cannot register view: "
        cases = [
            (begin(kind="unspecified"), tensorreg.InvalidArgument,
             view + "registration_kind is required (CANONICAL or PIECE), got 0"),
            (begin(edit=lambda o: setattr(o, "placement", 0)), tensorreg.InvalidArgument,
             view + "placement is required (SERVER or CLIENT), got 0"),
            (begin(size=100), tensorreg.InvalidArgument,
             view + "the view covers 5200 canonical bytes, more than canonical_size_bytes 100"),
            (begin(edit=one_range), tensorreg.InvalidArgument,
             view + "ranges do not match the view's canonical coverage (1 merged ranges, 5200 bytes)"),
            (begin(kind="piece", size=5200, total=2640), tensorreg.InvalidArgument,
             view + "a PIECE needs a client_artifact_id (the cgid of its assembly)"),
            (begin(kind="piece", total=2640, cgid="cgid:model-raw"), tensorreg.InvalidArgument,
             view + "a PIECE needs canonical_size_bytes > 0"),
            (begin(kind="piece", size=5200, total=2000, cgid="cgid:model-raw"), tensorreg.InvalidArgument,
             view + "total_size 2000 of a PIECE must equal its view size 2640"),
            (begin(kind="piece", size=5200, total=2640, cgid="cgid:model-raw", placement="client"),
             tensorreg.Unimplemented,
             view + "a PIECE with placement CLIENT is not implemented; send its view bytes with placement SERVER"),
        ]
        for call, cls, message in cases:
            with self.subTest(message=message):
                self.assert_fails(call, cls, cls.code, message)

        # Feed and Commit of a SERVER upload: past the view, progress without a staging memfd,
        # incomplete.
        from tensorreg import _requests

        def chunk(rid, at, n):
            frame = _messages.Request()
            frame.feed_register_artifact_stream.registration_id = rid
            frame.feed_register_artifact_stream.view_chunk.view_offset = at
            frame.feed_register_artifact_stream.view_chunk.data = bytes(n)
            return frame

        answer, fds = begin(edit=lambda o: setattr(o, "staging_memfd", False))()
        self.assertEqual(fds, [])
        rid = answer.begin_register_artifact.registration_id
        try:
            self.assert_fails(lambda: c.feed([chunk(rid, 5190, 20)]), tensorreg.OutOfRange, 11,
                              f"cannot feed registration '{rid}': view bytes [5190, +20) run past the view size 5200")
            self.assert_fails(lambda: c.feed([_requests.stable_dram_feed(rid, 5200)]), tensorreg.FailedPrecondition, 9,
                              f"cannot feed registration '{rid}': stable_dram_write_progress needs a view registration "
                              f"with staging_memfd; this one takes view_chunk messages")
            c.feed([chunk(rid, 0, 100)])
            self.assert_fails(lambda: _put.commit(c, rid), tensorreg.FailedPrecondition, 9,
                              f"cannot commit view registration '{rid}': view bytes incomplete: view bytes [100, 5200) "
                              f"were not written")
        finally:
            _put.abort(c, rid)

        # Through the staging memfd: ranges past the view, and the same incomplete commit.
        answer, fds = begin()()
        rid = answer.begin_register_artifact.registration_id
        try:
            self.assertEqual(len(fds), 1)
            self.assertEqual(os.fstat(fds[0]).st_size, 5200)
            self.assert_fails(lambda: c.feed([_requests.write_progress(rid, [(5190, 20)])]), tensorreg.OutOfRange, 11,
                              f"cannot feed registration '{rid}': view bytes [5190, +20) run past the view size 5200")
            c.feed([_requests.write_progress(rid, [(0, 100)])])
            self.assert_fails(lambda: _put.commit(c, rid), tensorreg.FailedPrecondition, 9,
                              f"cannot commit view registration '{rid}': view bytes incomplete: view bytes [100, 5200) "
                              f"were not written")
        finally:
            for fd in fds:
                os.close(fd)
            _put.abort(c, rid)

    # ---- what a view answers, and reading it back ----

    def test_a_transposed_view_of_an_artifact_answers_its_record_and_reads_back_as_torch_transposes(self):
        s, m, a = self.store, self.model, self.whole.artifact_id
        for placement in ("server", "client"):
            with self.subTest(placement=placement):
                v = s.register_view(a, {"w": ("transpose", 0, 1)}, placement)
                self.assertEqual(v.artifact_id, a)
                self.assertTrue(v.existed)
                self.assertEqual(v.registration_kind, "canonical")
                self.assertEqual(v.view_id, "bciqgyctoxh5u7fmvnv6nau52ywhmto5g54zyumjozukh7wrt5pnrm4i")
                self.assertEqual(v.canonical_ranges, [(0, 5200)])
                self.assertEqual(v.view_index_json, b'{"b":[0,80,[40],[1],"torch.bfloat16",0],'
                                                    b'"w":[80,5120,[40,32],[32,1],"torch.float32",0]}')
                self.assertEqual(v.view_data_hash, multihash(linearized({"b": m["b"], "w": m["w"].t()})))
                self.assertIsNone(v.assembly)
                got = s.get(a, view=v.view_id)
                self.assertEqual(sorted(got), ["b", "w"])
                self.assertTrue(torch.equal(got["w"], m["w"].t()))
                self.assertTrue(torch.equal(got["b"], m["b"]))
                record = s.view(a, v.view_id)
                self.assertEqual(record["spec"], {"b": [], "w": [tensorreg.Transpose(0, 1)]})
                self.assertEqual(record["view_size"], 5200)
                self.assertEqual(record["view_data_hash"], v.view_data_hash)

    def test_a_view_of_tensors_registers_them_whole_under_the_id_put_gives(self):
        s = self.store
        m = small_model(seed=7)
        for placement in ("server", "client"):
            with self.subTest(placement=placement):
                v = s.register_view(m, {"w": [("transpose", 0, 1), ("transpose", 1, 0), ("transpose", 0, 1)]},
                                    placement)
                whole = s.put(m)
                self.assertEqual(v.artifact_id, whole.artifact_id)
                got = s.get(whole.artifact_id, view=v.view_id)
                self.assertTrue(torch.equal(got["w"], m["w"].t()))

    def test_staged_view_bytes_land_at_their_view_offsets_in_batches_reported_as_written(self):
        g = torch.Generator().manual_seed(3)
        tensors = [("a", torch.randn(3, generator=g)), ("b", torch.randint(0, 255, (5,), generator=g,
                                                                            dtype=torch.uint8)),
                   ("c", torch.randn(7, 9, generator=g).t()), ("d", torch.randn(2, generator=g).to(torch.bfloat16))]
        expected = linearized(dict(tensors))
        for batch in (8, 13, 64, 1 << 22):
            with self.subTest(batch=batch):
                fd = os.memfd_create("staging-test")
                try:
                    os.ftruncate(fd, len(expected))
                    reported = []
                    frames = list(_views.staged_frames(torch, tensors, "reg", fd, batch))
                    for k, f in enumerate(frames):
                        feed = f.feed_register_artifact_stream
                        self.assertEqual(feed.registration_id, "reg")
                        ranges = [(r.canonical_offset, r.length) for r in feed.stable_dram_write_progress.ranges]
                        for at, n in ranges:
                            self.assertLessEqual(n, batch)
                            # Reported once written: the bytes are in the memfd when the frame comes.
                            self.assertEqual(os.pread(fd, n, at), expected[at:at + n])
                        # Small tensors share a report; every report but the last carries a batch.
                        if k + 1 < len(frames):
                            self.assertGreaterEqual(sum(n for _, n in ranges), batch)
                        reported += ranges
                    self.assertEqual(os.pread(fd, len(expected), 0), expected)  # PAD reads as zero
                    self.assertEqual(sum(n for _, n in reported), sum(t.numel() * t.element_size() for _, t in tensors))
                    if batch == 1 << 22:  # more than all the bytes: one report for the four tensors
                        self.assertEqual(len(frames), 1)
                finally:
                    os.close(fd)

    def test_random_views_read_back_as_torch_narrow_and_transpose(self):
        """Property: for random tensors and specs, the transposed views read back (get(view=))
        equal torch's transposes, and each narrow piece's data hash is that of torch's narrow."""
        rng = random.Random(20261202)
        dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int8, torch.uint8]
        s = self.store
        saved = _views.STAGED_BYTES
        try:
            for trial in range(12):
                _views.STAGED_BYTES = rng.choice([8, 40, 1000, 8 << 20])
                g = torch.Generator().manual_seed(trial)
                sd = {}
                for k in range(rng.randint(1, 4)):
                    shape = [rng.randint(1, 6) for _ in range(rng.randint(1, 4))]
                    dtype = rng.choice(dtypes)
                    t = (torch.randn(shape, generator=g) * 50).to(dtype) if dtype.is_floating_point else \
                        torch.randint(0, 100, shape, generator=g, dtype=dtype)
                    sd[f"t{k}"] = t
                spec = {}
                for name, t in sd.items():
                    if t.dim() >= 2 and rng.random() < 0.8:
                        spec[name] = [("transpose", *rng.sample(range(t.dim()), 2)) for _ in range(rng.randint(1, 3))]
                placement = rng.choice(["server", "client"])
                with self.subTest(trial=trial, spec=spec, placement=placement):
                    v = s.register_view(sd, spec, placement)
                    got = s.get(v.artifact_id, view=v.view_id)
                    want = {n: _views.apply_ops(t, _views.parse_spec(spec).get(n, [])) for n, t in sd.items()}
                    self.assertEqual(sorted(got), sorted(want))
                    for name in want:
                        self.assertEqual(got[name].shape, want[name].shape)
                        self.assertTrue(torch.equal(got[name], want[name]), name)
                    self.assertEqual(v.view_data_hash, multihash(linearized(want)))

                # A narrow of one tensor (the others whole) as a piece: its bytes, as the daemon
                # hashed them, are torch's narrow.
                narrowable = [n for n, t in sd.items() if any(x > 1 for x in t.shape)]
                if not narrowable:
                    continue
                name = rng.choice(narrowable)
                t = sd[name]
                dim = rng.choice([d for d in range(t.dim()) if t.shape[d] > 1])
                length = rng.randint(1, t.shape[dim] - 1)
                start = rng.randint(0, t.shape[dim] - length)
                negative = rng.random() < 0.5
                local = dict(sd)
                local[name] = t.narrow(dim, start, length).contiguous()
                with self.subTest(trial=trial, name=name, dim=dim, start=start, length=length):
                    spec_start = start - t.shape[dim] if negative else start
                    p = s.register_piece(f"cgid:property-{trial}", local, {name: (dim, spec_start, t.shape[dim])})
                    self.assertEqual(p.registration_kind, "piece")
                    self.assertFalse(p.sealed)
                    self.assertEqual(p.view_index[name][2], list(local[name].shape))
                    self.assertEqual(p.view_data_hash, multihash(linearized(local)))
        finally:
            _views.STAGED_BYTES = saved

    # ---- tensor-parallel assembly ----

    def run_ranks(self, sd, cgid, world, ranks, seed):
        """Ranks `ranks` of `world` register their pieces from processes of their own, each after
        a random delay; their results (in arrival order). The processes fork from a server that
        imported torch once: a spawned one each imported it again, most of the test's CPU time."""
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["torch"])
        out = ctx.Queue()
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "model.pt")
            torch.save(sd, path)
            rng = random.Random(seed)
            procs = [ctx.Process(target=_rank_main, args=(self.daemon.socket, path, cgid, r, world,
                                                         rng.uniform(0, 0.3), out)) for r in ranks]
            for p in procs:
                p.start()
            results = [out.get(timeout=120) for _ in procs]
            for p in procs:
                p.join(timeout=60)
                self.assertEqual(p.exitcode, 0)
        return results

    def test_tp_pieces_from_2_4_and_8_processes_seal_the_id_of_the_whole_model(self):
        sd = llama_state_dict()
        whole_id = None
        for world in (2, 4, 8):
            with self.subTest(world=world):
                results = self.run_ranks(sd, f"cgid:llama-tp{world}", world, range(world), seed=world)
                errors = [r[7] for r in results if r[7] is not None]
                self.assertEqual(errors, [])
                sealed = [r for r in results if r[2]]
                self.assertEqual(len(sealed), 1)
                self.assertEqual(sealed[0][4], world)  # the sealing piece is the last of `world`
                self.assertEqual(sorted(r[4] for r in results), list(range(1, world + 1)))
                if whole_id is None:
                    whole = self.store.put(sd)
                    whole_id = whole.artifact_id
                    self.assertTrue(whole.existed)  # the assembly made it first
                self.assertEqual(sealed[0][3], whole_id)
                got = self.store.get(whole_id)
                self.assertTrue(all(torch.equal(got[n], sd[n]) for n in sd))

    def test_a_missing_piece_leaves_the_assembly_unsealed(self):
        sd = llama_state_dict(seed=5)
        results = self.run_ranks(sd, "cgid:llama-missing", 4, [0, 1, 3], seed=1)
        self.assertEqual([r[7] for r in results], [None] * 3)
        self.assertFalse(any(r[2] for r in results))
        last = max(results, key=lambda r: r[4])
        self.assertEqual(last[4], 3)
        self.assertLess(last[5], last[6])  # covered < canonical
        self.assertEqual(last[3], "cgid:llama-missing")
        # No artifact yet, so the daemon lists it among its assemblies, open and expiring.
        listed = [a for a in self.store.assemblies() if a.cgid == "cgid:llama-missing"]
        self.assertEqual(len(listed), 1)
        a = listed[0]
        self.assertEqual((a.pieces, a.sealed, a.artifact_id), (3, False, ""))
        self.assertEqual((a.covered_bytes, a.canonical_size_bytes), (last[5], last[6]))
        self.assertIsNotNone(a.expires_in_ms)
        self.assertTrue(0 < a.expires_in_ms <= 600_000)
        self.assertNotIn("cgid:llama-missing", [d["artifact_id"] for d in self.store.list()])
        if _support.PATHS["cli"]:
            ls = subprocess.run([_support.PATHS["cli"], "ls", "--socket", self.daemon.socket], check=True,
                                capture_output=True, text=True).stdout
            row = [line.split() for line in ls.splitlines() if line.startswith("cgid:llama-missing")]
            self.assertEqual(len(row), 1)
            self.assertEqual(row[0][1], "3")  # PIECES
            self.assertIn("1 assembly waiting for pieces", ls)
            shown = json.loads(subprocess.run([_support.PATHS["cli"], "show", "--socket", self.daemon.socket, "--json",
                                               "cgid:llama-missing"], check=True, capture_output=True,
                                              text=True).stdout)
            self.assertEqual((shown["pieces"], shown["sealed"], shown["covered_bytes"]), (3, False, last[5]))
            human = subprocess.run([_support.PATHS["cli"], "show", "--socket", self.daemon.socket,
                                    "cgid:llama-missing"], check=True, capture_output=True, text=True).stdout
            self.assertIn("open, waiting for pieces", human)

    def test_overlapping_bytes_that_differ_are_aborted_naming_both_pieces(self):
        s = self.store
        sd = llama_state_dict(seed=9)
        first, spec0 = rank_piece(sd, 0, 2)
        second, spec1 = rank_piece(sd, 1, 2)
        second = dict(second)
        second["model.norm.weight"] = second["model.norm.weight"].clone()
        second["model.norm.weight"][3] += 1  # a replicated vector: both ranks write it
        p0 = s.register_piece("cgid:llama-conflict", first, spec0)
        self.assertFalse(p0.sealed)
        pattern = re.compile(r"cannot add piece '(reg_[0-9_]+)' to assembly cgid:llama-conflict: its byte at canonical "
                             r"offset \d+ \(view offset \d+\) differs from piece '" + re.escape(p0.registration_id) +
                             r"', which wrote it first")
        self.assert_fails(lambda: s.register_piece("cgid:llama-conflict", second, spec1), tensorreg.Aborted, 10,
                          pattern)
        # The assembly is unchanged: the right piece still seals it.
        right, _ = rank_piece(sd, 1, 2)
        done = s.register_piece("cgid:llama-conflict", right, spec1)
        self.assertTrue(done.sealed)
        self.assertEqual(done.assembly.pieces, 2)
        # and a piece after that is FAILED_PRECONDITION at Begin.
        self.assert_fails(lambda: s.register_piece("cgid:llama-conflict", right, spec1), tensorreg.FailedPrecondition,
                          9, f"cannot begin registration: assembly cgid:llama-conflict is already sealed as artifact "
                          f"{done.artifact_id}")

    # ---- CUDA (skipped without a GPU; the lead runs them on the H200) ----

    @unittest.skipUnless(torch.cuda.is_available(), "no CUDA device")
    def test_cuda_views_and_pieces_equal_the_cpu_ones(self):
        s = self.store
        m = small_model(seed=11)
        cpu = s.register_view(m, {"w": ("transpose", 0, 1)})
        for placement in ("server", "client"):
            with self.subTest(placement=placement):
                dev = {k: v.cuda() for k, v in m.items()}
                v = s.register_view(dev, {"w": ("transpose", 0, 1)}, placement)
                self.assertEqual(v.artifact_id, cpu.artifact_id)
                self.assertEqual(v.view_data_hash, cpu.view_data_hash)
                got = s.get(v.artifact_id, "cuda", view=v.view_id)
                self.assertTrue(torch.equal(got["w"].cpu(), m["w"].t()))
        sd = llama_state_dict(seed=12)
        pieces = [rank_piece({k: t.cuda() for k, t in sd.items()}, r, 2) for r in range(2)]
        s.register_piece("cgid:llama-cuda", *pieces[1])
        done = s.register_piece("cgid:llama-cuda", *pieces[0])
        self.assertTrue(done.sealed)
        self.assertEqual(done.artifact_id, s.put(sd).artifact_id)


if __name__ == "__main__":
    _support.main()
