"""Client of the attention service (``seqpar serve``): the model process sends queries and new K/V, the
service's ranks hold the sharded KV cache and answer with the exact attention output.

    from seqpar.client import Client
    with Client("http://127.0.0.1:8470", token=None, timeout=30) as c:
        s = c.create_session(layers=2, heads=32, kv_heads=8, head_dim=128, dtype="float32", capacity=131072)
        c.append(s, 0, k, v)                                   # k, v (H_kv, T, D) or (1, H_kv, T, D)
        out, lse = c.attend(s, 0, q, k_new, v_new, return_lse=True)   # q (H, T, D) or (1, H, T, D)
        outs = c.attend(s, [0, 1], q2, k2, v2)                 # several layers: q2 (L, H, T, D), k2 (L, H_kv, T, D)
        outs = c.attend_many([s, s2], 0, qb, kb, vb)            # several sessions in one request: qb (B, H, T, D)
        c.delete_session(s)

numpy arrays or torch tensors in, the same kind out (bfloat16 needs torch). Two transports, both kept open
and reused: HTTP/1.1 (``http.client``, the standard library) for sessions, stats and health, and -- when pyzmq
is installed (``transport="auto"``) -- the service's **tensor door** for appends and attends: one ZeroMQ
DEALER socket, one message per request, read by the service's step loop itself (0.4-0.6 ms less per call than
HTTP on localhost, measured; README: "The attention service"). ``transport="http"`` (or no pyzmq) sends
everything over HTTP; the answers are the same. A request the service refuses raises :class:`ServeError` with
the HTTP status and the service's message; a network failure or a timeout raises :class:`ServeUnavailable`.
Not thread-safe: one client per thread.

The wire format (also used by the service between its ranks), for every request and answer with tensors
(content type ``application/x-seqpar``)::

    uint32 little-endian  N         length of the header
    N bytes               header    UTF-8 JSON: the request's fields and "tensors": [{"name", "dtype", "shape"}]
    the tensors' bytes               raw little-endian, C order, in the order of "tensors", nothing between

Nothing is ever unpickled: a body whose header is not this JSON is refused (400).
"""

from __future__ import annotations

import http.client
import json
import struct
import sys
import time
import urllib.parse
import warnings
from typing import Any

import numpy as np

CONTENT_TYPE = "application/x-seqpar"
DTYPES = ("float32", "float64", "float16", "bfloat16", "int64")
_SIZES = {"float32": 4, "float64": 8, "float16": 2, "bfloat16": 2, "int64": 8}
_MAX_HEADER = 1 << 20
if sys.byteorder != "little":  # pragma: no cover - x86 / ARM are little-endian
    raise ImportError("seqpar.client: the wire format is little-endian; this machine is big-endian")


class FrameError(ValueError):
    """A body that is not a valid frame (bad header, unknown dtype, truncated): the service answers 400."""


class ServeError(RuntimeError):
    """The service refused or failed a request: ``status`` (HTTP code) and ``message`` (the service's words)."""

    def __init__(self, status: int, message: str):
        self.status, self.message = status, message
        super().__init__(f"seqpar service: HTTP {status}: {message}")


class ServeUnavailable(ConnectionError):
    """The service could not be reached, closed the connection, or did not answer within the timeout."""


class _DoorUnreachable(Exception):
    """The tensor door does not connect while HTTP answers (the client then uses HTTP)."""


# -- frames -----------------------------------------------------------------------------------------


def _torch():
    import torch

    return torch


def _to_bytes(t: Any) -> tuple[str, list[int], memoryview]:
    if isinstance(t, np.ndarray):
        name = str(t.dtype)
        if name not in DTYPES:
            raise ValueError(f"dtype {name}; allowed: {', '.join(DTYPES)}")
        a = np.ascontiguousarray(t)
        return name, list(a.shape), memoryview(a).cast("B")
    torch = _torch()
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"expected a numpy array or a torch tensor, got {type(t).__name__}")
    name = str(t.dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"dtype {name}; allowed: {', '.join(DTYPES)}")
    c = t.detach().to("cpu").contiguous()
    return name, list(c.shape), memoryview(c.view(torch.uint8).reshape(-1).numpy())


