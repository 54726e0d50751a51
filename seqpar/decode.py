"""Exact decode over a sharded KV cache: replicated queries, one combining collective per layer.

A step appends ``T >= 1`` new tokens to each sequence of the batch (K/V replicated on every rank, as
every rank runs the same replicated model) and attends their queries over the whole sequence::

    every rank   store the new tokens it owns (seqpar.cache placement); lengths not yet committed
                 (out_r, lse_r) = attention(q, K_r, V_r)          fused local kernel, masks on
                                                                  global positions (causal, window, padding)
    combine      "allgather": gather [header | out_r | lse_r] float32 from every rank, merge in rank
                              order (ops.lse.merge_many) -- 1 collective, (W-1) * n bytes
                 "allreduce": all-reduce MAX [header | -header | lse_r], then all-reduce SUM of
                              [exp(lse_r - m) out_r | exp(lse_r - m)] -- 2 collectives, 2(W-1)/W * n bytes
    commit       lengths += T (only once every rank agreed)

with ``n = B * H * T * (D + 1) * 4`` bytes: independent of the context length. The cache's
``combine="auto"`` picks by :func:`seqpar.plan.decode_combine` (latency vs bandwidth) from the agreed
step shape, so every rank picks the same. Every rank computes the same merge
from the same numbers, so the result is bitwise identical on every rank.

Validated once, not per step: the step's arguments travel in a small header *inside* the combining
collective (status, B, H, T, D, layer, scale, window, padding flag, slot and length hashes, a fingerprint of
q, k_new, v_new). The
payload size is that of the last step shape ``(B, H, T)`` all ranks agreed on; a rank whose step has
a new shape, or fails a local check, sends a header-only flag in that same collective, then every rank
either agrees on the new shape (one more collective: the real combine) or raises the same
``ValueError``. Ranks therefore always issue the same collectives with the same sizes: no hang, and
on any error the cache is unchanged (new K/V were written past the committed lengths only).

Shapes::

    q             (B, H, T, D)          identical on every rank; H % kv_heads == 0 (GQA, never repeated)
    k_new, v_new  (B, kv_heads, T, D)   identical on every rank
    out           (B, H, T, D)          q's dtype, identical on every rank
    lse           (B, H, T)             float32 (float64 for float64), -inf on rows seeing no key
    weights       (B, H, T, n)          this rank's keys, local order (``cache.positions(slot)``)
"""

from __future__ import annotations

from typing import Any

import torch

from seqpar import checks
from seqpar.cache import KVCache, _hash
from seqpar.ops.kernels import attention_forward
from seqpar.ops.lse import NEG_INF, finite_or_zero, global_lse_from_max_sum, merge_many, stat_dtype

_HEADER = ("status", "B", "H", "T", "D", "layer", "scale", "window", "padding", "slots hash", "lengths hash",
           "q/k_new/v_new fingerprint")
_NH = len(_HEADER)
_OK, _RESHAPE, _ERROR = 0, 1, 2  # header status: max over ranks tells whether anyone failed


