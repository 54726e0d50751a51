"""seqpar.decode over seqpar.KVCache against the float64 reference (seqpar/ops/reference.py).

Run: ``python -m pytest tests/test_decode.py -q``

Each case replays the same random steps on every rank: sequences of different lengths (ragged) are
filled by multi-token steps, then decoded in a batch with T = 1 and T > 1; the reference attends the
same queries over each sequence's full K/V with the mask written from the formula (causal on global
positions, window, padding). float64: tolerance 1e-12 max-abs (relative to max |ref|); float32: 1e-5.
"""

from __future__ import annotations

import torch

from seqpar.ops.reference import attention as ref_attention

H, D = 4, 8


def _ref(q, ks, vs, lens, t, window, keep):
    """Reference out/lse/weights for row b: queries at positions lens[b]..+t over keys 0..lens[b]+t-1."""
    outs, lses, ws = [], [], []
    for b in range(q.shape[0]):
        n = lens[b] + t
        i = torch.arange(lens[b], n).view(-1, 1)
        j = torch.arange(n).view(1, -1)
        m = j <= i
        if window is not None:
            m = m & (i - j <= window)
        if keep is not None:
            m = m & keep[b, :n].view(1, -1)
        o, lse, w = ref_attention(q[b : b + 1], ks[b][..., :n, :].unsqueeze(0), vs[b][..., :n, :].unsqueeze(0),
                                  mask=m.view(1, 1, t, n))
        outs.append(o[0]), lses.append(lse[0]), ws.append(w[0])
    return outs, lses, ws


def _decode_case(rank, world_size, placement, block, kv_heads, lens0, steps, window, pad, combine, dtype):
    from seqpar.cache import KVCache
    from seqpar.decode import decode_attention

    g = torch.Generator().manual_seed(1)  # the same stream on every rank: replicated inputs
    n_layers, B = 2, len(lens0)
    max_len = max(lens0) + sum(steps) + 3
    cache = KVCache(num_layers=n_layers, max_batch=B + 1, max_seq_len=max_len, kv_heads=kv_heads, head_dim=D,
                    dtype=dtype, placement=placement, block_size=block, combine=combine)
    taken = cache.allocate(B + 1)  # slot 1 is freed again: the batch's slots are 0, 2, 3, ... (two runs)
    cache.free([taken[1]])
    slots = taken[:1] + taken[2:]
    keep = None
    if pad:
        keep = torch.rand(B, max_len, generator=g) > 0.3
        keep[:, 0] = True  # every query sees at least its first key (padding of a whole row tested elsewhere)
    full_k = [[torch.zeros(kv_heads, 0, D, dtype=dtype) for _ in range(B)] for _ in range(n_layers)]
    full_v = [[torch.zeros(kv_heads, 0, D, dtype=dtype) for _ in range(B)] for _ in range(n_layers)]
    err = 0.0
    outs: list = []  # every step's outputs: bitwise the same on every rank

    def step(rows, t):
        nonlocal err
        for layer in range(n_layers):
            q = torch.randn(len(rows), H, t, D, generator=g, dtype=dtype)
            k = torch.randn(len(rows), kv_heads, t, D, generator=g, dtype=dtype)
            v = torch.randn(len(rows), kv_heads, t, D, generator=g, dtype=dtype)
            lens = [cache.lengths[layer][slots[b]] for b in rows]
            for i, b in enumerate(rows):
                full_k[layer][b] = torch.cat([full_k[layer][b], k[i]], dim=1)
                full_v[layer][b] = torch.cat([full_v[layer][b], v[i]], dim=1)
            kpm = None if keep is None else keep[rows]
            out, w, lse = decode_attention(cache, layer, q, k, v, slots=[slots[b] for b in rows], window_size=window,
                                           key_padding_mask=kpm, return_lse=True, return_weights=True)
            outs.append((out, lse))
            ro, rl, rw = _ref(q, [full_k[layer][b] for b in rows], [full_v[layer][b] for b in rows], lens, t, window,
                              kpm)
            for i, b in enumerate(rows):
                scale = ro[i].abs().max().clamp_min(1)
                err = max(err, ((out[i] - ro[i]).abs().max() / scale).item())
                err = max(err, (lse[i] - rl[i]).abs().max().item() / max(1.0, rl[i].abs().max().item()))
                pos = cache.positions(slots[b], layer)
                assert torch.isfinite(out).all() and not torch.isnan(lse).any()
                err = max(err, (w[i][..., : len(pos)] - rw[i][..., pos]).abs().max().item() if len(pos) else 0.0)

    for b, n in enumerate(lens0):  # ragged fill: one sequence at a time, a multi-token step each
        if n:
            step([b], n)
    for i, t in enumerate(steps):  # rows in slot order, then reversed (any order of any slots)
        step(list(range(B))[::-1 if i % 2 else 1], t)
    counts = [cache.local_count(s, cache.lengths[0][s]) for s in slots]
    return err, counts, [cache.lengths[0][s] for s in slots], outs