def encode(header: dict[str, Any], tensors: dict[str, Any] | None = None) -> bytes:
    """A frame: ``header`` (JSON-able) plus ``tensors`` (name -> array/tensor), see the module docstring."""
    metas, blobs = [], []
    for name, t in (tensors or {}).items():
        dtype, shape, raw = _to_bytes(t)
        metas.append({"name": name, "dtype": dtype, "shape": shape})
        blobs.append(raw)
    head = json.dumps({**header, "tensors": metas}, separators=(",", ":")).encode()
    return b"".join([struct.pack("<I", len(head)), head, *blobs])


def decode(body: bytes | bytearray | memoryview, *, as_torch: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(header, tensors)`` of a frame; raises :class:`FrameError` naming what is wrong."""
    body = memoryview(body)
    if len(body) < 4:
        raise FrameError(f"body of {len(body)} bytes: too short for a frame (4-byte header length first)")
    (n,) = struct.unpack_from("<I", body, 0)
    if n > min(_MAX_HEADER, len(body) - 4):
        raise FrameError(f"header length {n} bytes, but the body has {len(body) - 4} bytes after the length "
                         f"(limit {_MAX_HEADER}): not a seqpar frame (the service accepts no pickle)")
    try:
        header = json.loads(bytes(body[4:4 + n]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise FrameError(f"header is not UTF-8 JSON: {type(e).__name__}: {str(e)[:200]}") from None
    if not isinstance(header, dict) or not isinstance(header.get("tensors", []), list):
        raise FrameError("header must be a JSON object with a 'tensors' list")
    tensors: dict[str, Any] = {}
    off = 4 + n
    for i, meta in enumerate(header.pop("tensors", [])):
        if not isinstance(meta, dict) or set(meta) != {"name", "dtype", "shape"}:
            raise FrameError(f"tensors[{i}] = {meta!r}: expected {{'name', 'dtype', 'shape'}}")
        name, dtype, shape = meta["name"], meta["dtype"], meta["shape"]
        if not isinstance(name, str) or name in tensors:
            raise FrameError(f"tensors[{i}]: name {name!r}; expected a string, once per frame")
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise FrameError(f"tensor {name!r}: dtype {dtype!r}; allowed: {', '.join(DTYPES)}")
        if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**48
                                                  for s in shape) or len(shape) > 8:
            raise FrameError(f"tensor {name!r}: shape {str(shape)[:200]}; expected a list of <= 8 ints in "
                             "0 .. 2**48 - 1")
        count = 1
        for n in shape:  # Python ints: no overflow from a hostile shape
            count *= n
        nbytes = count * _SIZES[dtype]
        if off + nbytes > len(body):
            raise FrameError(f"truncated body: tensor {name!r} {dtype} {shape} needs {nbytes} bytes at offset "
                             f"{off}, the body has {len(body)} bytes")
        tensors[name] = _from_bytes(body[off:off + nbytes], dtype, shape, as_torch)
        off += nbytes
    if off != len(body):
        raise FrameError(f"body has {len(body) - off} bytes after the last tensor (header says {off}, got {len(body)})")
    return header, tensors


def _from_bytes(raw: memoryview, dtype: str, shape: list[int], as_torch: bool) -> Any:
    if not as_torch and dtype != "bfloat16":
        return np.frombuffer(raw, dtype=dtype).reshape(shape).copy()
    torch = _torch()
    buf = bytearray(raw)  # writable, owned
    if not buf:
        return torch.empty(shape, dtype=getattr(torch, dtype))
    return torch.frombuffer(buf, dtype=getattr(torch, dtype)).reshape(shape)


# -- the client -------------------------------------------------------------------------------------


class Client:
    """A connection to ``seqpar serve`` at ``address`` (``http://host:port`` or ``host:port``).

    Args:
        token: the service's token (sent as ``Authorization: Bearer``, and in the tensor door's requests);
            default none.
        timeout: seconds to wait for connect and for each answer (then :class:`ServeUnavailable`).
        transport: ``"auto"``: appends and attends through the tensor door (ZeroMQ) when pyzmq is installed
            and the service has one, else HTTP; ``"http"``: everything over HTTP.
    """

    def __init__(self, address: str, *, token: str | None = None, timeout: float = 60.0, transport: str = "auto"):
        if "://" not in address:
            address = "http://" + address
        u = urllib.parse.urlsplit(address)
        if u.scheme != "http" or not u.hostname or not u.port:
            raise ValueError(f"address={address!r}; expected http://HOST:PORT")
        if transport not in ("auto", "http"):
            raise ValueError(f"transport={transport!r}; allowed: 'auto', 'http'")
        self.host, self.port, self.timeout, self.transport = u.hostname, u.port, timeout, transport
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._auth = {"auth": token} if token else {}
        self._conn: http.client.HTTPConnection | None = None
        self._door: str | None = None  # the tensor door's endpoint once asked ("" = none: HTTP)
        self._sock: Any = None
        self._limit: int | None = None
        self._rid = 0
        self._ever_up = False  # the door's connection came up once (else, when HTTP answers: unreachable from here)
        self.last_step_ms: float | None = None  # the last attend's times in the service, for benchmarks: the step
        self.last_server_ms: float | None = None  # on rank 0, and from the request's arrival to its answer

    # -- transport --
    def _request(self, method: str, path: str, body: bytes | None = None, ctype: str | None = None):
        headers = dict(self._headers)
        if ctype:
            headers["Content-Type"] = ctype
        for attempt in range(2):
            fresh = self._conn is None
            if fresh:
                self._conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            try:
                self._conn.request(method, path, body=body, headers=headers)
                resp = self._conn.getresponse()
                data = resp.read()
                break
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as e:
                self.close()
                if fresh or attempt or method != "GET":  # only a GET may be resent (nothing changes twice)
                    raise ServeUnavailable(f"seqpar service at {self.host}:{self.port}: {e!r} during {method} "
                                           f"{path}") from e
            except OSError as e:  # refused, timed out
                self.close()
                raise ServeUnavailable(
                    f"seqpar service at {self.host}:{self.port}: {e!r} during {method} {path}") from e
        if resp.status >= 400:
            try:
                msg = json.loads(data)["error"]
            except Exception:  # noqa: BLE001 - not our JSON: show what came
                msg = data[:500].decode("utf-8", "replace")
            raise ServeError(resp.status, msg)
        return resp.getheader("Content-Type", ""), data

    def _json(self, method: str, path: str, payload: dict | None = None) -> dict:
        body = None if payload is None else json.dumps(payload).encode()
        _, data = self._request(method, path, body, "application/json" if body is not None else None)
        return json.loads(data)

    def _door_at(self, port: int) -> str:
        """The door's endpoint: the host this client reaches HTTP at (the service may bind 0.0.0.0), its port."""
        return f"tcp://[{self.host}]:{port}" if ":" in self.host else f"tcp://{self.host}:{port}"

    def _door_socket(self) -> Any:
        """The tensor door's DEALER socket (connected once), or None: everything over HTTP."""
        if self._door is None:
            door = ""
            if self.transport == "auto":
                try:
                    import zmq  # noqa: F401
                except ImportError:
                    self._door = ""
                    return None
                h = self.health()  # may raise: then asked again next time
                self._limit = h.get("max_request_bytes")
                if h.get("tensor_port"):
                    door = self._door_at(h["tensor_port"])
            self._door = door
        if not self._door:
            return None
        if self._sock is None:
            import zmq

            sock = zmq.Context.instance().socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            # not IMMEDIATE: with it, libzmq discards answers not yet read when the connection drops (measured: a
            # failing service's 503 lost); a request sent while disconnected waits in the socket, closed on timeout
            sock.setsockopt(zmq.IPV6, int(":" in self.host))
            # the connection's state: a service gone fails a request now, not at its timeout
            self._mon = sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
            self._up = False
            self._since = time.monotonic()
            sock.connect(self._door)
            self._poller = zmq.Poller()
            self._poller.register(sock, zmq.POLLIN)
            self._poller.register(self._mon, zmq.POLLIN)
            self._sock = sock
        return self._sock

    def _tensor_request(self, op: str, session: str | None, header: dict, tensors: dict) -> bytes:
        """An append / attend / attend_many: through the tensor door (or HTTP); the answer's frame."""
        sock = self._door_socket()
        if sock is None:
            path = "/v1/attend" if session is None else f"/v1/sessions/{session}/{op}"
            return self._request("POST", path, encode(header, tensors), CONTENT_TYPE)[1]
        body = encode({"op": op, **({} if session is None else {"session": session}), **self._auth, **header},
                      tensors)
        if self._limit is not None and len(body) > self._limit:
            raise ServeError(413, f"request body of {len(body)} bytes exceeds serve.max_request_bytes = "
                                  f"{self._limit} (the service's limit, checked before sending)")
        import zmq

        self._rid += 1
        rid = struct.pack("<Q", self._rid)
        deadline = time.monotonic() + self.timeout
        try:
            try:
                sock = self._connected(deadline)
            except _DoorUnreachable as e:  # nothing was sent: this request and the next ones go over HTTP
                warnings.warn(f"seqpar.client: the service's tensor door {e} does not connect from here while its "
                              f"HTTP at {self.host}:{self.port} answers; using HTTP (open that port for the door's "
                              "speed, or pass transport='http' to skip this check)", RuntimeWarning, stacklevel=3)
                self._close_door()
                self.transport, self._door = "http", ""
                return self._tensor_request(op, session, header, tensors)
            sock.send_multipart([rid, body], copy=False)
            while True:  # answers to earlier requests that timed out are dropped
                left = deadline - time.monotonic()
                ready = dict(self._poller.poll(max(1, int(left * 1000)))) if left > 0 else {}
                if sock in ready or (ready and sock.poll(0)):  # an answer first, even one that came with a close
                    frames = sock.recv_multipart()
                    if len(frames) == 3 and frames[0] == rid:
                        break
                elif ready:
                    if not self._event():
                        raise ConnectionError("the service closed the connection before answering")
                else:
                    raise TimeoutError(f"no answer within timeout = {self.timeout:g} s")
        except (zmq.ZMQError, TimeoutError, ConnectionError) as e:
            door, self._door = self._door, None  # asked again next time: a restarted service has a new door
            self._close_door()  # and a fresh socket: nothing stale queued or arriving
            raise ServeUnavailable(f"seqpar service's tensor door {door}: {e!r} during {op}") from e
        status = int(frames[1])
        if status >= 400:
            try:
                msg = json.loads(frames[2])["error"]
            except Exception:  # noqa: BLE001 - not our JSON: show what came
                msg = frames[2][:500].decode("utf-8", "replace")
            raise ServeError(status, msg)
        return frames[2]

    def _event(self) -> bool:
        """Read one connection event; True if the connection is up."""
        import zmq
        from zmq.utils.monitor import recv_monitor_message

        self._up = recv_monitor_message(self._mon)["event"] == zmq.EVENT_CONNECTED
        return self._up

    def _connected(self, deadline: float) -> Any:
        """The door's socket once its connection is up (a fresh one: milliseconds). Nothing is sent before: a
        service that went away fails here at once (HTTP's health is refused), one restarted at the same address
        is found with its new door, and a request never waits in a socket that nothing reads."""
        while self._mon.poll(0):
            self._event()
        while not self._up:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no connection to the tensor door within timeout = {self.timeout:g} s")
            if self._mon.poll(max(1, int(min(left, 0.5) * 1000))):
                self._event()
                continue
            h = self.health()  # half a second without a connection: is the service there? (ServeUnavailable if not)
            door = self._door_at(h.get("tensor_port"))
            if door != self._door:  # restarted: its new door (nothing was sent to the old one)
                self._close_door()
                self._door, self._ever_up = door, False
                self._door_socket()
            elif not self._ever_up and time.monotonic() - self._since > 2.0:
                raise _DoorUnreachable(door)  # HTTP answers, the door never connected: not reachable from here
        self._ever_up = True
        return self._sock

    def _close_door(self) -> None:
        if self._sock is not None:
            self._sock.disable_monitor()
            self._mon.close(linger=0)
            self._sock.close(linger=0)
            self._sock = None

    def close(self) -> None:
        self._close_door()
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the API --
    def health(self) -> dict:
        """``{"status": "ok", "world_size": W, ...}``."""
        return self._json("GET", "/v1/health")

    def stats(self) -> dict:
        """Per-rank used/reserved/free tokens, sessions, request counts, latency percentiles."""
        return self._json("GET", "/v1/stats")

    def create_session(self, *, layers: int, heads: int, kv_heads: int, head_dim: int, capacity: int,
                       dtype: str = "float32") -> str:
        """A new sequence held by the service (``capacity`` tokens at most); returns its id."""
        return self._json("POST", "/v1/sessions", {"layers": layers, "heads": heads, "kv_heads": kv_heads,
                                                   "head_dim": head_dim, "dtype": str(dtype).removeprefix("torch."),
                                                   "capacity": capacity})["session"]

    def delete_session(self, session: str) -> None:
        """Free the session's slot (404 -> :class:`ServeError` if unknown)."""
        self._json("DELETE", f"/v1/sessions/{session}")

    def append(self, session: str, layer: int, k: Any, v: Any) -> int:
        """Store new keys/values ``(H_kv, T, D)`` (or ``(1, H_kv, T, D)``) of ``layer``; returns the new length."""
        k, v = (_squeeze1(t, 3, "k/v") for t in (k, v))
        return int(decode(self._tensor_request("append", session, {"layer": layer}, {"k": k, "v": v}))[0]["length"])

    def attend(self, session: str, layers: int | list[int], q: Any, k: Any, v: Any, *, scale: float | None = None,
               return_lse: bool = False, return_weights: bool = False) -> Any:
        """Append ``k, v`` and attend ``q`` over the whole sequence (causal: query ``t`` sees keys ``<= length + t``).

        One layer (an int): ``q (H, T, D)`` or ``(1, H, T, D)``, ``k, v (H_kv, T, D)`` or with the leading 1.
        Several layers (a list of L): ``q (L, H, T, D)``, ``k, v (L, H_kv, T, D)``; computed in one step.
        Returns ``out`` shaped like ``q``, plus ``lse`` (``q``'s shape without D, float32) with ``return_lse``,
        plus with ``return_weights`` a list with one ``(positions (n_r,), weights (L, H, T, n_r))`` per rank
        (``(H, T, n_r)`` when ``q`` is): each rank's shard of the attention weights over the global key positions
        it holds.
        """
        one = isinstance(layers, int)
        lead = 1 if one and (q.ndim == 4) else 0
        if one:
            q, k, v = (_squeeze1(t, 3, n)[None] for t, n in ((q, "q"), (k, "k"), (v, "v")))
            layers = [layers]
        header = {"layers": list(layers), "scale": scale, "return_lse": return_lse, "return_weights": return_weights}
        data = self._tensor_request("attend", session, header, {"q": q, "k": k, "v": v})
        head, ts = decode(data, as_torch=not isinstance(q, np.ndarray))
        self.last_step_ms, self.last_server_ms = head.get("step_ms"), head.get("server_ms")
        out, lse = ts["out"], ts.get("lse")
        if one and not lead:
            out, lse = out[0], None if lse is None else lse[0]
        res = [out]
        if return_lse:
            res.append(lse)
        if return_weights:
            res.append([(ts[f"pos{r}"], ts[f"w{r}"][0] if one and not lead else ts[f"w{r}"])
                        for r in range(head["world_size"])])
        return res[0] if len(res) == 1 else tuple(res)

    def attend_many(self, sessions: list[str], layers: int | list[int], q: Any, k: Any, v: Any, *,
                    scale: float | None = None, return_lse: bool = False) -> Any:
        """:meth:`attend` for several sessions in one request (row ``i`` for ``sessions[i]``): the service runs them
        in one step (one combining collective per layer for those that share an arena) and stores nothing unless
        every row is valid. One layer: ``q (B, H, T, D)``, ``k, v (B, H_kv, T, D)``; several layers (a list of L):
        ``q (B, L, H, T, D)``, ``k, v (B, L, H_kv, T, D)``. Returns ``out`` shaped like ``q`` (plus ``lse``)."""
        one = isinstance(layers, int)
        if one:
            q, k, v = (t[:, None] for t in (q, k, v))
            layers = [layers]
        header = {"sessions": list(sessions), "layers": list(layers), "scale": scale, "return_lse": return_lse}
        data = self._tensor_request("attend_many", None, header, {"q": q, "k": k, "v": v})
        head, ts = decode(data, as_torch=not isinstance(q, np.ndarray))
        self.last_step_ms, self.last_server_ms = head.get("step_ms"), head.get("server_ms")
        out, lse = ts["out"], ts.get("lse")
        if one:
            out, lse = out[:, 0], None if lse is None else lse[:, 0]
        return (out, lse) if return_lse else out


def _squeeze1(t: Any, dims: int, name: str) -> Any:
    """``(1, *x)`` -> ``x`` when ``t`` has ``dims + 1`` dims (the SDPA batch of one)."""
    if t.ndim == dims + 1:
        if t.shape[0] != 1:
            raise ValueError(f"{name} has shape {tuple(t.shape)}: a session is one sequence (batch 1)")
        return t[0]
    return t
