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

with ``n = B * H * T * (D + 1) * 4`` bytes (B, H, T: the agreed shape, below): independent of the context
length. The cache's ``combine="auto"`` picks by :func:`seqpar.plan.decode_combine` (latency vs bandwidth)
from the agreed step shape, so every rank picks the same. Every rank computes the same merge from the same
numbers, so the result is bitwise identical on every rank.

Validated once, not per step: the step's arguments travel in a small header *inside* the combining
collective (status, B, H, T, D, layer, scale, window, padding flag, slot and length hashes, a fingerprint of
q, k_new, v_new). The
payload is sized for the agreed shape ``(B, H, T)`` -- the last one all ranks settled on -- and a step of
no more rows (``b * h * t <= B * H * T``) fills its start: a batch that shrinks or varies (a service's
batches do, step to step) costs one collective, no renegotiation. A rank whose step has more rows, or
fails a local check, sends a header-only flag in that same collective, then every rank either agrees on
the new shape (one more collective: the real combine) or raises the same ``ValueError``. After a step
of at most a quarter of the agreed rows every rank shrinks the agreed shape to it (agreed data only, so
all do), so the padding never costs more than 4x the step's bytes. Ranks therefore always issue the same
collectives with the same sizes: no hang, and on any error the cache is unchanged (new K/V were written
past the committed lengths only).

A batch's sequences may sit in any slots: each run of consecutive slots is one local kernel call on a
view of the cache (no gathered copy of K/V), and the whole batch goes through one combine.

Shapes::

    q             (B, H, T, D)          identical on every rank; H % kv_heads == 0 (GQA, never repeated)
    k_new, v_new  (B, kv_heads, T, D)   identical on every rank
    out           (B, H, T, D)          q's dtype, identical on every rank
    lse           (B, H, T)             float32 (float64 for float64), -inf on rows seeing no key
    weights       (B, H, T, n)          this rank's keys, local order (``cache.positions(slot)``)
"""

from __future__ import annotations

import math
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


def _runs(slots: list[int]) -> list[list[int]]:
    """Batch rows grouped into runs of consecutive slots (in slot order): a run's cache rows are a view."""
    runs: list[list[int]] = []
    for i in sorted(range(len(slots)), key=slots.__getitem__):
        if runs and slots[i] == slots[runs[-1][-1]] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def _local_step(cache: KVCache, layer, slots, q, k_new, v_new, scale, window_size, key_padding_mask):
    """Store the owned new tokens; attend over this rank's keys. Returns (out_r, lse_r, local) with ``local``
    one ``(rows, K view, positions, mask)`` per run of consecutive slots (what :func:`_weights` reads).

    The cache is read in place: each run of consecutive slots is one kernel call on a view of the cache
    (a scattered batch is a few calls, never a gathered copy of its K/V); the batch's partials then go
    through one combine together."""
    b, h, t, d = q.shape
    sd = stat_dtype(q.dtype)
    lens = [cache.lengths[layer][s] for s in slots]
    new_counts = [cache._store(layer, s, k_new[i], v_new[i]) for i, s in enumerate(slots)]
    runs = _runs(slots)
    whole = len(runs) == 1 and runs[0] == list(range(b))  # the batch is one run, in order: no row copies
    dev = q.device  # the cache's (checked)
    out = q.new_zeros(q.shape, dtype=sd)
    lse = torch.full((b, h, t), NEG_INF, dtype=sd, device=dev)
    local = []
    for run in runs:
        s0, nb = slots[run[0]], len(run)
        counts = [new_counts[i] for i in run]
        n = max(counts)
        kk, vv = cache.k[layer, s0:s0 + nb, :, :n], cache.v[layer, s0:s0 + nb, :, :n]  # views
        pos = cache.pos[s0:s0 + nb, :n]  # (nb, n) global positions of the local keys
        qpos = torch.tensor([lens[i] for i in run], device=dev).unsqueeze(-1) + torch.arange(t, device=dev)  # (nb, T)
        mask = None
        if n and (not all(c == n for c in counts) or not bool((pos[:, -1] <= qpos[:, 0]).all())
                  or window_size is not None or key_padding_mask is not None):
            m = (torch.arange(n, device=dev).unsqueeze(0)
                 < torch.tensor(counts, device=dev).unsqueeze(-1)).unsqueeze(1)  # (nb, 1, n)
            m = m & (pos.unsqueeze(1) <= qpos.unsqueeze(-1))  # causal (nb, T, n)
            if window_size is not None:
                m = m & (qpos.unsqueeze(-1) - pos.unsqueeze(1) <= window_size)
            if key_padding_mask is not None:
                kpm = key_padding_mask.to(device=dev, dtype=torch.bool)[run]
                m = m & kpm.gather(1, pos.clamp(0, kpm.shape[1] - 1)).unsqueeze(1)
            mask = m.unsqueeze(1)  # (nb, 1, T, n)
        local.append((run, kk, pos, mask))
        if n == 0:
            continue  # this rank holds no key of these sequences: out 0, lse -inf
        # GQA packing (flash-decoding): the G query heads of a kv head become G*T query rows of that head,
        # so each K/V row is read once per kv head, not once per query head (decode is memory-bound).
        hkv = kk.shape[1]
        g = h // hkv
        qp = (q if whole else q[run]).reshape(nb, hkv, g * t, d)  # row g_i * T + t_i; head h = kv * G + g_i
        mp = None if mask is None else mask.repeat(1, 1, g, 1)  # (nb, 1, G*T, n)
        o, ls = attention_forward(qp, kk, vv, scale=scale, mask=mp)
        if whole:
            out, lse = o.reshape(b, h, t, d).to(sd), ls.reshape(b, h, t).to(sd)
        else:
            out[run], lse[run] = o.reshape(nb, h, t, d).to(sd), ls.reshape(nb, h, t).to(sd)
    return out, lse, local