CASES = [
    # placement, block, kv_heads, lens0, steps, window, pad, combine, dtype
    ("round_robin", 4, 2, [5, 1, 13], [1, 1, 3, 1], None, False, "allgather", torch.float64),
    ("round_robin", 3, 1, [7, 2, 11], [1, 2, 1], 4, True, "allreduce", torch.float64),
    ("contiguous", 16, 4, [6, 17, 3], [1, 3, 1], None, True, "allgather", torch.float64),
    ("contiguous", 16, 2, [9, 4, 2], [2, 1], 3, False, "allreduce", torch.float64),
    ("round_robin", 16, 2, [2, 1, 0], [1, 1], None, False, "auto", torch.float64),  # short: ranks hold nothing
    ("round_robin", 5, 2, [19, 8, 4], [1, 4], None, True, "auto", torch.float32),
]


def _all_cases(rank, world_size):
    return [_decode_case(rank, world_size, *c) for c in CASES]


def test_decode_matches_reference(dist, one_thread):
    for w in (1, 2, 3, 4):
        per_rank = dist(w, _all_cases)
        for c, case in enumerate(CASES):
            tol = 1e-12 if case[-1] == torch.float64 else 1e-5
            errs = [per_rank[r][c][0] for r in range(w)]
            assert max(errs) <= tol, (w, case, errs)
            counts = [per_rank[r][c][1] for r in range(w)]
            for r in range(1, w):  # the same bits on every rank, every step
                assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
                           for a, b in zip(per_rank[0][c][3], per_rank[r][c][3])), (w, case, r)
            lengths = per_rank[0][c][2]
            assert [sum(col) for col in zip(*counts)] == lengths, (w, case, counts)  # each key on exactly one rank
            if w > 1 and case[1] == 16 and case[3][1] < 16:
                assert any(0 in row for row in counts), counts  # some rank held no key of a short sequence


def _steady_state(rank, world_size, combine, b, t):
    """Collectives and bytes of decode steps once the step shape is agreed: 1 (allgather) or 2 (allreduce)."""
    from seqpar.cache import KVCache
    from seqpar.decode import decode_attention
    from seqpar.plan import decode_combine

    cache = KVCache(num_layers=2, max_batch=b, max_seq_len=64, kv_heads=2, head_dim=D, combine=combine)
    slots = cache.allocate(b)
    comm = cache.comm
    calls = []
    for name in ("_all_gather", "_all_reduce"):
        orig = getattr(comm, name)
        setattr(comm, name, lambda *a, _o=orig, _n=name: (calls.append(_n), _o(*a))[1])
    g = torch.Generator().manual_seed(0)
    per_step = []
    try:
        for _step in range(4):
            for layer in range(2):
                n0, b0 = len(calls), comm.bytes_sent
                q = torch.randn(b, H, t, D, generator=g)
                k, v = torch.randn(b, 2, t, D, generator=g), torch.randn(b, 2, t, D, generator=g)
                decode_attention(cache, layer, q, k, v, slots=slots)
                per_step.append((len(calls) - n0, comm.bytes_sent - b0))
    finally:
        for name in ("_all_gather", "_all_reduce"):
            delattr(comm, name)
    plan = decode_combine(batch=b, heads=H, q_len=t, head_dim=D, world_size=world_size)
    return per_step, plan.bytes_per_rank[cache.combine if combine != "auto" else plan.combine]


