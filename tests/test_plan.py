"""seqpar.plan (the cost model behind strategy="auto") and that "auto" runs the strategy it names.

Run: ``python -m pytest tests/test_plan.py -q``
"""

from __future__ import annotations

import pytest
import torch
from test_attention import TOL, expected_positions, full_mask, make_masks, reference_case, rel_err

import seqpar
from seqpar.plan import STRATEGIES

KV_STRATEGIES = ("ring", "allgather")


@pytest.mark.parametrize("world_size", [2, 4, 8, 64])
@pytest.mark.parametrize("kv_heads", [32, 8, 1])
def test_decode_picks_allreduce(world_size, kv_heads):
    """One query over a long K/V: moving the query is cheapest."""
    p = seqpar.plan(batch=1, heads=32, kv_heads=kv_heads, seq_len=1 << 17, head_dim=128, world_size=world_size,
                    q_len=1)
    assert p.strategy == "allreduce", p.table()
    assert p.bytes_per_rank["allreduce"] < p.bytes_per_rank["ring"]


@pytest.mark.parametrize("world_size", [2, 4, 8])
@pytest.mark.parametrize("kv_heads", [32, 8, 1], ids=["MHA", "GQA", "MQA"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_training_picks_the_least_exposed_communication(world_size, kv_heads, dtype):
    """One node, 32k tokens: ring's transfers hide behind its compute; ulysses sends fewer bytes when K/V heads
    are many, but all of them exposed."""
    p = seqpar.plan(batch=1, heads=32, kv_heads=kv_heads, seq_len=32768, head_dim=128, world_size=world_size,
                    dtype=dtype)
    assert p.strategy == "ring" and p.exposed_s["ring"] == 0, p.table()
    assert p.exposed_s[p.strategy] == min(p.exposed_s.values())
    if kv_heads == 32 and world_size > 2:  # MHA: (W-1)/W * |q, k, v, out| against (W-1) * |k, v|
        assert p.bytes_per_rank["ulysses"] < p.bytes_per_rank["ring"], p.table()


def test_across_nodes_short_sequences_pick_all_to_all():
    """4 nodes x 8 ranks, 32k tokens, MHA: the ring step crosses nodes and outlasts the block's compute;
    the all-to-all sends a quarter of the bytes, most of them across nodes too -- and the two-level arrangement keeps
    its all-to-all inside the node. With 6 ranks per node (not a divisor of 32) ulysses_ring is no candidate."""
    kw = {"batch": 1, "heads": 32, "kv_heads": 32, "seq_len": 32768, "head_dim": 128, "world_size": 32}
    p = seqpar.plan(ranks_per_node=8, **kw)
    assert p.strategy == "ulysses_ring" and 0 < p.exposed_s["ulysses"] < p.exposed_s["ring"], p.table()
    assert seqpar.plan(ranks_per_node=6, **kw).strategy == "ulysses"
    assert seqpar.plan(**kw).strategy != "ulysses_ring"  # one node: no two levels
    assert seqpar.plan(**kw).exposed_s["ring"] < p.exposed_s["ring"]  # one node: the faster link
    assert seqpar.plan(ranks_per_node=8, **{**kw, "seq_len": 1 << 20}).strategy == "ring"  # long: hidden again


@pytest.mark.parametrize("name,value", [("intra_node_bandwidth", 0), ("inter_node_bandwidth", float("inf")),
                                        ("flops", -1.0), ("latency_s", -1e-6), ("ranks_per_node", 0)])
def test_invalid_link_model_raises_value_error(name, value):
    with pytest.raises(ValueError, match=name):
        seqpar.plan(batch=1, heads=8, kv_heads=2, seq_len=128, head_dim=64, world_size=2, **{name: value})


def test_kv_bytes_follow_the_docstring_formula():
    """ring/allgather send (W-1) * 2*B*H_kv*ceil(S/W)*D*e bytes per rank (the docstring's table)."""
    b, hkv, s, d, w = 2, 4, 1000, 64, 3
    p = seqpar.plan(batch=b, heads=16, kv_heads=hkv, seq_len=s, head_dim=d, world_size=w, dtype=torch.bfloat16)
    want = (w - 1) * 2 * b * hkv * 334 * d * 2
    assert p.bytes_per_rank["ring"] == p.bytes_per_rank["allgather"] == want
    assert p.extra_memory["ring"] == 2 * 2 * b * hkv * 334 * d * 2  # two K/V shards


def test_kv_shapes_pick_ring_at_any_world_size():
    kw = {"batch": 1, "heads": 32, "kv_heads": 8, "seq_len": 32768, "head_dim": 128, "dtype": torch.bfloat16}
    for w in (2, 3, 8):
        assert seqpar.plan(world_size=w, **kw).strategy == "ring"


def test_table_lists_every_strategy():
    p = seqpar.plan(batch=1, heads=8, kv_heads=2, seq_len=4096, head_dim=64, world_size=4)
    t = p.table()
    lines = t.splitlines()
    for s in STRATEGIES:
        (row,) = [ln for ln in lines if ln.split()[0] == s]
        assert f"{p.bytes_per_rank[s]:,}" in row
        assert ("<-" in row) == (s == p.strategy), t
    assert set(p.bytes_per_rank) == set(p.extra_memory) == set(STRATEGIES)
    assert p.reason


@pytest.mark.parametrize(
    "heads,kv_heads", [(6, 4), (4, 8), (4, 0), (0, 0), (-4, 2), (4, -2)]
)
def test_invalid_heads_raise_value_error(heads, kv_heads):
    with pytest.raises(ValueError, match="heads"):
        seqpar.plan(batch=1, heads=heads, kv_heads=kv_heads, seq_len=128, head_dim=64, world_size=2)


@pytest.mark.parametrize("name", ["batch", "seq_len", "head_dim", "world_size", "q_len"])
def test_invalid_sizes_raise_value_error(name):
    kw = {"batch": 1, "heads": 8, "kv_heads": 2, "seq_len": 128, "head_dim": 64, "world_size": 2, "q_len": None}
    kw[name] = 0
    with pytest.raises(ValueError, match=name):
        seqpar.plan(**kw)


# --- "auto" runs what plan names -------------------------------------------------------------------

# (world size, kv heads, dtype): at these tiny shapes the link model's latency decides: one collective
# (allgather) at W = 3, the ring's single step at W = 2 -- asserted below through seqpar.plan itself.
AUTO_CASES = [(3, 4, torch.float64), (3, 1, torch.float64), (2, 2, torch.float64), (3, 2, torch.float32)]


def run_auto(rank, world_size, kv_heads, dtype, is_causal, layout):
    seq_len, b, h, d = 4 * world_size + 3, 2, 4, 8
    gen = torch.Generator().manual_seed(11)
    q = torch.randn(b, h, seq_len, d, generator=gen, dtype=torch.float64).to(dtype)
    k = torch.randn(b, kv_heads, seq_len, d, generator=gen, dtype=torch.float64).to(dtype)
    v = torch.randn(b, kv_heads, seq_len, d, generator=gen, dtype=torch.float64).to(dtype)
    g = torch.randn(b, h, seq_len, d, generator=gen, dtype=torch.float64).to(dtype)
    m = make_masks("docs_pad_window", seq_len, gen)
    ref = reference_case(q, k, v, g, full_mask(seq_len, is_causal, m))
    idx = expected_positions(seq_len, world_size, rank, layout)
    local = {n: (None if t is None else t[:, idx]) for n, t in m.items() if n != "window_size"}
    res = {}
    for strategy in ("auto", *STRATEGIES):
        ql, kl, vl = (t[:, :, idx].clone().requires_grad_() for t in (q, k, v))
        out = seqpar.attention(ql, kl, vl, is_causal=is_causal, layout=layout, strategy=strategy,
                               window_size=m["window_size"], **local)
        out.backward(g[:, :, idx])
        res[strategy] = [t.detach() for t in (out, ql.grad, kl.grad, vl.grad)]
    picked = seqpar.plan(batch=b, heads=h, kv_heads=kv_heads, seq_len=seq_len, head_dim=d, world_size=world_size,
                         dtype=dtype).strategy
    return {
        "picked": picked,
        "same_as_picked": all(torch.equal(a, p) for a, p in zip(res["auto"], res[picked])),
        "err": {s: max(rel_err(x, r[:, :, idx]) for x, r in zip(res[s], ref)) for s in res},
    }


@pytest.mark.parametrize("layout,is_causal", [("zigzag", True), ("contiguous", False)])
def test_auto_matches_explicit_strategies(dist, layout, is_causal):
    picked = set()
    for world_size, kv_heads, dtype in AUTO_CASES:
        res = dist(world_size, run_auto, kv_heads, dtype, is_causal, layout)
        for rank, r in enumerate(res):
            cid = f"W={world_size} H_kv={kv_heads} {dtype} rank {rank}"
            assert r["same_as_picked"], f"{cid}: auto differs from plan's pick {r['picked']!r}"
            for s, e in r["err"].items():
                assert e <= TOL[dtype], f"{cid} {s}: err {e:.2e}"
        picked.add(res[0]["picked"])
    assert len(picked) >= 2, f"the cases exercise only {picked}"
