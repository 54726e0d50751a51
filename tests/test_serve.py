"""``seqpar serve`` seen from outside: a real service on 2 gloo ranks on a free port, the real client
(``seqpar.client``) over the real transport. Exactness against the float64 formula, every malformed request
refused with the caches unchanged, limits and the token, the load test, a stalled or killed rank, drain."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import queue
import signal
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from procs import alive, children, wait_for

from seqpar.client import CONTENT_TYPE, Client, ServeError, ServeUnavailable, encode
from seqpar.ops import reference

ROOT = Path(__file__).resolve().parents[1]
START_S = 90  # the ready line must come within this (two ranks starting on a loaded 2-core machine)


class Service:
    """``python -m seqpar_tools serve --port 0 ARGS``; ``address`` from its ready line."""

    def __init__(self, *args: str, env: dict | None = None):
        e = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "PMI_RANK", "OMPI_COMM_WORLD_RANK",
                                                                "SEQPAR_SERVE_TOKEN")}
        e.update(PYTHONPATH=f"{ROOT}{os.pathsep}{e.get('PYTHONPATH', '')}", PYTHONUNBUFFERED="1", **(env or {}))
        self.proc = subprocess.Popen([sys.executable, "-m", "seqpar_tools", "serve", "--port", "0", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=e, cwd=ROOT)
        self.lines: queue.Queue[str] = queue.Queue()
        self.err: list[str] = []
        threading.Thread(target=lambda: [self.lines.put(x) for x in self.proc.stdout], daemon=True).start()
        threading.Thread(target=lambda: [self.err.append(x) for x in self.proc.stderr], daemon=True).start()
        self.address = None
        t0 = time.monotonic()
        while self.address is None:
            try:
                line = self.lines.get(timeout=max(0.1, START_S - (time.monotonic() - t0)))
            except queue.Empty:
                self.kill()
                pytest.fail(f"no ready line within {START_S} s; stderr: {''.join(self.err)[-2000:]}")
            if "ready on " in line:
                self.address = line.split("ready on ")[1].split()[0]
        self.ranks = wait_for(lambda: len(children(self.proc.pid)) == 2 and children(self.proc.pid), 30, "2 ranks")

    def client(self, **kw) -> Client:
        return Client(self.address, **kw)

    def stop(self, sig=signal.SIGTERM, timeout: float = 60) -> int:
        self.proc.send_signal(sig)
        return self.wait(timeout)

    def wait(self, timeout: float = 60) -> int:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"the service did not exit within {timeout} s")
        wait_for(lambda: not any(alive(p) for p in self.ranks), 30, "rank processes gone")
        return rc

    def kill(self) -> None:
        for p in [self.proc.pid, *children(self.proc.pid)]:
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def service():
    s = Service("--set", "serve.session_slots=8", "--set", "serve.max_sessions=40", "--timeout", "30")
    yield s
    rc = s.stop()
    assert rc == 0, "".join(s.err)[-3000:]


# -- the float64 yardstick ---------------------------------------------------------------------------


class Seq:
    """A session's K/V history kept by the test, for the float64 reference."""

    def __init__(self, layers, heads, kv_heads, head_dim, dtype=torch.float32, seed=0):
        self.h, self.hkv, self.d, self.dtype = heads, kv_heads, head_dim, dtype
        self.k = [torch.zeros(kv_heads, 0, head_dim, dtype=dtype) for _ in range(layers)]
        self.v = [torch.zeros(kv_heads, 0, head_dim, dtype=dtype) for _ in range(layers)]
        self.g = torch.Generator().manual_seed(seed)

    def rand(self, *shape):
        return torch.randn(*shape, generator=self.g, dtype=torch.float64).to(self.dtype)

    def new_kv(self, t):
        return self.rand(self.hkv, t, self.d), self.rand(self.hkv, t, self.d)

    def add(self, layer, k, v):
        self.k[layer] = torch.cat([self.k[layer], k], 1)
        self.v[layer] = torch.cat([self.v[layer], v], 1)

    def ref(self, layer, q, scale=None):
        """(out, lse, weights) of q (H, T, D), the last T keys being q's own tokens (causal)."""
        n, t = self.k[layer].shape[1], q.shape[1]
        mask = torch.ones(t, n, dtype=torch.bool).tril(n - t)
        o, lse, w = reference.attention(q[None], self.k[layer][None], self.v[layer][None], mask=mask, scale=scale)
        return o[0], lse[0], w[0]


def _attend(c, s, seq, layer, t, **kw):
    q = seq.rand(seq.h, t, seq.d)
    k, v = seq.new_kv(t)
    res = c.attend(s, layer, q, k, v, **kw)
    seq.add(layer, k, v)
    return q, res


TOL = {torch.float32: 2e-6, torch.float64: 1e-12}


