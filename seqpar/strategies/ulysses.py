"""Ulysses: all-to-all from sequence-sharded to head-sharded, attention over the whole sequence, all-to-all back.

::

    forward   [q | k | v] (B, H, S_r, D) per rank  --all-to-all-->  (B, H_j, S, D): rank j's heads, every token
              tokens placed at their global positions (zigzag order restored: one causal diagonal, no blocks)
              (out_j, lse_j) = attend(q_j, k_j, v_j)  over the whole sequence, masks on global positions
              out (B, H_j, S, D)  --all-to-all-->  (B, H, S_r, D)
    backward  dout --all-to-all--> head-sharded;  (dq_j, dk_j, dv_j) = block backward;  all-to-all back
              (K/V head copies, H_kv < W: their gradients are summed at home, sent in float32)

Any ``S``: ranks send and receive uneven counts (:meth:`Communicator.all_to_all_v`, no padding).

Heads (:func:`head_split`): with ``H_kv >= W`` the K/V heads are split between the ranks (``tensor_split``
sizes, so ``H_kv % W != 0`` is an *uneven* split: some ranks attend ``H / H_kv`` more query heads than
others) and each rank gets the query heads of its K/V heads: K/V are moved, never repeated. With
``H_kv < W`` the query heads are split (uneven when ``W`` does not divide ``H``; ranks get no head when
``H < W``) and each rank receives the K/V heads its query heads use: a K/V head goes to the ranks whose
query heads share it, ``W`` copies in all when ``H_kv`` divides ``W`` and ``W`` divides ``H`` (the fewest a
rank-per-head split allows: every rank needs one), one more per query-head range that straddles two K/V heads
otherwise. An uneven split is chosen over an error because it is exact and costs only load balance: the
slowest rank does ``ceil(n / W)`` of ``n`` heads.

Bytes per rank ``r`` (``h_j``, ``g_j``: query / K/V heads of rank ``j``; ``S_j`` its tokens)::

    forward   sum_{j != r} B*S_r*D*(h_j + 2*g_j)*e   +   sum_{j != r} B*S_j*D*h_r*e
    backward  sum_{j != r} B*S_r*D*h_j*e             +   sum_{j != r} B*S_j*D*(h_r + 2*g_r)*e'

``e'`` = ``e`` without K/V copies; with them the gradients go in the float32 (float64) accumulator type.
Memory: the head-sharded q, k, v, out of the whole sequence: as large as the local shards when heads split
evenly -- nothing gathered.
"""

from __future__ import annotations

import torch

from seqpar.ops.lse import stat_dtype
from seqpar.ops.masks import Tokens
from seqpar.ops.tiled import tiled_backward, tiled_forward
from seqpar.strategies.setup import Setup


def _bounds(n: int, parts: int) -> list[tuple[int, int]]:
    """``torch.tensor_split`` bounds: the first ``n % parts`` parts get one more."""
    q, r = divmod(n, parts)
    out, a = [], 0
    for i in range(parts):
        b = a + q + (i < r)
        out.append((a, b))
        a = b
    return out


