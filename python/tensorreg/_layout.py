"""The canonical layout of a state dict or of safetensors files (registration.md §2.2, §2.4).

`Layout` is what every registration path needs before it talks to the daemon: the canonical
index (a dict, and its JSON bytes exactly as upstream's SDK writes them), total_size, and the
distinct storages with their canonical offsets and a source to copy their bytes from.

Rules, as the C++ `canonical_index::build` and the SDK apply them: tensor names in byte order of
their UTF-8 (= Python's code point order); a storage is placed the first time a name on it is
seen, at the cursor rounded up to 8, and the cursor moves past its nbytes; later names on the
same storage reuse its offset; total_size is the largest storage end. Entries are
[offset, storage nbytes, shape, stride, dtype, storage_offset in elements].

Thread-safety: pure functions over their arguments.
"""

from __future__ import annotations

import json
import operator
import os
import struct
from typing import Any, NamedTuple

from .errors import InvalidArgument

ALIGNMENT = 8

# torch dtype strings the canonical index knows, with element sizes (registration.md §2.4,
# DECISIONS §5.18); the same table as src/index/dtype.cpp.
DTYPE_SIZES = {
    "torch.float16": 2,
    "torch.bfloat16": 2,
    "torch.float32": 4,
    "torch.float64": 8,
    "torch.int8": 1,
    "torch.uint8": 1,
    "torch.int16": 2,
    "torch.int32": 4,
    "torch.int64": 8,
    "torch.bool": 1,
    "torch.float": 4,
    "torch.double": 8,
    "torch.float8_e4m3fn": 1,
    "torch.float8_e5m2": 1,
    "torch.uint16": 2,
    "torch.uint32": 4,
    "torch.uint64": 8,
}

# safetensors dtype → torch dtype string (BOOL stays torch.uint8 as upstream writes it).
SAFETENSORS_DTYPES = {
    "F16": "torch.float16",
    "BF16": "torch.bfloat16",
    "F32": "torch.float32",
    "F64": "torch.float64",
    "I8": "torch.int8",
    "I16": "torch.int16",
    "I32": "torch.int32",
    "I64": "torch.int64",
    "U8": "torch.uint8",
    "BOOL": "torch.uint8",
    "F8_E4M3": "torch.float8_e4m3fn",
    "F8_E5M2": "torch.float8_e5m2",
    "U16": "torch.uint16",
    "U32": "torch.uint32",
    "U64": "torch.uint64",
}

SAFETENSORS_MAX_HEADER = 100 << 20


def quote(name: str) -> str:
    return "'" + name + "'"


def canonical_json(index: dict) -> bytes:
    """The canonical index bytes: exactly the SDK's json.dumps (DECISIONS §5.13)."""
    return json.dumps(index, separators=(",", ":"), sort_keys=True, ensure_ascii=True).encode("ascii")


class Desc(NamedTuple):
    """One tensor as the layout sees it. shape and stride are lists the layout keeps (the index
    entries share them)."""

    name: str
    storage_key: Any  # equal keys = one storage
    storage_nbytes: int
    shape: list
    stride: list
    dtype: str
    storage_offset: int
    source: Any  # how to read the storage's bytes; opaque here


class Storage(NamedTuple):
    offset: int
    nbytes: int
    source: Any
    first_name: str


class Layout(NamedTuple):
    index: dict  # name -> [offset, size, shape, stride, dtype, storage_offset]
    json: bytes
    total_size: int
    storages: list  # [Storage], in canonical order
    storage_of: dict  # name -> position in storages
    descs: dict  # name -> Desc


def check_name(name: Any) -> str:
    if not isinstance(name, str):
        raise InvalidArgument(f"cannot build the canonical index: tensor name {name!r} is not a str")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidArgument(f"cannot build the canonical index: tensor name {name!r} is not valid UTF-8") from None
    return name


_name_of = operator.itemgetter(0)  # Desc.name


def check(names: list, nbytes: list) -> None:
    """Refuses what build() would refuse of tensors with these names and storage sizes (their
    storages keyed by address and size, so one storage cannot have two sizes), without laying
    anything out: lets a caller send its first requests before build() runs.
    Errors: InvalidArgument, with build()'s messages."""
    if not names:
        raise InvalidArgument("cannot build the canonical index: empty tensor dict")
    if len(set(names)) != len(names):
        seen: set = set()
        for name in sorted(names):
            if name in seen:
                raise InvalidArgument(f"cannot build the canonical index: duplicate tensor name {quote(name)}")
            seen.add(name)
    if not any(nbytes):
        raise InvalidArgument("cannot build the canonical index: every tensor is empty, so total_size would be 0")


