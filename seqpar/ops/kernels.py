"""Local attention kernels that return (and, backward, consume) the log-sum-exp.

Every strategy reduces to "attend these queries to these keys, give me ``(out, lse)``" plus the
matching backward given the *global* ``out`` and ``lse`` -- the flash-attention identity
``P = exp(S - lse)`` makes a block's gradient exact once the global statistics are known.

Backends, picked per call by :func:`kernel_name`:

``cpu_flash``  ``aten._scaled_dot_product_flash_attention_for_cpu`` (+ its backward): fused, O(S·D)
               memory, native GQA (query head h uses kv head h // (H/H_kv)), float masks. bf16/fp16
               inputs are computed in float32 (the op is no faster in bf16 on CPU, measured on torch 2.13),
               so partial results are merged without intermediate low-precision rounding.
``blockwise``  flash-attention's tiled loop in plain torch (any device, any dtype): memory O(tile + S·D).
               Used on CUDA for now: wiring SDPA's fused CUDA ops (cuDNN/flash with LSE) is still to do.

Shapes::

    q      (B, H,    Sq, D)
    k, v   (B, H_kv, Sk, D)        H % H_kv == 0 (GQA/MQA: K/V are never repeated)
    mask   broadcastable to (B, H, Sq, Sk); bool (True = attend) or additive float
    out    (B, H,    Sq, D)        float32 (float64 for float64 input); 0 on rows that see no key
    lse    (B, H,    Sq)           float32 (float64 for float64 input); -inf on rows that see no key

``is_causal`` is *top-left aligned* (query i sees keys j <= i); callers pass it only for diagonal
blocks where query and key positions coincide.
"""

from __future__ import annotations

import os

import torch

from seqpar.ops.lse import NEG_INF, finite_or_zero, stat_dtype

_CPU_FWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_CPU_BWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)



def kernel_name(q: torch.Tensor) -> str:
    """Which local kernel runs for ``q`` (``SEQPAR_KERNEL=blockwise`` forces the fallback)."""
    forced = os.environ.get("SEQPAR_KERNEL")
    if forced:
        if forced not in ("cpu_flash", "blockwise"):
            raise ValueError(f"SEQPAR_KERNEL={forced!r}; allowed: 'cpu_flash', 'blockwise'")
        return forced
    if q.device.type == "cpu" and _CPU_FWD is not None:
        return "cpu_flash"
    return "blockwise"


def _upcast(*ts: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Inputs as the CPU kernel needs them: bf16/fp16 -> float32 (no slower there, and partials stay
    exact to float32), and a stride-1 last dimension -- the op reads rows as if ``stride(-1) == 1``
    and returns garbage (1e19..1e36, NaN) for e.g. ``x.transpose(2, 3).contiguous().transpose(2, 3)``."""
    if ts[0].dtype in (torch.bfloat16, torch.float16):
        ts = tuple(t.float() for t in ts)
    return tuple(t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous() for t in ts)


def _float_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive 4-D mask (the CPU op accepts only 2-D or 4-D masks; 1-D/3-D ones broadcast too)."""
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, NEG_INF)
    return mask.to(dtype)


def _row_valid(mask: torch.Tensor | None, out_shape: torch.Size) -> torch.Tensor | None:
    """(B|1, H|1, Sq) bool: rows that see at least one key (None: all rows do)."""
    if mask is None:
        return None
    m = mask if mask.dtype == torch.bool else mask > NEG_INF
    while m.dim() < 4:
        m = m.unsqueeze(0)
    return m.any(-1)


def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    mask: torch.Tensor | None = None,
    is_causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q`` over ``k, v`` returning ``(out, lse)``; see the module docstring."""
    valid = _row_valid(mask, q.shape)
    if kernel_name(q) == "cpu_flash":
        q, k, v = _upcast(q, k, v)
        fmask = None if mask is None else _float_mask(mask, stat_dtype(q.dtype))  # never rounded to bf16
        out, lse = _CPU_FWD(q, k, v, 0.0, is_causal, attn_mask=fmask, scale=scale)
        lse = lse.to(stat_dtype(q.dtype))
    else:
        out, lse = _blockwise_forward(q, k, v, scale, mask, is_causal)
    if valid is not None:  # the CPU op reports lse = 0 on fully masked rows
        lse = torch.where(valid, lse, torch.full_like(lse, NEG_INF))
        out = out.masked_fill(~valid.unsqueeze(-1), 0)
    return out, lse


def attention_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    scale: float,
    mask: torch.Tensor | None = None,
    is_causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of this block given the *global* ``out`` and ``lse`` of its query rows.

    Returns ``dq (B, H, Sq, D)``, ``dk, dv (B, H_kv, Sk, D)`` in float32 (float64 for float64 input):
    callers accumulate in float32 and round to the input dtype once.
    """
    # Rows that see nothing anywhere have lse = -inf and out = 0: their P is 0 whatever finite lse
    # we use, so use 0 to keep exp(S - lse) free of NaN.
    lse = finite_or_zero(lse)
    if kernel_name(q) == "cpu_flash":
        q, k, v, dout, out = _upcast(q, k, v, dout, out)
        fmask = None if mask is None else _float_mask(mask, stat_dtype(q.dtype))  # never rounded to bf16
        return _CPU_BWD(
            dout.contiguous(), q, k, v, out.contiguous(), lse.to(stat_dtype(q.dtype)),
            0.0, is_causal, attn_mask=fmask, scale=scale,
        )
    return _blockwise_backward(dout, q, k, v, out, lse, scale, mask, is_causal)


# --- the blockwise fallback -------------------------------------------------------------------
# Flash-attention's loop in plain torch: query tiles x key tiles, online softmax in the statistics
# dtype. A tile holds at most TILE_ELEMENTS scores, so memory stays O(tile + S * D).

