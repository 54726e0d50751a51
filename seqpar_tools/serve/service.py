"""One rank of the attention service.

Rank 0 has two doors: an aiohttp server in a thread (the whole API: sessions, stats, health, and appends and
attends too) and the tensor door, a ZeroMQ socket for appends and attends that its step loop (the main thread)
reads and answers itself (:mod:`.door`). Every other rank runs the step loop only::

    HTTP thread (rank 0)     parse + frame checks, token, size limit -> inbox (a request and its future), wake
    tensor door (rank 0)     the step loop polls it with the wake-up pipe; frame checks, token, size limit
    step loop (rank 0)       take the first request, wait at most batch_window_ms from its arrival for more
                             (up to max_batch, one per session; not at all when every recently active session
                             is in the batch already); validate each against the sessions (4xx answered at
                             once, nothing changes); broadcast the step [ops | tensors] to every rank (one
                             64 KiB broadcast, a second for larger steps); apply it (engine); answer
    step loop (rank r > 0)   receive a step, apply it
    heartbeats               every rank bumps a counter in the job's store every 0.1 s; rank 0 watches them

Attends of sessions in one arena with the same (layers, H, T, scale) form one batch: one
``decode_attention`` call per layer, one combining collective for all of them. When idle, rank 0 broadcasts
a tick every ``timeout_s / 4`` so the other ranks' waits never reach the process group's timeout.

Failures: a rank whose heartbeat stops for ``timeout_s`` (dead or stalled), a step running longer than
``timeout_s``, or a collective that fails -> every pending request (and every one still unread in the tensor
door's socket) is answered ``503`` naming the rank(s) whose heartbeat stopped, the reason goes to stderr,
and rank 0 exits with code 1 (the spawner or launcher then stops the other ranks). SIGTERM / SIGINT on rank 0:
new requests get ``503 draining``, the queued ones are answered, then a stop step ends every rank's loop (exit 0).
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import json
import math
import os
import queue
import signal
import struct
import sys
import threading
import time
from typing import Any

import torch

from seqpar.client import CONTENT_TYPE, FrameError, decode, encode
from seqpar_tools.serve.door import MAX_RID, Door
from seqpar_tools.serve.engine import TORCH_DTYPES, Engine

HEARTBEAT_S = 0.1
_STEP, _TICK, _STOP = 0, 1, 2
_CREATE_KEYS = ("layers", "heads", "kv_heads", "head_dim", "dtype", "capacity")
DOOR_OPS = ("append", "attend", "attend_many")  # what the tensor door takes; the rest is HTTP


class Reject(Exception):
    """A request refused with an HTTP status (4xx) and a message; nothing changed."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def _err(status: int, message: str) -> tuple[int, bytes, str]:
    return status, json.dumps({"error": message, "status": status}).encode(), "application/json"


def _ok_json(payload: dict) -> tuple[int, bytes, str]:
    return 200, json.dumps(payload).encode(), "application/json"


class Pending:
    """A request waiting for its answer; ``reply`` may be called from any thread, once. ``send`` delivers the
    answer: to the HTTP thread's future (``fut``), or onto the tensor door's socket.

    A batch attend (``attend_many``) carries one ``attend`` Pending per session in ``parts`` (each with ``parent``
    and ``index``): they are validated together (one bad part refuses the whole request, nothing stored) and
    answered together once every part's result is in ``results``."""

    __slots__ = ("kind", "sid", "sids", "header", "tensors", "t0", "send", "fut", "done", "parts", "parent", "index",
                 "results")

    def __init__(self, kind, sid, header, tensors, send, fut=None, parts=None):
        self.kind, self.sid, self.header, self.tensors = kind, sid, header, tensors
        self.t0, self.send, self.fut, self.done = time.monotonic(), send, fut, False
        self.parts, self.parent, self.index = parts or [], None, 0
        self.sids = {x.sid for x in self.parts} if parts else {sid}
        self.results: dict[int, tuple] = {}
        for i, part in enumerate(self.parts):
            part.parent, part.index = self, i

    def reply(self, answer: tuple[int, bytes, str]) -> None:
        self.send(answer)


