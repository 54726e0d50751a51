"""strategy="ulysses_ring": all-to-all over the inner group x ring over the outer one, on 2-D grids of gloo ranks.

Run: ``python -m pytest tests/test_ulysses_ring.py -q``

Grids: 2 x 2 on 4 ranks as a ``DeviceMesh``, as a pair ``(inner, outer)`` of groups whose inner groups are *not*
consecutive ranks ({0, 2}, {1, 3}), and as ``group=None`` with ``LOCAL_WORLD_SIZE=2``; 2 x 1 and 1 x 2 on 2 ranks.
Each: uneven S, both layouts, causal and not, GQA with H_kv < inner and >= inner, MQA, padding / document / window
masks (fully masked rows included), forward and dq/dk/dv against the float64 reference (tests/test_attention.py's
``run_case``), float64 and bfloat16. Then the bytes each rank counts against the registered formula.
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
from test_attention import TOL, check_results, run_case
from test_strategies_registry import check_bytes, measured_bytes

_GROUPS: dict = {}


def _group(kind: str, world_size: int):
    """The ``group=`` argument of a grid kind (built once per worker process: new_group is collective)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    key = (kind, world_size, id(dist.group.WORLD))
    if key not in _GROUPS:
        if kind == "pair":  # inner groups {0, 2}, {1, 3}; outer groups {0, 1}, {2, 3}
            inner = [dist.new_group([0, 2]), dist.new_group([1, 3])]
            outer = [dist.new_group([0, 1]), dist.new_group([2, 3])]
            r = dist.get_rank()
            _GROUPS[key] = (inner[r % 2], outer[r // 2])
        else:  # "mesh m x n"
            m, n = (int(t) for t in kind.split()[1].split("x"))
            _GROUPS[key] = init_device_mesh("cpu", (m, n), mesh_dim_names=("outer", "inner"))
    return _GROUPS[key]


@contextlib.contextmanager
def _on_grid(kind: str, world_size: int):
    """Run seqpar.attention on grid ``kind``: a group= for it, or (``local n``) LOCAL_WORLD_SIZE=n and group=None."""
    import seqpar

    if kind.startswith("local"):
        old = os.environ.get("LOCAL_WORLD_SIZE")
        os.environ["LOCAL_WORLD_SIZE"] = kind.split()[1]
        try:
            yield
        finally:
            if old is None:
                del os.environ["LOCAL_WORLD_SIZE"]
            else:
                os.environ["LOCAL_WORLD_SIZE"] = old
        return
    group, plain = _group(kind, world_size), seqpar.attention
    seqpar.attention = lambda *a, **kw: plain(*a, group=group, **kw)
    try:
        yield
    finally:
        seqpar.attention = plain


GRIDS = {4: ["mesh 2x2", "pair", "local 2"], 2: ["mesh 2x1", "mesh 1x2"]}
# (layout, is_causal, mask kind, H, H_kv): H_kv < inner (MQA), = inner, > inner with groups; fully masked rows
CASES = [("zigzag", True, "docs_pad_window", 4, 1), ("contiguous", True, "none", 4, 2),
         ("contiguous", False, "pad_rows", 6, 3), ("zigzag", False, "window", 4, 4), ("zigzag", True, "pad", 8, 4)]


def run_grid(rank, world_size, kind):
    res = {}
    with _on_grid(kind, world_size):
        for dtype in (torch.float64, torch.bfloat16):
            for i, (layout, causal, mask_kind, heads, kv_heads) in enumerate(CASES):
                if dtype != torch.float64 and i > 1:
                    continue
                seq_len = 4 * world_size + 3  # uneven shards
                cid = f"{kind} S={seq_len} {layout} causal={causal} {mask_kind} H={heads} Hkv={kv_heads} {dtype}"
                res[cid] = run_case(rank, world_size, seq_len=seq_len, dtype=dtype, strategy="ulysses_ring",
                                    is_causal=causal, layout=layout, kv_heads=kv_heads, mask_kind=mask_kind, seed=i,
                                    heads=heads)
    return res


@pytest.mark.parametrize("world_size,kind", [(w, k) for w, ks in GRIDS.items() for k in ks])
def test_against_the_reference(dist, world_size, kind):
    res = dist(world_size, run_grid, kind, timeout=90)
    for dtype in (torch.float64, torch.bfloat16):
        mine = [{c: r[c] for c in r if c.endswith(str(dtype))} for r in res]
        assert mine[0]
        check_results(mine, TOL[dtype], require_dead_rows=dtype == torch.float64)


def run_bytes(rank, world_size, kind, inner):
    import seqpar
    from seqpar.comm import get_communicator
    from seqpar.plan import bytes_sent

    comm = get_communicator(None)
    probe = check_bytes(comm)
    rows = []
    b, d = 2, 4
    with _on_grid(kind, world_size):
        for heads, kv_heads in ((4, 1), (6, 3), (4, 4)):
            for seq_len, layout in ((4 * world_size + 3, "contiguous"), (2 * world_size + 1, "zigzag")):
                for dtype in (torch.float32, torch.bfloat16):
                    gen = torch.Generator().manual_seed(seq_len)
                    idx = seqpar.layout.positions(seq_len, world_size, rank, layout)
                    q, k, v, g = (torch.randn(b, h, seq_len, d, generator=gen).to(dtype)[:, :, idx]
                                  for h in (heads, kv_heads, kv_heads, heads))
                    kw = {"is_causal": True, "layout": layout, "strategy": "ulysses_ring"}
                    fwd, fwd_bwd = measured_bytes(comm, probe, q, k, v, g, kw)
                    want = bytes_sent("ulysses_ring", batch=b, heads=heads, kv_heads=kv_heads, seq_len=seq_len,
                                      head_dim=d, world_size=world_size, element_size=q.element_size(), layout=layout,
                                      rank=rank, inner=inner)
                    rows.append((f"{kind} H={heads} H_kv={kv_heads} S={seq_len} {layout} {dtype}",
                                 {"fwd": fwd, "fwd_bwd": fwd_bwd}, want))
    return rows


@pytest.mark.parametrize("world_size,kind,inner", [(4, "mesh 2x2", 2), (4, "local 2", 2), (2, "mesh 2x1", 1)])
def test_measured_bytes_equal_the_registered_formula(dist, world_size, kind, inner):
    res = dist(world_size, run_bytes, kind, inner, timeout=90)
    bad = [f"rank {r} {cid}: measured {got}, formula {want}" for r, rows in enumerate(res) for cid, got, want in rows
           if got != want]
    assert all(row[1]["fwd"] > 0 for rows in res for row in rows), "nothing sent: the count is broken"
    assert not bad, "\n".join(bad)


def run_bad_inner(rank, world_size):
    import seqpar

    q = torch.randn(1, 2, 3, 4)
    msgs = []
    for kind, strategy in (("local 3", "ulysses_ring"), ("mesh 2x2", "ring")):
        with _on_grid(kind, world_size):
            try:
                seqpar.attention(q, q, q, strategy=strategy)
                msgs.append(None)
            except ValueError as e:
                msgs.append(str(e))
    with _on_grid("mesh 2x2", world_size):
        a, b = (seqpar.attention(q, q, q, strategy=s) for s in ("auto", "ulysses_ring"))
        same = torch.equal(a, b)
    return msgs, same


def test_bad_grids_are_refused_on_every_rank(dist):
    """An inner size that does not divide the ranks; a grid with another strategy than ulysses_ring / auto (auto with
    a grid is ulysses_ring)."""
    res = dist(4, run_bad_inner, timeout=60)
    assert all(m is not None for msgs, _ in res for m in msgs), res
    assert all(same for _, same in res)
    lws, strat = res[0][0]
    assert "LOCAL_WORLD_SIZE='3'" in lws and "divisor of the world size 4" in lws, lws
    assert "needs strategy='ulysses_ring'" in strat and "'ring'" in strat, strat


def run_cut_groups(rank, world_size):
    """2 x 3 grid, H = 8, H_kv = 2: inner rank 1 attends query heads 3..5 = K/V heads 0, 1, 1, so its K/V travel
    the ring expanded to one head per query head (and their gradients are summed back before the all-to-all)."""
    from seqpar.comm import get_communicator
    from seqpar.plan import bytes_sent

    comm = get_communicator(None)
    probe = check_bytes(comm)
    res = {}
    with _on_grid("local 3", world_size):
        for layout, causal, mask_kind in (("zigzag", True, "docs_pad_window"), ("contiguous", False, "none")):
            comm.reset_stats()
            res[f"{layout} {causal} {mask_kind}"] = run_case(
                rank, world_size, seq_len=2 * world_size + 1, dtype=torch.float64, strategy="ulysses_ring",
                is_causal=causal, layout=layout, kv_heads=2, mask_kind=mask_kind, seed=5, heads=8)
    got = comm.bytes_sent - probe  # the last case's forward + backward (no mask: nothing else gathered)
    want = bytes_sent("ulysses_ring", batch=2, heads=8, kv_heads=2, seq_len=2 * world_size + 1, head_dim=8,
                      world_size=world_size, element_size=8, layout="contiguous", rank=rank, inner=3)
    return res, (got, want["fwd_bwd"])


@pytest.mark.timeout(120)
def test_query_heads_cutting_a_kv_group_travel_expanded(dist):
    from seqpar.strategies.ulysses_ring import travelling_kv_heads

    assert [travelling_kv_heads(8, 2, 3, i) for i in range(3)] == [1, 3, 1]  # inner rank 1's heads 3..5: expanded
    res = dist(6, run_cut_groups, timeout=100)
    check_results([r for r, _ in res], TOL[torch.float64], require_dead_rows=True)
    assert all(got == want for _, (got, want) in res), [b for _, b in res]


@pytest.mark.timeout(150)
def test_over_mpi4py_with_a_two_level_split():
    """``group=MPI.COMM_WORLD`` on 4 ranks with LOCAL_WORLD_SIZE=2: the communicator is split into 2 "nodes" x 2
    (tests/mpi_ulysses_case.py: uneven S and heads, GQA, float64 and bfloat16, forward and dq/dk/dv against the
    reference, bytes against the formula with inner=2, which differs from every one-level figure)."""
    import subprocess
    import sys
    from pathlib import Path

    from test_mpi import _need_mpi

    mpiexec = _need_mpi()
    script = Path(__file__).with_name("mpi_ulysses_case.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LOCAL_WORLD_SIZE": "2"}
    proc = subprocess.run([mpiexec, "-n", "4", sys.executable, str(script), "ulysses_ring"], capture_output=True,
                          text=True, timeout=120, env=env, cwd=script.parent.parent, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("ok ulysses_ring (inner 2)") == 4, proc.stdout


def run_auto_over_nodes(rank, world_size):
    """``strategy="auto"`` with ``group=None`` and the launcher's ranks per node: ``LOCAL_WORLD_SIZE=2`` of 4 ranks
    makes two nodes, where ``seqpar.plan`` picks ``ulysses_ring`` at this shape; ``LOCAL_WORLD_SIZE=4`` (one node)
    picks another. Per node count: the plan's pick, bytes sent (fwd, fwd+bwd) against that strategy's formula, and
    the error against float64 SDPA."""
    import torch.nn.functional as F

    import seqpar
    from seqpar.comm import get_communicator
    from seqpar.plan import bytes_sent, plan

    comm = get_communicator(None)
    probe = check_bytes(comm)
    b, h, hkv, s, d = 1, 4, 2, 1024, 128
    gen = torch.Generator().manual_seed(0)
    q, k, v, g = (torch.randn(b, n, s, d, generator=gen, dtype=torch.float64) for n in (h, hkv, hkv, h))
    idx = seqpar.layout.positions(s, world_size, rank, "contiguous")
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)
    ql, kl, vl, gl = (t[:, :, idx].float() for t in (q, k, v, g))
    res = {}
    for per_node in (2, 4, "mixed"):  # mixed: rank 0 says 2 per node, the others 4 -> planned as one node
        env = (2 if rank == 0 else 4) if per_node == "mixed" else per_node
        with _on_grid(f"local {env}", world_size):
            pick = plan(batch=b, heads=h, kv_heads=hkv, seq_len=s, head_dim=d, world_size=world_size,
                        dtype=torch.float32, ranks_per_node=None if per_node == "mixed" else per_node).strategy
            got = measured_bytes(comm, probe, ql, kl, vl, gl, {"is_causal": True, "strategy": "auto"})
            want = bytes_sent(pick, batch=b, heads=h, kv_heads=hkv, seq_len=s, head_dim=d, world_size=world_size,
                              element_size=4, layout="contiguous", rank=rank,
                              inner=per_node if pick == "ulysses_ring" else None)
            err = (seqpar.attention(ql, kl, vl, is_causal=True).double() - ref[:, :, idx]).abs().max().item()
        res[per_node] = (pick, got, (want["fwd"], want["fwd_bwd"]), err)
    return res


def test_auto_picks_the_two_level_strategy_across_nodes(dist):
    for rank, res in enumerate(dist(4, run_auto_over_nodes, timeout=120)):
        assert res[2][0] == "ulysses_ring" and res[4][0] != "ulysses_ring" != res["mixed"][0], res
        for per_node, (pick, got, want, err) in res.items():
            assert got == want, f"rank {rank}, {per_node} ranks per node, {pick}: sent {got}, formula {want}"
            assert err < 1e-5, f"rank {rank}, {per_node} ranks per node, {pick}: error {err}"
