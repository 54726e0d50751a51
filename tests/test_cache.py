"""seqpar.KVCache: sharded prefill, errors raised on every rank with the cache unchanged, memory per rank.

Run: ``python -m pytest tests/test_cache.py -q``
"""

from __future__ import annotations

import torch

from seqpar.ops.reference import attention as ref_attention

H, KV, D = 4, 2, 8


def _cache(**kw):
    from seqpar.cache import KVCache

    args = dict(num_layers=1, max_batch=3, max_seq_len=40, kv_heads=KV, head_dim=D, dtype=torch.float64)
    args.update(kw)
    return KVCache(**args)


def _step(g, b, t, dtype=torch.float64):
    return (torch.randn(b, H, t, D, generator=g, dtype=dtype), torch.randn(b, KV, t, D, generator=g, dtype=dtype),
            torch.randn(b, KV, t, D, generator=g, dtype=dtype))


def _sharded_prefill(rank, world_size, placement):
    """Prefill each rank's contiguous piece of a 2-sequence prompt, then decode; compare with the reference."""
    from seqpar.decode import decode_attention
    from seqpar.layout import pieces

    g = torch.Generator().manual_seed(3)
    cache = _cache(placement=placement, block_size=3)
    slots = cache.allocate(2)
    p = 11
    k, v = torch.randn(2, KV, p, D, generator=g, dtype=torch.float64), torch.randn(2, KV, p, D, generator=g,
                                                                                      dtype=torch.float64)
    a, b = pieces(p, world_size, rank, "contiguous")[0]
    cache.prefill(0, slots, k[:, :, a:b], v[:, :, a:b], prompt_len=p)
    assert torch.equal(cache.positions(slots[0]), torch.arange(a, b))  # the piece, nothing else
    err = 0.0
    for t in (1, 3, 1):
        q, kn, vn = _step(g, 2, t)
        k, v = torch.cat([k, kn], 2), torch.cat([v, vn], 2)
        out = decode_attention(cache, 0, q, kn, vn, slots=slots)
        n = k.shape[2]
        mask = torch.arange(n).view(1, -1) <= torch.arange(n - t, n).view(-1, 1)
        want = ref_attention(q, k, v, mask=mask)[0]
        err = max(err, ((out - want).abs().max() / want.abs().max()).item())
    return err, sorted(cache.positions(slots[0]).tolist())


def test_sharded_prefill_then_decode(dist, one_thread):
    for w in (2, 3):
        for placement in ("round_robin", "contiguous"):
            res = dist(w, _sharded_prefill, placement)
            assert max(r[0] for r in res) < 1e-12, (w, placement, res)
            held = sorted(p for r in res for p in r[1])
            assert held == list(range(16)), held  # every position on exactly one rank


def _errors(rank, world_size, combine):
    from seqpar.decode import decode_attention

    g = torch.Generator().manual_seed(5)
    cache = _cache(max_seq_len=12, combine=combine)
    slots = cache.allocate(2)
    msgs = {}

    def expect(name, fn):
        before = ([list(x) for x in cache.lengths], list(cache.live), cache.k.clone())
        try:
            fn()
            msgs[name] = None
        except ValueError as e:
            msgs[name] = str(e)
        after = ([list(x) for x in cache.lengths], list(cache.live), cache.k.clone())
        unchanged = before[0] == after[0] and before[1] == after[1]
        msgs[name + " unchanged"] = unchanged

    q, k, v = _step(g, 2, 4)
    decode_attention(cache, 0, q, k, v, slots=slots)
    q, k, v = _step(g, 2, 9)
    expect("full", lambda: decode_attention(cache, 0, q, k, v, slots=slots))
    t = 1 if rank == 0 else 2  # rank 1's step has another shape
    q, k, v = _step(g, 2, t)
    expect("T differs", lambda: decode_attention(cache, 0, q, k, v, slots=slots))
    g = torch.Generator().manual_seed(6)  # the ranks drew different amounts above: the same stream again
    q, k, v = _step(g, 2, 1)
    q_odd = q + 1 if rank == 1 else q  # the replicated query differs on one rank: a wrong merge, unless refused
    expect("q differs", lambda: decode_attention(cache, 0, q_odd, k, v, slots=slots))
    q, k, v = _step(g, 1, 1)
    bad = [slots[0]] if rank == 0 else [2]  # slot 2 was never allocated
    expect("unknown slot", lambda: decode_attention(cache, 0, q, k, v, slots=bad))
    expect("allocate too many", lambda: cache.allocate(5))
    expect("free differs", lambda: cache.free([slots[rank % 2]]))
    q, k, v = _step(g, 2, 1)
    decode_attention(cache, 0, q, k, v, slots=slots)  # still usable afterwards
    msgs["lengths"] = [cache.lengths[0][s] for s in slots]
    return msgs