def test_one_collective_per_layer_and_bytes(dist, one_thread):
    for combine, n_coll in (("allgather", 1), ("allreduce", 2)):
        for w in (2, 3):
            per_step, want = dist(w, _steady_state, combine, 2, 3)[0]
            first, rest = per_step[0], per_step[1:]
            assert first[0] == n_coll + 1, per_step  # the first step agrees on the shape: one header-only round
            assert all(c == n_coll and nb == want for c, nb in rest), (combine, w, per_step, want)


def _varying_batches(rank, world_size, combine, sizes):
    """Steps over batches of ``sizes`` sequences (a service's batches vary step to step), each a different
    subset of 4 slots in a different order: collectives, bytes and the max error against the reference."""
    from seqpar.cache import KVCache
    from seqpar.decode import decode_attention
    from seqpar.plan import decode_combine

    cache = KVCache(num_layers=1, max_batch=4, max_seq_len=2 * len(sizes) + 8, kv_heads=2, head_dim=D,
                    dtype=torch.float64, combine=combine)
    slots = cache.allocate(4)
    comm = cache.comm
    calls = []
    orig = comm._all_gather if combine == "allgather" else comm._all_reduce
    name = "_all_gather" if combine == "allgather" else "_all_reduce"
    setattr(comm, name, lambda *a: (calls.append(1), orig(*a))[1])
    g = torch.Generator().manual_seed(2)
    full = {s: (torch.zeros(2, 0, D, dtype=torch.float64), torch.zeros(2, 0, D, dtype=torch.float64)) for s in slots}
    per_step, err = [], 0.0
    try:
        for b in sizes:
            rows = torch.randperm(4, generator=g)[:b].tolist()  # any subset, any order
            q = torch.randn(b, H, 1, D, generator=g, dtype=torch.float64)
            k, v = (torch.randn(b, 2, 1, D, generator=g, dtype=torch.float64) for _ in range(2))
            lens = [cache.lengths[0][slots[r]] for r in rows]
            n0, b0 = len(calls), comm.bytes_sent
            out = decode_attention(cache, 0, q, k, v, slots=[slots[r] for r in rows])
            per_step.append((len(calls) - n0, comm.bytes_sent - b0, cache.step_shape[0]))
            for j, r in enumerate(rows):
                full[slots[r]] = tuple(torch.cat([full[slots[r]][x], (k, v)[x][j]], dim=1) for x in (0, 1))
            ro, _, _ = _ref(q, [full[slots[r]][0] for r in rows], [full[slots[r]][1] for r in rows], lens, 1, None,
                            None)
            err = max(err, max((out[j] - ro[j]).abs().max().item() for j in range(b)))
    finally:
        delattr(comm, name)
    want = {c: decode_combine(batch=c, heads=H, q_len=1, head_dim=D, world_size=world_size).bytes_per_rank[combine]
            for c in (1, 2, 3, 4)}
    return per_step, want, err


