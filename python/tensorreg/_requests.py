"""The wire messages of the Store's calls: each request built from plain arguments, and the
parts of answers that several calls read (descriptors, tier names).

Building a message is the only job here: nothing is sent, nothing is checked that the daemon
checks itself. The Feed of a lease (lease_feed) is the one per-tensor builder and is kept lean:
register() of 1 000 CUDA tensors builds it while the daemon imports the regions.

Thread-safety: pure functions; every call returns a new message that the caller owns.
"""

from __future__ import annotations

import os

from . import _layout, _messages
from .errors import InvalidArgument

PROFILES = ("cache", "durable", "ha", "cold", "warm", "pinned")
DEFAULT_TTL_MS = 600_000
_COMMON = _messages.COMMON
_DAEMON = _messages.DAEMON


_LEVELS = ("must", "should", "may")
_TIERS = ("stable_dram", "shared_disk")
_SCOPES = ("local", "remote", "any")


def policy_profile(policy: str | None, verb: str):
    """The PolicyProfile number of a profile name, or for explicit tiers
    "LEVEL:TIER[:SCOPE[:N]],..." (e.g. "should:stable_dram:remote:2", docs/cluster.md §5) a
    list of (level, tier, scope, min_replicas); None for no policy (the daemon's default).
    apply_policy() puts either into a StorePolicy. Errors: InvalidArgument naming what is
    wrong."""
    if policy is None or policy == "":
        return None
    if ":" in policy:
        return _parse_tiers(policy, verb)
    if policy not in PROFILES:
        raise InvalidArgument(f"cannot {verb}: unknown policy profile {policy!r}: expected one of "
                              f"{', '.join(PROFILES)}")
    return _messages.enum_value(_COMMON + ".PolicyProfile", "POLICY_PROFILE_" + policy.upper())


def _parse_tiers(policy: str, verb: str) -> list:
    def bad(why: str):
        return InvalidArgument(f"cannot {verb}: cannot parse policy {policy!r}: {why} (a profile, or tiers "
                               "LEVEL:TIER[:SCOPE[:N]] separated by commas, e.g. should:stable_dram:remote:2)")
    tiers = []
    for item in policy.split(","):
        parts = item.split(":")
        if not 2 <= len(parts) <= 4:
            raise bad(f"{item!r} is not LEVEL:TIER[:SCOPE[:N]]")
        if parts[0] not in _LEVELS:
            raise bad(f"unknown level {parts[0]!r} (must, should, may)")
        if parts[1] not in _TIERS:
            raise bad(f"unknown tier {parts[1]!r} (stable_dram, shared_disk)")
        scope = parts[2] if len(parts) > 2 else None
        if scope is not None and scope not in _SCOPES:
            raise bad(f"unknown scope {scope!r} (local, remote, any)")
        n = 0
        if len(parts) > 3:
            if not parts[3].isdigit():
                raise bad(f"min_replicas {parts[3]!r} is not a number")
            n = int(parts[3])
        tiers.append((parts[0], parts[1], scope, n))
    return tiers


def apply_policy(message, policy) -> None:
    """Puts what policy_profile() answered into the StorePolicy `message` (None: nothing)."""
    if policy is None:
        return
    if isinstance(policy, int):
        message.profile = policy
        return
    for level, tier, scope, n in policy:
        t = getattr(message, level).add()
        t.tier = _messages.enum_value(_COMMON + ".PolicyTier", "POLICY_TIER_" + tier.upper())
        if scope is not None:
            t.scope = _messages.enum_value(_COMMON + ".PolicyScope", "POLICY_SCOPE_" + scope.upper())
        t.min_replicas = n


# ---- registration ----


def put_begin(layout, profile, plan: str, device_id: int = 0, device_uuid: str = ""):
    """BeginRegisterArtifact of a put: the index inline, `plan` ("stable_dram" or "coalesced")
    with its defaults, the policy profile when one is given, the device by UUID when known."""
    begin = _messages.Request()
    b = begin.begin_register_artifact
    b.device_id = device_id
    if device_uuid:
        b.device_uuid = device_uuid
    b.total_size = layout.total_size
    b.ttl_ms = DEFAULT_TTL_MS
    b.owner_pid = os.getpid()
    b.tensor_index_data.data = layout.json
    b.tensor_index_data.schema_version = "v3"
    b.tensor_index_data.encoding = "json"
    getattr(b, plan).SetInParent()
    apply_policy(b.policy, profile)
    return begin


def lease_begin(ttl_ms: int, client_artifact_id: str | None, profile):
    """BeginRegisterArtifact of a lease in place, on no device yet (-1) and without total_size:
    the register flow fills in those it knows (the device, the layout's size)."""
    begin = _messages.Request()
    b = begin.begin_register_artifact
    b.device_id = -1
    b.ttl_ms = ttl_ms
    b.owner_pid = os.getpid()
    b.lease.in_place = True
    if client_artifact_id:
        b.client_artifact_id = client_artifact_id
    apply_policy(b.policy, profile)
    return begin