@pytest.mark.parametrize("transport", ["auto", "http"])
def test_exact_against_the_float64_formula(service, transport):
    """Several sessions (GQA, MQA, float32 / float64), ragged lengths, appends, one- and multi-layer attends,
    LSE and every rank's weight shard, all against the formula -- through the tensor door (the client's default)
    and over HTTP."""
    c = service.client(transport=transport)
    specs = [(2, 8, 2, 16, torch.float32), (1, 4, 1, 8, torch.float64), (2, 8, 2, 16, torch.float32)]
    sessions, seqs = [], []
    for i, (nl, h, hkv, d, dt) in enumerate(specs):
        sessions.append(c.create_session(layers=nl, heads=h, kv_heads=hkv, head_dim=d, capacity=300,
                                         dtype=str(dt).removeprefix("torch.")))
        seqs.append(Seq(nl, h, hkv, d, dt, seed=i))
    for s, seq, n0 in zip(sessions, seqs, (37, 1, 70)):  # ragged prefixes, not multiples of the block (16)
        for layer in range(len(seq.k)):
            k, v = seq.new_kv(n0 + layer)
            assert c.append(s, layer, k, v) == n0 + layer
            seq.add(layer, k, v)
    for t in (1, 3, 1):
        for s, seq in zip(sessions, seqs):
            q, (out, lse, shards) = _attend(c, s, seq, 0, t, return_lse=True, return_weights=True)
            ro, rl, rw = seq.ref(0, q)
            assert out.dtype == seq.dtype and out.shape == q.shape
            assert (out.double() - ro).abs().max() <= TOL[seq.dtype]
            assert (lse.double() - rl).abs().max() <= TOL[seq.dtype] * 10
            w = torch.zeros_like(rw)
            seen = torch.cat([p for p, _ in shards])
            assert sorted(seen.tolist()) == list(range(seq.k[0].shape[1]))  # every key on exactly one rank
            if seq.k[0].shape[1] > 16:  # past the first round-robin block: both ranks hold keys
                assert all(len(p) for p, _ in shards)
            for p, ws in shards:
                assert ws.shape == (seq.h, t, len(p))  # like q: no layer dimension for one layer
                w[..., p] = ws.double()
            assert (w - rw).abs().max() <= TOL[seq.dtype]
    # several layers in one request; numpy in, numpy out; a custom scale
    s, seq = sessions[0], seqs[0]
    q = seq.rand(2, seq.h, 2, seq.d)
    kv = [seq.new_kv(2) for _ in range(2)]
    k, v = torch.stack([a for a, _ in kv]), torch.stack([b for _, b in kv])
    out = c.attend(s, [0, 1], q.numpy(), k.numpy(), v.numpy(), scale=0.3)
    assert isinstance(out, np.ndarray) and out.shape == (2, seq.h, 2, seq.d)
    for layer in range(2):
        seq.add(layer, k[layer], v[layer])
        ro, _, _ = seq.ref(layer, q[layer], scale=0.3)
        assert np.abs(out[layer] - ro.numpy()).max() <= TOL[seq.dtype]
    st = c.stats()
    for s, seq in zip(sessions, seqs):  # every open session listed (an id a timed-out create never returned too)
        assert st["session_ids"][s] == {"length": seq.k[0].shape[1], "capacity": 300}, st["session_ids"]
    used = [r["used_tokens"] for r in st["ranks"]]
    assert sum(used) >= sum(sum(x.shape[1] for x in seq.k) for seq in seqs) and min(used) > 0
    for s in sessions:
        c.delete_session(s)
    with pytest.raises(ServeError) as e:
        c.attend(sessions[0], 0, q[0], k[0], v[0])
    assert e.value.status == 404 and sessions[0] in e.value.message
    assert c._door == ("" if transport == "http" else f"tcp://127.0.0.1:{c.health()['tensor_port']}")


@pytest.mark.parametrize("transport", ["auto", "http"])
def test_attend_many_sessions_in_one_request(service, transport):
    """``Client.attend_many``: rows of several sessions -- two arenas (capacities differ), ragged lengths, one and
    several layers, LSE -- exact in one request; a request with one bad row is refused whole: nothing is stored for
    the valid rows (their next answers stay exact). Through the tensor door and over HTTP."""
    c = service.client(transport=transport)
    caps = (100, 100, 120)  # the third session's shape differs: its own arena, a second group in the same step
    sessions = [c.create_session(layers=2, heads=4, kv_heads=2, head_dim=8, capacity=cap) for cap in caps]
    seqs = [Seq(2, 4, 2, 8, seed=20 + i) for i in range(3)]
    for s, seq, n0 in zip(sessions, seqs, (5, 33, 18)):
        for layer in (0, 1):
            k, v = seq.new_kv(n0)
            c.append(s, layer, k, v)
            seq.add(layer, k, v)

    def step(rows, layers, t):
        q = torch.stack([torch.stack([seqs[i].rand(4, t, 8) for _ in layers]) for i in rows])  # (B, L, H, T, D)
        kv = [[seqs[i].new_kv(t) for _ in layers] for i in rows]
        k = torch.stack([torch.stack([a for a, _ in row]) for row in kv])
        v = torch.stack([torch.stack([b for _, b in row]) for row in kv])
        return q, k, v

    for rows, layers, t in (([0, 1, 2], [0, 1], 1), ([2, 0], [1], 2), ([1], [0, 1], 1)):
        q, k, v = step(rows, layers, t)
        one = len(layers) == 1
        out, lse = c.attend_many([sessions[i] for i in rows], layers[0] if one else layers,
                                 *(x[:, 0] if one else x for x in (q, k, v)), return_lse=True)
        out, lse = (out[:, None], lse[:, None]) if one else (out, lse)
        assert out.shape == q.shape and lse.shape == q.shape[:-1]
        for b, i in enumerate(rows):
            for j, layer in enumerate(layers):
                seqs[i].add(layer, k[b, j], v[b, j])
                ro, rl, _ = seqs[i].ref(layer, q[b, j])
                assert (out[b, j].double() - ro).abs().max() <= TOL[torch.float32], (rows, layers, b, j)
                assert (lse[b, j].double() - rl).abs().max() <= 10 * TOL[torch.float32]
    lengths = [seq.k[0].shape[1] for seq in seqs]
    # one unknown session in the batch: 404 naming it and its row; the others' K/V not stored
    q, k, v = step([0, 1], [0], 1)
    with pytest.raises(ServeError) as e:
        c.attend_many([sessions[0], "nope", sessions[1]][:3], 0, *(torch.cat([x[:, 0], x[:1, 0]]) for x in (q, k, v)))
    assert e.value.status == 404 and "'nope' (row 1)" in e.value.message and "nothing was stored" in e.value.message
    with pytest.raises(ServeError) as e:  # a row of the wrong head count
        c.attend_many(sessions[:2], 0, torch.zeros(2, 3, 1, 8), torch.zeros(2, 2, 1, 8), torch.zeros(2, 2, 1, 8))
    assert e.value.status == 400 and "row 0" in e.value.message
    with pytest.raises(ServeError) as e:  # the same session twice
        c.attend_many([sessions[0]] * 2, 0, q[:, 0], k[:, 0], v[:, 0])
    assert e.value.status == 400 and "distinct" in e.value.message
    for i in (0, 1):  # nothing of the refused requests was stored: the next single attends are exact
        q1, out = _attend(c, sessions[i], seqs[i], 0, 1)
        assert seqs[i].k[0].shape[1] == lengths[i] + 1
        assert (out.double() - seqs[i].ref(0, q1)[0]).abs().max() <= TOL[torch.float32]
    for s in sessions:
        c.delete_session(s)