def _local_step(cache: KVCache, layer, slots, q, k_new, v_new, scale, window_size, key_padding_mask):
    """Store the owned new tokens; attend over this rank's keys. Returns (out_r, lse_r, keys, mask)."""
    b, h, t, d = q.shape
    sd = stat_dtype(q.dtype)
    lens = [cache.lengths[layer][s] for s in slots]
    new_counts = []
    for i, s in enumerate(slots):
        n0 = cache.local_count(s, lens[i])
        p = torch.arange(lens[i], lens[i] + t)
        mine = (cache.owners(s, p) == cache.rank).nonzero().flatten()
        if mine.numel():
            idx = slice(n0, n0 + mine.numel())
            cache.k[layer, s, :, idx] = k_new[i, :, mine]
            cache.v[layer, s, :, idx] = v_new[i, :, mine]
        new_counts.append(n0 + mine.numel())
    n = max(new_counts)
    contiguous = slots == list(range(slots[0], slots[0] + b))
    sel = slice(slots[0], slots[0] + b) if contiguous else torch.tensor(slots)
    kk, vv = cache.k[layer, sel, :, :n], cache.v[layer, sel, :, :n]  # views when the slots are a range
    pos = cache.pos[sel, :n]  # (B, n) global positions of the local keys
    if n == 0:
        return q.new_zeros(q.shape, dtype=sd), torch.full((b, h, t), NEG_INF, dtype=sd), (kk, pos), None
    qpos = torch.tensor(lens).unsqueeze(-1) + torch.arange(t)  # (B, T)
    all_valid = all(c == n for c in new_counts) and bool((pos[:, -1] <= qpos[:, 0]).all())
    mask = None
    if not all_valid or window_size is not None or key_padding_mask is not None:
        m = (torch.arange(n).unsqueeze(0) < torch.tensor(new_counts).unsqueeze(-1)).unsqueeze(1)  # (B, 1, n)
        m = m & (pos.unsqueeze(1) <= qpos.unsqueeze(-1))  # causal (B, T, n)
        if window_size is not None:
            m = m & (qpos.unsqueeze(-1) - pos.unsqueeze(1) <= window_size)
        if key_padding_mask is not None:
            keep = key_padding_mask.to(torch.bool).gather(1, pos.clamp(0, key_padding_mask.shape[1] - 1))
            m = m & keep.unsqueeze(1)
        mask = m.unsqueeze(1)  # (B, 1, T, n)
    # GQA packing (flash-decoding): the G query heads of a kv head become G*T query rows of that head,
    # so each K/V row is read once per kv head, not once per query head (decode is memory-bound).
    hkv = kk.shape[1]
    g = h // hkv
    qp = q.reshape(b, hkv, g * t, d)  # row g_i * T + t_i; head h = kv * G + g_i (the GQA mapping)
    mp = None if mask is None else mask.repeat(1, 1, g, 1)  # (B, 1, G*T, n)
    out, lse = attention_forward(qp, kk, vv, scale=scale, mask=mp)
    return out.reshape(b, h, t, d).to(sd), lse.reshape(b, h, t).to(sd), (kk, pos), mask


def _check(cache: KVCache, layer, slots, q, k_new, v_new, key_padding_mask) -> None:
    r = cache.rank
    checks.check_qkv(q, k_new, v_new, r)
    if q.dtype != cache.dtype:
        raise ValueError(f"rank {r}: q.dtype={q.dtype} but the cache holds {cache.dtype}")
    if not isinstance(layer, int) or not (0 <= layer < cache.num_layers):
        raise ValueError(f"rank {r}: layer={layer!r}; allowed 0..{cache.num_layers - 1}")
    cache._check_slots(slots)
    b, _, t, d = q.shape
    if len(set(slots)) != len(slots) or b != len(slots):
        raise ValueError(f"rank {r}: q has batch {b} but slots={slots} (distinct live slots, one per row)")
    want = (b, cache.kv_heads, t, cache.head_dim)
    if tuple(k_new.shape) != want or tuple(v_new.shape) != want:
        raise ValueError(f"rank {r}: k_new {tuple(k_new.shape)}, v_new {tuple(v_new.shape)}; expected "
                         f"(B, kv_heads, T, head_dim)={want} (T = q.shape[2])")
    for s in slots:
        new_len = cache.lengths[layer][s] + t
        need = max(cache.local_count(s, new_len, rr) for rr in range(cache.world_size))
        if new_len > cache.max_seq_len or need > cache.capacity:
            raise ValueError(f"rank {r}: cache full: slot {s} would hold {new_len} tokens "
                             f"(max_seq_len={cache.max_seq_len}, per-rank capacity {cache.capacity})")
    if key_padding_mask is not None:
        longest = max(cache.lengths[layer][s] for s in slots) + t
        if key_padding_mask.dim() != 2 or key_padding_mask.shape[0] != b or key_padding_mask.shape[1] < longest:
            raise ValueError(f"rank {r}: key_padding_mask shape {tuple(key_padding_mask.shape)}; expected "
                             f"(B, >= {longest}) over global positions")


def _inputs_hash(q, k_new, v_new) -> int:
    """The replicated step inputs must be identical on every rank (a differing q would merge partials of
    different queries: a silently wrong answer). ``checks.fingerprint`` of each (integer sums of their bits,
    about one read of these small tensors), folded to < 2**23 so it is exact in the float32 header; 0 with
    ``SEQPAR_CHECK=0``."""
    if not checks.enabled():
        return 0
    return _hash([x for t in (q, k_new, v_new) for x in checks.fingerprint(t)])


