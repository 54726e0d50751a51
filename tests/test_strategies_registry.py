"""The strategy registry (seqpar.strategies.registry): every strategy's measured bytes equal its formula.

Run: ``python -m pytest tests/test_strategies_registry.py -q``

Each rank counts what it sends (``Communicator.bytes_sent``) over one forward and one forward + backward of
``seqpar.attention``; the call's argument check (one small all-gather, :func:`seqpar.checks.agree`) is measured
on its own and taken off. The count must equal :func:`seqpar.plan.bytes_sent` for that rank -- the registered
formula -- exactly, on uneven shard lengths, both layouts, MHA / GQA / MQA and heads that W does not divide.
"""

from __future__ import annotations

import pytest
import torch

from seqpar.strategies.registry import REGISTRY, STRATEGIES


def check_bytes(comm) -> int:
    """Bytes this rank sends in one argument check (``seqpar.checks.agree``'s all-gather; every call makes one)."""
    from seqpar import checks

    comm.reset_stats()
    checks.agree(comm, "probe", lambda: None)
    return comm.bytes_sent


def measured_bytes(comm, probe: int, q, k, v, g, kw: dict) -> tuple[int, int]:
    """Bytes this rank sent in one forward and in one forward + backward of ``seqpar.attention(q, k, v, **kw)``,
    less ``probe`` (the argument check's all-gather, :func:`check_bytes`, measured once by the caller)."""
    import seqpar

    comm.reset_stats()
    with torch.no_grad():
        seqpar.attention(q, k, v, **kw)
    fwd = comm.bytes_sent - probe
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    comm.reset_stats()
    seqpar.attention(*leaves, **kw).backward(g)
    return fwd, comm.bytes_sent - probe

# (heads, kv_heads) per world size: H_kv >= W, H_kv < W, W not dividing the heads
HEADS = {2: [(4, 4), (6, 3), (4, 1)], 3: [(4, 2), (8, 4), (2, 2)], 4: [(4, 2), (6, 6)]}
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


def run_bytes(rank, world_size, names=STRATEGIES, inner=None):
    """``inner``: ulysses_ring's inner size, set as LOCAL_WORLD_SIZE for the call (default: every rank)."""
    import os

    import seqpar
    from seqpar.comm import get_communicator
    from seqpar.plan import bytes_sent

    comm = get_communicator(None)
    probe = check_bytes(comm)
    rows = []
    b, d = 2, 4
    for heads, kv_heads in HEADS[world_size]:
        for seq_len, layout in ((4 * world_size + 3, "contiguous"), (2 * world_size + 1, "zigzag")):
            for dtype_name, dtype in DTYPES.items():
                gen = torch.Generator().manual_seed(seq_len)
                idx = seqpar.layout.positions(seq_len, world_size, rank, layout)
                q, k, v, g = (torch.randn(b, h, seq_len, d, generator=gen).to(dtype)[:, :, idx]
                              for h in (heads, kv_heads, kv_heads, heads))
                for name in names:
                    kw = {"is_causal": True, "layout": layout, "strategy": name}
                    if inner is not None:
                        os.environ["LOCAL_WORLD_SIZE"] = str(inner)
                    try:
                        fwd, fwd_bwd = measured_bytes(comm, probe, q, k, v, g, kw)
                    finally:
                        os.environ.pop("LOCAL_WORLD_SIZE", None)
                    want = bytes_sent(name, batch=b, heads=heads, kv_heads=kv_heads, seq_len=seq_len, head_dim=d,
                                      world_size=world_size, element_size=q.element_size(), layout=layout, rank=rank,
                                      inner=inner)
                    rows.append((f"W={world_size} {name} H={heads} H_kv={kv_heads} S={seq_len} {layout} {dtype_name}",
                                 {"fwd": fwd, "fwd_bwd": fwd_bwd}, want))
    return rows


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_measured_bytes_equal_the_registered_formula(dist, world_size):
    res = dist(world_size, run_bytes)
    bad = []
    for rank, rows in enumerate(res):
        for cid, got, want in rows:
            if got != want:
                bad.append(f"rank {rank} {cid}: measured {got}, formula {want}")
    n = len(res[0])
    assert n == len(HEADS[world_size]) * 2 * len(DTYPES) * len(STRATEGIES)
    assert all(r[1]["fwd"] > 0 for rows in res for r in rows), "a strategy sent nothing: the count is broken"
    assert not bad, f"{len(bad)} of {n * world_size} (rank, case) pairs differ:\n" + "\n".join(bad)


@pytest.mark.parametrize("world_size,inner", [(4, 2), (2, 1)])
def test_ulysses_ring_on_a_grid_equals_its_formula(dist, world_size, inner):
    """The two-level strategy on a real grid (the test above runs it with one level: inner size W)."""
    res = dist(world_size, run_bytes, ("ulysses_ring",), inner)
    bad = [f"rank {r} {cid}: measured {got}, formula {want}" for r, rows in enumerate(res) for cid, got, want in rows
           if got != want]
    assert len(res[0]) == len(HEADS[world_size]) * 2 * len(DTYPES)
    assert not bad, "\n".join(bad)


def test_every_strategy_has_one_record_read_everywhere():
    import importlib

    from seqpar_tools import names

    plan_module = importlib.import_module("seqpar.plan")
    assert tuple(REGISTRY) == STRATEGIES == plan_module.STRATEGIES == names.STRATEGIES
    for name, rec in REGISTRY.items():
        assert rec.name == name
        assert issubclass(rec.fn, torch.autograd.Function)
        assert rec.constraints and rec.summary
    p = plan_module.plan(batch=1, heads=8, kv_heads=2, seq_len=4096, head_dim=64, world_size=4)
    assert set(p.bytes_per_rank) == set(p.extra_memory) == set(STRATEGIES)


def test_bytes_sent_names_the_allowed_values():
    from seqpar.plan import bytes_sent

    kw = {"batch": 1, "heads": 2, "kv_heads": 1, "seq_len": 9, "head_dim": 4, "world_size": 2, "element_size": 4}
    with pytest.raises(ValueError, match="'ulysses'"):
        bytes_sent("ulyses", **kw)
    with pytest.raises(ValueError, match="'zigzag'"):
        bytes_sent("ring", layout="striped", **kw)