def test_varying_batches_reuse_the_agreed_payload(dist, one_thread):
    """A step of no more rows than the agreed shape is one collective (padded to that shape); only a larger one
    renegotiates; a step of <= 1/4 of the agreed rows shrinks it. Results exact whatever the subset and order."""
    sizes = [2, 1, 2, 4, 1, 2, 3, 2]
    #        the agreed batch after each step: 2, 2, 2, 4, 1 (shrunk), 2, 3, 3
    for combine, n_coll in (("allgather", 1), ("allreduce", 2)):
        per_step, want, err = dist(2, _varying_batches, combine, sizes)[0]
        assert err <= 1e-12, (combine, err)
        assert [cap for _, _, cap in per_step] == [2, 2, 2, 4, 1, 2, 3, 3], per_step
        renegotiated = [n == n_coll + 1 for n, _, _ in per_step]
        assert renegotiated == [True, False, False, True, False, True, True, False], (combine, per_step)
        if combine == "allgather":  # the bytes of the agreed (padded) payload; float64 here: 2x the model's
            before, ran = [0, 2, 2, 2, 4, 1, 2, 3], [2, 2, 2, 4, 4, 2, 3, 3]  # agreed batch before / at the combine
            payload = {0: 12 * 8, **{c: 2 * want[c] for c in want}}  # 0: nothing agreed yet, the header only
            assert [nb for _, nb, _ in per_step] == [payload[r] + (payload[b] if again else 0)
                                                      for b, r, again in zip(before, ran, renegotiated)], per_step


def test_decode_combine_cost_model():
    from seqpar.plan import decode_combine

    small = decode_combine(batch=1, heads=32, q_len=1, head_dim=128, world_size=2)
    assert small.combine == "allgather" and small.collectives == {"allgather": 1, "allreduce": 2}
    assert small.bytes_per_rank["allgather"] == (32 * 129 + 12) * 4  # 12 header fields; no context length anywhere
    big = decode_combine(batch=64, heads=32, q_len=4, head_dim=128, world_size=8)
    assert big.combine == "allreduce", big
    assert decode_combine(batch=1, heads=1, q_len=1, head_dim=1, world_size=1).combine == "allgather"


def _hostile_steps(rank, world_size):
    """decode over scattered slots (3, 0) with q / k_new / v_new in every odd layout of tests/test_strides.py, and a
    NaN in one query row: per step (layout, max error of the finite rows vs float64, whether the NaN row is NaN
    and only it)."""
    from test_strides import LAYOUTS, odd

    from seqpar.cache import KVCache
    from seqpar.decode import decode_attention

    g = torch.Generator().manual_seed(3)
    cache = KVCache(num_layers=1, max_batch=4, max_seq_len=40, kv_heads=2, head_dim=D, dtype=torch.float64,
                    block_size=3)
    slots = cache.allocate(4)
    rows = [slots[3], slots[0]]
    full = {s: [torch.zeros(2, 0, D, dtype=torch.float64)] * 2 for s in rows}
    out_rows = []
    for how in (*LAYOUTS, "nan"):
        q = torch.randn(2, H, 2, D, generator=g, dtype=torch.float64)
        k1, v1 = (torch.randn(2, 1, 2, D, generator=g, dtype=torch.float64) for _ in range(2))
        k, v = k1.expand(2, 2, 2, D).contiguous(), v1.expand(2, 2, 2, D).contiguous()  # equal kv heads: "expanded"
        if how == "nan":
            q[1, 2, 1, 0] = float("nan")  # one query row of the second sequence
        args = (q, k, v) if how == "nan" else tuple(odd(t, how) for t in (q, k, v))
        lens = [cache.lengths[0][s] for s in rows]
        out = decode_attention(cache, 0, *args, slots=rows)
        for i, s in enumerate(rows):
            full[s] = [torch.cat([full[s][0], k[i]], 1), torch.cat([full[s][1], v[i]], 1)]
        ro, _, _ = _ref(q, [full[s][0] for s in rows], [full[s][1] for s in rows], lens, 2, None, None)
        ref = torch.stack(ro)
        nan = torch.isnan(out)
        finite = ~torch.isnan(ref)
        out_rows.append((how, float((out[finite] - ref[finite]).abs().max()), bool(torch.equal(nan, ~finite))))
    return out_rows


def test_odd_layouts_and_nan_in_decode(dist, one_thread):
    for w in (2, 3):
        for rank, steps in enumerate(dist(w, _hostile_steps)):
            for how, err, nan_ok in steps:
                assert err <= 1e-12 and nan_ok, (w, rank, how, err, nan_ok)
            assert [h for h, _, _ in steps][-1] == "nan" and len(steps) == 5
