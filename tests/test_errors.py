"""Bad input: what must fail, where, and how (never a hang, never a silently wrong result).

Run: ``python -m pytest tests/test_errors.py -q``

- arguments that must agree across ranks but differ: ``ValueError`` on *every* rank naming the
  argument, the ranks and their values (from the one all-gather of :mod:`seqpar.checks`);
- local errors (ndim, head dims, GQA ratio, dtypes, mask shape): ``ValueError`` after exactly one
  collective, the verdict exchange that tells the other ranks (checked with a communicator that
  records every collective; tests/test_hangs.py checks that every rank raises);
- a dead peer: the collective of the survivor raises within the process group's timeout.
"""

from __future__ import annotations

import os
import time

import pytest
import torch

import seqpar
from seqpar.comm import Communicator

B, H, S, D = 2, 4, 5, 8
CALL_TIMEOUT_S = 60  # a pool call that takes longer is a hang


# --- cross-rank mismatches (gloo pool) ---------------------------------------------------------


def _kv_inputs(rank, sq=S, hkv=H, d=D, dtype=torch.float32):
    g = torch.Generator().manual_seed(rank)
    q = torch.randn(B, H, sq, d, generator=g).to(dtype)
    k, v = (torch.randn(B, hkv, 3, d, generator=g).to(dtype) for _ in range(2))
    return q, k, v


def _kv_mismatch(rank, world_size, what, odd_rank):
    """Every rank calls kv_sharded_attention; ``odd_rank`` differs in ``what``. Returns the error
    message (or None), then proves the ranks are still in lock-step with one valid call."""
    odd = rank == odd_rank
    q, k, v = _kv_inputs(rank, sq=6 if (odd and what == "sq") else S, hkv=2 if (odd and what == "hkv") else H,
                         dtype=torch.float64 if (odd and what == "dtype") else torch.float32)
    kw = {}
    if what == "scale":
        kw["scale"] = 0.5 if odd else 0.25
    if what == "mask" and odd:
        kw["attn_mask"] = torch.ones(B, 1, S, 3, dtype=torch.bool)
    if what == "mask_dtype":
        kw["attn_mask"] = torch.zeros(B, 1, S, 3) if odd else torch.ones(B, 1, S, 3, dtype=torch.bool)
    if what == "sq+scale":
        q = q[:, :, :4] if odd else q
        kw["scale"] = 0.5 if odd else None
    msg = None
    try:
        seqpar.kv_sharded_attention(q, k, v, **kw)
    except ValueError as e:
        msg = str(e)
    q, k, v = _kv_inputs(0)
    after = seqpar.kv_sharded_attention(q, k, v)  # every rank again: the group still works
    return msg, after


KV_MISMATCHES = {  # what differs -> the argument named and the two values as the message shows them
    "sq": ("q.shape", "(2, 4, 5, 8)", "(2, 4, 6, 8)"),
    "hkv": ("k_local.shape (B, H_kv, D)", "(2, 4, 8)", "(2, 2, 8)"),
    "dtype": ("dtype", "torch.float32", "torch.float64"),
    "scale": ("scale", "0.25", "0.5"),
    "mask": ("attn_mask", "None", "torch.bool"),
    "mask_dtype": ("attn_mask.dtype", "torch.bool", "torch.float32"),
}


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("what", list(KV_MISMATCHES))
def test_kv_cross_rank_mismatch_raises_on_every_rank(dist, world_size, what):
    odd_rank = world_size - 1
    results = dist(world_size, _kv_mismatch, what, odd_rank, timeout=CALL_TIMEOUT_S)
    arg, normal, odd = KV_MISMATCHES[what]
    msgs = [m for m, _ in results]
    for rank, msg in enumerate(msgs):
        assert msg is not None, f"rank {rank} did not raise for a mismatched {what}"
        assert f"rank {rank}" in msg  # who is speaking
        assert arg in msg and "differs across ranks" in msg
        for r in range(world_size):  # every rank's value is listed
            want = odd if r == odd_rank else normal
            assert f"rank {r}: {want}" in msg, (msg, r, want)
    assert len({m.split(":", 1)[1] for m in msgs}) == 1  # the same diagnosis everywhere
    after = [a for _, a in results]
    assert all(torch.equal(a, after[0]) for a in after)


def test_kv_two_mismatches_are_both_named(dist):
    (m0, _), (m1, _) = dist(2, _kv_mismatch, "sq+scale", 1, timeout=CALL_TIMEOUT_S)
    for m in (m0, m1):
        assert "'q.shape' differs" in m and "rank 1: (2, 4, 4, 8)" in m
        assert "'scale' differs" in m and "rank 0: 0.3535533905932738" in m and "rank 1: 0.5" in m


