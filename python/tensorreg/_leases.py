"""Leases in place, held by this process: the `Lease` object, its keep-alive thread, and the
release (revoke, then unregister the regions) that every way of ending one runs exactly once.

A lease ends by close(), by garbage collection, at interpreter exit (weakref.finalize runs at
all three, once) or by the daemon (revoked, expired: the keep-alive thread then stops). The
release also serves a register() that fails half-way: release_now() takes back whatever it had
made, registration or regions.

Thread-safety: a Lease may be closed from any thread; its state is written by its keep-alive
thread and read by others (counters only). Calls go over the Store's connection, which
serialises them.
"""

from __future__ import annotations

import random
import threading
import weakref

from . import _requests
from ._wire import Connection
from .errors import Error, NotFound, PermissionDenied


class Lease:
    """A live lease-in-place registration: kept alive by a thread, released by close(), by
    garbage collection or at interpreter exit (whichever comes first; later ones do nothing).
    region_ids: the regions it was fed from (unregistered on release); `keep`: objects held
    until then (the leased CUDA storages)."""

    def __init__(self, conn: Connection, registration_id: str, region_ids: list, ttl_ms: int, keep=None) -> None:
        self.registration_id = registration_id
        self.region_ids = list(region_ids)
        self.ttl_ms = ttl_ms
        self._keep = keep
        self._state = _LeaseState()
        if ttl_ms > 0:
            self._state.thread = threading.Thread(target=_keep_alive_loop,
                                                  args=(conn, registration_id, ttl_ms, self._state),
                                                  name=f"tensorreg-keepalive-{registration_id}", daemon=True)
            self._state.thread.start()
        # The finalizer holds no reference to self, so garbage collection can trigger it.
        self._finalizer = weakref.finalize(self, _release_lease, conn, registration_id, self.region_ids, self._state)

    @property
    def keepalives_sent(self) -> int:
        return self._state.sent

    @property
    def last_keepalive_error(self) -> Error | None:
        return self._state.last_error

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def close(self) -> None:
        """Revokes the lease and unregisters its regions. Idempotent; errors are swallowed (the
        daemon also releases everything of this process when it exits)."""
        self._finalizer()
        self._keep = None

    def ended_by_daemon(self) -> None:
        """Marks the lease ended without a call: the daemon ended it already (a RepublishLease
        with revoke_previous replaced it). Stops the keep-alive; the regions stay registered."""
        if self._finalizer.detach() is not None:
            self._state.stop.set()
        self._keep = None

    def __repr__(self) -> str:
        return f"Lease({self.registration_id!r}, closed={self.closed})"


class _LeaseState:
    """What the keep-alive thread and the release share; kept apart from the Lease so that
    neither holds the Lease itself alive."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None
        self.sent = 0
        self.failed = 0
        self.last_error: Error | None = None


def _keep_alive_loop(conn: Connection, registration_id: str, ttl_ms: int, state: _LeaseState) -> None:
    # registration.md §10: every max(1 s, ttl/2), ±10 % jitter, the epoch counting up from 1.
    interval = max(1.0, ttl_ms / 2000.0)
    rng = random.Random()
    epoch = 0
    while not state.stop.wait(interval * rng.uniform(0.9, 1.1)):
        epoch += 1
        try:
            conn.call(_requests.keep_alive(registration_id, ttl_ms, epoch))
            state.sent += 1
        except (NotFound, PermissionDenied) as e:
            state.last_error = e  # the lease is gone (revoked, expired) or not ours: stop
            return
        except Error as e:
            state.failed += 1
            state.last_error = e
            if conn.closed:
                return


def release_now(conn: Connection, registration_id: str | None, region_ids: list) -> None:
    """Revokes the registration (when there is one), then unregisters the regions; errors are
    swallowed (the daemon releases everything of an owner that exits)."""
    if conn.closed:
        return
    if registration_id:
        try:
            conn.call(_requests.revoke(registration_id, "lease released by its holder"))
        except Error:
            pass
    if region_ids:
        try:
            conn.call_many([(_requests.unregister_region(r), ()) for r in region_ids])
        except Error:
            pass


def _release_lease(conn: Connection, registration_id: str, region_ids: list, state: _LeaseState) -> None:
    state.stop.set()
    if conn.held_by_current_thread():
        # Garbage collection ran in the middle of a call on this very connection: a call now
        # would interleave frames (and the keepalive thread may wait for that call). Release
        # from another thread once the lock is free.
        threading.Thread(target=_join_and_release, args=(conn, registration_id, region_ids, state),
                         name="tensorreg-release", daemon=True).start()
    else:
        _join_and_release(conn, registration_id, region_ids, state)


def _join_and_release(conn: Connection, registration_id: str, region_ids: list, state: _LeaseState) -> None:
    thread = state.thread
    if thread is not None and thread is not threading.current_thread():
        thread.join(timeout=10)
    release_now(conn, registration_id, region_ids)
