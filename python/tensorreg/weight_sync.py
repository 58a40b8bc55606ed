"""The weight-sync loop: a training process publishes each new version of its weights, inference
processes on the same host pick them up.

    # trainer                                      # inference engine (another process)
    pub = WeightPublisher(store, "policy")         sub = WeightSubscriber(store, "policy")
    for step in ...:                               v = sub.wait_for(last + 1)
        train_step(model)                          sub.load_into(engine_params, v)
        v = pub.publish(model.state_dict())        # engine_params now hold version v's bytes

Versions. Each publish() is a lease in place of the trainer's tensors under its own CGID,
`cgid:wsync~<name>~<number>` (registration.md §3.5: no data hash is waited for), numbered
1, 2, 3, ... per name; a publisher that starts where versions of its name exist goes on after
the highest. The producer's Registrar keeps the exports, regions, layout and Feed from one
version to the next, so a version over the same memory and layout costs Begin, Feed and Commit
only (_registrar.py). publish(verify=True) commits with hash_in_background: the version is
usable at once and its mi2 id (the content id of the bytes the daemon hashed) follows;
Version.mi2() and WeightSubscriber.verified() wait for it. keep=N (default 1) versions stay
leased; publishing another releases the oldest.

Finding the latest version: ListArtifacts (Store.list()) filtered by the name's prefix, the
highest number wins. No extra file or counter: the daemon's catalogue is the one place versions
are made and dropped, so it cannot disagree with itself, and one list call costs about what one
small RPC does. wait_for() polls it (from 0.2 ms up to 5 ms between calls); a loop that already
hands the version number to its readers (a queue, a collective) calls tensors(number) directly.

Bytes. A lease in place is the trainer's own memory: a version's tensors read what the trainer
holds now, so the trainer must not change them until the readers have copied them (load_into()
returns once its copies are done); the version's mi2 id is the hash of those bytes at commit.
For CUDA tensors a reader maps the trainer's allocations (open(keep_mappings=True): mapped once,
kept across versions; an unchanged layout gives back the same tensor objects). CPU tensors are
copied into a daemon region at each publish, and readers get them from a stable DRAM replica:
publish CPU tensors with a policy that keeps one (e.g. policy="warm").

Thread-safety: a publisher or a subscriber is used by one thread at a time (its Store may be
shared). Ownership: a WeightPublisher owns its Registrar and the versions it keeps leased
(close() releases them); a WeightSubscriber owns nothing but what its Store keeps for open().
"""

from __future__ import annotations

import operator
import re
import time
from typing import Any

from . import _batched_copy
from ._requests import DEFAULT_TTL_MS
from ._torch import module as _torch
from .errors import DeadlineExceeded, FailedPrecondition, InvalidArgument, NotFound

__all__ = ["Version", "WeightPublisher", "WeightSubscriber", "version_id"]

PREFIX = "cgid:wsync~"
_NAME = re.compile(r"[A-Za-z0-9._-]{1,160}")  # §3.5's characters but '~', which separates


def _check_name(name: Any) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidArgument(f"cannot sync weights under name {name!r}: a name is 1 to 160 of A-Z a-z 0-9 . _ -")
    return name


def version_id(name: str, number: int) -> str:
    """The CGID of version `number` of `name`."""
    return f"{PREFIX}{_check_name(name)}~{number}"


def _versions(store, name: str) -> list:
    """The version numbers of `name` the daemon holds, ascending."""
    prefix = f"{PREFIX}{name}~"
    out = []
    for a in store.list():
        artifact_id = a["artifact_id"]
        if artifact_id.startswith(prefix) and artifact_id[len(prefix):].isdigit():
            out.append(int(artifact_id[len(prefix):]))
    return sorted(out)


def _wait_mi2(store, artifact_id: str, timeout: float | None) -> str:
    state, mi2 = store.wait_hash(artifact_id, timeout=timeout)
    if state == "done":
        return mi2
    if state == "pending":
        raise DeadlineExceeded(f"cannot verify {artifact_id}: its hash is not done after {timeout} s")
    raise FailedPrecondition(f"cannot verify {artifact_id}: its hash is {state}"
                             + (" (publish it with verify=True)" if state == "none" else ""))


