"""Views and pieces (registration.md §7; wire-format.md §16): register_view, register_piece and
get(..., view=...).

- A **view** is a set of canonical tensors, each narrowed once or transposed any number of
  times. The spec is `{name: op or [ops]}`, an op being ("narrow", dim, start, length) or
  ("transpose", d0, d1) (or a `Narrow`/`Transpose`); `tensor_names` are tensors taken whole.
- **SERVER placement**: Begin carries the canonical index and the spec; the daemon checks every
  rule of §7.1–§7.6 there, and only then does this process build the view bytes (torch's
  narrow/transpose of the canonical tensors, made contiguous: the row-major linearization of
  §7.3) and write them into the staging memfd the Begin answer hands out, at their view
  offsets, reporting each batch written (wire-format.md §16); the daemon copies them out as
  they are reported. CUDA tensors are made contiguous on their GPU and copied to the host a
  batch at a time.
- **CLIENT placement**: the canonical tensors go up as put() sends them (stable_dram for CPU
  tensors, coalesced for CUDA ones) with the view options in the Begin; the daemon records the
  view over what it published.
- A **piece** is a tensor-parallel rank's narrow of each weight: the canonical index is that
  of the whole model, built from the local tensors and the rank spec (contiguous, untied
  canonical tensors, as a model's state_dict() has them) unless the caller passes it.
- get(view=...) asks the daemon for the view record and applies its normalized spec to the
  canonical tensors of get(): zero-copy views with the view's shapes.

Errors are the daemon's status where it checks (every §7 rule), raised as the package's
exception classes; a failure after Begin aborts the registration.

Thread-safety: each function runs one registration over the given connection (which
serialises calls).
"""

from __future__ import annotations

import ctypes
import json
import os
import time
from typing import NamedTuple, Optional

from . import _buffers, _layout, _messages, _put, _reads, _requests
from ._torch import module as _torch
from ._wire import Connection, _close_fds
from .errors import DataLoss, FailedPrecondition, InvalidArgument

# View bytes written into the staging memfd between two progress reports: the daemon copies
# each batch out on its own thread while the next is written.
STAGED_BYTES = 8 << 20
_DAEMON = _messages.DAEMON
_ALIGNMENT = _layout.ALIGNMENT


class Narrow(NamedTuple):
    dim: int
    start: int
    length: int


class Transpose(NamedTuple):
    dim0: int
    dim1: int


class AssemblyStatus(NamedTuple):
    """Where a piece's assembly stands: after its commit, and in Store.assemblies()
    (wire-format.md §16)."""

    cgid: str
    canonical_size_bytes: int
    covered_bytes: int
    pieces: int
    sealed: bool
    artifact_id: str  # the mi2 id once sealed, else ""
    expires_in_ms: Optional[int] = None  # until the daemon drops it, sealed or not; None: no TTL

    @classmethod
    def from_message(cls, a) -> "AssemblyStatus":
        return cls(a.cgid, a.canonical_size_bytes, a.covered_bytes, a.pieces, a.sealed, a.artifact_id,
                   a.expires_in_ms if a.HasField("expires_in_ms") else None)


class ViewRegistration:
    """What register_view() and register_piece() return.

    view_id, view_index_json (bytes: the view tensors' own v3 index), view_index (it, parsed),
    view_data_hash, canonical_ranges ([(offset, length)], merged), registration_kind
    ("canonical" or "piece"), artifact_id (the artifact's id; for a piece, the cgid until the
    assembly seals, then the mi2 id), existed, descriptor (dict), local_stable_tier
    ((status, message) or None), assembly (AssemblyStatus of a piece, else None).
    """

    def __init__(self, answer, registration_id: str = "") -> None:
        self.registration_id = registration_id  # what the daemon's messages name a piece by
        d = answer.artifact_descriptor
        self.artifact_id: str = d.artifact_id
        self.descriptor: dict = _requests.descriptor_dict(d)
        self.existed: bool = answer.existed
        self.view_id: str = answer.view_id
        self.view_index_json: bytes = bytes(answer.view_index_json)
        self.view_index: dict = json.loads(self.view_index_json) if self.view_index_json else {}
        self.view_data_hash: str = answer.view_data_hash
        self.canonical_ranges: list = [(r.offset, r.length) for r in answer.canonical_ranges]
        self.registration_kind: str = _kind_name(answer.registration_kind)
        self.local_stable_tier = _requests.local_stable_tier(answer)
        self.assembly = None
        if answer.HasField("assembly"):
            self.assembly = AssemblyStatus.from_message(answer.assembly)

    @property
    def sealed(self) -> bool:
        return self.assembly is not None and self.assembly.sealed

    def __repr__(self) -> str:
        return (f"ViewRegistration({self.view_id!r}, artifact_id={self.artifact_id!r}, "
                f"kind={self.registration_kind!r}, assembly={self.assembly!r})")