class Bus:
    """Rank 0 -> every rank: a step as one frame (``seqpar.client.encode``). One broadcast of :data:`INLINE` bytes
    carries ``[kind, size]`` and the frame's start (a one-token attend fits); a second one the rest, if any.
    Through seqpar's communicator (bounded waits): rank 0 waits at most ``timeout_s`` for the others to take a
    step; the others wait ``2 * timeout_s`` for the next one (an idle rank 0 sends a tick every ``timeout_s / 4``)."""

    INLINE = 1 << 16

    def __init__(self, timeout_s: float, group=None):
        from seqpar.comm import get_communicator

        self.comm, self.timeout_s = get_communicator(group), timeout_s

    def send(self, kind: int, ops: list | None = None, tensors: dict | None = None) -> None:
        raw = encode({"ops": ops or []}, tensors) if kind == _STEP else b""
        first = bytearray(self.INLINE)
        struct.pack_into("<qq", first, 0, kind, len(raw))
        head = raw[:self.INLINE - 16]
        first[16:16 + len(head)] = head
        self.comm.broadcast(torch.frombuffer(first, dtype=torch.uint8), 0, timeout=self.timeout_s)
        if len(raw) > len(head):
            self.comm.broadcast(torch.frombuffer(bytearray(raw[len(head):]), dtype=torch.uint8), 0,
                                timeout=self.timeout_s)

    def recv(self) -> tuple[int, list, dict]:
        first = torch.empty(self.INLINE, dtype=torch.uint8)
        self.comm.broadcast(first, 0, timeout=2 * self.timeout_s)
        mem = first.numpy().data
        kind, n = struct.unpack_from("<qq", mem, 0)
        if kind != _STEP:
            return kind, [], {}
        if n <= self.INLINE - 16:
            body = mem[16:16 + n]
        else:
            rest = torch.empty(n - (self.INLINE - 16), dtype=torch.uint8)
            self.comm.broadcast(rest, 0, timeout=self.timeout_s)
            body = bytes(mem[16:]) + bytes(rest.numpy().data)
        header, tensors = decode(body)
        return kind, header["ops"], tensors


class Heartbeats:
    """Each rank bumps ``serve/hb/<rank>`` in the job's store every :data:`HEARTBEAT_S`; rank 0 reads them."""

    def __init__(self, rank: int, world_size: int):
        from seqpar.comm import job_store

        self.rank, self.world_size = rank, world_size
        self.store = job_store("seqpar-serve")
        now = time.monotonic()
        self.values = [-1] * world_size
        self.changed = [now] * world_size
        self.stop = threading.Event()
        threading.Thread(target=self._beat, name="seqpar-serve-heartbeat", daemon=True).start()

    def _beat(self) -> None:
        while not self.stop.is_set():
            try:
                self.store.add(f"hb/{self.rank}", 1)
            except Exception:  # noqa: BLE001 - the store's host is gone: rank 0's watch reports it
                return
            self.stop.wait(HEARTBEAT_S)

    def poll(self) -> None:
        """Read every rank's counter (rank 0's watch thread)."""
        now = time.monotonic()
        for r in range(self.world_size):
            v = self.store.add(f"hb/{r}", 0)
            if v != self.values[r]:
                self.values[r], self.changed[r] = v, now

    def silent(self, seconds: float) -> list[int]:
        now = time.monotonic()
        return [r for r in range(self.world_size) if now - self.changed[r] > seconds]

    def ages(self) -> list[float]:
        now = time.monotonic()
        return [round(now - t, 3) for t in self.changed]