def _post(address, path, body, ctype=CONTENT_TYPE, headers=None):
    req = urllib.request.Request(address + path, data=body, method="POST",
                                 headers={"Content-Type": ctype, **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())["error"]


def _door(address: str, frames: list[bytes], token: str | None = None) -> tuple[int, str | bytes]:
    """One raw tensor-door request ``frames`` (``[rid, body]``): ``(status, the error message or the body)``."""
    import zmq

    port = Client(address, token=token).health()["tensor_port"]
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://127.0.0.1:{port}")
    try:
        sock.send_multipart(frames)
        assert sock.poll(30_000), "no answer from the tensor door within 30 s"
        rid, status, data = sock.recv_multipart()
        assert rid == frames[0]
        return int(status), json.loads(data)["error"] if int(status) >= 400 else data
    finally:
        sock.close()


@pytest.mark.parametrize("transport", ["auto", "http"])
def test_odd_strides_and_nan_inputs(service, transport):
    """Non-contiguous torch tensors and Fortran-order numpy arrays give the float64 formula's answer; a NaN query
    head gives NaN in that head only (never a silent 0), the other heads stay exact."""
    c = service.client(transport=transport)
    s = c.create_session(layers=1, heads=4, kv_heads=2, head_dim=8, capacity=64)
    g = torch.Generator().manual_seed(7)
    k = torch.randn(2, 8, 10, generator=g).transpose(1, 2)  # (2, 10, 8), strides (80, 1, 10)
    v = torch.randn(10, 2, 8, generator=g).permute(1, 0, 2)
    assert not k.is_contiguous() and not v.is_contiguous()
    c.append(s, 0, k, v)
    for i in range(3):
        q = torch.randn(4, 8, 1, generator=g).transpose(1, 2)  # (4, 1, 8), not contiguous
        k1, v1 = torch.randn(2, 1, 8, generator=g), torch.randn(2, 1, 8, generator=g)
        k, v = torch.cat([k, k1], 1), torch.cat([v, v1], 1)
        ro = reference.attention(q[None].double(), k[None].double(), v[None].double())[0][0]
        if i == 0:
            out = c.attend(s, 0, q, k1, v1)
        elif i == 1:
            out = torch.from_numpy(c.attend(s, 0, *(np.asfortranarray(x.numpy()) for x in (q, k1, v1))))
        else:
            q[1] = float("nan")
            out = c.attend(s, 0, q, k1, v1)
            assert torch.isnan(out[1]).all()
            out, ro = out[[0, 2, 3]], ro[[0, 2, 3]]
        assert (out.double() - ro).abs().max() <= TOL[torch.float32], i
    c.delete_session(s)


def _raw_frame(header: bytes, nbytes: int = 0) -> bytes:
    return struct.pack("<I", len(header)) + header + bytes(nbytes)


def test_malformed_requests_are_refused_and_change_nothing(service):
    """Two sessions with the same history; one gets every kind of bad request. Their next attends are bitwise
    equal, and the service keeps serving."""
    c = service.client()
    a, b = (c.create_session(layers=2, heads=4, kv_heads=2, head_dim=8, capacity=64) for _ in range(2))
    seq = Seq(2, 4, 2, 8, seed=5)
    k, v = seq.new_kv(60)
    for s in (a, b):
        c.append(s, 0, k, v)
    q = seq.rand(4, 1, 8)
    k1, v1 = seq.new_kv(1)
    good = encode({"layers": [0]}, {"q": q[None], "k": k1[None], "v": v1[None]})
    path = f"/v1/sessions/{a}/attend"
    cases = [  # (body, content type, status, words in the message)
        (pickle.dumps({"q": q, "k": k1, "v": v1}), CONTENT_TYPE, 400, "no pickle"),
        (pickle.dumps({"q": q}), "application/python-pickle", 415, "application/x-seqpar"),
        (struct.pack("<I", 5) + b"{bad}", CONTENT_TYPE, 400, "not UTF-8 JSON"),
        (b"\x01", CONTENT_TYPE, 400, "too short"),
        (good[:-7], CONTENT_TYPE, 400, "truncated body"),
        (good + b"xx", CONTENT_TYPE, 400, "after the last tensor"),
        (encode({"layers": [0]}, {"q": q[None].double(), "k": k1[None], "v": v1[None]}), CONTENT_TYPE, 400,
         "q.dtype = float64"),
        (encode({"layers": [0]}, {"q": q[None, :2], "k": k1[None], "v": v1[None]}), CONTENT_TYPE, 400, "q.shape"),
        (encode({"layers": [0]}, {"q": q[None], "k": k1[None, :1], "v": v1[None]}), CONTENT_TYPE, 400, "k.shape"),
        (encode({"layers": [2]}, {"q": q[None], "k": k1[None], "v": v1[None]}), CONTENT_TYPE, 400, "unknown layer 2"),
        (encode({"layers": [0]}, {"q": q[None], "k": k1[None]}), CONTENT_TYPE, 400, "missing tensor 'v'"),
        (encode({"layers": [0]}, {"q": q[None], "k": seq.new_kv(5)[0][None], "v": seq.new_kv(5)[1][None]}),
         CONTENT_TYPE, 400, "k.shape"),
        (encode({"layers": [0], "scale": -1}, {"q": q[None], "k": k1[None], "v": v1[None]}), CONTENT_TYPE, 400,
         "scale"),
    ]
    for body, ctype, status, words in cases:
        got, msg = _post(service.address, path, body, ctype)
        assert (got, True) == (status, words in msg), (words, got, msg)
    got, msg = _post(service.address, "/v1/sessions/nope/attend", good)
    assert got == 404 and "unknown session 'nope'" in msg
    door = {"op": "attend", "session": a, "layers": [0]}
    tensors = {"q": q[None], "k": k1[None], "v": v1[None]}
    door_cases = [  # the tensor door: (body, status, words in the message)
        (pickle.dumps({"q": q, "k": k1, "v": v1}), 400, "no pickle"),
        (struct.pack("<I", 5) + b"{bad}", 400, "not UTF-8 JSON"),
        (encode(door, tensors)[:-7], 400, "truncated body"),
        (encode({**door, "op": None}, tensors), 400, "op = None; the tensor door takes append, attend, attend_many"),
        (encode({**door, "op": "create"}, tensors), 400, "op = 'create'"),
        (encode({k: x for k, x in door.items() if k != "session"}, tensors), 400, "session = None"),
        (encode({**door, "session": "nope"}, tensors), 404, "unknown session 'nope'"),
        (encode(door, {**tensors, "q": q[None].double()}), 400, "q.dtype = float64"),
        (encode(door, {**tensors, "k": k1[None, :1, :0]}), 400, "k.shape"),
        (encode({**door, "layers": [5]}, tensors), 400, "unknown layer 5"),
        (encode({**door, "op": "append", "layer": 0}, {"k": k1, "v": v1.double()}), 400, "v.dtype = float64"),
        (encode({**door, "scale": 10**400}, tensors), 400, "scale = 1000"),  # beyond float: once a crash
        (_raw_frame(b"[" * 200_000), 400, "RecursionError"),  # once a crash of the whole service, like the next two
        (_raw_frame(json.dumps({"tensors": [{"name": [1], "dtype": "float32", "shape": [1]}]}).encode(), 4), 400,
         "expected a string"),
        (_raw_frame(json.dumps({"tensors": [{"name": "q", "dtype": "float32", "shape": [0, 2**70]}]}).encode()), 400,
         "0 .. 2**48 - 1"),
    ]
    for i, (body, status, words) in enumerate(door_cases):
        got, msg = _door(service.address, [b"r%d" % i, body])
        assert (got, True) == (status, words in msg), (words, got, msg)
    for frames in ([b"r"], [b"r", encode(door, tensors), b"more"]):
        got, msg = _door(service.address, frames)
        assert got == 400 and "2 frames [rid, body]" in msg, (got, msg)
    # a full cache: 60 + 5 > 64 -> nothing stored (then 4 more fit exactly)
    k5, v5 = seq.new_kv(5)
    with pytest.raises(ServeError) as e:
        c.append(a, 0, k5, v5)
    assert e.value.status == 409 and f"session '{a}' is full" in e.value.message and "capacity = 64" in e.value.message
    got, msg = _post(service.address, "/v1/sessions", b'{"layers": 1, "heads": 3, "kv_heads": 2, "head_dim": 8, '
                     b'"capacity": 9}', "application/json")
    assert got == 400 and "not a multiple of kv_heads = 2" in msg
    got, msg = _post(service.address, "/v1/sessions", b'{"layers": 1, "heads": 4, "kv_heads": 2, "head_dim": 8, '
                     b'"capacity": 9, "dtype": "int8"}', "application/json")
    assert got == 400 and "dtype = 'int8'" in msg
    got, msg = _post(service.address, "/v1/sessions", b'{"layers": 1, "heads": 4, "kv_heads": 2, "head_dim": 8, '
                     b'"capacity": 9, "dtype": []}', "application/json")
    assert got == 400 and "dtype = []" in msg  # an unhashable dtype: once a crash of the whole service
    outs = [c.attend(s, 0, q, k1, v1, return_lse=True) for s in (a, b)]
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    seq.add(0, k, v)
    seq.add(0, k1, v1)
    assert (outs[0][0].double() - seq.ref(0, q)[0]).abs().max() <= TOL[torch.float32]
    assert c.health()["status"] == "ok"
    for s in (a, b):
        c.delete_session(s)


def test_load_16_clients_mixed_requests_every_answer_exact(service):
    """16 concurrent clients, each its own session (two arenas of 8), mixed appends and attends: every
    answer exact against the float64 formula, the lengths count every request exactly once, and requests
    were batched (more than one per step)."""
    clients, per_client = 16, int(os.environ.get("SEQPAR_SERVE_LOAD", "200"))
    c0 = service.client()
    before = c0.stats()
    errors: list[str] = []

    def work(i: int) -> None:
        try:
            with service.client(timeout=60) as c:
                seq = Seq(1, 4, 2, 16, seed=100 + i)
                s = c.create_session(layers=1, heads=4, kv_heads=2, head_dim=16, capacity=2 * per_client + 8)
                n = 0
                for j in range(per_client):
                    if j % 3 == 0:
                        k, v = seq.new_kv(1 + j % 2)
                        n = c.append(s, 0, k, v)
                        seq.add(0, k, v)
                    else:
                        q, (out, lse) = _attend(c, s, seq, 0, 1, return_lse=True)
                        ro, rl, _ = seq.ref(0, q)
                        err = max((out.double() - ro).abs().max().item(), (lse.double() - rl).abs().max().item() / 10)
                        if err > TOL[torch.float32]:
                            errors.append(f"client {i} request {j}: error {err}")
                    if seq.k[0].shape[1] != n and j % 3 == 0:
                        errors.append(f"client {i}: service length {n}, sent {seq.k[0].shape[1]}")
                final = c.append(s, 0, *seq.new_kv(1))
                if final != seq.k[0].shape[1] + 1:
                    errors.append(f"client {i}: final length {final}, expected {seq.k[0].shape[1] + 1}")
                c.delete_session(s)
        except Exception as e:  # noqa: BLE001 - collected and reported below
            errors.append(f"client {i}: {e!r}")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors[:5]
    after = c0.stats()
    ok = {k: after["requests"].get(k, {}).get("200", 0) - before["requests"].get(k, {}).get("200", 0)
          for k in ("append", "attend")}
    n_attend = clients * sum(1 for j in range(per_client) if j % 3)
    assert ok == {"append": clients * (per_client - n_attend // clients + 1), "attend": n_attend}
    steps = after["steps"] - before["steps"]
    assert steps < sum(ok.values()), "no request was batched with another"


def test_limits_and_token():
    """A token on loopback: checked on every request. Session count, request size, per-rank capacity: 4xx with
    the numbers."""
    token = "s3cret-token-123"
    s = Service("--token", token, "--set", "serve.max_sessions=2", "--set", "serve.max_request_bytes=4096",
                "--set", "serve.capacity_tokens=2000", "--set", "serve.session_slots=2", "--timeout", "30")
    try:
        for bad in (None, "wrong-token-1234"):
            with pytest.raises(ServeError) as e:
                s.client(token=bad).health()
            assert e.value.status == 401
        with pytest.raises(ServeError) as e:
            s.client(token=token[:-1] + "4").stats()
        assert e.value.status == 401
        c = s.client(token=token)
        assert c.health()["status"] == "ok"
        with pytest.raises(ServeError) as e:  # 2 slots x (ceil(1000 / 2) + 17) x 2 layers = 2068 > 2000
            c.create_session(layers=2, heads=2, kv_heads=1, head_dim=8, capacity=1000)
        assert e.value.status == 409 and "2068 tokens per rank" in e.value.message and "2000" in e.value.message
        a = c.create_session(layers=1, heads=2, kv_heads=1, head_dim=8, capacity=100)
        c.create_session(layers=1, heads=2, kv_heads=1, head_dim=8, capacity=100)
        with pytest.raises(ServeError) as e:
            c.create_session(layers=1, heads=2, kv_heads=1, head_dim=8, capacity=100)
        assert e.value.status == 429 and "2 sessions open, serve.max_sessions = 2" in e.value.message
        big = torch.zeros(1, 100, 8)
        for transport in ("http", "auto"):  # HTTP: the service's 413; the door: the client checks before sending
            with pytest.raises(ServeError) as e:
                c.append(a, 0, big, big) if transport == "auto" else s.client(token=token, transport="http").append(
                    a, 0, big, big)
            assert e.value.status == 413 and "serve.max_request_bytes = 4096" in e.value.message
        head = {"op": "append", "session": a, "layer": 0}
        got, msg = _door(s.address, [b"1", encode({**head, "auth": token}, {"k": big, "v": big})], token)
        assert got == 413 and "request body of 6" in msg and "serve.max_request_bytes = 4096" in msg  # a raw sender
        for auth in ({}, {"auth": "wrong-token-1234"}, {"auth": 12345}, {"auth": "\ud800"}):
            got, msg = _door(s.address, [b"2", encode({**head, **auth}, {"k": big[:, :1], "v": big[:, :1]})], token)
            assert got == 401 and "token" in msg, (auth, got, msg)
        assert c.append(a, 0, big[:, :10], big[:, :10]) == 10
        c.delete_session(a)
        with pytest.raises(ServeError) as e:  # within the token budget, but not in this machine's memory
            c.create_session(layers=1, heads=65536, kv_heads=65536, head_dim=65536, capacity=100)  # 4.6 TiB
        assert e.value.status == 409 and "MemAvailable" in e.value.message
    finally:
        rc = s.stop()
    assert rc == 0


def test_non_loopback_host_needs_a_token():
    env = {k: v for k, v in os.environ.items() if k != "SEQPAR_SERVE_TOKEN"}
    env["PYTHONPATH"] = str(ROOT)
    r = subprocess.run([sys.executable, "-m", "seqpar_tools", "serve", "--host", "0.0.0.0", "--port", "0"],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 2 and "not a loopback address" in r.stderr and "SEQPAR_SERVE_TOKEN" in r.stderr


def _pending_attends(s: Service, n: int, door: bool):
    """``n`` clients each send an attend that cannot complete (rank 1 is stopped): the first over HTTP (the
    service reads it; the step loop then waits on rank 1), the others over HTTP too (all ``n`` pending: the HTTP
    thread reads them), or (``door``) through the tensor door: they wait in its socket, unread, and are sent
    within milliseconds, while the heartbeat timeout is seconds away. Returns the threads and their outcomes."""
    c = s.client()
    sid = c.create_session(layers=1, heads=2, kv_heads=1, head_dim=8, capacity=64)
    c.append(sid, 0, torch.ones(1, 4, 8), torch.ones(1, 4, 8))
    clients = [s.client(timeout=60, transport="auto" if i and door else "http") for i in range(n)]
    for cl in clients:
        cl.health()  # connected before the stall: the door clients only send below
        cl._door_socket()
    os.kill(s.ranks[1], signal.SIGSTOP)
    results: list = [None] * n

    def one(i):
        t0 = time.monotonic()
        try:
            clients[i].attend(sid, 0, torch.ones(2, 1, 8), torch.ones(1, 1, 8), torch.ones(1, 1, 8))
            results[i] = ("answered", time.monotonic() - t0)
        except ServeError as e:
            results[i] = (e.status, e.message, time.monotonic() - t0)
        except ServeUnavailable as e:
            results[i] = ("unavailable", str(e))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    threads[0].start()
    wait_for(lambda: c.health()["pending"] == 1, 30, "the first request pending")
    for t in threads[1:]:
        t.start()
    if not door:
        wait_for(lambda: c.health()["pending"] == n, 30, f"{n} pending requests")
    return threads, results


def test_a_stalled_rank_fails_every_pending_request_and_the_service_exits():
    s = Service("--timeout", "2")
    try:
        threads, results = _pending_attends(s, 3, door=True)
        for t in threads:
            t.join(timeout=60)
        rc = s.wait(60)
    finally:
        if s.proc.poll() is None:
            s.kill()
    assert rc == 1
    for r in results:
        assert r[0] == 503 and "rank(s) [1]" in r[1] and "heartbeat" in r[1], r
        assert r[2] < 2 + 10  # the timeout, plus the time to notice and answer on a loaded machine
    assert "rank(s) [1]" in "".join(s.err)


def test_a_killed_rank_fails_every_pending_request_before_the_timeout():
    s = Service("--timeout", "30")
    try:
        threads, results = _pending_attends(s, 2, door=False)
        os.kill(s.ranks[1], signal.SIGKILL)
        for t in threads:
            t.join(timeout=60)
        rc = s.wait(60)
    finally:
        if s.proc.poll() is None:
            s.kill()
    assert rc == 1
    for r in results:
        assert r[0] == 503 and "rank(s) [1]" in r[1], r
        assert r[2] < 30  # noticed from the failed collective, not the 30 s timeout


def test_the_client_finds_a_restarted_service_and_fails_at_once_when_it_is_gone():
    """A door client whose service was restarted at the same address (a new tensor door) finds it -- the old
    session is unknown there (404), a new one is exact; when the service is gone, the next request raises
    ServeUnavailable at once (the HTTP health check is refused), not at the client's 60 s timeout."""
    a = Service()
    port = a.address.rsplit(":", 1)[1]
    c = a.client(timeout=60)
    sid = c.create_session(layers=1, heads=2, kv_heads=1, head_dim=8, capacity=64)
    assert c.append(sid, 0, torch.ones(1, 3, 8), torch.ones(1, 3, 8)) == 3
    old = c._door
    assert a.stop() == 0
    b = Service("--port", port)
    try:
        assert b.address == a.address
        with pytest.raises(ServeError) as e:
            c.append(sid, 0, torch.ones(1, 1, 8), torch.ones(1, 1, 8))
        assert e.value.status == 404 and sid in e.value.message
        assert c._door != old and c._door == f"tcp://127.0.0.1:{c.health()['tensor_port']}"
        s2 = c.create_session(layers=1, heads=2, kv_heads=1, head_dim=8, capacity=64)
        v = torch.randn(1, 1, 8)
        out = c.attend(s2, 0, torch.randn(2, 1, 8), torch.randn(1, 1, 8), v)  # one key: the output is its value
        assert (out - v).abs().max() <= 1e-6
    finally:
        assert b.stop() == 0
    for _ in range(2):  # the second asks HTTP's health for the door, and is refused too
        t0 = time.monotonic()
        with pytest.raises(ServeUnavailable):
            c.attend(s2, 0, torch.randn(2, 1, 8), torch.randn(1, 1, 8), v)
        assert time.monotonic() - t0 < 30
    third = Service("--port", port)  # back again: the client uses its door again, not HTTP for good
    try:
        s3 = c.create_session(layers=1, heads=2, kv_heads=1, head_dim=8, capacity=64)
        assert (c.attend(s3, 0, torch.randn(2, 1, 8), torch.randn(1, 1, 8), v) - v).abs().max() <= 1e-6
        assert c._door == f"tcp://127.0.0.1:{c.health()['tensor_port']}" and c._sock is not None
    finally:
        assert third.stop() == 0


def test_a_door_that_does_not_connect_while_http_answers_means_http():
    """A client that reaches the HTTP port but not the tensor door (only HTTP forwarded: here a TCP forwarder on
    127.0.0.2) warns once and sends its appends and attends over HTTP -- exact -- instead of timing out."""
    import socket
    import socketserver

    s = Service()
    http_port = int(s.address.rsplit(":", 1)[1])

    class Forward(socketserver.BaseRequestHandler):  # one HTTP connection, both directions
        def handle(self):
            with socket.create_connection(("127.0.0.1", http_port)) as up:
                def pump(a, b):
                    while data := a.recv(65536):
                        b.sendall(data)
                    b.shutdown(socket.SHUT_WR)

                t = threading.Thread(target=pump, args=(up, self.request), daemon=True)
                t.start()
                pump(self.request, up)
                t.join(30)

    fwd = socketserver.ThreadingTCPServer(("127.0.0.2", 0), Forward)
    fwd.daemon_threads = True
    threading.Thread(target=fwd.serve_forever, daemon=True).start()
    box = {"port": fwd.server_address[1]}
    try:
        c = Client(f"http://127.0.0.2:{box['port']}", timeout=30)
        sid = c.create_session(layers=1, heads=2, kv_heads=1, head_dim=8, capacity=64)
        v = torch.randn(1, 1, 8)
        with pytest.warns(RuntimeWarning, match="does not connect from here"):
            out = c.attend(sid, 0, torch.randn(2, 1, 8), torch.randn(1, 1, 8), v)
        assert (out - v).abs().max() <= 1e-6 and c.transport == "http" and c._door == ""
        assert c.append(sid, 0, torch.randn(1, 2, 8), torch.randn(1, 2, 8)) == 3  # HTTP from now on, no wait
    finally:
        c.close()
        fwd.shutdown()
        fwd.server_close()
        assert s.stop() == 0


@pytest.mark.parametrize("batch, prompt, new", [(1, 1024, 32), (3, 200, 12)])
def test_hf_generation_with_the_cache_on_the_service(service, batch, prompt, new):
    """A single-process tiny random-init Llama generates 32 tokens after a 1k prompt (and a batch of 3 prompts:
    one session per row, ``attend_many``) with its KV cache held by the service (attn_implementation=
    "seqpar_remote"): the tokens of local sdpa generation, logits within 1e-5."""
    transformers = pytest.importorskip("transformers")
    import seqpar.hf_remote as hr

    vocab = 97

    def model(attn):
        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(
            vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=prompt + new + 8, attention_dropout=0.0,
            bos_token_id=None, eos_token_id=None, pad_token_id=0)
        return transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn).float().eval()

    ids = torch.randint(1, vocab, (batch, prompt), generator=torch.Generator().manual_seed(1))

    def generate(m, cache=None):
        with torch.no_grad():
            out = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                             do_sample=False, cache=cache, output_logits=True, return_dict_in_generate=True)
        return out.sequences[:, prompt:], torch.stack(out.logits, 1)

    want_tokens, want_logits = generate(model("sdpa"))
    remote = model(hr.NAME)
    with service.client() as c:
        cache = hr.RemoteCache(remote.config, c, max_cache_len=prompt + new, batch_size=batch)
        tokens, logits = generate(remote, cache)
        held = [r["used_tokens"] for r in c.stats()["ranks"]]
        cache.close()
    assert torch.equal(tokens, want_tokens), (tokens != want_tokens).nonzero()[:5]
    err = ((logits - want_logits).abs().amax(-1) / want_logits.abs().amax(-1)).max().item()
    assert err < 1e-5, err
    assert all(held) and sum(held) >= 2 * batch * (prompt + new - 1)  # both ranks hold part of both layers' K/V


def test_hf_remote_cache_under_another_attention_is_refused(service):
    """A RemoteCache given to a model whose attention is not seqpar_remote (here: a second model built from the same
    config object switched it to sdpa) would attend the new tokens only -- it raises instead of generating."""
    transformers = pytest.importorskip("transformers")
    import seqpar.hf_remote as hr

    cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   bos_token_id=None, eos_token_id=None, pad_token_id=0)
    remote = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=hr.NAME).eval()
    transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")  # rewrites the shared config
    with service.client() as c:
        cache = hr.RemoteCache(remote.config, c, max_cache_len=32)
        with pytest.raises(ValueError, match="implementation is 'sdpa', not 'seqpar_remote'"), torch.no_grad():
            remote.generate(torch.ones(1, 8, dtype=torch.long), cache=cache, max_new_tokens=4, do_sample=False)
        cache.close()


