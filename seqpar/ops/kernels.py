"""Local attention kernels that return (and, backward, consume) the log-sum-exp.

Every strategy reduces to "attend these queries to these keys, give me ``(out, lse)``" plus the
matching backward given the *global* ``out`` and ``lse`` -- the flash-attention identity
``P = exp(S - lse)`` makes a block's gradient exact once the global statistics are known.

Backends, picked per call by :func:`kernel_name`:

``cpu_flash``  ``aten._scaled_dot_product_flash_attention_for_cpu`` (+ its backward): fused, O(S·D)
               memory, native GQA (query head h uses kv head h // (H/H_kv)), float masks.
``blockwise``  a pure-torch loop over query blocks (any device, any dtype): memory O(block·Sk).

Shapes::

    q      (B, H,    Sq, D)
    k, v   (B, H_kv, Sk, D)        H % H_kv == 0 (GQA/MQA: K/V are never repeated)
    mask   broadcastable to (B, H, Sq, Sk); bool (True = attend) or additive float
    out    (B, H,    Sq, D)        q.dtype; 0 on rows that see no key
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

BLOCK_Q = 1024  # query rows per step of the blockwise kernel


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


def _float_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
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
        fmask = None if mask is None else _float_mask(mask, q.dtype)
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

    Returns ``dq (B, H, Sq, D)``, ``dk, dv (B, H_kv, Sk, D)``, in the dtype of the inputs.
    """
    # Rows that see nothing anywhere have lse = -inf and out = 0: their P is 0 whatever finite lse
    # we use, so use 0 to keep exp(S - lse) free of NaN.
    lse = finite_or_zero(lse)
    if kernel_name(q) == "cpu_flash":
        fmask = None if mask is None else _float_mask(mask, q.dtype)
        return _CPU_BWD(
            dout.contiguous(), q, k, v, out.contiguous(), lse.float() if q.dtype != torch.float64 else lse,
            0.0, is_causal, attn_mask=fmask, scale=scale,
        )
    return _blockwise_backward(dout, q, k, v, out, lse, scale, mask, is_causal)


# --- the blockwise fallback -------------------------------------------------------------------


def _scores(qb, k, scale, mask, is_causal, q0):
    """Scores of a query block (B, Hkv, G, bq, Sk) in the statistics dtype, masked with -inf."""
    sd = stat_dtype(qb.dtype)
    s = torch.einsum("bhgqd,bhkd->bhgqk", qb.to(sd), k.to(sd)) * scale
    if mask is not None:
        mb = mask[..., q0 : q0 + qb.shape[-2], :]
        if mb.dtype == torch.bool:
            s = s.masked_fill(~mb, NEG_INF)
        else:
            s = s + mb.to(sd)
    if is_causal:
        qi = torch.arange(q0, q0 + qb.shape[-2], device=s.device).unsqueeze(-1)
        kj = torch.arange(s.shape[-1], device=s.device)
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
    b, h, sq, d = q.shape
    hkv = k.shape[1]
    g = h // hkv
    qg = q.unflatten(1, (hkv, g))  # (B, Hkv, G, Sq, D)
    m5 = _mask5(mask, hkv, g)
    sd = stat_dtype(q.dtype)
    out = torch.empty(b, hkv, g, sq, v.shape[-1], dtype=q.dtype, device=q.device)
    lse = torch.empty(b, hkv, g, sq, dtype=sd, device=q.device)
    for q0 in range(0, sq, BLOCK_Q):
        s = _scores(qg[..., q0 : q0 + BLOCK_Q, :], k, scale, m5, is_causal, q0)
        m = finite_or_zero(s.amax(-1, keepdim=True))
        p = torch.exp(s - m)
        l = p.sum(-1, keepdim=True)
        o = torch.einsum("bhgqk,bhkd->bhgqd", p, v.to(sd)) / l.clamp_min(torch.finfo(sd).tiny)
        out[..., q0 : q0 + BLOCK_Q, :] = o.to(q.dtype)
        lse[..., q0 : q0 + BLOCK_Q] = (torch.log(l) + m).squeeze(-1)
    return out.flatten(1, 2), lse.flatten(1, 2)


def _blockwise_backward(dout, q, k, v, out, lse, scale, mask, is_causal):
    b, h, sq, d = q.shape
    hkv = k.shape[1]
    g = h // hkv
    sd = stat_dtype(q.dtype)
    qg, dog, og = (t.unflatten(1, (hkv, g)) for t in (q, dout, out))
    lg = lse.unflatten(1, (hkv, g))
    m5 = _mask5(mask, hkv, g)
    kf, vf = k.to(sd), v.to(sd)
    dq = torch.empty_like(qg)
    dk = torch.zeros(k.shape, dtype=sd, device=k.device)
    dv = torch.zeros(v.shape, dtype=sd, device=v.device)
    for q0 in range(0, sq, BLOCK_Q):
        sl = slice(q0, q0 + BLOCK_Q)
        qb, dob, ob = qg[..., sl, :], dog[..., sl, :].to(sd), og[..., sl, :].to(sd)
        s = _scores(qb, k, scale, m5, is_causal, q0)
        p = torch.exp(s - lg[..., sl].to(sd).unsqueeze(-1))  # (B, Hkv, G, bq, Sk)
        dv += torch.einsum("bhgqk,bhgqd->bhkd", p, dob)
        dp = torch.einsum("bhgqd,bhkd->bhgqk", dob, vf)
        delta = (dob * ob).sum(-1, keepdim=True)
        ds = p * (dp - delta) * scale
        dq[..., sl, :] = torch.einsum("bhgqk,bhkd->bhgqd", ds, kf).to(q.dtype)
        dk += torch.einsum("bhgqk,bhgqd->bhkd", ds, qb.to(sd))
    return dq.flatten(1, 2), dk.to(k.dtype), dv.to(v.dtype)