TILE_ELEMENTS = 1 << 24


def _tiles(b: int, h: int, sq: int, sk: int) -> tuple[int, int]:
    bk = min(sk, 4096)
    bq = max(1, min(sq, TILE_ELEMENTS // max(1, b * h * bk)))
    return bq, bk


def _scores(qb, kb, scale, mask, is_causal, q0, k0):
    """Scores of a tile (B, Hkv, G, bq, bk) in the statistics dtype, masked with -inf."""
    sd = stat_dtype(qb.dtype)
    s = torch.einsum("bhgqd,bhkd->bhgqk", qb.to(sd), kb.to(sd)) * scale
    if mask is not None:
        mq = slice(None) if mask.shape[-2] == 1 else slice(q0, q0 + qb.shape[-2])  # size-1 dims broadcast
        mk = slice(None) if mask.shape[-1] == 1 else slice(k0, k0 + kb.shape[-2])
        mb = mask[..., mq, mk]
        s = s.masked_fill(~mb, NEG_INF) if mb.dtype == torch.bool else s + mb.to(sd)
    if is_causal:
        qi = torch.arange(q0, q0 + qb.shape[-2], device=s.device).unsqueeze(-1)
        kj = torch.arange(k0, k0 + kb.shape[-2], device=s.device)
        s = s.masked_fill(kj > qi, NEG_INF)
    return s


def _mask5(mask: torch.Tensor | None, hkv: int, g: int) -> torch.Tensor | None:
    """Mask broadcastable to (B, H, Sq, Sk) -> broadcastable to (B, Hkv, G, Sq, Sk)."""
    if mask is None:
        return None
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    if mask.shape[1] == 1:
        return mask.unsqueeze(2)
    return mask.unflatten(1, (hkv, g))


def _blockwise_forward(q, k, v, scale, mask, is_causal):
    b, h, sq, _ = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    g = h // hkv
    bq, bk = _tiles(b, h, sq, sk)
    qg = q.unflatten(1, (hkv, g))  # (B, Hkv, G, Sq, D)
    m5 = _mask5(mask, hkv, g)
    sd = stat_dtype(q.dtype)
    out = torch.empty(b, hkv, g, sq, v.shape[-1], dtype=sd, device=q.device)
    lse = torch.empty(b, hkv, g, sq, dtype=sd, device=q.device)
    for q0 in range(0, sq, bq):
        qb = qg[..., q0 : q0 + bq, :]
        m = torch.full((*qb.shape[:-1], 1), NEG_INF, dtype=sd, device=q.device)  # running max
        l = torch.zeros_like(m)  # running sum of exp(s - m)
        acc = torch.zeros(*qb.shape[:-1], v.shape[-1], dtype=sd, device=q.device)
        for k0 in range(0, sk, bk):
            s = _scores(qb, k[:, :, k0 : k0 + bk], scale, m5, is_causal, q0, k0)
            m_new = torch.maximum(m, s.amax(-1, keepdim=True))
            safe = finite_or_zero(m_new)
            p = torch.exp(s - safe)
            corr = torch.exp(m - safe)  # 0 while m = -inf
            l = l * corr + p.sum(-1, keepdim=True)
            acc = acc * corr + torch.einsum("bhgqk,bhkd->bhgqd", p, v[:, :, k0 : k0 + bk].to(sd))
            m = m_new
        out[..., q0 : q0 + bq, :] = acc / l.clamp_min(torch.finfo(sd).tiny)
        lse[..., q0 : q0 + bq] = torch.where(l > 0, torch.log(l) + finite_or_zero(m), m).squeeze(-1)
    return out.flatten(1, 2), lse.flatten(1, 2)


def _blockwise_backward(dout, q, k, v, out, lse, scale, mask, is_causal):
    b, h, sq, _ = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    g = h // hkv
    bq, bk = _tiles(b, h, sq, sk)
    sd = stat_dtype(q.dtype)
    qg, dog, og = (t.unflatten(1, (hkv, g)) for t in (q, dout, out))
    lg = lse.unflatten(1, (hkv, g))
    m5 = _mask5(mask, hkv, g)
    dq = torch.empty(qg.shape, dtype=sd, device=q.device)
    dk = torch.zeros(k.shape, dtype=sd, device=k.device)
    dv = torch.zeros(v.shape, dtype=sd, device=v.device)
    for q0 in range(0, sq, bq):
        sl = slice(q0, q0 + bq)
        qb, dob = qg[..., sl, :], dog[..., sl, :].to(sd)
        delta = (dob * og[..., sl, :].to(sd)).sum(-1, keepdim=True)  # (B, Hkv, G, bq, 1)
        dqb = torch.zeros(qb.shape, dtype=sd, device=q.device)
        for k0 in range(0, sk, bk):
            ks = slice(k0, k0 + bk)
            kb, vb = k[:, :, ks].to(sd), v[:, :, ks].to(sd)
            s = _scores(qb, kb, scale, m5, is_causal, q0, k0)
            p = torch.exp(s - lg[..., sl].to(sd).unsqueeze(-1))  # (B, Hkv, G, bq, bk)
            dv[:, :, ks] += torch.einsum("bhgqk,bhgqd->bhkd", p, dob)
            ds = p * (torch.einsum("bhgqd,bhkd->bhgqk", dob, vb) - delta) * scale
            dqb += torch.einsum("bhgqk,bhkd->bhgqd", ds, kb)
            dk[:, :, ks] += torch.einsum("bhgqk,bhgqd->bhkd", ds, qb.to(sd))
        dq[..., sl, :] = dqb
    return dq.flatten(1, 2), dk, dv
