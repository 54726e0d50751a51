"""Never hang: a local error on one rank, a collective a peer never joins, ranks calling different functions.

Run: ``python -m pytest tests/test_hangs.py -q``

- Every local argument error of every public function that issues collectives, raised on ONE rank
  (W = 2 and 3 over gloo): every rank must raise within a bound -- the failing rank its own error,
  the others a ``ValueError`` naming it and its message -- and the group must still work afterwards.
  (Before: the failing rank raised before the cross-rank exchange and the others waited in it until
  the process group's timeout.)
- A collective a peer never joins (backward on one rank only, a rank that returns early): the rank
  left waiting raises ``PeerTimeout`` within seqpar's own timeout (set to 3 s here) naming the
  operation and the likely cause. Run on a dedicated pool, torn down afterwards (the group is unusable).
"""

from __future__ import annotations

import time

import pytest
import torch
from dist_pool import Pool

import seqpar
import seqpar.nn
from seqpar.comm import PeerTimeout, set_timeout

B, H, S, D = 2, 4, 5, 8
BOUND_S = 10.0  # every rank must have raised by then (measured: ~0.01 s; slack for a loaded 2-core box)


def _z(*shape, dtype=torch.float32):
    return torch.zeros(shape, dtype=dtype)


def _good_kv():
    return dict(q=_z(B, H, S, D), k=_z(B, 2, 3, D), v=_z(B, 2, 3, D))


def _good_attn():
    return dict(q=_z(B, H, 4, D), k=_z(B, 2, 4, D), v=_z(B, 2, 4, D))


# case -> (function, bad kwargs builder, words the failing rank's message must contain)
def _kv(**over):
    a = _good_kv()
    a.update(over)
    return lambda: seqpar.kv_sharded_attention(a.pop("q"), a.pop("k"), a.pop("v"), **a)


def _attn(**over):
    a = _good_attn()
    a.update(over)
    return lambda: seqpar.attention(a.pop("q"), a.pop("k"), a.pop("v"), **a)


CASES = {
    # kv_sharded_attention
    "kv: q ndim": (lambda: _kv(q=_z(H, S, D)), ["q", "4-D"]),
    "kv: head dim q vs k": (lambda: _kv(k=_z(B, 2, 3, 16), v=_z(B, 2, 3, 16)), ["head dim"]),
    "kv: H % H_kv": (lambda: _kv(k=_z(B, 3, 3, D), v=_z(B, 3, 3, D)), ["H=4", "H_kv=3"]),
    "kv: k/v length": (lambda: _kv(v=_z(B, 2, 4, D)), ["disagree"]),
    "kv: batch": (lambda: _kv(k=_z(1, 2, 3, D), v=_z(1, 2, 3, D)), ["disagree"]),
    "kv: k dtype": (lambda: _kv(k=_z(B, 2, 3, D, dtype=torch.float64)), ["dtypes differ"]),
    "kv: integer q": (lambda: _kv(q=_z(B, H, S, D, dtype=torch.int64), k=_z(B, 2, 3, D, dtype=torch.int64),
                                  v=_z(B, 2, 3, D, dtype=torch.int64)), ["q.dtype"]),
    "kv: mask shape": (lambda: _kv(attn_mask=torch.ones(B, 1, S, 4, dtype=torch.bool)), ["attn_mask", "broadcast"]),
    "kv: mask head dim": (lambda: _kv(attn_mask=torch.ones(B, 2, S, 3, dtype=torch.bool)), ["(2, 2, 5, 3)"]),
    "kv: v dtype": (lambda: _kv(v=_z(B, 2, 3, D, dtype=torch.float16)), ["dtypes differ"]),
    "kv: int mask": (lambda: _kv(attn_mask=torch.ones(B, 1, S, 3, dtype=torch.int64)), ["attn_mask.dtype"]),
    "kv: mask not a tensor": (lambda: _kv(attn_mask="causal"), ["attn_mask must be a tensor"]),
    "kv: scale not a number": (lambda: _kv(scale="big"), ["big"]),
    # attention
    "attention: q ndim": (lambda: _attn(q=_z(H, 4, D)), ["q", "4-D"]),
    "attention: H % H_kv": (lambda: _attn(k=_z(B, 3, 4, D), v=_z(B, 3, 4, D)), ["H_kv=3"]),
    "attention: q/k tokens": (lambda: _attn(k=_z(B, 2, 3, D), v=_z(B, 2, 3, D)), ["k_local holds 3"]),
    "attention: bf16 k, f32 q": (lambda: _attn(k=_z(B, 2, 4, D, dtype=torch.bfloat16)), ["dtypes differ"]),
    "attention: layout": (lambda: _attn(layout="zig-zag"), ["layout='zig-zag'", "allowed"]),
    "attention: strategy": (lambda: _attn(strategy="tree"), ["strategy='tree'", "allowed"]),
    "attention: window -1": (lambda: _attn(window_size=-1), ["window_size=-1"]),
    "attention: window float": (lambda: _attn(window_size=2.5), ["window_size=2.5"]),
    "attention: padding shape": (lambda: _attn(key_padding_mask=torch.ones(B, 5, dtype=torch.bool)),
                                 ["key_padding_mask", "(2, 5)"]),
    "attention: padding dtype": (lambda: _attn(key_padding_mask=torch.ones(B, 4)), ["key_padding_mask.dtype"]),
    "attention: float document ids": (lambda: _attn(document_ids=torch.zeros(B, 4)), ["document_ids.dtype"]),
    # softmax
    "softmax: dim": (lambda: (lambda: seqpar.softmax(_z(2, 3), dim=2)), ["dim=2"]),
    "softmax: int": (lambda: (lambda: seqpar.softmax(_z(2, 3, dtype=torch.int64))), ["floating"]),
    # unshard
    "unshard: layout": (lambda: (lambda: seqpar.unshard(_z(1, 1, 4, 2), layout="zz", seq_len=8)), ["layout='zz'"]),
    "unshard: length": (lambda: (lambda: seqpar.unshard(_z(1, 1, 3, 2), seq_len=8)), ["length 3"]),
    "unshard: seq_len": (lambda: (lambda: seqpar.unshard(_z(1, 1, 4, 2), seq_len=-8)), ["seq_len=-8"]),
    # nn
    "loss: shapes": (lambda: (lambda: seqpar.nn.sequence_parallel_loss(
        _z(1, 4, 7), shift_labels=torch.zeros(1, 3, dtype=torch.int64))), ["shift_labels has"]),
    "loss: float labels": (lambda: (lambda: seqpar.nn.sequence_parallel_loss(
        _z(1, 4, 7), shift_labels=_z(1, 4))), ["shift_labels.dtype"]),
    "sync_gradients: not a tensor": (lambda: (lambda: _sync_bad()), ["got a str"]),
}


