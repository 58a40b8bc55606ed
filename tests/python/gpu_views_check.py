"""Views and pieces from CUDA tensors against a real CUDA-built tensorregd (registration.md §7;
not run by CI: the GPU machine runs it). Exits 77 when there is no CUDA device, 0 when every
check passes, 1 when one fails.

    python3 tests/python/gpu_views_check.py [--daemon PATH]

(default: .device-daemon/tensorregd). It starts the daemon on a temp socket and, over a
Llama-shaped bfloat16 state dict made on the GPU (random weights, nothing downloaded):

1. put() of the CUDA tensors and of their CPU copy give one mi2 id;
2. a SERVER-placement CANONICAL view transposing every matrix, registered from the CUDA tensors
   and from the CPU copy, gives one view_id and one view data hash, and get(id, view=…) reads
   back torch's transpose of the CPU tensors bit for bit;
3. tensor-parallel pieces from CUDA tensors (Megatron's split: o_proj and down_proj on dim 1,
   the other matrices on dim 0, vectors whole), 2 and 4 ranks in a shuffled order: only the
   last piece seals, and the sealed id is the whole dict's;
4. a CUDA piece whose bytes differ from an earlier piece where they overlap is ABORTED.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(REPO, "python"))
sys.path.insert(0, HERE)

from gpu_client_check import start_daemon  # noqa: E402 - the same daemon start-up

SKIP = 77


def log(*parts) -> None:
    print(*parts, flush=True)


def llama_state_dict(torch, seed: int, layers: int = 4, hidden: int = 256, intermediate: int = 704,
                     vocab: int = 1024) -> dict:
    g = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device="cuda").to(torch.bfloat16)

    sd = {"model.embed_tokens.weight": randn(vocab, hidden), "model.norm.weight": randn(hidden),
          "lm_head.weight": randn(vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            sd[p + f"self_attn.{name}.weight"] = randn(hidden, hidden)
        sd[p + "mlp.gate_proj.weight"] = randn(intermediate, hidden)
        sd[p + "mlp.up_proj.weight"] = randn(intermediate, hidden)
        sd[p + "mlp.down_proj.weight"] = randn(hidden, intermediate)
        sd[p + "input_layernorm.weight"] = randn(hidden)
        sd[p + "post_attention_layernorm.weight"] = randn(hidden)
    return sd


def rank_piece(sd: dict, rank: int, world: int):
    """(tensors, rank_spec) of rank `rank` of `world`: o_proj/down_proj on dim 1, other matrices
    on dim 0, vectors whole."""
    tensors, spec = {}, {}
    for name, t in sd.items():
        if t.dim() < 2:
            tensors[name] = t
            continue
        dim = 1 if ("o_proj" in name or "down_proj" in name) else 0
        n = t.shape[dim] // world
        tensors[name] = t.narrow(dim, rank * n, n).contiguous()
        spec[name] = (dim, rank * n, t.shape[dim])
    return tensors, spec


def bit_equal(torch, a, b) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.cpu().view(torch.int16),
                                                                      b.cpu().view(torch.int16))


class Checks:
    def __init__(self) -> None:
        self.failed = 0

    def check(self, ok: bool, what: str) -> bool:
        log(f"{'PASS' if ok else 'FAIL'} {what}")
        if not ok:
            self.failed += 1
        return ok


def run(socket_path: str) -> int:
    import torch

    import tensorreg

    c = Checks()
    sd = llama_state_dict(torch, seed=3)
    cpu = {k: v.cpu() for k, v in sd.items()}
    with tensorreg.Store(socket_path, timeout=120) as store:
        whole = store.put(cpu).artifact_id
        on_gpu = store.put(sd).artifact_id
        c.check(whole == on_gpu, f"put of the CUDA tensors and of their CPU copy: one id ({whole})")

        spec = {name: ("transpose", 0, 1) for name, t in sd.items() if t.dim() == 2}
        from_gpu = store.register_view(sd, spec, "server")
        from_cpu = store.register_view(cpu, spec, "server")
        c.check(from_gpu.view_id == from_cpu.view_id and from_gpu.view_data_hash == from_cpu.view_data_hash,
                f"SERVER transpose from CUDA and from CPU tensors: one view ({from_gpu.view_id}, "
                f"{from_gpu.view_data_hash})")
        c.check(from_gpu.artifact_id == whole, "the view's artifact is the whole dict's")
        read = store.get(whole, view=from_gpu.view_id)
        c.check(set(read) == set(sd) and all(
            bit_equal(torch, read[n], cpu[n].t() if n in spec else cpu[n]) for n in sd),
            "get(view=…) reads back torch's transpose of every matrix, bit for bit")
        del read

        rng = random.Random(5)
        for world in (2, 4):
            cgid = f"cgid:gpu-views-check.tp{world}"
            order = list(range(world))
            rng.shuffle(order)
            answers = []
            for k, rank in enumerate(order):
                tensors, rank_spec = rank_piece(sd, rank, world)
                answers.append(store.register_piece(cgid, tensors, rank_spec))
            c.check([a.sealed for a in answers] == [False] * (world - 1) + [True],
                    f"{world} CUDA pieces (order {order}): only the last seals")
            c.check(answers[-1].artifact_id == whole, f"{world} CUDA pieces seal as the whole dict's id "
                                                      f"({answers[-1].artifact_id})")

        cgid = "cgid:gpu-views-check.conflict"
        first, first_spec = rank_piece(sd, 0, 2)
        store.register_piece(cgid, first, first_spec)
        changed = {k: v.clone() for k, v in first.items()}
        changed["model.norm.weight"][0] += 1  # whole in every piece: this byte overlaps piece 0's
        second, second_spec = rank_piece(sd, 1, 2)
        second["model.norm.weight"] = changed["model.norm.weight"]
        try:
            store.register_piece(cgid, second, second_spec)
            c.check(False, "a CUDA piece conflicting with an earlier one was accepted")
        except tensorreg.Error as e:
            c.check(e.code == 10, f"a CUDA piece conflicting with an earlier one: ABORTED ({e.code}: {e.message})")
    log(f"gpu_views_check: {'OK' if c.failed == 0 else f'{c.failed} FAILED'}")
    return 0 if c.failed == 0 else 1


def main() -> int:
    args = sys.argv[1:]
    daemon = os.path.join(REPO, ".device-daemon", "tensorregd")
    if len(args) == 2 and args[0] == "--daemon":
        daemon = os.path.abspath(args[1])
    try:
        import torch
    except ImportError as e:
        log(f"skipped: {e}")
        return SKIP
    if not torch.cuda.is_available():
        log("skipped: no CUDA device")
        return SKIP
    work = tempfile.mkdtemp(prefix="tensorreg-gpu-views-")
    try:
        proc, socket_path, lines = start_daemon(daemon, work)
    except RuntimeError as e:
        shutil.rmtree(work, ignore_errors=True)
        log(str(e))
        return 1
    try:
        return run(socket_path)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        if len(lines) > 1:
            log("tensorregd said:\n" + "".join(lines[-20:]))
        shutil.rmtree(work, ignore_errors=True)

if __name__ == "__main__":
    sys.exit(main())