def _softmax_mismatch(rank, world_size, what):
    odd = rank == world_size - 1
    x = torch.randn(2, 3, 4 + rank)  # the split dim (last) may differ: that is allowed
    dim = -1
    if what == "shape" and odd:
        x = torch.randn(2, 5, 4)
    if what == "dtype" and odd:
        x = x.double()
    if what == "dim":
        x = torch.randn(2, 3, 4)
        dim = 1 if odd else -1
    if what == "ndim" and odd:
        x = torch.randn(2, 3, 1, 4)
    try:
        seqpar.softmax(x, dim=dim)
    except ValueError as e:
        return str(e)
    return None


SOFTMAX_MISMATCHES = {
    "shape": ("scores_local.shape (without dim)", "(3, 2, 3)", "(3, 2, 5)"),
    "dtype": ("scores_local.dtype", "torch.float32", "torch.float64"),
    "dim": ("dim", "2", "1"),
    "ndim": ("scores_local.shape (without dim)", "(3, 2, 3)", "(4, 2, 3, 1)"),
}


@pytest.mark.parametrize("what", list(SOFTMAX_MISMATCHES))
def test_softmax_cross_rank_mismatch_raises_on_every_rank(dist, what):
    msgs = dist(3, _softmax_mismatch, what, timeout=CALL_TIMEOUT_S)
    arg, normal, odd = SOFTMAX_MISMATCHES[what]
    for rank, msg in enumerate(msgs):
        assert msg is not None and f"rank {rank}" in msg and f"'{arg}' differs across ranks" in msg, msg
        assert f"rank 0: {normal}" in msg and f"rank 1: {normal}" in msg and f"rank 2: {odd}" in msg, msg


def _softmax_ok_uneven(rank, world_size):
    """Different lengths along the split dim are the point of the API, not an error."""
    return seqpar.softmax(torch.zeros(2, 1 + 2 * rank)).sum(-1)


def test_softmax_uneven_split_is_not_an_error(dist):
    for row_sums in dist(3, _softmax_ok_uneven, timeout=CALL_TIMEOUT_S):
        assert row_sums.shape == (2,)
    total = sum(dist(3, _softmax_ok_uneven, timeout=CALL_TIMEOUT_S))
    assert torch.allclose(total, torch.ones(2))  # 1 + 3 + 5 zeros: uniform weights summing to 1


# --- local errors: raised after the one verdict exchange, before any other collective -----------


class RecordingComm(Communicator):
    """A 2-rank communicator that records collectives instead of communicating (rank 0's view)."""

    def __init__(self):
        super().__init__()
        self.rank, self.world_size = 0, 2
        self.log: list[str] = []

    def _all_reduce(self, t, op):
        self.log.append(f"all_reduce {op}")

    def _all_gather(self, out, t):
        self.log.append("all_gather")
        out.view(self.world_size, -1).copy_(t.view(1, -1))  # every "rank" sends the same


def _q(*shape, dtype=torch.float32):
    return torch.zeros(shape, dtype=dtype)


KV_LOCAL = {  # name -> (q, k, v, extra kwargs, words the message must contain)
    "D q vs k": (_q(B, H, S, 8), _q(B, H, 3, 16), _q(B, H, 3, 16), {}, ["head dim", "8", "16"]),
    "H not multiple of H_kv": (_q(B, 4, S, 8), _q(B, 3, 3, 8), _q(B, 3, 3, 8), {}, ["H=4", "H_kv=3"]),
    "q ndim": (_q(H, S, 8), _q(B, H, 3, 8), _q(B, H, 3, 8), {}, ["q", "4-D", "(4, 5, 8)"]),
    "k ndim": (_q(B, H, S, 8), _q(B, H, 3, 8, 1), _q(B, H, 3, 8), {}, ["k", "4-D"]),
    "k/v length": (_q(B, H, S, 8), _q(B, H, 3, 8), _q(B, H, 4, 8), {}, ["(2, 4, 3, 8)", "(2, 4, 4, 8)"]),
    "batch": (_q(B, H, S, 8), _q(1, H, 3, 8), _q(1, H, 3, 8), {}, ["(2, 4, 5, 8)", "(1, 4, 3, 8)"]),
    "k dtype": (_q(B, H, S, 8), _q(B, H, 3, 8, dtype=torch.float64), _q(B, H, 3, 8), {},
                ["torch.float32", "torch.float64"]),
    "integer q": (_q(B, H, S, 8, dtype=torch.int64), _q(B, H, 3, 8, dtype=torch.int64),
                  _q(B, H, 3, 8, dtype=torch.int64), {}, ["q.dtype", "allowed", "float32", "bfloat16"]),
    "mask shape": (_q(B, H, S, 8), _q(B, H, 3, 8), _q(B, H, 3, 8),
                   {"attn_mask": torch.ones(B, H, S, 4, dtype=torch.bool)},
                   ["attn_mask", "(2, 4, 5, 4)", "(2, 4, 5, 3)"]),
}