def head_split(heads: int, kv_heads: int, world_size: int) -> list[tuple[int, int, int, int]]:
    """Per rank ``(qa, qb, ka, kb)``: the query heads ``[qa, qb)`` and K/V heads ``[ka, kb)`` it attends."""
    g = heads // kv_heads
    if kv_heads >= world_size:
        return [(ka * g, kb * g, ka, kb) for ka, kb in _bounds(kv_heads, world_size)]
    out = []
    for qa, qb in _bounds(heads, world_size):
        out.append((qa, qb, qa // g, -(-qb // g)) if qb > qa else (qa, qb, 0, 0))
    return out


def _local_kv(qa: int, qb: int, ka: int, kb: int, g: int) -> torch.Tensor | None:
    """Which of this rank's K/V heads each of its query heads uses, when the kernel's own GQA mapping
    (local query head i -> K/V head i // ((qb - qa) / (kb - ka))) would be wrong -- the query heads cut a group,
    e.g. H = 8, H_kv = 2, W = 3: rank 1 attends query heads 3..5 with K/V heads 0 (head 3) and 1 (heads 4, 5).
    None when the mapping holds (whole groups, or a single K/V head)."""
    n_q, n_k = qb - qa, kb - ka
    if n_q == 0 or n_k <= 1 or (qa % g == 0 and qb % g == 0):
        return None
    return torch.tensor([(qa + i) // g - ka for i in range(n_q)])


def has_copies(split: list[tuple[int, int, int, int]]) -> bool:
    """Whether some K/V head goes to more than one rank."""
    return sum(kb - ka for _, _, ka, kb in split) > max(kb for *_, kb in split)


def _full_tokens(setup: Setup, device) -> Tokens:
    """The whole sequence in position order, with every rank's document ids / key padding placed."""
    seq_len = sum(setup.sizes)
    pos = torch.arange(seq_len, device=device)

    def place(attr):
        parts = [getattr(t, attr) for t in setup.tokens]
        if parts[0] is None:
            return None
        full = parts[0].new_empty(parts[0].shape[0], seq_len)
        for t, p in zip(setup.tokens, parts):
            full[:, t.pos] = p
        return full

    return Tokens(pos, place("doc"), place("keep"))


def _to_heads(setup: Setup, parts: list[tuple[torch.Tensor, list[tuple[int, int]]]], dtype) -> list[torch.Tensor]:
    """Sequence-sharded ``(B, *, S_r, D)`` tensors -> head-sharded ``(B, n, S, D)`` ones, positions in order.

    ``parts``: (tensor, per-rank head ranges) pairs; every rank ``j`` receives heads ``ranges[j]`` of each."""
    comm, w, r = setup.comm, setup.world_size, setup.rank
    x0 = parts[0][0]
    b, s_r, d, seq_len = x0.shape[0], x0.shape[2], x0.shape[3], sum(setup.sizes)
    send_counts = [sum((hb - ha) * b * s_r * d for _, rng in parts for ha, hb in [rng[j]]) for j in range(w)]
    buf = torch.empty(sum(send_counts), dtype=dtype, device=x0.device)
    off = 0
    for j in range(w):
        for t, rng in parts:
            ha, hb = rng[j]
            n = (hb - ha) * b * s_r * d
            buf[off : off + n].view(b, hb - ha, s_r, d).copy_(t[:, ha:hb])
            off += n
    mine = [rng[r][1] - rng[r][0] for _, rng in parts]
    recv_counts = [sum(h * b * setup.sizes[i] * d for h in mine) for i in range(w)]
    got = comm.all_to_all_v(buf, send_counts, recv_counts)
    del buf
    outs = [torch.empty(b, h, seq_len, d, dtype=dtype, device=x0.device) for h in mine]
    off = 0
    for i in range(w):
        s_i, pos = setup.sizes[i], setup.tokens[i].pos
        for o, h in zip(outs, mine):
            n = h * b * s_i * d
            o.index_copy_(2, pos, got[off : off + n].view(b, h, s_i, d))
            off += n
    return outs


def _to_sequence(
    setup: Setup, parts: list[tuple[torch.Tensor, list[tuple[int, int]]]], heads: list[int], dtype,
) -> list[torch.Tensor]:
    """Head-sharded ``(B, h_r, S, D)`` tensors -> sequence-sharded ``(B, heads[k], S_r, D)`` ones (dtype ``dtype``);
    a head that several ranks hold (``ranges`` overlap) is summed."""
    comm, w, r = setup.comm, setup.world_size, setup.rank
    x0 = parts[0][0]
    b, d, s_r = x0.shape[0], x0.shape[3], setup.sizes[r]
    mine = [rng[r][1] - rng[r][0] for _, rng in parts]
    send_counts = [sum(h * b * setup.sizes[j] * d for h in mine) for j in range(w)]
    buf = torch.empty(sum(send_counts), dtype=dtype, device=x0.device)
    off = 0
    for j in range(w):
        s_j, pos = setup.sizes[j], setup.tokens[j].pos
        for (t, _), h in zip(parts, mine):
            n = h * b * s_j * d
            dst = buf[off : off + n].view(b, h, s_j, d)
            if t.dtype == dtype:
                torch.index_select(t, 2, pos, out=dst)
            else:
                dst.copy_(t.index_select(2, pos))
            off += n
    recv_counts = [sum((rng[i][1] - rng[i][0]) * b * s_r * d for _, rng in parts) for i in range(w)]
    got = comm.all_to_all_v(buf, send_counts, recv_counts)
    del buf
    outs = [torch.zeros(b, n, s_r, d, dtype=dtype, device=x0.device) for n in heads]
    off = 0
    for i in range(w):
        for o, (_, rng) in zip(outs, parts):
            ha, hb = rng[i]
            n = (hb - ha) * b * s_r * d
            o[:, ha:hb] += got[off : off + n].view(b, hb - ha, s_r, d)
            off += n
    return outs


def take_saved(ctx, strategy: str) -> list:
    """The head-sharded tensors the forward left in ``ctx.head_sharded`` (intermediates, so not through
    ``save_for_backward``), dropped from ``ctx`` unless this backward retains the graph: the backward can then
    free them as soon as the kernel is done instead of holding them through the all-to-alls back."""
    saved = ctx.head_sharded
    if saved is None:
        raise RuntimeError(
            f"strategy={strategy!r}: backward through this attention call a second time; its saved head-sharded "
            "tensors were freed after the first backward (pass retain_graph=True to keep them)"
        )
    keep = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)  # private, in torch 2.13
    if keep is not None and not keep():  # retain_graph / create_graph: they must stay (kept when torch won't say)
        ctx.head_sharded = None
    return saved


class UlyssesAttention(torch.autograd.Function):
    """
    ============  ========================  ===============================
    q             (B, H, S_r, D)            this rank's queries
    k, v          (B, H_kv, S_r, D)         this rank's keys / values
    out           (B, H, S_r, D)            this rank's slice of the output
    ============  ========================  ===============================

    Memory: one all-to-all per tensor (q, k, v, out; dout; dq, dk, dv), so at most one tensor's send and
    receive buffers are alive at a time. The head-sharded q, k, v, out are saved for the backward (as large as
    the local shards with an even head split).
    """

    @staticmethod
    def forward(ctx, q, k, v, setup: Setup):
        h, h_kv, w = q.shape[1], k.shape[1], setup.world_size
        split = head_split(h, h_kv, w)
        qr, kr = [(a, b) for a, b, _, _ in split], [(a, b) for _, _, a, b in split]
        (qf,), (kf,), (vf,) = (_to_heads(setup, [(t, rng)], q.dtype) for t, rng in ((q, qr), (k, kr), (v, kr)))
        tokens = _full_tokens(setup, q.device)
        idx = _local_kv(*split[setup.rank], h // h_kv)
        if idx is not None:  # one K/V head per query head here (only H_kv < W with groups cut; see _local_kv)
            idx = idx.to(q.device)
            kf, vf = kf.index_select(1, idx), vf.index_select(1, idx)
        if qf.shape[1]:
            out_f, lse_f = tiled_forward(qf, kf, vf, tokens, tokens, setup.spec, setup.scale)
            out_f = out_f.to(q.dtype)
        else:  # this rank has no head (H < W)
            out_f = qf.new_zeros(qf.shape)
            lse_f = torch.zeros(qf.shape[:3], dtype=stat_dtype(q.dtype), device=q.device)
        (out,) = _to_sequence(setup, [(out_f, qr)], [h], q.dtype)
        ctx.head_sharded = [qf, kf, vf, out_f, lse_f]  # intermediates: on ctx, so the backward can let them go
        ctx.setup, ctx.split, ctx.tokens, ctx.shape, ctx.idx = setup, split, tokens, (h, h_kv), idx
        return out

    @staticmethod
    def backward(ctx, dout):
        qf, kf, vf, out_f, lse_f = take_saved(ctx, "ulysses")  # freed after the kernel, not held to the end
        setup, split, tokens = ctx.setup, ctx.split, ctx.tokens
        dtype, (h, h_kv) = qf.dtype, ctx.shape
        qr, kr = [(a, b) for a, b, _, _ in split], [(a, b) for _, _, a, b in split]
        (dof,) = _to_heads(setup, [(dout, qr)], dtype)
        if qf.shape[1]:
            gq, gk, gv = tiled_backward(dof, qf, kf, vf, out_f, lse_f, tokens, tokens, setup.spec, setup.scale)
        else:
            gq, gk, gv = torch.zeros_like(qf), torch.zeros_like(kf), torch.zeros_like(vf)
        del dof, qf, kf, vf, out_f, lse_f
        if ctx.idx is not None:  # sum the per-query-head K/V gradients back onto this rank's K/V heads
            _, _, ka, kb = split[setup.rank]
            gk, gv = (gk.new_zeros(gk.shape[0], kb - ka, *gk.shape[2:]).index_add_(1, ctx.idx, t) for t in (gk, gv))
        gd = stat_dtype(dtype) if has_copies(split) else dtype  # copies' gradients are summed: accumulate wide
        (dq,) = _to_sequence(setup, [(gq, qr)], [h], gd)
        del gq
        (dk,) = _to_sequence(setup, [(gk, kr)], [h_kv], gd)
        del gk
        (dv,) = _to_sequence(setup, [(gv, kr)], [h_kv], gd)
        return dq.to(dtype), dk.to(dtype), dv.to(dtype), None