def _header(status, q, k_new, v_new, layer, scale, window_size, key_padding_mask, slots, lens) -> torch.Tensor:
    b, h, t, d = q.shape if status == 0 else (0, 0, 0, 0)
    vals = [status, b, h, t, d, layer if isinstance(layer, int) else -1, scale,
            -1 if window_size is None else window_size, int(key_padding_mask is not None),
            _hash(slots), _hash(lens), _inputs_hash(q, k_new, v_new)]
    return torch.tensor(vals, dtype=torch.float32)


def _pick(cache: KVCache) -> str:
    """The combine for the agreed step shape: a function of replicated state only, so every rank picks the same."""
    b, h, t = cache.step_shape
    if cache.combine != "auto":
        return cache.combine
    if b == 0:
        return "allgather"  # header only: no agreed shape yet
    from seqpar.plan import decode_combine

    return decode_combine(batch=b, heads=h, q_len=t, head_dim=cache.head_dim, world_size=cache.world_size).combine


def _describe(table: torch.Tensor, rows: str) -> str:
    """Which header fields differ across ranks (``table``: one row per rank, or the (max, min) rows)."""
    out = []
    for i, name in enumerate(_HEADER[1:], start=1):
        col = table[:, i].tolist()
        if len(set(col)) > 1:
            vals = (", ".join(f"rank {r}: {v:g}" for r, v in enumerate(col)) if rows == "rank"
                    else f"max {col[0]:g}, min {col[1]:g}")
            out.append(f"'{name}' differs across ranks ({vals})")
    return "; ".join(out)


def decode_attention(
    cache: KVCache,
    layer: int,
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    *,
    slots: list[int] | None = None,
    scale: float | None = None,
    window_size: int | None = None,
    key_padding_mask: torch.Tensor | None = None,
    return_lse: bool = False,
    return_weights: bool = False,
) -> Any:
    """Append ``k_new, v_new`` to ``cache`` (layer ``layer``) and attend ``q`` over the whole sequences.

    Args:
        cache: the :class:`seqpar.KVCache`.
        layer: layer index.
        q: ``(B, H, T, D)`` replicated queries of the ``T`` new tokens of each sequence (positions
            ``length .. length + T - 1`` of its slot); ``k_new, v_new`` ``(B, kv_heads, T, D)``.
        slots: the sequences, one per batch row (default: every live slot, in order). Lengths may
            differ (ragged batch).
        scale: score scale, default ``D ** -0.5``.
        window_size: key j visible to query i when ``0 <= i - j <= window_size`` (causal always).
        key_padding_mask: ``(B, >= length + T)`` bool over global positions, True = attend.
        return_lse, return_weights: also return the global LSE / this rank's weights (see the module).

    Returns ``out`` or a tuple ``(out[, weights][, lse])``; identical on every rank. Not differentiable.
    """
    comm = cache.comm
    error, shape, out_r, lse_r, local, mask = None, (0, 0, 0), None, None, None, None
    head = torch.zeros(_NH, dtype=stat_dtype(cache.dtype))
    with torch.no_grad():
        try:  # every local failure becomes an error flag in the collective: no rank is left waiting
            slots = cache.live_slots() if slots is None else [int(s) for s in slots]
            _check(cache, layer, slots, q, k_new, v_new, key_padding_mask)
            scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
            lens = [cache.lengths[layer][s] for s in slots]
            head = _header(_OK, q, k_new, v_new, layer, scale, window_size, key_padding_mask, slots, lens).to(
                head.dtype)
            out_r, lse_r, local, mask = _local_step(cache, layer, slots, q, k_new, v_new, scale, window_size,
                                                    key_padding_mask)
            shape = tuple(q.shape[:3])
        except Exception as e:  # noqa: BLE001 - reported to every rank through the header
            error = str(e)
            head.zero_()
        status = _ERROR if error is not None else _OK
        for _attempt in range(2):
            agreed = shape == cache.step_shape
            head[0] = _ERROR if status else (_OK if agreed else _RESHAPE)
            result = _combine(comm, _pick(cache), head, out_r, lse_r, cache.step_shape, cache.head_dim,
                              agreed and status == 0, stat_dtype(cache.dtype))
            if isinstance(result, tuple):
                break
            table, rows = result  # header rows: one per rank (allgather) or (max, min) (allreduce)
            failed = [r for r in range(table.shape[0]) if table[r, 0] == _ERROR]
            if failed:
                who = f"rank(s) {failed}" if rows == "rank" else "a rank"
                raise ValueError(f"seqpar decode (rank {cache.rank}): step failed on {who}"
                                 + (f": {error}" if error else " (see its error)") + "; the cache is unchanged")
            problems = _describe(table, rows)
            if problems:
                raise ValueError(f"seqpar decode (rank {cache.rank}): {problems}; the cache is unchanged")
            cache.step_shape = (int(table[0, 1]), int(table[0, 2]), int(table[0, 3]))  # all agree on it
        else:  # pragma: no cover - the second attempt always runs at the agreed shape
            raise RuntimeError("seqpar decode: internal: step shape not settled")
    out, lse = result
    for s in slots:
        cache.lengths[layer][s] += q.shape[2]
    res = [out.to(q.dtype)]
    if return_weights:
        res.append(_weights(q, local, mask, lse, scale))
    if return_lse:
        res.append(lse)
    return res[0] if len(res) == 1 else tuple(res)


