"""State dicts and torch's per-tensor IPC path, shared by the Python benchmarks
(python_register_bench.py, weight_sync_bench.py).

- varied_state_dict: `tensors` tensors of mixed dtypes and sizes (small ones share
  caching-allocator segments, large ones get their own cudaMalloc);
- model_state_dict: bf16 tensors shaped like a model: "moe" (995 tensors, 16.1 GiB: 32 layers
  of attention, a router and 8 experts of 3 matrices each; the caching allocator makes 868
  allocations of it) or "dense" (291 tensors, 15.0 GiB, Llama-3-8B's shapes); `gib` scales the
  first dimension of every matrix, so the tensor count stays;
- reduce_state_dict / rebuild_state_dict: what verl and vLLM do to hand CUDA tensors to another
  process (torch.multiprocessing.reductions.reduce_tensor in the producer, its rebuild function
  in the reader: one IPC handle per tensor, torch caching the opened allocation per handle);
- checksums: exact, order-sensitive per-tensor sums of the raw bits (equal lists = equal bytes
  but for a collision of two sums), and a float checksum of the first 50 tensors.
"""

from __future__ import annotations

MOE = {"layers": 32, "hidden": 4096, "kv": 1024, "experts": 8, "intermediate": 2240, "vocab": 32000}
DENSE = {"layers": 32, "hidden": 4096, "kv": 1024, "intermediate": 14336, "vocab": 128256}


def varied_state_dict(torch, tensors: int, gib: float, device="cuda") -> dict:
    """`tensors` bf16/fp16/fp32 tensors of varied sizes, `gib` GiB in all: sizes cycle over
    0.25x..1.75x of the mean so that small ones share caching-allocator segments and large ones
    get their own cudaMalloc (both register paths run)."""
    mean = int(gib * (1 << 30) / tensors)
    sd = {}
    dtypes = (torch.bfloat16, torch.bfloat16, torch.float16, torch.float32)
    for k in range(tensors):
        dtype = dtypes[k % len(dtypes)]
        nbytes = int(mean * (0.25 + 1.5 * ((k * 37) % 100) / 99))
        n = max(1, nbytes // torch.tensor([], dtype=dtype).element_size())
        sd[f"layers.{k // 10}.w{k % 10}"] = torch.empty(n, dtype=dtype, device=device).normal_()
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
    return sd


def model_shapes(shape: str) -> list:
    """(name, shape) of every tensor of the "moe" or "dense" model, in state_dict order."""
    if shape == "moe":
        c = MOE
    elif shape == "dense":
        c = DENSE
    else:
        raise ValueError(f"unknown shape {shape!r}: expected moe or dense")
    h, kv, i = c["hidden"], c["kv"], c["intermediate"]
    out = [("model.embed_tokens.weight", (c["vocab"], h))]
    for layer in range(c["layers"]):
        p = f"model.layers.{layer}."
        out += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,)),
                (p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h))]
        if shape == "moe":
            out.append((p + "block_sparse_moe.gate.weight", (c["experts"], h)))
            for e in range(c["experts"]):
                q = f"{p}block_sparse_moe.experts.{e}."
                out += [(q + "w1.weight", (i, h)), (q + "w2.weight", (h, i)), (q + "w3.weight", (i, h))]
        else:
            out += [(p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                    (p + "mlp.down_proj.weight", (h, i))]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (c["vocab"], h))]
    return out


def scaled_shapes(shape: str, gib: float | None) -> list:
    """model_shapes with the first dimension of every matrix scaled so the whole is ~`gib` GiB
    of bf16 (None: as the model has it)."""
    shapes = model_shapes(shape)
    if gib is None:
        return shapes
    full = sum(2 * _numel(s) for _, s in shapes)
    f = gib * (1 << 30) / full
    return [(name, s if len(s) == 1 else (max(1, round(s[0] * f)),) + tuple(s[1:])) for name, s in shapes]


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def model_state_dict(torch, shape: str, gib: float | None, device="cuda") -> dict:
    """A bf16 state dict of scaled_shapes(shape, gib), random values, allocated one tensor after
    the other (so the caching allocator lays it out as a model load would)."""
    sd = {}
    g = torch.Generator(device=device).manual_seed(17)
    for name, s in scaled_shapes(shape, gib):
        t = torch.empty(s, dtype=torch.bfloat16, device=device)
        t.normal_(generator=g)
        sd[name] = t
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
    return sd


def reduce_state_dict(reduce_tensor, sd: dict) -> dict:
    """name -> (rebuild function, its args): torch's per-tensor IPC export."""
    return {name: reduce_tensor(t) for name, t in sd.items()}


def rebuild_state_dict(reduced: dict) -> dict:
    """The reader's side of reduce_state_dict: every tensor rebuilt (each allocation opened once
    per rebuild while its tensors live)."""
    return {name: fn(*args) for name, (fn, args) in reduced.items()}


def checksum(torch, tensors: dict) -> float:
    return float(sum(float(tensors[name].float().sum()) for name in sorted(tensors)[:50]))


def exact_checksums(torch, tensors: dict) -> list:
    """[name, sum of the bits as int16, sum of every 7th] per tensor, by name: equal lists for
    equal bytes, whatever the device; a changed or moved element changes them."""
    out = []
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().view(-1)
        bits = t.view(torch.int16) if t.element_size() == 2 else t.view(torch.uint8).to(torch.int16)
        out.append([name, int(bits.sum(dtype=torch.int64)), int(bits[::7].sum(dtype=torch.int64))])
    return out
