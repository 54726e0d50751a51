"""The tensor door: a ZeroMQ ROUTER socket that rank 0's step loop reads and answers itself (no thread hand-over).

Appends and attends -- the requests a decoding model sends once per layer per token -- skip HTTP: one
request is one ZeroMQ message, read by the thread that batches and runs the steps, and answered from it::

    request   [rid, body]            rid: the client's request id (<= 64 bytes, echoed); body: a seqpar frame
                                     (seqpar.client.encode) whose header has "op" (append / attend /
                                     attend_many), "session" or "sessions", and "auth" (the token, if any)
    answer    [rid, status, body]    status: ASCII digits, HTTP's codes; body: a frame (200) or JSON
                                     {"error", "status"} (>= 400)

The loop waits on the socket and on a pipe (:meth:`wake`: the HTTP thread after queueing a request, the
signal handler for a drain), so either kind of request wakes it at once. Every use of the socket holds
:attr:`lock` (the loop's polls are at most :data:`POLL_S` long): a failing service answers every pending request
from its watch thread, which takes the socket over with the lock (a full memory barrier, as ZeroMQ requires to
move a socket between threads).

Bodies above ``max_request_bytes`` are refused 413; frames far above it (``MAXMSGSIZE``) make libzmq drop the
connection before buffering them (the client checks the limit before sending, so it sees the 413 itself).
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import threading
import time

POLL_S = 0.05  # the longest the loop holds the socket's lock in one poll
MAX_RID = 64


def _endpoint(host: str, port: int) -> tuple[str, bool]:
    """``tcp://ADDR:PORT`` for ``bind`` (port 0: a free one) and whether it is IPv6."""
    if host == "localhost":
        host = "127.0.0.1"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:  # an interface or host name: libzmq resolves it
        return f"tcp://{host}:{port or '*'}", False
    if ip.is_unspecified:
        return f"tcp://*:{port or '*'}", ip.version == 6
    return (f"tcp://[{host}]:{port or '*'}", True) if ip.version == 6 else (f"tcp://{host}:{port or '*'}", False)


class Door:
    """rank 0's ROUTER socket plus the wake-up pipe; all methods but :meth:`wake` belong to the step loop
    (or to whoever holds :attr:`lock`)."""

    def __init__(self, host: str, port: int, max_request_bytes: int):
        try:
            import zmq
        except ImportError as e:  # pragma: no cover - pyzmq is in the serve extra
            raise SystemExit(f"seqpar serve needs pyzmq: pip install 'seqpar[serve]' ({e})") from None
        self.zmq = zmq

        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        endpoint, v6 = _endpoint(host, port)
        self.sock.setsockopt(zmq.IPV6, int(v6))
        self.sock.setsockopt(zmq.MAXMSGSIZE, max_request_bytes + (1 << 16))
        self.sock.setsockopt(zmq.LINGER, 2000)
        self.sock.bind(endpoint)
        self.port = int(self.sock.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1])
        self.rfd, self.wfd = os.pipe()
        for fd in (self.rfd, self.wfd):
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
        self.poller = zmq.Poller()
        self.poller.register(self.sock, zmq.POLLIN)
        self.poller.register(self.rfd, zmq.POLLIN)
        self.lock = threading.RLock()
        self.closed = False

    def wake(self) -> None:
        """Wake the loop's poll (any thread, or a signal handler)."""
        try:
            os.write(self.wfd, b"!")
        except (BlockingIOError, OSError):  # full: the loop is being woken already (or closing)
            pass

    def poll(self, timeout_s: float) -> list | None:
        """Wait at most ``timeout_s`` (whole milliseconds, rounded down: never longer): one message's frames
        ``[identity, *frames]``, or None (timeout, or a wake-up)."""
        wait = max(0, int(min(timeout_s, POLL_S) * 1000))
        with self.lock:
            if not self.closed:
                ready = dict(self.poller.poll(wait))
                if self.rfd in ready:
                    try:
                        os.read(self.rfd, 1 << 16)
                    except BlockingIOError:
                        pass
                if self.sock in ready:
                    return self.sock.recv_multipart(copy=False)
                return None
        time.sleep(wait / 1000)  # closed (a failing service exits now): wait, as a poll would, do not spin
        return None

    def send(self, identity: bytes, rid: bytes, status: int, body: bytes) -> None:
        """An answer; dropped by ZeroMQ when the client is gone (never blocks the loop)."""
        with self.lock:
            if not self.closed:
                self.sock.send_multipart([identity, rid, b"%d" % status, body], copy=False)

    def queued(self) -> list:
        """Every message waiting in the socket now (``[identity, *frames]`` each), without waiting."""
        out = []
        with self.lock:
            while not self.closed:
                try:
                    out.append(self.sock.recv_multipart(self.zmq.NOBLOCK, copy=False))
                except self.zmq.Again:
                    break
        return out

    def refuse_queued(self, status: int, body: bytes) -> int:
        """Answer every message waiting in the socket with ``status`` (a failing or stopped service: nothing
        reads them any more); returns how many."""
        n = 0
        for frames in self.queued():
            if len(frames) >= 2 and len(frames[1]) <= MAX_RID:
                self.send(frames[0].bytes, frames[1].bytes, status, body)
                n += 1
        return n

    def close(self, linger_s: float = 2.0) -> None:
        """Send what is queued (at most ``linger_s``), then close; later calls do nothing."""
        with self.lock:
            if self.closed:
                return
            self.closed = True
            self.sock.close(linger=int(linger_s * 1000))
            self.ctx.term()  # returns once the queued answers left (or the linger expired)
            fds, self.rfd, self.wfd = (self.rfd, self.wfd), -1, -1
            for fd in fds:
                os.close(fd)