class Version:
    """One published version: `number`, `artifact_id` (its CGID), `artifact` (the
    RegisteredArtifact, owning its lease), `verify` (published with verify=True)."""

    def __init__(self, store, number: int, artifact, verify: bool) -> None:
        self._store = store
        self.number = number
        self.artifact = artifact
        self.artifact_id: str = artifact.artifact_id
        self.verify = verify

    def mi2(self, timeout: float | None = None) -> str:
        """The mi2 id of the bytes the daemon hashed, once the background hash is done.
        Errors: FailedPrecondition (published without verify=True, or the hash failed: the
        lease ended first), DeadlineExceeded (not done within `timeout` seconds)."""
        if not self.verify:
            raise FailedPrecondition(f"cannot verify {self.artifact_id}: it was published without verify=True")
        return _wait_mi2(self._store, self.artifact_id, timeout)

    @property
    def timings(self) -> dict:
        return self.artifact.timings

    def close(self) -> None:
        """Releases the version's lease (readers can no longer open it). Idempotent."""
        self.artifact.close()

    def __repr__(self) -> str:
        return f"Version({self.number}, {self.artifact_id!r})"


class WeightPublisher:
    """The producer side: publish(state_dict) each step.

    keep: how many versions stay leased (the newest ones); ttl_ms, policy: as Store.register();
    snapshot: each version is a snapshot lease (the daemon copies the bytes at commit, so the
    trainer may go on at once; needs a daemon with snapshot leases, else Unimplemented).
    Errors: InvalidArgument (name, keep), the daemon's status (listing the versions held)."""

    def __init__(self, store, name: str, *, keep: int = 1, ttl_ms: int = DEFAULT_TTL_MS,
                 policy: str | None = None, snapshot: bool = False) -> None:
        self.name = _check_name(name)
        if not isinstance(keep, int) or keep < 1:
            raise InvalidArgument(f"cannot publish weights of {name!r}: keep must be an int >= 1, got {keep!r}")
        self._store = store
        self._keep = keep
        self._registrar = store.registrar(ttl_ms=ttl_ms, policy=policy, snapshot=snapshot)
        held = _versions(store, name)
        self._next = held[-1] + 1 if held else 1
        self.versions: list = []  # the Versions still leased, oldest first

    @property
    def registrar(self):
        return self._registrar

    def publish(self, state_dict, *, verify: bool = False) -> Version:
        """Leases the tensors as the next version and releases the oldest beyond `keep`.
        verify=True: the daemon hashes the bytes in the background (Version.mi2()); the id is
        of the bytes at hash time, so change the tensors only once mi2() has answered.
        Errors: as Store.register()."""
        number = self._next
        # The oldest version goes when this one is in: in the same call when it is the last one
        # (keep=1, the same memory: one RepublishLease makes the new version and ends the old).
        oldest = self.versions[0] if len(self.versions) >= self._keep else None
        art = self._registrar.register(state_dict, client_artifact_id=version_id(self.name, number),
                                       hash_in_background=verify,
                                       replaces=oldest.artifact if oldest is not None else None)
        self._next = number + 1
        if oldest is not None:
            self.versions.remove(oldest)
        version = Version(self._store, number, art, verify)
        self.versions.append(version)
        while len(self.versions) > self._keep:
            self.versions.pop(0).close()
        return version

    def close(self) -> None:
        """Releases the versions still leased and the registrar's regions. Idempotent."""
        while self.versions:
            self.versions.pop(0).close()
        self._registrar.close()

    def __enter__(self) -> WeightPublisher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class WeightSubscriber:
    """The consumer side: latest(), wait_for(), tensors(), load_into(), verified().

    device: where the tensors are read: "cuda" (or "cuda:N") maps the producer's GPU memory
    (Store.open with keep_mappings), "cpu" reads a stable DRAM replica (Store.get)."""

    def __init__(self, store, name: str, *, device: Any = "cuda") -> None:
        self.name = _check_name(name)
        self._store = store
        self._device = device
        self._cuda = str(device).startswith("cuda")
        self._last_pairs = None  # (dst tensors, src tensors, devices, dst pointers) of the last checked load
        self._copy_plan = None  # (the dst list it was made for, CopyPlan or None, indices left to torch)

    def latest(self) -> int | None:
        """The highest version the daemon holds, or None."""
        held = _versions(self._store, self.name)
        return held[-1] if held else None

    def wait_for(self, version: int = 1, timeout: float | None = None) -> int:
        """Waits until a version >= `version` is held; returns the latest.
        Errors: DeadlineExceeded after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = 0.0002
        while True:
            latest = self.latest()
            if latest is not None and latest >= version:
                return latest
            if deadline is not None and time.monotonic() >= deadline:
                raise DeadlineExceeded(f"cannot wait for version {version} of {self.name!r}: after {timeout} s "
                                       f"the latest is {latest}")
            time.sleep(pause)
            pause = min(pause * 2, 0.005)

    def tensors(self, version: int | None = None) -> dict:
        """The tensors of `version` (default: the latest), zero-copy.
        Errors: NotFound (no such version held), as Store.open() / Store.get()."""
        if version is None:
            version = self.latest()
            if version is None:
                raise NotFound(f"cannot read weights of {self.name!r}: no version is published")
        artifact_id = version_id(self.name, version)
        if self._cuda:
            return self._store.open(artifact_id, self._device, keep_mappings=True)
        return self._store.get(artifact_id, self._device)

    def load_into(self, target, version: int | None = None, *, synchronize: bool = True,
                  timings: dict | None = None) -> int:
        """Copies version `version` (default: the latest) into `target`'s own tensors (a
        module's state_dict() or a dict of tensors), in one batched copy pass under no_grad;
        with `synchronize` returns once the copies are done (then the producer may change its
        tensors). Returns the version copied. `timings`, when given, gets the seconds spent
        reading the version ("open") and checking and copying it ("copy").
        Errors: InvalidArgument (names, shapes or dtypes that differ; nothing is copied then),
        as tensors()."""
        torch = _torch()
        if version is None:
            version = self.latest()
            if version is None:
                raise NotFound(f"cannot load weights of {self.name!r}: no version is published")
        started = time.perf_counter()
        src = self.tensors(version)
        opened = time.perf_counter()
        dst = target.state_dict() if callable(getattr(target, "state_dict", None)) else target
        dsts, srcs, devices = self._pairs(torch, dst, src, f"load version {version} of {self.name!r}")
        with torch.no_grad():
            self._copy(torch, dsts, srcs)
        if synchronize:
            for device in devices:
                torch.cuda.synchronize(device)
        if timings is not None:
            timings["open"] = opened - started
            timings["copy"] = time.perf_counter() - opened
        return version

    def _pairs(self, torch, dst: dict, src: dict, what: str) -> tuple:
        """([dst tensors], [src tensors], {their CUDA devices}) in dst's order, checked: the
        same names, and each pair of one shape and dtype. The last call's check stands when `src` and `dst` hold the
        same tensor objects (kept mappings give back the same tensors for an unchanged layout)
        and dst's tensors still point where they did.
        Errors: InvalidArgument (nothing is copied then)."""
        last = self._last_pairs
        if last is not None and len(dst) == len(last[0]) and len(src) == len(last[1]):
            dsts, srcs, devices, ptrs = last
            # map() over C functions, not generator expressions: this runs for every version.
            if all(map(operator.is_, dst.values(), dsts)) and all(map(operator.is_, map(src.get, dst), srcs)) \
                    and list(map(torch.Tensor.data_ptr, dsts)) == ptrs:
                return dsts, srcs, devices
        if len(dst) != len(src) or any(name not in src for name in dst):
            missing = sorted(set(src) - set(dst))[:3]
            extra = sorted(set(dst) - set(src))[:3]
            raise InvalidArgument(f"cannot {what}: the names differ (only in the version: {missing}; only in the "
                                  f"target: {extra})")
        dsts, srcs = [], []
        for name, d in dst.items():
            s = src[name]
            if d.shape != s.shape or d.dtype != s.dtype:
                raise InvalidArgument(f"cannot {what}: tensor '{name}' is {tuple(s.shape)} {s.dtype} in the version "
                                      f"but {tuple(d.shape)} {d.dtype} in the target")
            dsts.append(d)
            srcs.append(s)
        devices = {t.device for t in dsts + srcs if t.device.type == "cuda"}
        self._last_pairs = (dsts, srcs, devices, list(map(torch.Tensor.data_ptr, dsts)))
        return dsts, srcs, devices

    def _copy(self, torch, dsts: list, srcs: list) -> None:
        """Copies srcs into dsts: the device pairs in one batched kernel launch (planned once
        for the same pointers), the rest with torch."""
        plan, rest = self._copy_plan, None
        if plan is not None and plan[0] is dsts:
            plan, rest = plan[1], plan[2]
        else:
            plan, rest = _batched_copy.plan(torch, dsts, srcs, plan[1] if plan is not None else None)
            self._copy_plan = (dsts, plan, rest)
        if plan is not None:
            plan.launch()
        if rest:
            d, s = [dsts[k] for k in rest], [srcs[k] for k in rest]
            if hasattr(torch, "_foreach_copy_"):
                torch._foreach_copy_(d, s)
            else:
                for a, b in zip(d, s):
                    a.copy_(b)

    def verified(self, version: int, timeout: float | None = None) -> str:
        """The mi2 id of version `version`'s bytes, once the daemon's background hash is done
        (a version published with verify=True).
        Errors: FailedPrecondition (no background hash, or it failed), DeadlineExceeded."""
        return _wait_mi2(self._store, version_id(self.name, version), timeout)