def _sync_bad():
    seqpar.nn.sync_gradients([torch.nn.Parameter(torch.zeros(3)), "bias"])


def _good_call(name: str):
    """A valid call of the same function (every rank), to prove the group still works."""
    fn = name.split(":")[0]
    if fn == "kv":
        a = _good_kv()
        return seqpar.kv_sharded_attention(a["q"] + 1, a["k"], a["v"] + 1).sum()
    if fn == "attention":
        a = _good_attn()
        return seqpar.attention(a["q"] + 1, a["k"], a["v"] + 2).sum()
    if fn == "softmax":
        return seqpar.softmax(_z(2, 3)).sum()
    if fn == "unshard":
        return seqpar.unshard(_z(1, 1, 4, 2) + 1, seq_len=4 * torch.distributed.get_world_size()).sum()
    if fn == "loss":
        return seqpar.nn.sequence_parallel_loss(_z(1, 4, 7), shift_labels=torch.zeros(1, 4, dtype=torch.int64))
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.ones(3)
    seqpar.nn.sync_gradients([p])
    return p.grad.sum()


def _one_rank_bad(rank, world_size, names, bad_rank):
    """For each case: only ``bad_rank`` passes the bad arguments. Returns per case (error type, message,
    seconds until this rank raised, result of a valid call afterwards)."""
    set_timeout(30)  # a regression shows up as PeerTimeout, not as a pool timeout
    out = {}
    try:
        for name in names:
            bad, _ = CASES[name]
            call = bad() if rank == bad_rank else _good_call_fn(name)
            t0 = time.monotonic()
            try:
                call()
                got = (None, "", time.monotonic() - t0)
            except Exception as e:  # noqa: BLE001 - the type is checked by the parent
                got = (type(e).__name__, str(e), time.monotonic() - t0)
            out[name] = (*got, float(_good_call(name)))
    finally:
        set_timeout(None)
    return out


def _good_call_fn(name):
    return lambda: _good_call(name)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world_size", [2, 3])
def test_a_local_error_on_one_rank_raises_on_every_rank(dist, world_size):
    bad_rank = world_size - 1
    names = list(CASES)
    per_rank = dist(world_size, _one_rank_bad, names, bad_rank, timeout=240)
    problems = []
    for name in names:
        words = CASES[name][1]
        bad_kind, bad_msg, _, _ = per_rank[bad_rank][name]
        for rank in range(world_size):
            kind, msg, secs, after = per_rank[rank][name]
            if kind is None:
                problems.append(f"{name}: rank {rank} did not raise")
                continue
            if secs > BOUND_S:
                problems.append(f"{name}: rank {rank} raised after {secs:.1f} s")
            if rank == bad_rank:
                if kind not in ("ValueError", "TypeError") or not all(w in msg for w in words):
                    problems.append(f"{name}: failing rank: {kind}: {msg!r} lacks {words}")
            else:
                want = [f"rank {rank}", f"rank(s) [{bad_rank}]", bad_msg[:40]]
                if kind != "ValueError" or not all(w in msg for w in want):
                    problems.append(f"{name}: rank {rank}: {kind}: {msg!r} lacks {want}")
            if after != per_rank[0][name][3]:
                problems.append(f"{name}: the valid call afterwards differs across ranks")
    assert not problems, "\n".join(problems)
    assert len(names) >= 30