def _kind_name(number: int) -> str:
    name = _messages.enum_name(_DAEMON + ".ViewRegistrationKind", number)
    return name.replace("VIEW_REGISTRATION_KIND_", "").lower()


# ---- specs ----------------------------------------------------------------------------------


def _int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"cannot register view: {what} {value!r} is not an int")
    return value


def parse_spec(spec) -> dict:
    """{name: [Narrow | Transpose]} of a user spec. Only the shape of the ops is checked here;
    every rule of §7.1 is the daemon's. Errors: InvalidArgument."""
    if spec is None:
        return {}
    if not hasattr(spec, "items"):
        raise InvalidArgument(f"cannot register view: the spec is a {type(spec).__name__}, not a mapping of "
                              f"tensor names to ops")
    out = {}
    for name, ops in spec.items():
        _layout.check_name(name)
        if isinstance(ops, (tuple, Narrow, Transpose)) and ops and isinstance(ops[0], (str, int)):
            ops = [ops]
        parsed = []
        for op in ops:
            if isinstance(op, (Narrow, Transpose)):
                parsed.append(op)
                continue
            if not isinstance(op, (tuple, list)) or not op:
                raise InvalidArgument(f"cannot register view: tensor {_layout.quote(name)}: op {op!r} is not "
                                      f"('narrow', dim, start, length) or ('transpose', dim0, dim1)")
            kind, *args = op
            if kind == "narrow" and len(args) == 3:
                parsed.append(Narrow(*(_int(a, f"tensor {_layout.quote(name)}: narrow argument") for a in args)))
            elif kind == "transpose" and len(args) == 2:
                parsed.append(Transpose(*(_int(a, f"tensor {_layout.quote(name)}: transpose dim") for a in args)))
            else:
                raise InvalidArgument(f"cannot register view: tensor {_layout.quote(name)}: op {op!r} is not "
                                      f"('narrow', dim, start, length) or ('transpose', dim0, dim1)")
        out[name] = parsed
    return out


def view_options(ops: dict, tensor_names, placement: str, kind: str, canonical_size: int = 0, view_id: str = ""):
    """The ViewRegistrationOptions of a Begin."""
    options = _messages.message(_DAEMON + ".ViewRegistrationOptions")()
    for name, tensor_ops in ops.items():
        entry = options.spec.tensors[name]
        for op in tensor_ops:
            wire_op = entry.ops.add()
            if isinstance(op, Narrow):
                wire_op.narrow.dim = op.dim
                wire_op.narrow.start = op.start
                wire_op.narrow.length = op.length
            else:
                wire_op.transpose.dim0 = op.dim0
                wire_op.transpose.dim1 = op.dim1
    for name in tensor_names or ():
        options.tensor_names.append(_layout.check_name(name))
    if placement not in ("server", "client"):
        raise InvalidArgument(f"cannot register view: unknown placement {placement!r}: expected 'server' or "
                              f"'client'")
    options.placement = _messages.enum_value(_DAEMON + ".TransformPlacement",
                                             "TRANSFORM_PLACEMENT_" + placement.upper())
    options.registration_kind = _messages.enum_value(_DAEMON + ".ViewRegistrationKind",
                                                     "VIEW_REGISTRATION_KIND_" + kind.upper())
    options.canonical_size_bytes = canonical_size
    # A SERVER upload writes its view bytes into a staging memfd the daemon hands out.
    options.staging_memfd = placement == "server"
    if view_id:
        options.view_id = view_id
    return options


def apply_ops(tensor, ops):
    """The view tensor: the ops in order, as torch's narrow/transpose (§7.3)."""
    for op in ops:
        if isinstance(op, Narrow):
            start = op.start + tensor.shape[op.dim] if op.start < 0 else op.start
            tensor = tensor.narrow(op.dim, start, op.length)
        else:
            tensor = tensor.transpose(op.dim0, op.dim1)
    return tensor