def build(descs: list) -> Layout:
    """Lays `descs` out canonically. Errors: InvalidArgument (no tensors, duplicate names, a
    storage with two sizes, total_size 0)."""
    if not descs:
        raise InvalidArgument("cannot build the canonical index: empty tensor dict")
    ordered = sorted(descs, key=_name_of)
    placed: dict = {}
    storages: list = []
    storage_of: dict = {}
    index: dict = {}
    cursor = 0
    total = 0
    previous = None
    # One pass, tuple-unpacked: this loop runs once per tensor of every register and put.
    for d in ordered:
        name, key, nbytes, shape, stride, dtype, storage_offset, source = d
        if name == previous:
            raise InvalidArgument(f"cannot build the canonical index: duplicate tensor name {quote(name)}")
        previous = name
        at = placed.get(key)
        if at is None:
            offset = (cursor + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT
            at = placed[key] = len(storages)
            storages.append(Storage(offset, nbytes, source, name))
            cursor = offset + nbytes
            if cursor > total:
                total = cursor
        else:
            offset = storages[at].offset
            if storages[at].nbytes != nbytes:
                s = storages[at]
                raise InvalidArgument(f"cannot build the canonical index: one storage has {nbytes} bytes for "
                                      f"tensor {quote(name)} but {s.nbytes} bytes for tensor {quote(s.first_name)}")
        storage_of[name] = at
        index[name] = [offset, nbytes, shape, stride, dtype, storage_offset]
    if total == 0:
        raise InvalidArgument("cannot build the canonical index: every tensor is empty, so total_size would be 0")
    return Layout(index, canonical_json(index), total, storages, storage_of, {d[0]: d for d in descs})


def extent_bytes(shape, stride, element_size: int) -> int:
    """Bytes from a view's first element to the end of its last (0 for an empty view)."""
    last = 0  # a plain loop: this runs once per tensor of every register and open
    for s, st in zip(shape, stride):
        if s == 0:
            return 0
        last += (s - 1) * (st if st >= 0 else -st)
    return (last + 1) * element_size


# ---- state dicts ---------------------------------------------------------------------------


def untyped_storage(t):
    """The tensor's untyped storage under torch 2 (`untyped_storage()`) and 1.13 (`storage().untyped()`)."""
    if hasattr(t, "untyped_storage"):
        return t.untyped_storage()
    typed = t.storage()
    if hasattr(typed, "untyped"):
        return typed.untyped()
    return typed._untyped()


def state_dict_descs(torch, state_dict, verb: str) -> tuple:
    """Validates a state dict and describes its tensors. Returns (descs, device).
    Errors: InvalidArgument (not a mapping of str → tensor, sparse or meta tensors, several
    devices, a dtype outside the table), raised before anything is sent."""
    items, storages, device = state_dict_storages(torch, state_dict, verb)
    return describe(items, storages), device


def state_dict_storages(torch, state_dict, verb: str) -> tuple:
    """The first half of state_dict_descs: every check, and each tensor's storage. Returns
    (items, storages, device): items as (name, tensor), storages as (storage, data_ptr, nbytes,
    dtype string), one per item. A register of CUDA tensors needs only this much before it can
    send its first request (describe() can follow while the daemon works).
    Errors: as state_dict_descs."""
    if not hasattr(state_dict, "items"):
        raise InvalidArgument(f"cannot {verb}: expected a mapping of names to tensors, got {type(state_dict).__name__}")
    items = list(state_dict.items())
    devices = {}
    tensor_type, strided = torch.Tensor, torch.strided
    for name, t in items:
        check_name(name)
        if not isinstance(t, tensor_type):
            raise InvalidArgument(f"cannot {verb}: {quote(name)} is a {type(t).__name__}, not a torch.Tensor")
        if t.layout != strided:
            raise InvalidArgument(f"cannot {verb}: tensor {quote(name)} has layout {t.layout}; only dense "
                                  f"(torch.strided) tensors can be registered")
        devices.setdefault(t.device, name)
    devices = {str(d): n for d, n in devices.items()}
    if len(devices) > 1:
        listed = ", ".join(f"{d} ({quote(n)})" for d, n in sorted(devices.items()))
        raise InvalidArgument(f"cannot {verb}: the tensors are on several devices: {listed}; they must all be on "
                              f"the CPU or all on one CUDA device")
    device = next(iter(devices), "cpu")
    kind = device.split(":")[0]
    if kind not in ("cpu", "cuda"):
        raise InvalidArgument(f"cannot {verb}: the tensors are on {device}; only cpu and cuda tensors can be "
                              f"registered")
    storages = []
    # This loop and describe()'s are the client's metadata cost per tensor (1 000 tensors: a
    # few ms): look-ups are hoisted out of them.
    storage_of = getattr(tensor_type, "untyped_storage", None) or untyped_storage  # torch 2 / 1.13
    dtype_names: dict = {}
    for name, t in items:
        dtype = dtype_names.get(t.dtype)
        if dtype is None:
            dtype = dtype_names[t.dtype] = str(t.dtype)
        if dtype not in DTYPE_SIZES:
            raise InvalidArgument(f"cannot {verb}: tensor {quote(name)} has unsupported dtype {dtype}")
        storage = storage_of(t)
        storages.append((storage, storage.data_ptr(), storage.nbytes(), dtype))
    return items, storages, device


def describe(items: list, storages: list) -> list:
    """The second half of state_dict_descs: a Desc per item."""
    new = tuple.__new__  # a Desc without NamedTuple's Python-level __new__
    return [new(Desc, (name, (ptr, nbytes), nbytes, list(t.shape), list(t.stride()), dtype, t.storage_offset(),
                       (storage, t)))
            for (name, t), (storage, ptr, nbytes, dtype) in zip(items, storages)]


def storage_bytes(torch, source):
    """A uint8 tensor over all bytes of a storage, on its device, with no copy."""
    storage, t = source
    try:
        return torch.empty(0, dtype=torch.uint8, device=t.device).set_(storage)
    except (TypeError, RuntimeError):
        # Older or newer torch without set_(UntypedStorage): view the storage through the tensor.
        size = DTYPE_SIZES[str(t.dtype)]
        whole = t.detach().as_strided((storage.nbytes() // size,), (1,), 0)
        return whole.view(torch.uint8)


# ---- safetensors files ---------------------------------------------------------------------


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def read_safetensors_header(path: str) -> tuple:
    """Returns (tensors, data_offset): tensors as (name, torch dtype, shape, begin, end) with
    begin/end relative to the data section. Errors: InvalidArgument, NotFound via OSError."""
    label = f"cannot read safetensors file {quote(path)}"
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            raise InvalidArgument(f"{label}: file of {size} bytes is too short for the 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > SAFETENSORS_MAX_HEADER or n > size - 8:
            raise InvalidArgument(f"{label}: header length {n} exceeds the file or the 100 MiB limit")
        text = f.read(n)
    try:
        doc = json.loads(text.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as e:
        raise InvalidArgument(f"{label}: header is not valid json: {e}") from None
    if not isinstance(doc, dict):
        raise InvalidArgument(f"{label}: top level must be a json object")
    data_offset = 8 + n
    data_size = size - data_offset
    tensors = []
    for name, info in doc.items():
        if name == "__metadata__":
            continue
        if not name or "/" in name or "\\" in name or name.startswith("."):
            raise InvalidArgument(f"{label}: tensor name {quote(name)} is empty, starts with '.' or holds a path "
                                  f"separator")
        if not isinstance(info, dict):
            raise InvalidArgument(f"{label}: tensor {quote(name)} must be a json object")
        st_dtype = info.get("dtype")
        torch_dtype = SAFETENSORS_DTYPES.get(st_dtype) if isinstance(st_dtype, str) else None
        if torch_dtype is None:
            raise InvalidArgument(f"{label}: tensor {quote(name)} has unsupported dtype {st_dtype!r}")
        shape = info.get("shape")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**63
                                                  for d in shape):
            raise InvalidArgument(f"{label}: tensor {quote(name)} field 'shape' must be an array of non-negative "
                                  f"integers")
        offsets = info.get("data_offsets")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)):
            raise InvalidArgument(f"{label}: tensor {quote(name)} field 'data_offsets' must be an array of two "
                                  f"non-negative integers")
        begin, end = offsets
        if begin > end or end > data_size:
            raise InvalidArgument(f"{label}: tensor {quote(name)} data_offsets [{begin}, {end}] are inverted or end "
                                  f"past the data section of {data_size} bytes")
        numel = 1
        for d in shape:
            numel *= d
        if numel * DTYPE_SIZES[torch_dtype] != end - begin:
            raise InvalidArgument(f"{label}: tensor {quote(name)} data_offsets [{begin}, {end}] span {end - begin} "
                                  f"bytes but shape {shape} of {st_dtype} needs {numel * DTYPE_SIZES[torch_dtype]}")
        tensors.append((name, torch_dtype, shape, begin, end))
    spans = sorted((t[3], t[4], t[0]) for t in tensors if t[4] > t[3])
    for (a0, a1, an), (b0, b1, bn) in zip(spans, spans[1:]):
        if b0 < a1 and (a0, a1) != (b0, b1):
            raise InvalidArgument(f"{label}: tensors {quote(an)} [{a0}, {a1}) and {quote(bn)} [{b0}, {b1}) overlap in "
                                  f"the data section")
    return tensors, data_offset


def safetensors_descs(paths: list) -> list:
    """Describes the tensors of safetensors files as coalesce() does: files in filename order,
    row-major strides, storage_offset 0, identical data ranges of one file share a storage.
    Each source is (path, absolute file offset, length)."""
    order = sorted(range(len(paths)), key=lambda k: (os.path.basename(paths[k]), paths[k], k))
    seen: dict = {}
    descs = []
    for f in order:
        tensors, data_offset = read_safetensors_header(paths[f])
        for name, dtype, shape, begin, end in tensors:
            if name in seen:
                raise InvalidArgument(f"cannot coalesce safetensors files: tensor {quote(name)} appears in both "
                                      f"{quote(paths[seen[name]])} and {quote(paths[f])}")
            seen[name] = f
            stride = [0] * len(shape)
            step = 1
            for d in range(len(shape) - 1, -1, -1):
                stride[d] = step
                step *= max(shape[d], 1)
            key = (f, begin, end) if end > begin else (f, begin, end, name)  # empty tensors never alias
            descs.append(Desc(name, key, end - begin, shape, stride, dtype, 0,
                              (paths[f], data_offset + begin, end - begin)))
    return descs
