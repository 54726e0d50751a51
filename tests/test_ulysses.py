"""strategy="ulysses": the head split, heads that W does not divide, H < W, GQA copies, a peer that never joins
the all-to-all, and the same over mpi4py.

Run: ``python -m pytest tests/test_ulysses.py -q``

The main grid (W = 2, 3, 4, every mask kind, both layouts, MHA/GQA/MQA, forward and dq/dk/dv in four dtypes,
gradcheck) runs it with the other strategies in tests/test_attention.py; the bytes in
tests/test_strategies_registry.py. Here: head counts the grid does not reach.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_attention import TOL, check_results, run_case

from seqpar.strategies.ulysses import has_copies, head_split


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 5, 8])
def test_head_split_covers_every_head_once(world_size):
    for kv_heads in range(1, 9):
        for groups in (1, 2, 3):
            heads = kv_heads * groups
            split = head_split(heads, kv_heads, world_size)
            assert len(split) == world_size
            got = [h for qa, qb, _, _ in split for h in range(qa, qb)]
            assert got == list(range(heads)), (heads, kv_heads, split)  # every query head once, in order
            for qa, qb, ka, kb in split:
                need = {h // groups for h in range(qa, qb)}
                assert need == set(range(ka, kb)), (heads, kv_heads, split)  # exactly the K/V heads it uses
            sizes = [qb - qa for qa, qb, _, _ in split]
            if kv_heads >= world_size:
                assert not has_copies(split), split  # K/V heads moved, never repeated
                kv_sizes = [kb - ka for _, _, ka, kb in split]
                assert max(kv_sizes) - min(kv_sizes) <= 1
            else:
                assert max(sizes) - min(sizes) <= 1
                copies = sum(kb - ka for _, _, ka, kb in split)
                if world_size % kv_heads == 0 and heads % world_size == 0:
                    assert copies == world_size, split  # one K/V head per rank: the fewest possible


# (W, heads, kv_heads): uneven K/V split (H_kv >= W, W not dividing it), H < W (idle ranks), MQA with
# W not dividing H, MHA with W dividing H, and H_kv < W with a rank's query heads cutting a group (8, 2 at
# W = 3: rank 1 attends heads 3..5 = K/V heads 0, 1, 1; the kernel's own GQA mapping would pair them wrongly).
EXTRA = [(2, 6, 3), (3, 8, 4), (3, 2, 2), (3, 3, 1), (4, 6, 3), (4, 8, 8), (3, 8, 2)]


def run_heads(rank, world_size, heads, kv_heads):
    res = {}
    for dtype in (torch.float64, torch.bfloat16):
        for layout, causal, mask_kind in (("zigzag", True, "docs_pad_window"), ("contiguous", False, "pad_rows"),
                                          ("zigzag", False, "none")):
            cid = f"W={world_size}-H={heads}-Hkv={kv_heads}-{layout}-causal={causal}-{mask_kind}-{dtype}"
            res[cid] = run_case(rank, world_size, seq_len=3 * world_size + 2, dtype=dtype, strategy="ulysses",
                                is_causal=causal, layout=layout, kv_heads=kv_heads, mask_kind=mask_kind, seed=11,
                                heads=heads)
    return res


@pytest.mark.parametrize("world_size,heads,kv_heads", EXTRA)
def test_head_counts_against_the_reference(dist, world_size, heads, kv_heads):
    res = dist(world_size, run_heads, heads, kv_heads)
    for dtype in (torch.float64, torch.bfloat16):
        check_results([{c: r[c] for c in r if c.endswith(str(dtype))} for r in res], TOL[dtype])


def run_backward_twice(rank, world_size, strategy):
    """The head-sharded tensors the forward saves are freed by a backward without ``retain_graph`` (they are not
    held through the all-to-alls back); with it they stay, and a second backward gives the same gradients."""
    import seqpar

    g = torch.Generator().manual_seed(rank)
    q, k, v = (torch.randn(1, 4, 10, 8, generator=g, dtype=torch.float64).requires_grad_() for _ in range(3))
    out = seqpar.attention(q, k, v, is_causal=True, strategy=strategy)
    out.sum().backward(retain_graph=True)
    first = [t.grad.clone() for t in (q, k, v)]
    out.sum().backward()  # second time: accumulates the same gradients again
    same = all(torch.equal(t.grad, 2 * f) for t, f in zip((q, k, v), first))
    try:
        out.sum().backward()  # third: the saved tensors went with the second
    except RuntimeError as e:
        return same, str(e)
    return same, None


@pytest.mark.parametrize("strategy", ["ulysses", "ulysses_ring"])
def test_backward_frees_the_saved_tensors_unless_the_graph_is_retained(dist, strategy):
    for same, err in dist(2, run_backward_twice, strategy):
        assert same  # ulysses_ring gave zero gradients the second time before 2026-11-29
        assert err is not None and f"strategy={strategy!r}" in err and "second time" in err and "retain_graph" in err


def test_a_rank_skipping_the_backward_raises_peer_timeout():
    from test_hangs import PEER_TIMEOUT_S, _backward_on_one_rank, _run_on_own_pool

    msg, secs = _run_on_own_pool(2, _backward_on_one_rank, "ulysses")[1]
    assert "all_to_all" in msg and f"did not complete within {PEER_TIMEOUT_S:g} s" in msg, msg
    assert PEER_TIMEOUT_S * 0.9 <= secs < PEER_TIMEOUT_S + 10, secs


@pytest.mark.timeout(150)
def test_over_mpi4py():
    """tests/mpi_ulysses_case.py under mpiexec -n 3: all_to_all_v over mpi4py (float64, bfloat16; uneven S and
    heads) against the reference, and the bytes it counts against the formula."""
    from test_mpi import _need_mpi

    mpiexec = _need_mpi()
    script = Path(__file__).with_name("mpi_ulysses_case.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([mpiexec, "-n", "3", sys.executable, str(script)], capture_output=True, text=True,
                          timeout=120, env=env, cwd=script.parent.parent, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("ok ") == 4, proc.stdout
