"""Leases in place, held by this process: the `Lease` object, the keep-alives of every lease of a
connection, and the release (revoke, then unregister the regions) that every way of ending one
runs exactly once.

A lease ends by close(), by garbage collection, at interpreter exit (weakref.finalize runs at
all three, once) or by the daemon (revoked, expired: its keep-alives then stop). The release also
serves a register() that fails half-way: release_now() takes back whatever it had made,
registration or regions.

Keep-alives: one thread per connection (a `_Keeper`) sends them for all its leases, each on its
own schedule, and ends when no lease is left. A weight-sync loop makes a lease per version, many
a second: a thread of each lease's own cost each version its start and its stop.

Thread-safety: a Lease may be closed from any thread; its state is written by the keeper and
read by others (counters only). Calls go over the Store's connection, which serialises them.
"""

from __future__ import annotations

import heapq
import itertools
import random
import threading
import time
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
            self._state.thread = _keeper_of(conn).add(registration_id, ttl_ms, self._state)
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
        self.thread: threading.Thread | None = None  # the keeper's, None for ttl 0
        self.epoch = 0
        self.sent = 0
        self.failed = 0
        self.last_error: Error | None = None


class _Keeper:
    """The keep-alives of a connection's leases (registration.md §10): each lease every
    max(1 s, ttl/2), ±10 % jitter, its epoch counting up from 1, until it is stopped, the daemon
    answers NotFound or PermissionDenied (gone, or not ours), or the connection is closed. One
    thread, started when a lease is added to an idle keeper, ending when none is left."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._wake = threading.Condition(threading.Lock())
        self._due: list = []  # heap of (when, seq, registration_id, ttl_ms, state)
        self._seq = itertools.count()
        self._rng = random.Random()
        self._thread: threading.Thread | None = None

    def add(self, registration_id: str, ttl_ms: int, state: "_LeaseState") -> threading.Thread:
        """Schedules the lease's keep-alives; returns the thread that sends them."""
        with self._wake:
            self._schedule(registration_id, ttl_ms, state)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="tensorreg-keepalive", daemon=True)
                self._thread.start()
            else:
                self._wake.notify()
            return self._thread

    def _schedule(self, registration_id: str, ttl_ms: int, state: "_LeaseState") -> None:
        interval = max(1.0, ttl_ms / 2000.0) * self._rng.uniform(0.9, 1.1)
        heapq.heappush(self._due, (time.monotonic() + interval, next(self._seq), registration_id, ttl_ms, state))

    def _next(self):
        """The next lease due, waiting for it; None once no lease is left (the thread ends)."""
        with self._wake:
            while True:
                while self._due and self._due[0][4].stop.is_set():
                    heapq.heappop(self._due)
                if not self._due:
                    self._thread = None
                    return None
                wait = self._due[0][0] - time.monotonic()
                if wait <= 0:
                    return heapq.heappop(self._due)
                self._wake.wait(wait)

    def _run(self) -> None:
        while True:
            due = self._next()
            if due is None:
                return
            _, _, registration_id, ttl_ms, state = due
            state.epoch += 1
            try:
                self._conn.call(_requests.keep_alive(registration_id, ttl_ms, state.epoch))
                state.sent += 1
            except (NotFound, PermissionDenied) as e:
                state.last_error = e  # the lease is gone (revoked, expired) or not ours: stop
                continue
            except Error as e:
                state.failed += 1
                state.last_error = e
                if self._conn.closed:
                    continue
            if not state.stop.is_set():
                with self._wake:
                    self._schedule(registration_id, ttl_ms, state)


_keepers_lock = threading.Lock()


def _keeper_of(conn: Connection) -> _Keeper:
    with _keepers_lock:
        keeper = getattr(conn, "_lease_keeper", None)
        if keeper is None:
            keeper = conn._lease_keeper = _Keeper(conn)
        return keeper


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
    # The keeper sends no keep-alive of a stopped lease after this; one already on its way finds
    # the lease revoked (NotFound) and ends there.
    state.stop.set()
    if conn.held_by_current_thread():
        # Garbage collection ran in the middle of a call on this very connection: a call now
        # would interleave frames. Release from another thread once the lock is free.
        threading.Thread(target=release_now, args=(conn, registration_id, region_ids), name="tensorreg-release",
                         daemon=True).start()
    else:
        release_now(conn, registration_id, region_ids)