def test_sigterm_drains_in_flight_requests_and_exits_0():
    """Clients keep attending while SIGTERM arrives: every request answered before the drain is exact, later ones
    get 503 'draining' (or find the service gone); nothing hangs; exit 0, no rank left."""
    s = Service("--timeout", "30")
    outcomes: list[list] = [[] for _ in range(4)]

    def work(i):
        seq = Seq(1, 4, 2, 8, seed=i)
        try:
            with s.client(timeout=60) as c:
                sid = c.create_session(layers=1, heads=4, kv_heads=2, head_dim=8, capacity=4000)
                for _ in range(3000):
                    q, out = _attend(c, sid, seq, 0, 1)
                    outcomes[i].append(float((out.double() - seq.ref(0, q)[0]).abs().max()))
        except ServeError as e:
            outcomes[i].append((e.status, e.message))
        except ServeUnavailable as e:
            outcomes[i].append(("unavailable", str(e)))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    wait_for(lambda: all(len(o) > 5 for o in outcomes), 60, "every client answered a few times")
    rc = s.stop()
    for t in threads:
        t.join(timeout=60)
    assert rc == 0 and not any(t.is_alive() for t in threads)
    for o in outcomes:
        assert all(isinstance(x, float) and x <= TOL[torch.float32] for x in o[:-1]), o[-3:]
        last = o[-1]
        assert isinstance(last, tuple), last
        assert last[0] == "unavailable" or (last[0] == 503 and "draining" in last[1]), last