def _check(cache: KVCache, layer, slots, q, k_new, v_new, key_padding_mask) -> None:
    r = cache.rank
    checks.check_qkv(q, k_new, v_new, r)
    if q.dtype != cache.dtype:
        raise ValueError(f"rank {r}: q.dtype={q.dtype} but the cache holds {cache.dtype}")
    if q.device != cache.k.device:
        raise ValueError(f"rank {r}: q is on {q.device} but the cache is on {cache.k.device}")
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
    error, shape, out_r, lse_r, local = None, (0, 0, 0), None, None, None
    head = torch.zeros(_NH, dtype=stat_dtype(cache.dtype), device=cache.k.device)
    with torch.no_grad():
        try:  # every local failure becomes an error flag in the collective: no rank is left waiting
            slots = cache.live_slots() if slots is None else [int(s) for s in slots]
            _check(cache, layer, slots, q, k_new, v_new, key_padding_mask)
            scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
            lens = [cache.lengths[layer][s] for s in slots]
            head = _header(_OK, q, k_new, v_new, layer, scale, window_size, key_padding_mask, slots, lens).to(
                head.device, head.dtype)
            out_r, lse_r, local = _local_step(cache, layer, slots, q, k_new, v_new, scale, window_size,
                                              key_padding_mask)
            shape = tuple(q.shape[:3])
        except Exception as e:  # noqa: BLE001 - reported to every rank through the header
            error = str(e)
            head.zero_()
        status = _ERROR if error is not None else _OK
        for _attempt in range(2):
            agreed = 0 < math.prod(shape) <= math.prod(cache.step_shape)  # fits the agreed payload
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
    if 4 * math.prod(shape) <= math.prod(cache.step_shape):  # far smaller: shrink the payload (agreed data only)
        cache.step_shape = shape
    for s in slots:
        cache.lengths[layer][s] += q.shape[2]
    res = [out.to(q.dtype)]
    if return_weights:
        res.append(_weights(q, local, lse, scale))
    if return_lse:
        res.append(lse)
    return res[0] if len(res) == 1 else tuple(res)