def _combine(comm, combine, head, out_r, lse_r, shape, d, ok, bd):
    """One collective at the agreed ``shape`` (B, H, T) and head dim ``d``.

    Returns ``(out, lse)``, or the list ``[header table, "rank" | "minmax"]`` when a rank flagged its header.
    """
    b, h, t = shape
    n = b * h * t
    if combine == "allgather":
        buf = torch.zeros(_NH + n * (d + 1), dtype=bd)
        buf[:_NH] = head
        if ok:
            buf[_NH:_NH + n * d] = out_r.reshape(-1)
            buf[_NH + n * d:] = lse_r.reshape(-1)
        table = comm.all_gather(buf)  # (W, _NH + n (D + 1))
        heads = table[:, :_NH]
        if not bool((heads[:, 0] == _OK).all()) or _describe(heads, "rank"):
            return [heads, "rank"]
        sd = out_r.dtype
        outs = [table[r, _NH:_NH + n * d].view(b, h, t, d).to(sd) for r in range(comm.world_size)]
        lses = [table[r, _NH + n * d:].view(b, h, t).to(sd) for r in range(comm.world_size)]
        return merge_many(outs, lses)
    # allreduce: MAX of [head | -head | lse], then SUM of [w out | w]
    buf = torch.full((2 * _NH + n,), NEG_INF, dtype=bd)
    buf[:_NH], buf[_NH:2 * _NH] = head, -head
    if ok:
        buf[2 * _NH:] = lse_r.reshape(-1)
    comm.all_reduce(buf, "max")
    hmax, hmin = buf[:_NH], -buf[_NH:2 * _NH]
    if hmax[0] != _OK or not bool((hmax == hmin).all()):
        return [torch.stack([hmax, hmin]), "minmax"]
    sd = out_r.dtype
    m = buf[2 * _NH:].view(b, h, t).to(sd)
    wgt = torch.exp(lse_r - finite_or_zero(m)).unsqueeze(-1)  # 0 on -inf partials
    acc = torch.cat([out_r * wgt, wgt], dim=-1).contiguous()
    comm.all_reduce(acc, "sum")
    z = acc[..., -1:]
    out = torch.where(z > 0, acc[..., :-1] / torch.where(z > 0, z, torch.ones_like(z)), torch.zeros_like(z))
    return out, global_lse_from_max_sum(m, z.squeeze(-1))


@torch.no_grad()
def _weights(q, local, mask, lse, scale) -> torch.Tensor:
    """This rank's weights exp(s - lse) over its local keys (B, H, T, n); 0 where masked."""
    kk, _ = local
    sd = stat_dtype(q.dtype)
    g = q.shape[1] // kk.shape[1]
    s = q.to(sd) @ kk.to(sd).repeat_interleave(g, dim=1).transpose(-1, -2) * scale
    if mask is not None:
        s = s.masked_fill(~mask, NEG_INF)
    return torch.exp(s - finite_or_zero(lse).unsqueeze(-1)).to(q.dtype)