def test_bad_serve_config_is_refused_before_any_rank_starts(capsys):
    from seqpar_tools.cli import main

    rc = main(["serve", "--port", "70000", "--set", "serve.max_batch=0", "--set", "serve.batch_window_ms=-1"])
    err = capsys.readouterr().err
    assert rc == 2
    for words in ("serve.port = 70000", "serve.max_batch = 0: must be >= 1", "serve.batch_window_ms = -1"):
        assert words in err, err
    for key, val in (("run.device", "cuda"), ("run.backend", "nccl")):  # a GPU service is not built: not ignored
        assert main(["serve", "--port", "0", "--set", f"{key}={val}"]) == 2
        err = capsys.readouterr().err
        assert f"{key} = '{val}'" in err and "CPU memory" in err, err


@pytest.mark.parametrize("which", ["serve.port", "serve.tensor_port"])
def test_a_port_in_use_is_one_clear_error_and_every_rank_stops(which):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if k != "SEQPAR_SERVE_TOKEN"}
        env["PYTHONPATH"] = str(ROOT)
        t0 = time.monotonic()
        r = subprocess.run([sys.executable, "-m", "seqpar_tools", "serve", "--port", "0", "--set", f"{which}={port}"],
                           capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 1 and "cannot listen on 127.0.0.1" in r.stderr and f"{which} = {port}" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and time.monotonic() - t0 < 30  # not the other rank's 2 x timeout_s wait


def _engine_batch(rank, world_size):
    """A batched attend over scattered slots (two runs) with weights, through the engine on every rank."""
    from seqpar_tools.serve.engine import Engine

    eng = Engine(session_slots=4, block_size=4)
    spec = {"layers": 2, "heads": 4, "kv_heads": 2, "head_dim": 8, "dtype": "float64", "capacity": 64}
    for i in range(4):
        eng.apply([{"op": "create", "sid": f"s{i}", "aid": 0, "new_arena": i == 0, **spec}], {}, rank, world_size)
    eng.apply([{"op": "delete", "sid": "s1"}], {}, rank, world_size)  # live slots 0, 2, 3
    seqs = {sid: Seq(2, 4, 2, 8, torch.float64, seed=i) for i, sid in enumerate(("s0", "s2", "s3"))}
    for i, (sid, seq) in enumerate(seqs.items()):
        for layer in range(2):
            k, v = seq.new_kv(9 + 5 * i)  # ragged
            eng.apply([{"op": "append", "sid": sid, "layer": layer}], {"0.k": k, "0.v": v}, rank, world_size)
            seq.add(layer, k, v)
    order = ["s3", "s0", "s2"]  # not in slot order
    qs, ks, vs = [], [], []
    for sid in order:
        seq = seqs[sid]
        qs.append(seq.rand(2, 4, 2, 8))
        kv = [seq.new_kv(2) for _ in range(2)]
        ks.append(torch.stack([a for a, _ in kv]))
        vs.append(torch.stack([b for _, b in kv]))
        for layer in range(2):
            seq.add(layer, *kv[layer])
    (res,) = eng.apply([{"op": "attend", "sids": order, "layers": [0, 1], "scale": None, "weights": True}],
                       {"0.q": torch.stack(qs), "0.k": torch.stack(ks), "0.v": torch.stack(vs)}, rank, world_size)
    errs = []
    for b, sid in enumerate(order):
        for layer in range(2):
            ro, rl, rw = seqs[sid].ref(layer, qs[b][layer])
            errs.append(float((res["out"][b, layer] - ro).abs().max()))
            errs.append(float((res["lse"][b, layer] - rl).abs().max()))
            if rank == 0:
                w = torch.zeros_like(rw)
                for pos, ws in res["weights"][b]:
                    w[..., pos] = ws[layer]
                errs.append(float((w - rw).abs().max()))
    return max(errs)


def test_engine_batch_over_scattered_slots_is_exact(dist):
    assert max(dist(2, _engine_batch, timeout=120)) < 1e-12


@contextlib.contextmanager
def _launched(script: str, env: dict, seed: int):
    """``launch/<script> serve`` started in its own process group: gives ``(proc, output lines so far)`` once rank 0
    served one exact attend (and reports two ranks); the group is killed if the test leaves it running."""
    env = {**{k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "SEQPAR_SERVE_TOKEN")},
           "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", **env}
    proc = subprocess.Popen(["bash", str(ROOT / "launch" / script), "serve", "--port", "0", "--timeout", "20"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT,
                            start_new_session=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    try:
        address, seen = None, []
        while address is None:
            line = lines.get(timeout=START_S)
            seen.append(line)
            if "ready on " in line:
                address = line.split("ready on ")[1].split()[0]
        c = Client(address)
        seq = Seq(1, 4, 2, 8, seed=seed)
        sid = c.create_session(layers=1, heads=4, kv_heads=2, head_dim=8, capacity=64)
        q, out = _attend(c, sid, seq, 0, 5)
        assert (out.double() - seq.ref(0, q)[0]).abs().max() <= TOL[torch.float32]
        assert c.stats()["world_size"] == 2
        yield proc, seen
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def _launched_ranks(proc, marker: str) -> list[int]:
    """Pids of the launcher's rank processes (descendants of ``proc`` whose command line or environment shows it)."""
    return [int(d.name) for d in Path("/proc").iterdir() if d.name.isdigit() and proc.pid in _ancestors(int(d.name))
            and "seqpar_tools serve" in _cmdline(int(d.name)) and (marker in _cmdline(int(d.name))
                                                                   or _environ(d).get(marker))]


@pytest.mark.timeout(START_S + 90)
def test_under_torchrun_rank_0_serves_and_a_drain_stops_every_rank():
    """``launch/torchrun.sh serve``: the ranks join torchrun's job, rank 0 serves; SIGTERM to rank 0 drains and
    stops every rank, and torchrun exits 0."""
    with _launched("torchrun.sh", {"NPROC": "2"}, seed=3) as (proc, seen):
        workers = _launched_ranks(proc, "TORCHELASTIC_RUN_ID")
        rank0 = [p for p in workers if _environ(Path(f"/proc/{p}"))["RANK"] == "0"]
        assert len(workers) == 2 and len(rank0) == 1, workers
        os.kill(rank0[0], signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, "".join(seen)
        wait_for(lambda: not any(alive(p) for p in workers), 30, "workers gone")


@pytest.mark.timeout(START_S + 90)
def test_under_mpirun_rank_0_serves_and_sigterm_drains():
    """``launch/mpirun.sh serve``: the ranks join the MPI job (gloo bootstrapped through mpi4py), rank 0 serves an
    exact answer; SIGTERM to the launcher (forwarded to every rank: rank 0 drains, the others wait for its stop
    step) ends the job with 0 and leaves no rank behind."""
    from test_mpi import _need_mpi

    mpiexec = _need_mpi()
    with _launched("mpirun.sh", {"NP": "2", "MPIEXEC": mpiexec, "PYTHON": sys.executable}, seed=4) as (proc, seen):
        ranks = _launched_ranks(proc, "mpi4py")
        assert len(ranks) == 2, ranks
        os.killpg(proc.pid, signal.SIGTERM)  # what Ctrl-C / a scheduler's stop does to the job
        assert proc.wait(timeout=60) == 0, "".join(seen)
        wait_for(lambda: not any(alive(p) for p in ranks), 30, "ranks gone")


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _environ(d: Path) -> dict:
    try:
        raw = (d / "environ").read_bytes()
    except OSError:
        return {}
    return dict(x.split("=", 1) for x in raw.decode(errors="replace").split("\0") if "=" in x)


def _ancestors(pid: int) -> list[int]:
    out = []
    for _ in range(10):
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except OSError:
            break
        out.append(pid)
    return out