def view_tensors(canonical: dict, ops: dict, tensor_names) -> list:
    """[(name, view tensor)] in view order (names in byte order)."""
    names = dict.fromkeys(list(ops) + list(tensor_names or ()))
    return [(name, apply_ops(canonical[name], ops.get(name, ()))) for name in sorted(names)]


def _view_bytes(torch, t):
    """A flat uint8 tensor of a view tensor's row-major bytes (on its device)."""
    flat = t.detach().contiguous().reshape(-1)
    return flat.view(torch.uint8) if flat.numel() else torch.empty(0, dtype=torch.uint8, device=t.device)


def staged_frames(torch, tensors: list, registration_id: str, fd: int, batch_bytes: int):
    """The Feed frames of a SERVER upload through the daemon's staging memfd `fd`
    (wire-format.md §16): each view tensor's row-major bytes (§7.3) written at its view offset,
    at most `batch_bytes` at a time, and reported by a stable_dram_write_progress frame once
    `batch_bytes` have been written (small tensors share one), so that the daemon copies one
    batch out while the next is written. PAD is not written (the memfd reads as zeros there).
    CUDA tensors are made contiguous on their GPU and copied to the host a batch at a time. A
    generator: it writes as it is iterated."""
    cursor = 0  # view offset past the last tensor
    written, pending = [], 0  # ranges written and not reported yet, and their bytes
    with torch.no_grad():
        for _, t in tensors:
            if t.numel() == 0:
                continue
            start = (cursor + _ALIGNMENT - 1) // _ALIGNMENT * _ALIGNMENT
            data = _view_bytes(torch, t)
            n = data.numel()
            for at in range(0, n, batch_bytes):
                piece = data[at:at + batch_bytes]
                if piece.device.type != "cpu":
                    piece = piece.cpu()
                # The tensor's own memory, seen as bytes; `piece` keeps it alive.
                _buffers.pwrite_all(fd, (ctypes.c_ubyte * piece.numel()).from_address(piece.data_ptr()), start + at)
                written.append((start + at, piece.numel()))
                pending += piece.numel()
                if pending >= batch_bytes:
                    yield _requests.write_progress(registration_id, written)
                    written, pending = [], 0
            cursor = start + n
    if written:
        yield _requests.write_progress(registration_id, written)


# ---- register_view / register_piece --------------------------------------------------------


def _begin(layout_json, total_size: int, options, device_id: int = 0, ttl_ms: int = _requests.DEFAULT_TTL_MS,
           cgid: str | None = None):
    """BeginRegisterArtifact of a SERVER upload: the canonical index inline, stable_dram named
    (the handshake carries no buffer, §7.7), the view options."""
    begin = _messages.Request()
    b = begin.begin_register_artifact
    b.device_id = device_id
    b.total_size = total_size
    b.ttl_ms = ttl_ms
    b.owner_pid = os.getpid()
    b.tensor_index_data.data = layout_json
    b.tensor_index_data.schema_version = "v3"
    b.tensor_index_data.encoding = "json"
    b.stable_dram.SetInParent()
    if cgid:
        b.client_artifact_id = cgid
    b.view.CopyFrom(options)
    return begin


def _commit_when_free(conn: Connection, registration_id: str, ttl_ms: int):
    """Commit; again, backing off, while the daemon answers that bytes of this piece lie in the
    claim of a piece that has not committed yet (docs/registration.md §7.11): until that one has
    committed or ended, for at most the registration's TTL (600 s when it has none)."""
    deadline = time.monotonic() + (ttl_ms or 600_000) / 1000
    pause = 0.001
    while True:
        try:
            return _put.commit(conn, registration_id)
        except FailedPrecondition as e:
            if "which has not committed yet" not in e.message or time.monotonic() + pause > deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 0.05)


def _server_upload(conn: Connection, begin, make_tensors) -> ViewRegistration:
    """Begin → the view bytes (built by make_tensors() once Begin has passed) written into the
    staging memfd and reported → Commit; aborts on failure."""
    begun, fds = conn.call(begin)
    registration_id = begun.begin_register_artifact.registration_id
    try:
        if not fds:
            raise DataLoss(f"cannot upload view registration '{registration_id}': the daemon sent no staging memfd")
        torch = _torch()
        conn.feed(staged_frames(torch, make_tensors(), registration_id, fds[0], STAGED_BYTES))
        _close_fds(fds)
        fds = ()
        done = _commit_when_free(conn, registration_id, begin.begin_register_artifact.ttl_ms)
    except BaseException:
        _close_fds(fds)
        _put.abort(conn, registration_id)
        raise
    return ViewRegistration(done, registration_id)