def test_errors_on_every_rank_cache_unchanged(dist, one_thread):
    for combine in ("allgather", "allreduce"):
        per_rank = dist(2, _errors, combine, timeout=60)
        for rank, m in enumerate(per_rank):
            assert "cache full" in (m["full"] or "") or "failed their local" in (m["full"] or ""), (rank, m)
            assert "'T' differs across ranks" in (m["T differs"] or ""), (rank, m)
            assert "fingerprint' differs across ranks" in (m["q differs"] or ""), (rank, m)
            assert any(x in (m["unknown slot"] or "") for x in (
                "failed on rank(s) [1]", "failed on a rank", "unknown sequence slot")), (rank, m)
            assert "allocate" in (m["allocate too many"] or ""), (rank, m)
            assert "differs across ranks" in (m["free differs"] or ""), (rank, m)
            assert all(m[k] for k in m if k.endswith("unchanged")), (rank, m)
            assert m["lengths"] == [5, 5], (rank, m)
        assert "unknown sequence slot 2" in per_rank[1]["unknown slot"]


def _build_mismatch(rank, world_size):
    try:
        _cache(kv_heads=KV + rank)
    except ValueError as e:
        return str(e)
    return None


def test_cache_build_mismatch(dist):
    for msg in dist(2, _build_mismatch):
        assert msg and "differs across ranks" in msg and "rank 1: (1, 3, 40, 3, 8)" in msg, msg


def _build_local_error(rank, world_size):
    """Rank 1 passes a bad placement: every rank raises at once (no rank waits in the exchange)."""
    try:
        _cache(placement="bogus" if rank == 1 else "round_robin")
    except ValueError as e:
        return str(e)
    return None


def test_cache_build_local_error_raises_on_every_rank(dist):
    msgs = dist(2, _build_local_error, timeout=30)
    assert "placement='bogus'" in msgs[1], msgs
    assert msgs[0] and "rank(s) [1]" in msgs[0] and "placement='bogus'" in msgs[0], msgs


def _memory(rank, world_size, per_token_budget):
    """Largest context whose cache fits ``budget`` bytes per rank; fill it and decode to the end."""
    from seqpar.decode import decode_attention

    budget = per_token_budget * 2 * KV * D * 8  # bytes: float64 K and V
    length = 256 * world_size
    cache = _cache(max_batch=1, max_seq_len=length, block_size=16)
    g = torch.Generator().manual_seed(0)
    (slot,) = cache.allocate(1)
    for _ in range(length // 128):
        q, k, v = _step(g, 1, 128)
        decode_attention(cache, 0, q, k, v, slots=[slot])
    q, k, v = _step(g, 1, 1)
    try:
        decode_attention(cache, 0, q, k, v, slots=[slot])
        full = None
    except ValueError as e:
        full = str(e)
    return cache.nbytes(), budget, length, cache.local_count(slot, length), full


def test_context_that_fits_a_budget_grows_with_world_size(dist, one_thread):
    rows = {}
    for w in (1, 2, 4):
        res = dist(w, _memory, 256 + 17)
        for nbytes, budget, _length, _held, full in res:
            assert nbytes <= budget, (w, nbytes, budget)
            assert "cache full" in full
        rows[w] = (res[0][2], res[0][0], [r[3] for r in res])
        assert sum(rows[w][2]) == rows[w][0]  # every token stored once
    assert rows[2][0] == 2 * rows[1][0] and rows[4][0] == 4 * rows[1][0]


def _add_and_free(rank, world_size):
    """Sequence A runs throughout; B ends, C takes B's slot, A and C go on in one batch: all against the reference."""
    from seqpar.decode import decode_attention

    g = torch.Generator().manual_seed(9)
    cache = _cache(max_batch=2, block_size=2)
    a, b = cache.allocate(2)
    full = {}  # sequence name -> (K, V) so far

    def step(names, slots, t):
        q, k, v = _step(g, len(names), t)
        out = decode_attention(cache, 0, q, k, v, slots=slots)
        err = 0.0
        for i, name in enumerate(names):
            k0, v0 = full.get(name, (k[i, :, :0], v[i, :, :0]))
            full[name] = (torch.cat([k0, k[i]], 1), torch.cat([v0, v[i]], 1))
            kk, vv = full[name]
            n = kk.shape[1]
            mask = torch.arange(n).view(1, -1) <= torch.arange(n - t, n).view(-1, 1)
            want = ref_attention(q[i : i + 1], kk[None], vv[None], mask=mask)[0][0]
            err = max(err, (out[i] - want).abs().max().item())
        return err

    err = step(["A", "B"], [a, b], 5)
    err = max(err, step(["A", "B"], [a, b], 1))
    cache.free([b])
    (c,) = cache.allocate(1)
    err = max(err, step(["C"], [c], 3))  # C starts while A waits
    for _ in range(3):
        err = max(err, step(["A", "C"], [a, c], 1))
    return err, c == b, [cache.lengths[0][s] for s in (a, c)]


def test_sequences_added_and_freed_while_others_continue(dist, one_thread):
    for w in (2, 3):
        for err, reused, lengths in dist(w, _add_and_free):
            assert err < 1e-12 and reused and lengths == [9, 6], (w, err, reused, lengths)
