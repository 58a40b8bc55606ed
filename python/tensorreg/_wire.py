"""The tensorregd transport (docs/wire-format.md): frames, request ids, fds, Feed streams.

A `Connection` is one Unix stream socket to the daemon. Each call sends one request (or one
whole Feed stream) and waits for its single answer, under a lock, so a connection may be shared
by threads (calls are serialised; open several Stores for parallel calls). call_many()
pipelines a batch instead: every request is sent before any answer is read, and answers are
matched by request id (the daemon works on them concurrently, §5). Frames are a 4-byte
little-endian length and a serialised tensorreg.wire.v1 Request/Response; file descriptors ride
as SCM_RIGHTS on the sendmsg that carries a frame's first byte, and those that come back with an
answer are handed to the caller, who owns (and must close) them. Answers are read through a
buffer, so several frames in one read (pipelined answers) are split correctly, and the fds of a
read go to the last frame beginning in it (§7).

After a broken connection the next call reconnects. A call that was cut off (the daemon restarted,
or handed over to a successor with `tensorregd --takeover`) is retried once on a new connection
when it is idempotent (the reads: GetServerConfig, GetArtifactIndexById, Query/WaitPersistence-
Status, ListArtifacts, GetStats, GetArtifactMemfd, OpenArtifactDevice, OpenPersistedArtifact);
any other raises Unavailable saying it was not retried, since it may or may not have taken effect.
"""

from __future__ import annotations

import array
import os
import select
import socket
import struct
import threading
import time

from . import _messages
from .errors import DataLoss, DeadlineExceeded, Error, InvalidArgument, Unavailable, error_for_code

MAX_FDS_PER_FRAME = 250
# Answers are small except ListArtifacts and index JSON; the daemon's own limit is 64 MiB.
MAX_ANSWER_BYTES = 1 << 30
_HEADER = struct.Struct("<I")
# Calls that change nothing in the daemon: retried once when their connection is lost.
IDEMPOTENT_CALLS = frozenset({
    "get_server_config", "get_artifact_index_by_id", "query_persistence_status", "wait_persistence_status",
    "list_artifacts", "get_stats", "get_artifact_memfd", "open_artifact_device", "open_persisted_artifact",
})
# How long a retry waits for the daemon's socket to accept again (a restart, a takeover).
RECONNECT_SECONDS = 5.0


class _ConnectionLost(Unavailable):
    """The connection broke under a call (not an answer from the daemon)."""


def default_socket_path() -> str:
    """The daemon's default socket: $TENSORREG_SOCKET when set and non-empty (as the CLI and
    the daemon take it), else $XDG_RUNTIME_DIR/tensorreg/tensorregd.sock when XDG_RUNTIME_DIR
    is set and non-empty, else /tmp/tensorreg-$UID/tensorregd.sock."""
    named = os.environ.get("TENSORREG_SOCKET", "")
    if named:
        return named
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    if runtime:
        return os.path.join(runtime, "tensorreg", "tensorregd.sock")
    return f"/tmp/tensorreg-{os.getuid()}/tensorregd.sock"