class _Replica(NamedTuple):
    index_json: bytes
    tensors: dict  # canonical name -> tensor (views of a private mapping of the replica)


def _replica(conn: Connection, artifact_id: str) -> _Replica:
    answer, _ = conn.call(_requests.artifact_index(artifact_id))
    index_json = answer.get_artifact_index_by_id.tensor_index_data
    if isinstance(index_json, str):
        index_json = index_json.encode()
    return _Replica(index_json, _reads.get_tensors(conn, artifact_id, "cpu"))


def register_view(conn: Connection, source, spec, placement: str, tensor_names, view_id: str,
                  policy: str | None) -> ViewRegistration:
    """Store.register_view: a CANONICAL view of an artifact (by id) or of a state dict."""
    ops = parse_spec(spec)
    profile = _requests.policy_profile(policy, "register view")
    if isinstance(source, str):
        replica = _replica(conn, source)
        index = json.loads(replica.index_json)
        if tensor_names is None:
            tensor_names = [n for n in sorted(index) if n not in ops]
        options = view_options(ops, tensor_names, placement, "canonical", view_id=view_id)
        if placement == "client":
            return _client_upload_replica(conn, source, replica, options, profile)
        begin = _begin(replica.index_json, _index_total(index), options)
        if profile is not None:
            _requests.apply_policy(begin.begin_register_artifact.policy, profile)
        return _server_upload(conn, begin, lambda: view_tensors(replica.tensors, ops, tensor_names))

    torch = _torch()
    descs, _ = _layout.state_dict_descs(torch, source, "register view")
    layout = _layout.build(descs)
    if tensor_names is None:
        tensor_names = [n for n in sorted(layout.index) if n not in ops]
    options = view_options(ops, tensor_names, placement, "canonical", view_id=view_id)
    if placement == "client":
        art = _put.put(conn, source, policy, view=options)
        return ViewRegistration(art.answer, art.registration_id)
    begin = _begin(layout.json, layout.total_size, options)
    if profile is not None:
        _requests.apply_policy(begin.begin_register_artifact.policy, profile)
    return _server_upload(conn, begin, lambda: view_tensors(dict(source.items()), ops, tensor_names))


def _index_total(index: dict) -> int:
    return max((e[0] + e[1] for e in index.values()), default=0)


def _client_upload_replica(conn: Connection, artifact_id: str, replica: _Replica, options,
                           profile) -> ViewRegistration:
    """CLIENT placement of an artifact's view: its canonical bytes, copied from its replica's
    memfd, up again through stable_dram with the view in the Begin."""
    index = json.loads(replica.index_json)
    total = _index_total(index)
    layout = _layout.Layout(index, replica.index_json, total, [], {}, {})
    answer, fds = conn.call(_requests.get_artifact_memfd(artifact_id))
    try:
        if not fds or answer.get_artifact_memfd.size_bytes < total:
            raise DataLoss(f"cannot register view of {artifact_id}: the daemon sent no memfd of its {total} bytes")

        def write(fd, start):
            _buffers.pwrite_file_range(fd, start, fds[0], 0, total, bytearray(_buffers._FILE_PIECE))

        art = _put._put_stable_dram(conn, layout, profile, write, view=options)
    finally:
        _close_fds(fds)
    return ViewRegistration(art.answer, art.registration_id)