def host_shared_region(size_bytes: int, pid: int):
    """RegisterRegion of a daemon-managed HOST_SHARED region of `size_bytes` (the daemon answers
    with its memfd)."""
    request = _messages.Request()
    rr = request.register_region
    rr.memory_kind = _messages.enum_value(_DAEMON + ".RegionMemoryKind", "REGION_MEMORY_KIND_HOST_SHARED")
    rr.owner_pid = pid
    rr.size_bytes = size_bytes
    rr.host_shared.daemon_managed = True
    return request


def stable_dram_feed(registration_id: str, total_size: int):
    """The one Feed frame of a stable_dram put: every canonical byte written, upload complete."""
    return write_progress(registration_id, [(0, total_size)], complete=True)


def write_progress(registration_id: str, ranges, complete: bool = False):
    """A stable_dram_write_progress Feed frame: the (offset, length) `ranges` of the memfd the
    Begin handed out are written."""
    frame = _messages.Request()
    feed = frame.feed_register_artifact_stream
    feed.registration_id = registration_id
    progress = feed.stable_dram_write_progress
    for offset, length in ranges:
        r = progress.ranges.add()
        r.canonical_offset = offset
        r.length = length
    progress.upload_complete = complete
    return frame


def lease_feed(layout, source):
    """The one Feed frame of a lease (a Request; the caller sets its registration_id): a storage
    entry per layout storage (`source(entry, k)` fills in where its bytes are), one segment
    each covering it whole, and the tensor aliases."""
    frame = _messages.Request()
    feed = frame.feed_register_artifact_stream
    ids = []
    entries = feed.storage_entries
    segments = feed.lease_segments.segments
    for k, s in enumerate(layout.storages):
        sid = f"s{k}"
        ids.append(sid)
        e = entries.add()
        e.storage_id = sid
        e.storage_length = s.nbytes
        source(e, k)
        seg = segments.add()
        seg.storage_id = sid  # storage_offset 0: the default, not stored
        seg.artifact_offset = s.offset
        seg.length = s.nbytes
    aliases = feed.tensor_aliases
    sizes, descs, storage_of, extent = _layout.DTYPE_SIZES, layout.descs, layout.storage_of, _layout.extent_bytes
    for name in sorted(layout.index):
        d = descs[name]
        a = aliases.add()
        a.name = name
        a.storage_id = ids[storage_of[name]]
        if d.storage_offset:
            a.storage_offset = d.storage_offset
        a.logical_length = extent(d.shape, d.stride, sizes[d.dtype])
        a.shape.extend(d.shape)
        a.stride.extend(d.stride)
        a.dtype = d.dtype
    return frame


def host_region_feed(layout, region):
    """lease_feed of a lease whose storages all lie in one HOST_SHARED region (`region`, a
    RegionRef), each at its canonical offset: the layout was written into the region as is."""

    def source(entry, k):
        entry.device_id = -1
        entry.region_ref.CopyFrom(region)
        entry.mapping_base_offset = layout.storages[k].offset

    return lease_feed(layout, source)


def commit(registration_id: str, hash_in_background: bool = False, replica_timeout_ms: int = 0):
    """CommitRegisteredArtifact; with hash_in_background (a cgid registration only) the daemon
    answers once the artifact is usable and hashes it afterwards (registration.md §4.8);
    replica_timeout_ms: how long it waits for copies on other hosts (0: the daemon's)."""
    request = _messages.Request()
    request.commit_registered_artifact.registration_id = registration_id
    if hash_in_background:
        request.commit_registered_artifact.hash_in_background = True
    if replica_timeout_ms:
        request.commit_registered_artifact.replica_timeout_ms = replica_timeout_ms
    return request


def republish_lease(registration_id: str, client_artifact_id: str | None, ttl_ms: int, profile,
                    hash_in_background: bool, revoke_previous: bool):
    """RepublishLease: a new version over the memory and layout of the lease `registration_id`
    (docs/wire-format.md §20)."""
    request = _messages.Request()
    r = request.republish_lease
    r.registration_id = registration_id
    if client_artifact_id:
        r.client_artifact_id = client_artifact_id
    r.owner_pid = os.getpid()
    r.ttl_ms = ttl_ms
    apply_policy(r.policy, profile)
    r.hash_in_background = hash_in_background
    r.revoke_previous = revoke_previous
    return request


# HashState (store_daemon.proto): where a cgid artifact's background hash stands.
HASH_STATES = {0: "none", 1: "pending", 2: "done", 3: "failed"}


def wait_artifact_hash(artifact_id: str, timeout_ms: int):
    """WaitArtifactHash: timeout_ms 0 waits until the hash ends."""
    request = _messages.Request()
    request.wait_artifact_hash.artifact_id = artifact_id
    request.wait_artifact_hash.timeout_ms = timeout_ms
    return request


