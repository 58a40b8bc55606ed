"""What put() and register() return: `RegisteredArtifact` (and its `LocalStableTier`), read
from the commit answer and the layout that was registered.

Thread-safety: plain values once built; close() is the lease's (idempotent, any thread).
Ownership: a RegisteredArtifact from register() owns its lease.
"""

from __future__ import annotations

from typing import NamedTuple

from . import _requests
from ._leases import Lease


class LocalStableTier(NamedTuple):
    """The local stable tier's outcome at commit: status is "ready", "degraded", "skipped" or
    "unspecified"; message says why when it is not ready."""

    status: str
    message: str


class RegisteredArtifact:
    """What put() and register() return.

    artifact_id, index (name → [offset, size, shape, stride, dtype, storage_offset]),
    index_json (the canonical bytes), total_size, existed (the daemon held it already),
    descriptor (dict), registration_id, registration_kind ("stable_dram" for put of CPU
    tensors, "coalesced" for put of CUDA tensors, "lease_in_place" for register),
    local_stable_tier (LocalStableTier or None), remote_stable_tier (LocalStableTier: the copies
    on other hosts a policy such as "should:stable_dram:remote:2" asks for; None when it asks for
    none), lease (a Lease for register, else None),
    timings (seconds: "metadata" = layout and driver queries in this process, "rpc" = the calls
    before commit, "commit" = the commit call, where the daemon hashes; a register of CUDA
    tensors adds "feed_build" and "answer_wait", the parts of "rpc" spent building the Feed
    while the daemon imports the regions and then waiting for it). close() releases the lease,
    if any; so does leaving a `with`.
    """

    def __init__(self, commit, layout, registration_id: str, kind: str, lease: Lease | None,
                 timings: dict | None = None) -> None:
        self.timings: dict = timings or {}
        self.answer = commit  # the CommitRegisteredArtifactResponse (a view's fields, _views.py)
        d = commit.artifact_descriptor
        self.artifact_id: str = d.artifact_id
        self.descriptor: dict = _requests.descriptor_dict(d)
        self.index: dict = layout.index
        self.index_json: bytes = layout.json
        self.total_size: int = d.total_size
        self.existed: bool = commit.existed
        self.registration_id = registration_id
        self.registration_kind = kind
        self.lease = lease
        tier = _requests.local_stable_tier(commit)
        self.local_stable_tier = LocalStableTier(*tier) if tier is not None else None
        remote = _requests.remote_stable_tier(commit)
        self.remote_stable_tier = LocalStableTier(*remote) if remote is not None else None

    def close(self) -> None:
        if self.lease is not None:
            self.lease.close()

    def __enter__(self) -> RegisteredArtifact:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"RegisteredArtifact({self.artifact_id!r}, total_size={self.total_size}, existed={self.existed}, "
                f"kind={self.registration_kind!r})")