@pytest.mark.parametrize("case", list(KV_LOCAL))
def test_kv_local_errors_after_only_the_verdict_exchange(case):
    q, k, v, kw, words = KV_LOCAL[case]
    comm = RecordingComm()
    with pytest.raises(ValueError) as info:
        seqpar.kv_sharded_attention(q, k, v, group=comm, **kw)
    msg = str(info.value)
    assert "rank 0" in msg and all(w in msg for w in words), msg
    assert comm.log == ["all_gather"], f"collectives other than the verdict exchange: {comm.log}"


def test_softmax_local_errors_after_only_the_verdict_exchange():
    comm = RecordingComm()
    with pytest.raises(ValueError, match=r"rank 0: dim=3 .*\(2, 3, 4\).*allowed: -3 \.\. 2"):
        seqpar.softmax(torch.zeros(2, 3, 4), dim=3, group=comm)
    with pytest.raises(TypeError, match="rank 0: scores_local must be a floating.*int64"):
        seqpar.softmax(torch.zeros(2, 3, dtype=torch.int64), group=comm)
    assert comm.log == ["all_gather", "all_gather"]


def test_check_is_one_all_gather_and_can_be_disabled(monkeypatch):
    """One all-gather per call before the math; SEQPAR_CHECK=0 switches off the comparison, not the
    exchange (it carries the local verdicts, which must reach every rank)."""
    q, k, v = _kv_inputs(0)
    comm = RecordingComm()
    seqpar.kv_sharded_attention(q, k, v, group=comm)
    assert comm.log[0] == "all_gather" and comm.log.count("all_gather") == 1
    monkeypatch.setenv("SEQPAR_CHECK", "0")
    comm = RecordingComm()
    seqpar.kv_sharded_attention(q, k, v, group=comm)
    seqpar.softmax(torch.zeros(2, 3), group=comm)
    assert comm.log.count("all_gather") == 2 and len(comm.log) > 2  # the math's all-reduces still run


def _all_ranks_bad(rank, world_size):
    try:
        seqpar.kv_sharded_attention(_q(B, 4, S, 8), _q(B, 3, 3, 8), _q(B, 3, 3, 8))
    except ValueError as e:
        return str(e)
    return None


def test_same_local_error_on_every_rank_does_not_hang(dist):
    msgs = dist(2, _all_ranks_bad, timeout=CALL_TIMEOUT_S)
    assert [("H=4" in m and f"rank {r}" in m) for r, m in enumerate(msgs)] == [True, True], msgs


# --- a dead or stuck peer (a private pool of the one runner, process-group timeout 5 s) ---------------

PG_TIMEOUT_S = 5
PEER_BOUND_S = 45  # the survivor must have raised by then (pg timeout + slack on a loaded box)


def _peer_case(rank, world_size, mode, release):
    """Rank 1 exits ("dead") or stays connected without entering the collective until rank 0 is done
    ("stuck"); rank 0 calls kv_sharded_attention and returns (outcome, seconds)."""
    if rank == 1:
        if mode == "dead":
            os._exit(0)  # exits without entering the collective
        while not os.path.exists(release):  # alive and idle until rank 0 has its verdict
            time.sleep(0.05)
        return None
    t0 = time.monotonic()
    try:
        q, k, v = _kv_inputs(0)
        seqpar.kv_sharded_attention(q, k, v)
        outcome = "returned normally"
    except Exception as e:  # noqa: BLE001 - any error is the right answer; the type is reported
        outcome = f"{type(e).__name__}: {str(e)[:300]}"
    elapsed = time.monotonic() - t0
    open(release, "w").close()
    return outcome, elapsed


@pytest.mark.timeout(150)
@pytest.mark.parametrize("mode", ["dead", "stuck"])
def test_dead_or_stuck_peer_raises_in_bounded_time(mode, tmp_path):
    """Rank 1 exits (or idles) before the collective; rank 0's call must raise, within the bound, instead of
    hanging; the runner names the dead rank."""
    from seqpar_tools.runner import Pool, RankError

    pool = Pool(2, timeout_s=PG_TIMEOUT_S, grace_s=PEER_BOUND_S)
    try:
        if mode == "dead":
            with pytest.raises(RankError) as e:
                pool.run(_peer_case, mode, str(tmp_path / "release"), timeout=PEER_BOUND_S + 45)
            assert e.value.errors == {1: "exited with code 0 without reporting an error"}, e.value.errors
            outcome, elapsed = e.value.results[0]
        else:
            (outcome, elapsed), _ = pool.run(_peer_case, mode, str(tmp_path / "release"), timeout=PEER_BOUND_S + 45)
    finally:
        pool.close(force=True)
    assert outcome != "returned normally"
    assert elapsed < PEER_BOUND_S, (outcome, elapsed)
    if mode == "stuck":  # only the process group's timeout can end this wait
        assert elapsed >= PG_TIMEOUT_S * 0.9, (outcome, elapsed)