def _combine(comm, combine, head, out_r, lse_r, cap, d, ok, bd):
    """One collective with the payload of the agreed shape ``cap`` (B, H, T) and head dim ``d``; this step's
    ``out_r (b, h, t, d)``, ``lse_r (b, h, t)`` fill its start (``b * h * t <= B * H * T``).

    Returns ``(out, lse)``, or the list ``[header table, "rank" | "minmax"]`` when a rank flagged its header.
    """
    n_cap = math.prod(cap)
    if combine == "allgather":
        buf = torch.zeros(_NH + n_cap * (d + 1), dtype=bd, device=head.device)
        buf[:_NH] = head
        if ok:
            n = out_r.shape[:3].numel()
            buf[_NH:_NH + n * d] = out_r.reshape(-1)
            buf[_NH + n_cap * d:_NH + n_cap * d + n] = lse_r.reshape(-1)
        table = comm.all_gather(buf)  # (W, _NH + n_cap (D + 1))
        heads = table[:, :_NH]
        if not bool((heads[:, 0] == _OK).all()) or _describe(heads, "rank"):
            return [heads, "rank"]
        b, h, t = out_r.shape[:3]  # every rank's header says the same shape
        n, sd = b * h * t, out_r.dtype
        outs = [table[r, _NH:_NH + n * d].view(b, h, t, d).to(sd) for r in range(comm.world_size)]
        lses = [table[r, _NH + n_cap * d:_NH + n_cap * d + n].view(b, h, t).to(sd) for r in range(comm.world_size)]
        return merge_many(outs, lses)
    # allreduce: MAX of [head | -head | lse], then SUM of [w out | w] (this step's size: the shape is agreed)
    buf = torch.full((2 * _NH + n_cap,), NEG_INF, dtype=bd, device=head.device)
    buf[:_NH], buf[_NH:2 * _NH] = head, -head
    if ok:
        buf[2 * _NH:2 * _NH + lse_r.numel()] = lse_r.reshape(-1)
    comm.all_reduce(buf, "max")
    hmax, hmin = buf[:_NH], -buf[_NH:2 * _NH]
    if hmax[0] != _OK or not bool((hmax == hmin).all()):
        return [torch.stack([hmax, hmin]), "minmax"]
    sd = out_r.dtype
    m = buf[2 * _NH:2 * _NH + lse_r.numel()].view(lse_r.shape).to(sd)
    wgt = torch.exp(lse_r - finite_or_zero(m)).unsqueeze(-1)  # 0 on -inf partials
    acc = torch.cat([out_r * wgt, wgt], dim=-1).contiguous()
    comm.all_reduce(acc, "sum")
    z = acc[..., -1:]
    out = torch.where(z > 0, acc[..., :-1] / torch.where(z > 0, z, torch.ones_like(z)), torch.zeros_like(z))
    return out, global_lse_from_max_sum(m, z.squeeze(-1))


@torch.no_grad()
def _weights(q, local, lse, scale) -> torch.Tensor:
    """This rank's weights exp(s - lse) over its local keys (B, H, T, n), n = the most keys any row holds here;
    0 where masked and past a row's keys."""
    sd = stat_dtype(q.dtype)
    b, h, t, _ = q.shape
    n = max(kk.shape[2] for _, kk, _, _ in local)
    w = q.new_zeros(b, h, t, n)
    for run, kk, _, mask in local:
        g = h // kk.shape[1]
        s = q[run].to(sd) @ kk.to(sd).repeat_interleave(g, dim=1).transpose(-1, -2) * scale
        if mask is not None:
            s = s.masked_fill(~mask, NEG_INF)
        w[run, ..., :kk.shape[2]] = torch.exp(s - finite_or_zero(lse[run]).unsqueeze(-1)).to(q.dtype)
    return w