class Service:
    """Rank 0 of the service (see the module docstring). ``serve()`` returns when drained; fatal errors exit(1)."""

    def __init__(self, scfg: Any, *, token: str | None, world_size: int, group=None,
                 on_fatal=None, on_ready=None):
        self.cfg, self.token, self.world_size = scfg, token, world_size
        self.engine = Engine(session_slots=scfg.session_slots, block_size=scfg.block_size, group=group)
        self.bus = Bus(scfg.timeout_s, group)
        self.on_fatal, self.on_ready = on_fatal, on_ready
        self.inbox: queue.Queue[Pending | None] = queue.Queue()
        self.lock = threading.Lock()
        self.pending: set[Pending] = set()
        self.draining = False
        self.absorbed = False  # the door's backlog taken in at the drain
        self.closing = False
        self.aborting = False
        self.step_started: float | None = None
        self.sessions_created = 0
        self.counts: dict[str, dict[str, int]] = collections.defaultdict(lambda: collections.defaultdict(int))
        self.latency: collections.deque = collections.deque(maxlen=10000)
        self.steps = 0
        self.batched = 0
        self.responding = 0
        self.address = ""
        self.apply_ms = 0.0
        self.hb = Heartbeats(0, world_size) if world_size > 1 else None

    # -- the HTTP side (its own thread and event loop) ---------------------------------------------
    def _start_http(self) -> None:
        ready = threading.Event()
        failure: list[BaseException] = []
        threading.Thread(target=self._http_main, args=(ready, failure), name="seqpar-serve-http", daemon=True).start()
        ready.wait()
        if failure:
            raise failure[0]

    def _http_main(self, ready: threading.Event, failure: list) -> None:
        from aiohttp import web

        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self.http_loop = loop
        app = web.Application(client_max_size=self.cfg.max_request_bytes + 1, middlewares=[self._middleware])
        app.router.add_get("/v1/health", self._health)
        app.router.add_get("/v1/stats", self._handle("stats"))
        app.router.add_post("/v1/sessions", self._handle("create"))
        app.router.add_delete("/v1/sessions/{sid}", self._handle("delete"))
        app.router.add_post("/v1/sessions/{sid}/append", self._handle("append"))
        app.router.add_post("/v1/sessions/{sid}/attend", self._handle("attend"))
        app.router.add_post("/v1/attend", self._handle("attend_many"))
        runner = web.AppRunner(app, access_log=None, handle_signals=False, keepalive_timeout=3600)
        try:
            loop.run_until_complete(runner.setup())
            site = web.TCPSite(runner, self.cfg.host, self.cfg.port)
            loop.run_until_complete(site.start())
            host, port = runner.addresses[0][:2]
            self.address = f"http://{host}:{port}" if ":" not in host else f"http://[{host}]:{port}"
        except BaseException as e:  # noqa: BLE001 - handed to the starting thread
            failure.append(e)
            ready.set()
            return
        ready.set()
        loop.run_forever()

    @staticmethod
    def _web():
        from aiohttp import web

        return web

    @property
    def _middleware(self):
        web = self._web()

        @web.middleware
        async def mw(request, handler):
            if self.token is not None:
                got = request.headers.get("Authorization", "")
                want = f"Bearer {self.token}"
                if not hmac.compare_digest(got.encode(), want.encode()):
                    return self._respond(*_err(401, "missing or wrong token (Authorization: Bearer ...)"))
            try:
                return await handler(request)
            except web.HTTPException as e:  # unknown path or method
                return self._respond(*_err(e.status, f"{request.method} {request.path}: {e.reason}"))

        return mw

    def _respond(self, status: int, body: bytes, ctype: str):
        return self._web().Response(status=status, body=body, content_type=ctype)

    async def _health(self, request):
        ages = self.hb.ages() if self.hb else [0.0]
        return self._respond(*_ok_json({"status": "draining" if self.draining else "ok", "world_size": self.world_size,
                                        "address": self.address, "tensor_port": self.door.port,
                                        "max_request_bytes": self.cfg.max_request_bytes, "heartbeat_age_s": ages,
                                        "pending": len(self.pending)}))

    def _handle(self, kind: str):
        async def handler(request):
            try:
                p = await self._parse(kind, request)
            except Reject as e:
                self._count(kind, e.status, None)
                return self._respond(*_err(e.status, e.message))
            with self.lock:
                if self.closing or self.draining:
                    return self._respond(*self._closed())
                self.pending.add(p)
                self.inbox.put(p)
            self.door.wake()
            self.responding += 1
            try:
                answer = await p.fut
                resp = self._respond(*answer)
                try:
                    await resp.prepare(request)
                    await resp.write_eof()
                except ConnectionError:  # the client left (e.g. its timeout) before its answer: nothing to send to
                    pass
                return resp
            finally:
                self.responding -= 1

        return handler

    async def _parse(self, kind: str, request) -> Pending:
        n = request.content_length
        limit = self.cfg.max_request_bytes
        if n is not None and n > limit:
            raise Reject(413, f"request body of {n} bytes exceeds serve.max_request_bytes = {limit}")
        try:
            body = await request.read()
        except Exception as e:  # noqa: BLE001 - aiohttp's too-large / connection errors
            raise Reject(getattr(e, "status", 400), f"could not read the body: {e}") from None
        sid = request.match_info.get("sid")
        header, tensors = {}, {}
        if kind == "create":
            try:
                header = json.loads(body)
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise Reject(400, f"create session: body is not JSON: {e}") from None
            if not isinstance(header, dict):
                raise Reject(400, "create session: body must be a JSON object")
        elif kind in ("append", "attend", "attend_many"):
            ctype = request.headers.get("Content-Type", "")
            if ctype.split(";")[0].strip() != CONTENT_TYPE:
                raise Reject(415, f"{kind}: Content-Type {ctype!r}; expected {CONTENT_TYPE!r} (raw tensors, no pickle)")
            try:
                header, tensors = decode(body)
            except FrameError as e:
                raise Reject(400, f"{kind}: {e}") from None
        loop = asyncio.get_running_loop()
        fut = loop.create_future()

        def send(answer, fut=fut):
            loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(answer))

        return self._pending(kind, sid, header, tensors, send, fut)

    def _pending(self, kind: str, sid, header: dict, tensors: dict, send, fut=None) -> Pending:
        parts = self._split(header, tensors) if kind == "attend_many" else None
        return Pending(kind, sid, header, tensors, send, fut, parts)

    def _split(self, header: dict, tensors: dict) -> list[Pending]:
        """A batch attend -> one ``attend`` part per session (its frame's structure checked here, the parts against
        the sessions in the step loop). Body: ``{"sessions": [...], "layers", "scale", "return_lse"}`` and ``q (B, L,
        H, T, D)``, ``k, v (B, L, H_kv, T, D)``, row ``i`` for ``sessions[i]``."""
        sids = header.get("sessions")
        if (not isinstance(sids, list) or not sids or not all(isinstance(x, str) for x in sids)
                or len(set(sids)) != len(sids)):
            raise Reject(400, f"attend_many: sessions = {sids!r}; expected a non-empty list of distinct session ids")
        if len(sids) > self.cfg.max_batch:
            raise Reject(413, f"attend_many: {len(sids)} sessions, serve.max_batch = {self.cfg.max_batch}")
        if header.get("return_weights"):
            raise Reject(400, "attend_many: return_weights is offered per session (POST /v1/sessions/{id}/attend)")
        extra = sorted(set(tensors) - {"q", "k", "v"})
        bad = [n for n in ("q", "k", "v") if n not in tensors or tensors[n].dim() != 5
               or tensors[n].shape[0] != len(sids)]
        if extra or bad:
            raise Reject(400, f"attend_many: tensors {sorted(tensors)}; expected q (B, L, H, T, D) and k, v (B, L, "
                              f"H_kv, T, D) with B = {len(sids)} sessions"
                              + (f" ({', '.join(f'{n}: {tuple(tensors[n].shape)}' for n in bad if n in tensors)})"
                                 if bad else ""))
        sub = {k: v for k, v in header.items() if k != "sessions"}
        return [Pending("attend", sid, sub, {n: tensors[n][i] for n in ("q", "k", "v")}, None)
                for i, sid in enumerate(sids)]

    def _closed(self) -> tuple[int, bytes, str]:
        why = "draining (shutting down)" if not self.aborting else "failed (see the earlier errors)"
        return _err(503, f"the service is {why}; no new requests")

    # -- the tensor door (ZeroMQ; read and answered by the step loop itself, see .door) ----------------
    def _take(self, frames: list, accept: bool = False) -> Pending | None:
        """A door message ``[identity, rid, body]`` -> a pending request, or None when it was answered at once
        (malformed, wrong token, draining unless ``accept``) or cannot be answered (no rid frame, or one over
        :data:`MAX_RID` bytes: not a seqpar client). Raises nothing: any message is answered or dropped."""
        if len(frames) < 2 or len(frames[1]) > MAX_RID:
            return None
        t0 = time.monotonic()
        ident, rid = frames[0].bytes, frames[1].bytes

        def send(answer, ident=ident, rid=rid):
            self.door.send(ident, rid, answer[0], answer[1])

        kind = "invalid"
        try:
            if len(frames) != 3:
                raise Reject(400, f"a tensor door request is 2 frames [rid, body]; got {len(frames) - 1}")
            body = frames[2].buffer
            limit = self.cfg.max_request_bytes
            if len(body) > limit:
                raise Reject(413, f"request body of {len(body)} bytes exceeds serve.max_request_bytes = {limit}")
            try:
                header, tensors = decode(body)
            except FrameError as e:
                raise Reject(400, f"tensor door: {e}") from None
            auth = header.pop("auth", None)
            if self.token is not None and not (isinstance(auth, str) and hmac.compare_digest(
                    auth.encode("utf-8", "surrogatepass"), self.token.encode())):
                raise Reject(401, 'missing or wrong token (the request header\'s "auth")')
            op = header.pop("op", None)
            if op not in DOOR_OPS:
                raise Reject(400, f"op = {op!r}; the tensor door takes {', '.join(DOOR_OPS)} (sessions, stats and "
                                  "health: HTTP)")
            kind, sid = op, None
            if op != "attend_many":
                sid = header.pop("session", None)
                if not isinstance(sid, str):
                    raise Reject(400, f"{op}: session = {sid!r}; expected a session id")
            p = self._pending(op, sid, header, tensors, send)
            p.t0 = t0
        except Exception as e:  # noqa: BLE001 - Reject, or a check that tripped on input it did not expect
            status, msg = (e.status, e.message) if isinstance(e, Reject) else (
                400, f"tensor door: malformed request ({type(e).__name__}: {str(e)[:200]})")
            self._count(kind, status, None)
            send(_err(status, msg))
            return None
        with self.lock:
            if (self.closing or self.draining) and not (accept and not self.closing):
                send(self._closed())
                return None
            self.pending.add(p)
        return p

    def _finish(self, p: Pending, answer: tuple[int, bytes, str]) -> None:
        p = p.parent or p  # a part's error answers its batch request
        with self.lock:
            if p.done:
                return
            p.done = True
            self.pending.discard(p)
        self._count(p.kind, answer[0], p.t0)
        p.reply(answer)

    def _count(self, kind: str, status: int, t0: float | None) -> None:
        with self.lock:  # both threads count
            self.counts[kind][str(status)] += 1
            if t0 is not None and status < 400:
                self.latency.append(time.monotonic() - t0)

    # -- the step loop ------------------------------------------------------------------------------
    def serve(self) -> None:
        try:
            self.door = Door(self.cfg.host, self.cfg.tensor_port, self.cfg.max_request_bytes)
            self._start_http()
        except Exception as e:  # noqa: BLE001 - a port in use, an address not here: say so, stop every rank now
            self._fail_start(f"cannot listen on {self.cfg.host} (serve.port = {self.cfg.port}, serve.tensor_port = "
                             f"{self.cfg.tensor_port}): {e}")
        threading.Thread(target=self._watch, name="seqpar-serve-watch", daemon=True).start()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._drain)
        if self.on_ready:
            self.on_ready(self)
        try:
            self._loop()
        except BaseException as e:  # noqa: BLE001 - a collective failed (a rank is gone), or a step did
            first = (str(e).strip().splitlines() or [""])[0][:300]
            self._abort(f"a step failed ({type(e).__name__}: {first})", wait_for_silence=True)
        t0 = time.monotonic()
        while (self.responding or self.pending) and time.monotonic() - t0 < 10:  # the last answers leave (bounded)
            time.sleep(0.01)
        self.door.refuse_queued(*self._closed()[:2])
        self.door.close()
        self.http_loop.call_soon_threadsafe(self.http_loop.stop)

    def _fail_start(self, msg: str) -> None:
        """Nothing was served yet: report, let the spawner stop the other ranks at once, exit 1. Never returns."""
        self._exit_failed(msg, msg)

    def _exit_failed(self, msg: str, line: str) -> None:
        """``line`` to stderr, ``msg`` to the spawner (it stops the other ranks at once), exit 1. Never returns."""
        print(f"seqpar serve: error: {line}", file=sys.stderr, flush=True)
        if self.on_fatal:
            try:
                self.on_fatal(msg)
                time.sleep(0.5)  # the spawner's queue is flushed by a feeder thread that os._exit would cut off
            except Exception:  # noqa: BLE001
                pass
        sys.stdout.flush()
        os._exit(1)

    def _drain(self, signum, frame) -> None:
        self.draining = True
        self.door.wake()

    def _next(self, carry: collections.deque, timeout: float) -> Pending | None:
        """The next request (postponed ones first, then HTTP's, then the door's); None after ``timeout`` (whole
        milliseconds, rounded down) or, when draining, as soon as none is waiting."""
        if self.draining and not self.absorbed:  # what waits in the door now was sent before the drain: serve it
            self.absorbed = True
            for frames in self.door.queued():
                p = self._take(frames, accept=True)
                if p is not None:
                    carry.append(p)
        if carry:
            return carry.popleft()
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.inbox.get_nowait()
            except queue.Empty:
                pass
            frames = self.door.poll(deadline - time.monotonic())
            if frames is not None:
                p = self._take(frames)
                if p is not None:
                    return p
            elif self.draining or deadline - time.monotonic() < 0.001:
                return None

    def _loop(self) -> None:
        carry: collections.deque[Pending] = collections.deque()
        recent: dict[str, float] = {}  # session -> its last request's arrival (who may join a batch soon)
        tick = self.cfg.timeout_s / 4
        window = self.cfg.batch_window_ms / 1000
        while True:
            p = self._next(carry, min(tick, 0.05) if self.draining else tick)
            if p is None:
                if self.draining:
                    with self.lock:  # atomically: no request is accepted after this
                        if self.inbox.empty() and not carry:
                            self.closing = True
                            break
                    continue
                self._run_step(_TICK, [], {})  # idle: keep the other ranks' waits short of the group's timeout
                continue
            if p.kind == "stats":
                self._finish(p, _ok_json(self.stats()))
                continue
            batch = [p]
            if p.kind in ("append", "attend", "attend_many"):
                sids = set(p.sids)
                deadline = p.t0 + window
                recent.update(dict.fromkeys(p.sids, p.t0))
                horizon = p.t0 - max(0.05, 20 * window)
                for sid in [sid for sid, t in recent.items() if t < horizon]:
                    del recent[sid]
                while len(batch) < min(self.cfg.max_batch, len(recent)):  # someone else may still come
                    q = self._next(carry, deadline - time.monotonic())
                    if q is None:
                        break
                    if q.kind == "stats":
                        self._finish(q, _ok_json(self.stats()))
                    elif q.kind in ("create", "delete") or q.sids & sids:
                        carry.append(q)
                        break
                    else:
                        batch.append(q)
                        sids |= q.sids
                        recent.update(dict.fromkeys(q.sids, q.t0))
            self._step(batch)
        self._run_step(_STOP, [], {})

    def _run_step(self, kind: int, ops: list, tensors: dict) -> list:
        self.step_started = time.monotonic()
        try:
            if self.world_size > 1:
                self.bus.send(kind, ops, tensors)
            t0 = time.perf_counter()
            results = self.engine.apply(ops, tensors, 0, self.world_size) if kind == _STEP else []
            self.apply_ms = (time.perf_counter() - t0) * 1000  # the step's compute + collectives on rank 0
            return results
        finally:
            self.step_started = None

    def _step(self, batch: list[Pending]) -> None:
        ops, tensors, owners = [], {}, []  # owners[i]: the requests answered by op i
        groups: dict[tuple, list] = {}
        for p in batch:  # a create or delete comes alone; appends and attends one per session
            try:
                if p.kind == "create":
                    ops.append(self._check_create(p.header))
                    owners.append([p])
                elif p.kind == "delete":
                    if p.sid not in self.engine.sessions:
                        raise Reject(404, self._unknown(p.sid))
                    ops.append({"op": "delete", "sid": p.sid})
                    owners.append([p])
                elif p.kind == "append":
                    k, v = self._check_append(p)
                    i = len(ops)
                    ops.append({"op": "append", "sid": p.sid, "layer": p.header["layer"]})
                    tensors[f"{i}.k"], tensors[f"{i}.v"] = k, v
                    owners.append([p])
                elif p.kind == "attend":
                    key = self._check_attend(p)
                    groups.setdefault(key, []).append(p)
                else:  # attend_many: every part valid, or the whole request refused
                    keys = []
                    for part in p.parts:
                        try:
                            keys.append(self._check_attend(part))
                        except Reject as e:
                            raise Reject(e.status, f"attend_many: session {part.sid!r} (row {part.index}): "
                                                   f"{e.message}; nothing was stored") from None
                    for key, part in zip(keys, p.parts):
                        groups.setdefault(key, []).append(part)
            except Reject as e:
                self._finish(p, _err(e.status, e.message))
            except Exception as e:  # noqa: BLE001 - a check that tripped on input it did not expect: this one only
                self._finish(p, _err(400, f"{p.kind}: malformed request ({type(e).__name__}: {str(e)[:200]})"))
        for (_aid, layers, _h, _t, scale, weights), ps in groups.items():
            i = len(ops)
            ops.append({"op": "attend", "sids": [p.sid for p in ps], "layers": list(layers), "scale": scale,
                        "weights": weights})
            for name in ("q", "k", "v"):
                tensors[f"{i}.{name}"] = torch.stack([p.tensors[name] for p in ps])
            owners.append(ps)
        if not ops:
            return
        try:
            results = self._run_step(_STEP, ops, tensors)
        except ValueError as e:  # raised the same on every rank (decode_attention's agreed errors)
            for ps in owners:
                for p in ps:
                    self._finish(p, _err(500, f"step failed after validation: {e}"))
            return
        self.steps += 1
        self.batched += len(batch)
        for op, ps, res in zip(ops, owners, results):
            if op["op"] == "attend":
                for j, p in enumerate(ps):
                    if p.parent is None:
                        self._finish(p, self._attend_answer(p, op, res, j))
                    else:
                        self._collect(p, op, res, j)
            elif op["op"] == "create":
                s = self.engine.sessions[op["sid"]]
                self._finish(ps[0], _ok_json({"session": s.sid, "slot": s.slot, "arena": op["aid"],
                                              "capacity": op["capacity"]}))
            else:
                self._finish(ps[0], _ok_json({"session": op["sid"], **res}) if op["op"] == "delete" else
                             (200, encode(res), CONTENT_TYPE))

    def _collect(self, part: Pending, op: dict, res: dict, j: int) -> None:
        """One part of a batch attend is done; the last one answers the request: ``out (B, L, H, T, D)``, ``lse``."""
        parent = part.parent
        parent.results[part.index] = (res["out"][j], res["lse"][j], self.engine.sessions[part.sid].length(
            op["layers"][0]))
        if len(parent.results) < len(parent.parts):
            return
        rows = [parent.results[i] for i in range(len(parent.parts))]
        out = {"out": torch.stack([r[0] for r in rows])}
        if parent.header.get("return_lse"):
            out["lse"] = torch.stack([r[1] for r in rows])
        head = {"world_size": self.world_size, "lengths": [r[2] for r in rows], **self._times(parent)}
        self._finish(parent, (200, encode(head, out), CONTENT_TYPE))

    def _times(self, p: Pending) -> dict:
        """For benchmarks: ``step_ms`` rank 0's time in the step (compute + collectives), ``server_ms`` from the
        request's arrival (its body read) to this answer: the client's round trip minus it is the transport's."""
        return {"step_ms": round(self.apply_ms, 4), "server_ms": round((time.monotonic() - p.t0) * 1000, 4)}

    def _attend_answer(self, p: Pending, op: dict, res: dict, j: int) -> tuple[int, bytes, str]:
        s = self.engine.sessions[p.sid]
        out = {"out": res["out"][j]}
        if p.header.get("return_lse"):
            out["lse"] = res["lse"][j]
        if p.header.get("return_weights"):
            for r, (pos, w) in enumerate(res["weights"][j]):
                out[f"pos{r}"], out[f"w{r}"] = pos, w
        head = {"world_size": self.world_size, "length": s.length(op["layers"][0]), **self._times(p)}
        return 200, encode(head, out), CONTENT_TYPE

    # -- validation against the sessions (rank 0, before a step) ----------------------------------------
    def _unknown(self, sid) -> str:
        return f"unknown session {sid!r} ({len(self.engine.sessions)} sessions open)"

    def _check_create(self, h: dict) -> dict:
        bad = sorted(set(h) - set(_CREATE_KEYS))
        missing = [k for k in _CREATE_KEYS if k not in h and k != "dtype"]
        if bad or missing:
            raise Reject(400, f"create session: unknown keys {bad}, missing keys {missing}; "
                              f"allowed: {', '.join(_CREATE_KEYS)}")
        h = {"dtype": "float32", **h}
        for k in ("layers", "heads", "kv_heads", "head_dim", "capacity"):
            if not isinstance(h[k], int) or isinstance(h[k], bool) or h[k] < 1:
                raise Reject(400, f"create session: {k} = {h[k]!r}; allowed: an int >= 1")
        if h["heads"] % h["kv_heads"]:
            raise Reject(400, f"create session: heads = {h['heads']} is not a multiple of kv_heads = {h['kv_heads']}")
        if not isinstance(h["dtype"], str) or h["dtype"] not in TORCH_DTYPES:
            raise Reject(400, f"create session: dtype = {h['dtype']!r}; allowed: {', '.join(TORCH_DTYPES)}")
        n = len(self.engine.sessions)
        if n >= self.cfg.max_sessions:
            raise Reject(429, f"create session: {n} sessions open, serve.max_sessions = {self.cfg.max_sessions}")
        key = (h["layers"], h["kv_heads"], h["head_dim"], h["dtype"], h["capacity"])
        arena = self.engine.arena_for(key)
        if arena is None:
            need = self.engine.arena_tokens(h["capacity"], self.world_size) * h["layers"]
            free = self.cfg.capacity_tokens - self.engine.reserved()
            if need > free:
                raise Reject(409, f"create session: capacity = {h['capacity']} needs {need} tokens per rank (an "
                                  f"arena of serve.session_slots = {self.cfg.session_slots} sequences x {h['layers']} "
                                  f"layers), but {free} of serve.capacity_tokens = {self.cfg.capacity_tokens} are free "
                                  "per rank")
            size = {"float64": 8, "float32": 4}.get(h["dtype"], 2)
            nbytes = 2 * need * h["kv_heads"] * h["head_dim"] * size  # K and V
            avail = _mem_available()
            if avail is not None and nbytes > 0.8 * avail:
                raise Reject(409, f"create session: its arena needs {nbytes / 2**30:.2f} GiB per rank (K/V of "
                                  f"{need} tokens x {h['kv_heads']} kv heads x {h['head_dim']} x {h['dtype']}), "
                                  f"{avail / 2**30:.2f} GiB is available on rank 0's node (MemAvailable)")
            aid = max(self.engine.arenas, default=-1) + 1
        else:
            aid = arena.aid
        self.sessions_created += 1
        return {"op": "create", "sid": f"s{self.sessions_created}", "aid": aid, "new_arena": arena is None, **h}

    def _tensor(self, p: Pending, name: str, want: tuple, dtype: str) -> torch.Tensor:
        t = p.tensors.get(name)
        if t is None:
            raise Reject(400, f"{p.kind}: missing tensor {name!r}; the request has {sorted(p.tensors)}")
        if str(t.dtype).removeprefix("torch.") != dtype:
            raise Reject(400, f"{p.kind}: {name}.dtype = {str(t.dtype).removeprefix('torch.')}, but session {p.sid!r} "
                              f"holds {dtype}")
        if tuple(t.shape) != want:
            raise Reject(400, f"{p.kind}: {name}.shape = {tuple(t.shape)}; expected {want} for session {p.sid!r}")
        return t

    def _session(self, p: Pending):
        s = self.engine.sessions.get(p.sid)
        if s is None:
            raise Reject(404, f"{p.kind}: {self._unknown(p.sid)}")
        extra = sorted(set(p.tensors) - {"q", "k", "v"} if p.kind == "attend" else set(p.tensors) - {"k", "v"})
        if extra:
            raise Reject(400, f"{p.kind}: unexpected tensors {extra}")
        return s

    def _layer(self, p: Pending, s, layer) -> int:
        if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < s.cache.num_layers:
            raise Reject(400, f"{p.kind}: unknown layer {layer!r} of session {p.sid!r}; it has layers "
                              f"0..{s.cache.num_layers - 1}")
        return layer

    def _room(self, p: Pending, s, layer: int, t: int) -> None:
        n, cap = s.length(layer), s.cache.max_seq_len
        if n + t > cap:
            raise Reject(409, f"{p.kind}: session {p.sid!r} is full: layer {layer} holds {n} tokens, {t} more would "
                              f"exceed its capacity = {cap}; nothing was stored")

    def _check_append(self, p: Pending):
        s = self._session(p)
        layer = self._layer(p, s, p.header.get("layer"))
        k = p.tensors.get("k")
        t = k.shape[1] if k is not None and k.dim() == 3 else -1
        if t < 1:
            raise Reject(400, f"append: k must be (kv_heads, T >= 1, head_dim); got "
                              f"{None if k is None else tuple(k.shape)}")
        want = (s.cache.kv_heads, t, s.cache.head_dim)
        k, v = (self._tensor(p, n, want, s.spec["dtype"]) for n in ("k", "v"))
        self._room(p, s, layer, t)
        return k, v

    def _check_attend(self, p: Pending) -> tuple:
        s = self._session(p)
        layers = p.header.get("layers")
        if not isinstance(layers, list) or not layers or len(set(map(str, layers))) != len(layers):
            raise Reject(400, f"attend: layers = {layers!r}; expected a non-empty list of distinct layer numbers")
        layers = [self._layer(p, s, layer) for layer in layers]
        scale = p.header.get("scale")
        if scale is not None and (not isinstance(scale, (int, float)) or isinstance(scale, bool)
                                  or not _finite(scale) or scale <= 0):
            raise Reject(400, f"attend: scale = {scale!r}; expected a finite number > 0 or null")
        q = p.tensors.get("q")
        if q is None or q.dim() != 4 or q.shape[2] < 1:
            raise Reject(400, f"attend: q must be (layers, heads, T >= 1, head_dim); got "
                              f"{None if q is None else tuple(q.shape)}")
        nl, t = len(layers), q.shape[2]
        self._tensor(p, "q", (nl, s.heads, t, s.cache.head_dim), s.spec["dtype"])
        for n in ("k", "v"):
            self._tensor(p, n, (nl, s.cache.kv_heads, t, s.cache.head_dim), s.spec["dtype"])
        for layer in layers:
            self._room(p, s, layer, t)
        weights = bool(p.header.get("return_weights"))
        if weights and len({s.length(layer) for layer in layers}) > 1:
            raise Reject(400, "attend: return_weights over several layers needs them at equal lengths; got "
                              f"{[s.length(layer) for layer in layers]}")
        return (s.arena.aid, tuple(layers), s.heads, t, None if scale is None else float(scale), weights)

    # -- stats, watch, abort ------------------------------------------------------------------------
    def stats(self) -> dict:
        with self.lock:
            lat = sorted(self.latency)
            counts = {k: dict(v) for k, v in self.counts.items()}

        def pct(x: float) -> float | None:
            return round(lat[min(len(lat) - 1, int(x * len(lat)))] * 1000, 3) if lat else None

        reserved = self.engine.reserved()
        return {
            "address": self.address, "world_size": self.world_size, "sessions": len(self.engine.sessions),
            "arenas": len(self.engine.arenas), "capacity_tokens_per_rank": self.cfg.capacity_tokens,
            "session_ids": {sid: {"length": s.length(0), "capacity": s.spec["capacity"]}
                            for sid, s in list(self.engine.sessions.items())},
            "ranks": [{"rank": r, "used_tokens": self.engine.used(r), "reserved_tokens": reserved,
                       "free_tokens": self.cfg.capacity_tokens - reserved} for r in range(self.world_size)],
            "requests": counts,
            "latency_ms": {"p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99), "count": len(lat)},
            "steps": self.steps, "requests_per_step": round(self.batched / self.steps, 3) if self.steps else None,
        }

    def _watch(self) -> None:
        limit = self.cfg.timeout_s
        while not self.aborting:
            time.sleep(HEARTBEAT_S)  # a polling period, not synchronisation
            if self.hb is not None:
                try:
                    self.hb.poll()
                except Exception:  # noqa: BLE001 - the store failed: the job is going down
                    pass
                silent = [r for r in self.hb.silent(limit) if r != 0]
                if silent:
                    self._abort(f"rank(s) {silent} sent no heartbeat for serve.timeout_s = {limit:g} s "
                                "(dead or stalled)")
            started = self.step_started
            if started is not None and time.monotonic() - started > limit:
                self._abort(f"a step did not complete within serve.timeout_s = {limit:g} s", wait_for_silence=True)

    def _abort(self, reason: str, wait_for_silence: bool = False) -> None:
        """Answer every pending request 503 naming the rank(s), report, exit 1. Never returns."""
        with self.lock:
            second = self.aborting
            self.aborting = self.closing = True
        if second:  # another thread is answering and will exit the process: this one must not go on (nor exit)
            threading.Event().wait()
        if wait_for_silence and self.hb is not None:  # whose heartbeat stopped? (up to 1 s to tell)
            t0 = time.monotonic()
            silent: list[int] = []
            while time.monotonic() - t0 < 1.0 and not silent:
                time.sleep(HEARTBEAT_S)
                try:
                    self.hb.poll()
                except Exception:  # noqa: BLE001
                    pass
                silent = [r for r in self.hb.silent(5 * HEARTBEAT_S) if r != 0]
            reason += (f"; rank(s) {silent} stopped sending heartbeats" if silent
                       else "; every rank's heartbeat is alive")
        msg = f"seqpar serve failed: {reason}; the service stops"
        with self.lock:
            waiting = list(self.pending)
        for p in waiting:
            self._finish(p, _err(503, msg))
        while True:  # answers still queued in the inbox
            try:
                p = self.inbox.get_nowait()
            except queue.Empty:
                break
            if p is not None:
                self._finish(p, _err(503, msg))
        queued = self.door.refuse_queued(*_err(503, msg)[:2])  # sent, not yet read by the stuck loop
        self.door.close()  # the door's answers leave (bounded by its linger)
        t0 = time.monotonic()
        while self.responding and time.monotonic() - t0 < 3.0:  # let the answers leave (bounded)
            time.sleep(0.01)
        self._exit_failed(msg, f"{msg} ({len(waiting) + queued} pending requests answered 503)")


def _finite(x: float) -> bool:
    try:
        return math.isfinite(x)
    except OverflowError:  # an int beyond float's range (JSON has them)
        return False


def _mem_available() -> int | None:
    """Linux ``MemAvailable`` in bytes, or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def follower(scfg: Any, rank: int, world_size: int, group=None) -> None:
    """The step loop of a rank > 0: apply rank 0's steps until the stop step."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)  # rank 0 decides when to stop (it drains first)
    hb = Heartbeats(rank, world_size)
    engine = Engine(session_slots=scfg.session_slots, block_size=scfg.block_size, group=group)
    bus = Bus(scfg.timeout_s, group)
    try:
        while True:
            kind, ops, tensors = bus.recv()
            if kind == _STOP:
                return
            if kind == _STEP:
                try:
                    engine.apply(ops, tensors, rank, world_size)
                except ValueError:  # the same error on every rank (rank 0 answers it); carry on
                    pass
    finally:
        hb.stop.set()