def piece_layout(torch, tensors: dict, rank_spec: dict):
    """The canonical layout of the whole model a rank holds pieces of: each local tensor's
    shape with its narrowed dim at its canonical size, contiguous, one storage each. Returns
    (layout, ops). Errors: InvalidArgument."""
    items, storages, _ = _layout.state_dict_storages(torch, tensors, "register piece")
    descs = []
    ops = {}
    for (name, t), (_, _, _, dtype) in zip(items, storages):
        shape = list(t.shape)
        spec = rank_spec.get(name)
        if spec is not None:
            if not isinstance(spec, (tuple, list)) or len(spec) != 3:
                raise InvalidArgument(f"cannot register piece: rank spec of {_layout.quote(name)} is {spec!r}, not "
                                      f"(dim, start, canonical_size)")
            dim, start, size = (_int(v, f"rank spec of {_layout.quote(name)}:") for v in spec)
            if not 0 <= dim < len(shape):
                raise InvalidArgument(f"cannot register piece: rank spec of {_layout.quote(name)} narrows dim {dim} "
                                      f"of a tensor of rank {len(shape)}")
            ops[name] = [Narrow(dim, start, shape[dim])]
            shape[dim] = size
        stride = []
        step = 1
        for s in reversed(shape):
            stride.append(step)
            step *= max(s, 1)
        stride.reverse()
        numel = 1
        for s in shape:
            numel *= s
        nbytes = numel * _layout.DTYPE_SIZES[dtype]
        descs.append(_layout.Desc(name, name, nbytes, shape, stride, dtype, 0, None))
    unknown = sorted(set(rank_spec) - set(tensors))
    if unknown:
        raise InvalidArgument(f"cannot register piece: rank spec names {_layout.quote(unknown[0])}, which is not "
                              f"one of the tensors")
    return _layout.build(descs), ops


def register_piece(conn: Connection, cgid: str, tensors, rank_spec, canonical_index, ttl_ms: int,
                   view_id: str) -> ViewRegistration:
    """Store.register_piece: a tensor-parallel rank's narrow of each weight, as a PIECE of the
    artifact `cgid` (SERVER placement: the only one the daemon takes for pieces, §7.6)."""
    torch = _torch()
    if not isinstance(cgid, str) or not cgid:
        raise InvalidArgument(f"cannot register piece: cgid {cgid!r} is not a non-empty str")
    if not isinstance(ttl_ms, int) or isinstance(ttl_ms, bool) or not 0 <= ttl_ms < 2**32:
        raise InvalidArgument(f"cannot register piece: ttl_ms {ttl_ms!r} is not a uint32")
    rank_spec = dict(rank_spec or {})
    layout, ops = piece_layout(torch, tensors, rank_spec)
    index_json, canonical_size = layout.json, layout.total_size
    if canonical_index is not None:
        index_json = canonical_index.encode() if isinstance(canonical_index, str) else bytes(canonical_index)
        canonical_size = _index_total(json.loads(index_json))
    local = dict(tensors.items())
    names = sorted(local)
    whole = [n for n in names if n not in ops]
    view_size = 0
    for name in names:
        t = local[name]
        view_size = (view_size + _ALIGNMENT - 1) // _ALIGNMENT * _ALIGNMENT if t.numel() else view_size
        view_size += t.numel() * t.element_size()
    options = view_options(ops, whole, "server", "piece", canonical_size, view_id)
    begin = _begin(index_json, view_size, options, ttl_ms=ttl_ms, cgid=cgid)
    return _server_upload(conn, begin, lambda: [(n, local[n]) for n in names])


# ---- reading a view back -------------------------------------------------------------------


def view_record(conn: Connection, artifact_id: str, view_id: str):
    """The ArtifactView of `view_id` on `artifact_id`. Errors: NotFound."""
    request = _requests.artifact_index(artifact_id)
    request.get_artifact_index_by_id.view_id = view_id
    answer, _ = conn.call(request)
    return answer.get_artifact_index_by_id.view


def record_ops(record) -> dict:
    """{name: [ops]} of a recorded (normalized) spec."""
    out = {}
    for name, entry in record.spec.tensors.items():
        ops = []
        for op in entry.ops:
            if op.HasField("narrow"):
                ops.append(Narrow(op.narrow.dim, op.narrow.start, op.narrow.length))
            elif op.HasField("transpose"):
                ops.append(Transpose(op.transpose.dim0, op.transpose.dim1))
            else:
                raise DataLoss(f"cannot read view {record.view_id}: tensor {_layout.quote(name)} has an op with "
                               f"neither narrow nor transpose")
        out[name] = ops
    return out


def get_view(conn: Connection, artifact_id: str, view_id: str, device) -> dict:
    """Store.get(view=...): the view tensors, as torch's narrow/transpose of get()'s tensors."""
    record = view_record(conn, artifact_id, view_id)
    ops = record_ops(record)
    canonical = _reads.get_tensors(conn, artifact_id, device)
    missing = sorted(set(ops) - set(canonical))
    if missing:
        raise DataLoss(f"cannot read view {view_id} of {artifact_id}: its tensor {_layout.quote(missing[0])} is not "
                       f"in the artifact")
    return {name: apply_ops(canonical[name], ops[name]) for name in sorted(ops)}