def abort(registration_id: str):
    request = _messages.Request()
    request.abort_registered_artifact.registration_id = registration_id
    return request


# ---- leases ----


def keep_alive(registration_id: str, ttl_ms: int, epoch: int):
    request = _messages.Request()
    k = request.keep_alive_register_artifact
    k.registration_id = registration_id
    k.ttl_ms = ttl_ms
    k.epoch = epoch
    k.owner_pid = os.getpid()
    return request


def revoke(registration_id: str, reason: str):
    request = _messages.Request()
    request.revoke_registered_artifact.registration_id = registration_id
    request.revoke_registered_artifact.reason = reason
    return request


def unregister_region(region_id: str):
    """UnregisterRegion, forced: the region goes even while a lease still names it."""
    request = _messages.Request()
    u = request.unregister_region
    u.region_id = region_id
    u.owner_pid = os.getpid()
    u.force = True
    return request


# ---- reads and the catalogue ----


def get_artifact_memfd(artifact_id: str):
    request = _messages.Request()
    request.get_artifact_memfd.artifact_id = artifact_id
    return request


def open_persisted_artifact(artifact_id: str, unless_in_memory: bool):
    """OpenPersistedArtifact (docs/wire-format.md §17): a read-only fd of the persisted copy."""
    request = _messages.Request()
    request.open_persisted_artifact.artifact_id = artifact_id
    request.open_persisted_artifact.unless_in_memory = unless_in_memory
    return request


def open_artifact_device(artifact_id: str, first_allocation: int, known_layout: int = 0, place_on: str = ""):
    request = _messages.Request()
    request.open_artifact_device.artifact_id = artifact_id
    request.open_artifact_device.first_allocation = first_allocation
    if known_layout:
        request.open_artifact_device.known_layout = known_layout
    if place_on:
        request.open_artifact_device.place_on_device_uuid = place_on
    return request


def artifact_index(artifact_id: str):
    request = _messages.Request()
    request.get_artifact_index_by_id.artifact_id = artifact_id
    return request


def list_artifacts():
    request = _messages.Request()
    request.list_artifacts.SetInParent()
    return request


def stats():
    request = _messages.Request()
    request.get_stats.SetInParent()
    return request


def publish_artifact(artifact_id: str, replicas: int, all_members: bool, timeout_ms: int):
    """PublishArtifact (docs/wire-format.md §19): timeout_ms 0 is the daemon's 60 s."""
    request = _messages.Request()
    p = request.publish_artifact
    p.artifact_id = artifact_id
    p.replicas = replicas
    p.all = all_members
    p.timeout_ms = timeout_ms
    return request


def deregister(artifact_id: str, wait_for_drain: bool):
    request = _messages.Request()
    d = request.deregister_artifact
    d.artifact_id = artifact_id
    d.wait_for_drain = wait_for_drain
    return request


# ---- answers ----


def descriptor_dict(d) -> dict:
    """An ArtifactDescriptor as the dict Store.index(), list() and RegisteredArtifact give."""
    return {
        "artifact_id": d.artifact_id,
        "index_multihash": d.index_multihash,
        "data_multihash": d.data_multihash,
        "schema_version": d.schema_version,
        "encoding": d.encoding,
        "total_size": d.total_size,
        "id_kind": _messages.enum_name(_COMMON + ".ArtifactIdKind", d.id_kind),
    }


def tier_name(tier: int) -> str:
    name = _messages.enum_name(_messages.WIRE + ".Tier", tier)
    return {"TIER_VRAM": "vram", "TIER_VRAM_LEASED": "leased", "TIER_STABLE_DRAM": "stable_dram",
            "TIER_SHARED_DISK": "shared_disk"}.get(name, name)


def remote_stable_tier(commit_answer) -> tuple | None:
    """(status, message) of a commit answer's remote stable tier (the copies on other hosts a
    policy asks for, docs/cluster.md §5), as local_stable_tier; None when it asked for none."""
    if not commit_answer.HasField("remote_stable_tier"):
        return None
    t = commit_answer.remote_stable_tier
    name = _messages.enum_name(_DAEMON + ".LocalStableTierStatus", t.status)
    return name.replace("LOCAL_STABLE_TIER_STATUS_", "").lower(), t.message


def local_stable_tier(commit_answer) -> tuple | None:
    """(status, message) of a commit answer's local stable tier, status lower case without its
    prefix ("ready", "degraded", ...); None when the answer has none."""
    if not commit_answer.HasField("local_stable_tier"):
        return None
    t = commit_answer.local_stable_tier
    name = _messages.enum_name(_DAEMON + ".LocalStableTierStatus", t.status)
    return name.replace("LOCAL_STABLE_TIER_STATUS_", "").lower(), t.message
