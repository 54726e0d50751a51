"""What the ranks must agree on is compared across ranks: a mismatch raises ValueError on every rank.

Run: ``python -m pytest tests/test_agreement.py -q``

Before, these gave a silently wrong result (``kv_sharded_attention`` with a q that differs across ranks,
``unshard`` with different layouts: data permuted) or killed a rank with a gloo C++ abort (``unshard``
with different dtype / seq_len / shape, ``sync_gradients`` with different parameter sizes). Each case:
the last rank differs; every rank must raise a ``ValueError`` naming the argument, then a valid call
proves the ranks are still in lock-step. (Shapes, dtypes, scale and options of ``kv_sharded_attention``
and ``softmax``: tests/test_errors.py.)
"""

from __future__ import annotations

import pytest
import torch

import seqpar
import seqpar.nn


def _kv_q(rank, world_size, what):
    odd = rank == world_size - 1
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 5, 8, generator=g)
    k, v = torch.randn(2, 2, 3, 8), torch.randn(2, 2, 3, 8)
    if odd and what == "one element":
        q[1, 2, 3, 4] = q[1, 2, 3, 4].nextafter(torch.tensor(1.0))  # one ulp
    if odd and what == "rows permuted":
        q = q[:, :, [1, 0, 2, 3, 4]]
    if odd and what == "heads permuted":
        q = q[:, [1, 0, 2, 3]]
    try:
        seqpar.kv_sharded_attention(q, k, v)
        msg = None
    except ValueError as e:
        msg = str(e)
    return msg, seqpar.kv_sharded_attention(torch.ones(1, 1, 2, 8), torch.ones(1, 1, 1, 8), torch.ones(1, 1, 1, 8))


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("what", ["one element", "rows permuted", "heads permuted"])
def test_kv_sharded_q_must_be_identical_on_every_rank(dist, world_size, what):
    results = dist(world_size, _kv_q, what, timeout=60)
    for rank, (msg, after) in enumerate(results):
        assert msg is not None, f"rank {rank} did not raise for a q whose {what} differs"
        assert "'q (bit fingerprint; q must be identical on every rank)' differs across ranks" in msg, msg
        assert f"rank {rank}" in msg and f"rank {world_size - 1}:" in msg
        assert torch.equal(after, results[0][1])


def _kv_q_unchecked(rank, world_size, monkey):
    import os

    os.environ["SEQPAR_CHECK"] = "0"
    try:
        q = torch.full((1, 1, 2, 8), float(rank))
        return seqpar.kv_sharded_attention(q, torch.ones(1, 1, 1, 8), torch.ones(1, 1, 1, 8)).shape
    finally:
        os.environ["SEQPAR_CHECK"] = "1"


def test_seqpar_check_0_switches_the_fingerprint_off(dist):
    assert dist(2, _kv_q_unchecked, None, timeout=60) == [torch.Size([1, 1, 2, 8])] * 2


def _unshard(rank, world_size, what):
    odd = rank == world_size - 1
    s = 4 * world_size  # contiguous and zigzag give every rank 4 tokens: only the comparison can tell
    kw = dict(layout="contiguous", seq_len=s, dim=2)
    x = torch.arange(4.0).view(1, 1, 4, 1) + 10 * rank
    if odd and what == "layout":
        kw["layout"] = "zigzag"
    if odd and what == "dtype":
        x = x.double()
    if odd and what == "seq_len":  # S+1 gives the first rank 5 tokens, this one still 4: passes its local check
        kw["seq_len"] = s + 1
    if odd and what == "shape":
        x = torch.cat([x, x], dim=1)  # (1, 2, 4, 1)
    if odd and what == "dim":
        x, kw["dim"] = x.transpose(1, 2), 1  # the same length, along another dim
    try:
        seqpar.unshard(x, **kw)
        msg = None
    except ValueError as e:
        msg = str(e)
    return msg, seqpar.unshard(torch.ones(1, 2), dim=1, seq_len=2 * world_size)


UNSHARD = {"layout": "'layout' differs", "dtype": "'x_local.dtype' differs", "seq_len": "'seq_len' differs",
           "shape": "'x_local.shape (without dim)' differs", "dim": "'dim' differs"}


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("what", list(UNSHARD))
def test_unshard_arguments_must_agree(dist, world_size, what):
    results = dist(world_size, _unshard, what, timeout=60)
    for rank, (msg, after) in enumerate(results):
        assert msg is not None and UNSHARD[what] in msg and f"rank {rank}" in msg, (rank, msg)
        assert torch.equal(after, torch.ones(1, 2 * world_size))


def _sync(rank, world_size, what):
    odd = rank == world_size - 1
    params = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2, 2))]
    if odd and what == "count":
        params.append(torch.nn.Parameter(torch.ones(1)))
    if odd and what == "sizes":  # same count and total elements, other shapes
        params = [torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(3))]
    if odd and what == "dtype":
        params[0] = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    for p in params:
        p.grad = torch.full_like(p, float(rank + 1))
    try:
        seqpar.nn.sync_gradients(params)
        msg = None
    except ValueError as e:
        msg = str(e)
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.ones(2)
    seqpar.nn.sync_gradients([p])
    return msg, p.grad


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("what", ["count", "sizes", "dtype"])
def test_sync_gradients_parameters_must_agree(dist, world_size, what):
    for rank, (msg, after) in enumerate(dist(world_size, _sync, what, timeout=60)):
        assert msg is not None and "differs across ranks" in msg and "parameter" in msg, (rank, msg)
        assert torch.equal(after, torch.full((2,), float(world_size)))


def _loss_vocab(rank, world_size):
    v = 7 if rank == world_size - 1 else 5
    try:
        seqpar.nn.sequence_parallel_loss(torch.zeros(1, 3, v), shift_labels=torch.zeros(1, 3, dtype=torch.int64))
    except ValueError as e:
        return str(e)
    return None


def test_loss_vocabulary_must_agree(dist):
    msgs = dist(2, _loss_vocab, timeout=60)
    assert all(m is not None and "'vocabulary size V' differs" in m and "rank 1: 7" in m for m in msgs), msgs


def _check_differs(rank, world_size):
    import os

    os.environ["SEQPAR_CHECK"] = "0" if rank == 1 else "1"
    try:
        seqpar.softmax(torch.zeros(2, 3))
        return None
    except ValueError as e:
        return str(e)
    finally:
        os.environ["SEQPAR_CHECK"] = "1"


def test_seqpar_check_set_differently_raises_on_every_rank(dist):
    msgs = dist(2, _check_differs, timeout=60)
    assert all(m is not None and "SEQPAR_CHECK differs across ranks" in m for m in msgs), msgs