def encode_varint(n: int) -> bytes:
    """A protobuf varint: 7 bits a byte, low first, the high bit set on all but the last."""
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _readable(sock: socket.socket) -> bool:
    """Whether `sock` has bytes or its end waiting, without waiting."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


def _close_fds(fds) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class Connection:
    """One connection to tensorregd; thread-safe (one call at a time)."""

    def __init__(self, path: str | None = None, timeout: float | None = None) -> None:
        self.path = path or default_socket_path()
        self.timeout = timeout
        # Reentrant so that a finalizer run by garbage collection inside a call cannot deadlock;
        # held_by_current_thread() lets it defer its own calls instead of interleaving frames.
        self._lock = threading.RLock()
        self._owner: int | None = None
        self._sock: socket.socket | None = None
        self._next_id = 1
        self._closed = False
        self._rbuf = bytearray()  # answer bytes read but not yet taken as whole frames
        self._rfds: dict = {}  # position in _rbuf of a frame's first byte -> the fds it came with
        self._payload = b""  # the last answer's bytes, for call(raw=True)
        with self._lock:
            self._ensure_connected()

    # ---- connection ----

    def _ensure_connected(self) -> socket.socket:
        if self._closed:
            raise Unavailable(f"cannot call tensorregd at {self.path}: the store is closed")
        if self._sock is not None and not self._rbuf and _readable(self._sock):
            # Between calls nothing may arrive but the daemon's last word on an idle connection
            # (or its end): this connection is finished, so the call goes out on a new one.
            self._drop()
        if self._sock is not None:
            return self._sock
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.path)
        except OSError as e:
            sock.close()
            raise Unavailable(f"cannot connect to tensorregd at {self.path}: {e.strerror or e}") from None
        self._sock = sock
        return sock

    def _drop(self) -> None:
        self._rbuf = bytearray()
        for fds in self._rfds.values():
            _close_fds(fds)
        self._rfds = {}
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
            self._sock = None

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._drop()

    @property
    def closed(self) -> bool:
        return self._closed

    def held_by_current_thread(self) -> bool:
        return self._owner == threading.get_ident()

    # ---- frames ----

    def _send(self, sock: socket.socket, request, fds=()) -> None:
        payload = request.SerializeToString()
        frame = _HEADER.pack(len(payload)) + payload
        try:
            if fds:
                if len(fds) > MAX_FDS_PER_FRAME:
                    raise InvalidArgument(f"cannot send request {request.request_id}: {len(fds)} file "
                                          f"descriptors, more than {MAX_FDS_PER_FRAME} per frame")
                # The fds ride on the sendmsg that carries the frame's first byte (§7).
                sent = sock.sendmsg([frame], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
                if sent < len(frame):
                    sock.sendall(frame[sent:])
            else:
                sock.sendall(frame)
        except socket.timeout:
            self._drop()
            raise DeadlineExceeded(f"cannot send request {request.request_id} to tensorregd at {self.path}: "
                                   f"timed out after {self.timeout} s") from None
        except OSError as e:
            self._drop()
            raise _ConnectionLost(f"cannot send request {request.request_id} to tensorregd at {self.path}: "
                                  f"{e.strerror or e}") from None

    def _receive(self, sock: socket.socket, request_id: int):
        """Reads the next answer frame; returns (Response, fds). Frames already read (several
        may arrive in one read when requests are pipelined) are taken from the buffer first."""
        ancillary = socket.CMSG_SPACE(MAX_FDS_PER_FRAME * array.array("i").itemsize)
        try:
            while True:
                frame = self._take_frame(request_id)
                if frame is not None:
                    payload, fds = frame
                    break
                try:
                    data, anc, flags, _ = sock.recvmsg(1 << 16, ancillary, socket.MSG_CMSG_CLOEXEC)
                except socket.timeout:
                    raise DeadlineExceeded(f"cannot read the daemon's answer to request {request_id}: "
                                           f"timed out after {self.timeout} s") from None
                except OSError as e:
                    raise _ConnectionLost(f"cannot read the daemon's answer to request {request_id}: "
                                          f"{e.strerror or e}") from None
                got = array.array("i")
                for level, kind, raw in anc:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                        got.frombytes(raw[: len(raw) - len(raw) % got.itemsize])
                begin = len(self._rbuf)
                self._rbuf += data
                if got:
                    self._attach_fds(begin, list(got))
                if flags & socket.MSG_CTRUNC:
                    raise DataLoss(f"cannot read the daemon's answer to request {request_id}: "
                                   f"file descriptors were truncated")
                if not data:
                    raise _ConnectionLost(f"cannot read the daemon's answer to request {request_id}: "
                                          f"the daemon closed the connection")
            response = _messages.Response()
            self._payload = payload
            try:
                response.ParseFromString(payload)
            except Exception:  # DecodeError's module differs between runtimes
                _close_fds(fds)
                raise DataLoss(f"cannot parse the daemon's answer to request {request_id}") from None
            return response, fds
        except BaseException:
            self._drop()
            raise

    def _frame_starts(self, end: int) -> list:
        """Where the frames in the read buffer begin, below `end` (the buffer always begins at a
        frame boundary: whole frames are taken off its front)."""
        starts = []
        pos = 0
        while pos < end:
            starts.append(pos)
            if pos + 4 > len(self._rbuf):
                break
            (n,) = _HEADER.unpack_from(self._rbuf, pos)
            pos += 4 + n
        return starts

    def _attach_fds(self, begin: int, fds: list) -> None:
        # §7: the fds of one recvmsg belong to the last frame that begins within the bytes it
        # returned ([begin, end of buffer)); Linux never joins them to later data, so when no
        # frame begins there they belong to the frame those bytes continue.
        starts = self._frame_starts(len(self._rbuf))
        inside = [p for p in starts if p >= begin]
        at = inside[-1] if inside else (starts[-1] if starts else 0)
        self._rfds.setdefault(at, []).extend(fds)

    def _take_frame(self, request_id: int):
        """The first whole frame of the read buffer, as (payload bytes, fds), or None."""
        buf = self._rbuf
        if len(buf) < 4:
            return None
        (n,) = _HEADER.unpack_from(buf)
        if n == 0 or n > MAX_ANSWER_BYTES:
            raise DataLoss(f"cannot read the daemon's answer to request {request_id}: frame length {n} is out of "
                           f"range")
        if len(buf) < 4 + n:
            return None
        payload = bytes(buf[4:4 + n])
        del buf[:4 + n]
        fds = self._rfds.pop(0, [])
        if self._rfds:
            self._rfds = {at - 4 - n: f for at, f in self._rfds.items()}
        return payload, fds

    def _finish(self, response, fds):
        if response.request_id == 0:
            self._drop()  # a connection-level error: the daemon closes the connection
        code = response.status.code
        if code != 0:
            _close_fds(fds)
            raise error_for_code(code, response.status.message)
        return response, fds

    # ---- calls ----

    def call(self, request, fds=(), raw: bool = False):
        """Sends `request` (its request_id is set here) with `fds` and waits for its answer.
        Returns (Response, received fds); the caller owns the fds. A non-OK status raises.
        raw=True adds the answer's bytes as received: (Response, fds, bytes)."""
        idempotent = request.WhichOneof("body") in IDEMPOTENT_CALLS
        with self._lock:
            outer, self._owner = self._owner, threading.get_ident()
            try:
                try:
                    answer = self._call_once(request, fds)
                    return answer + (self._payload,) if raw else answer
                except _ConnectionLost as e:
                    if not idempotent:
                        raise Unavailable(f"{e}; {request.WhichOneof('body')} is not idempotent and was not "
                                          f"retried: it may or may not have taken effect") from None
                # The daemon restarted or handed over: once more, on a new connection.
                self._reconnect()
                try:
                    answer = self._call_once(request, fds)
                    return answer + (self._payload,) if raw else answer
                except _ConnectionLost as e:
                    raise Unavailable(f"{e} (after one retry on a new connection)") from None
            finally:
                self._owner = outer

    def _call_once(self, request, fds):
        sock = self._ensure_connected()
        request.request_id = self._take_id()
        self._send(sock, request, fds)
        return self._finish(*self._matched(sock, request.request_id))

    def _reconnect(self) -> None:
        """Connects again, waiting up to RECONNECT_SECONDS for the socket to accept."""
        give_up = time.monotonic() + RECONNECT_SECONDS
        while True:
            try:
                self._ensure_connected()
                return
            except Unavailable:
                if time.monotonic() >= give_up:
                    raise
                time.sleep(0.05)

    def call_many(self, calls, meanwhile=None):
        """Pipelines requests: sends every (request, fds) of `calls` (request ids are set here)
        before reading any answer; the daemon works on them concurrently and may answer in any
        order (docs/wire-format.md §5). `meanwhile()`, when given, runs once everything is sent
        and before any answer is read, so that the caller's own work overlaps the daemon's; it
        returns further calls to send then (or None), and must not raise (its exception would
        leave the answers unread). Returns, in the order sent, (Response, fds) for each OK
        answer and the Error for each other; the caller owns the fds of the OK ones. A broken
        connection, or a connection-level error from the daemon, raises."""
        with self._lock:
            outer, self._owner = self._owner, threading.get_ident()
            results: dict = {}
            try:
                sock = self._ensure_connected()
                ids = []

                def send(batch):
                    for request, fds in batch:
                        request.request_id = self._take_id()
                        ids.append(request.request_id)
                        self._send(sock, request, fds)

                send(calls)
                if meanwhile is not None:
                    send(meanwhile() or ())
                waiting = set(ids)
                while waiting:
                    response, fds = self._receive(sock, min(waiting))
                    rid = response.request_id
                    if rid == 0:
                        self._finish(response, fds)  # raises the daemon's error and drops
                    if rid not in waiting:
                        _close_fds(fds)
                        self._drop()
                        raise DataLoss(f"cannot match the daemon's answer: it answered request {rid}, which is "
                                       f"not outstanding")
                    waiting.discard(rid)
                    try:
                        results[rid] = self._finish(response, fds)
                    except Error as e:
                        results[rid] = e
                return [results[i] for i in ids]
            except BaseException:
                for r in results.values():
                    if not isinstance(r, Error):
                        _close_fds(r[1])
                raise
            finally:
                self._owner = outer

    def _matched(self, sock: socket.socket, request_id: int):
        response, fds = self._receive(sock, request_id)
        if response.request_id not in (request_id, 0):
            _close_fds(fds)
            self._drop()
            raise DataLoss(f"cannot match the daemon's answer: request {request_id} got the answer to "
                           f"{response.request_id}")
        return response, fds

    def feed(self, frames):
        """Sends a whole Feed stream (`frames`: Requests whose feed_register_artifact_stream is
        filled in; their request_id is set here, so a large Feed is never copied), then the
        end-of-stream frame, and waits for its one answer."""
        with self._lock:
            outer, self._owner = self._owner, threading.get_ident()
            try:
                sock = self._ensure_connected()
                request_id = self._take_id()
                for request in frames:
                    request.request_id = request_id
                    self._send(sock, request)
                end = _messages.Request()
                end.request_id = request_id
                end.end_of_stream = True
                self._send(sock, end)
                return self._finish(*self._matched(sock, request_id))
            finally:
                self._owner = outer

    def _take_id(self) -> int:
        request_id = self._next_id
        self._next_id += 1
        return request_id


__all__ = ["Connection", "default_socket_path", "Error"]