def _hf_bad(rank, world_size, what):
    """seqpar.hf's attention function with an unsupported argument on rank 1 only."""
    pytest.importorskip("transformers")
    import seqpar.hf

    q, k, v = torch.randn(1, 2, 3, 4), torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4)
    kw = {}
    if rank == 1:
        kw = {"dropout": {"dropout": 0.1}, "softcap": {"softcap": 30.0}, "mask4d": {},
              "window_noncausal": {"sliding_window": 4, "is_causal": False}}[what]
    mask = torch.ones(1, 1, 3, 3, dtype=torch.bool) if (rank == 1 and what == "mask4d") else None
    module = torch.nn.Module()
    try:
        seqpar.hf.attention_forward(module, q, k, v, mask, **kw)
        return None
    except ValueError as e:
        return str(e)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("what", ["dropout", "softcap", "mask4d", "window_noncausal"])
def test_hf_local_error_on_one_rank_raises_on_every_rank(dist, what):
    pytest.importorskip("transformers")
    m0, m1 = dist(2, _hf_bad, what, timeout=60)
    assert m1 is not None and m0 is not None, (m0, m1)
    assert "rank(s) [1]" in m0 and m1[:30] in m0


def _different_functions(rank, world_size):
    try:
        if rank == 0:
            seqpar.softmax(torch.zeros(2, 3))
        else:
            seqpar.kv_sharded_attention(*_good_kv().values())
    except ValueError as e:
        return str(e)
    return None


def test_ranks_calling_different_functions_raise_on_every_rank(dist):
    msgs = dist(2, _different_functions, timeout=60)
    assert all(m is not None and "ranks called different functions" in m for m in msgs), msgs
    assert "seqpar softmax" in msgs[0] and "seqpar kv_sharded_attention" in msgs[1]


# --- collectives a peer never joins: dedicated pools (the group is unusable afterwards) ---------

PEER_TIMEOUT_S = 3.0


def _timed_out(call, what: str) -> tuple[str, float]:
    """``(PeerTimeout's message, seconds)`` of ``call()``, or ``(what, seconds)`` when it returned."""
    t0 = time.monotonic()
    try:
        call()
    except PeerTimeout as e:
        return (str(e), time.monotonic() - t0)
    return (what, time.monotonic() - t0)


def _backward_on_one_rank(rank, world_size, strategy):
    set_timeout(PEER_TIMEOUT_S)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 4, 8, generator=g).requires_grad_() for _ in range(3))
    out = seqpar.attention(q, k, v, is_causal=True, strategy=strategy)
    if rank == 0:
        return ("skipped backward", 0.0)
    return _timed_out(lambda: out.sum().backward(), "backward returned")


def _kv_backward_on_one_rank(rank, world_size):
    set_timeout(PEER_TIMEOUT_S)
    q = torch.ones(1, 2, 3, 8, requires_grad=True)
    k, v = (torch.randn(1, 1, 2, 8, requires_grad=True) for _ in range(2))
    out = seqpar.kv_sharded_attention(q, k, v)
    if rank == 0:
        return ("skipped backward", 0.0)
    return _timed_out(lambda: out.sum().backward(), "backward returned")


def _one_rank_returns_early(rank, world_size):
    set_timeout(PEER_TIMEOUT_S)
    if rank == 0:
        return ("returned early", 0.0)
    return _timed_out(lambda: seqpar.softmax(torch.zeros(2, 3)), "softmax returned")


def _run_on_own_pool(world_size, fn, *args):
    pool = Pool(world_size)
    try:
        return pool.run(fn, *args, timeout=90)
    finally:
        pool.close(force=True)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("case", ["ring", "allreduce", "allgather", "kv_sharded", "early return"])
def test_a_collective_a_peer_never_joins_raises_within_seqpar_timeout(case):
    if case == "kv_sharded":
        results = _run_on_own_pool(2, _kv_backward_on_one_rank)
    elif case == "early return":
        results = _run_on_own_pool(2, _one_rank_returns_early)
    else:
        results = _run_on_own_pool(2, _backward_on_one_rank, case)
    msg, secs = results[1]
    assert "did not complete within 3 s" in msg and "a peer did not join" in msg, msg
    assert "rank 1 of 2" in msg and "bytes" in msg and "backward only on some ranks" in msg, msg
    assert PEER_TIMEOUT_S * 0.9 <= secs < PEER_TIMEOUT_S + 10, secs


def test_timeout_setting_is_validated(monkeypatch):
    from seqpar.comm import timeout_s

    monkeypatch.setenv("SEQPAR_TIMEOUT_S", "2.5")
    assert timeout_s() == 2.5
    set_timeout(7)
    try:
        assert timeout_s() == 7.0  # the function wins over the environment
    finally:
        set_timeout(None)
    for bad in ("0", "-1", "nan", "inf", "soon"):
        monkeypatch.setenv("SEQPAR_TIMEOUT_S", bad)
        with pytest.raises(ValueError, match="SEQPAR_TIMEOUT_S"):
            timeout_s()
    for bad in (0, -3, float("nan"), float("inf"), "5"):
        with pytest.raises(ValueError, match="seconds="):
            set_timeout(bad)
