"""``blockwise``: flash-attention's tiled loop in plain torch -- any device, any dtype, any mask.

The fallback every other backend falls back to (it refuses nothing): float64, head dims or GPUs the
fused ops do not take, and any op error. Query tiles x key tiles with an online softmax in the
statistics dtype (float32; float64 for float64 input); memory O(tile + S * D), where a tile holds at
most ``TILE_ELEMENTS`` scores. GQA: query head h uses K/V head h // (H / H_kv), never repeated.
Deterministic (fixed loop order, no atomics). Outputs and grads in the statistics dtype.
"""

from __future__ import annotations

import torch

from seqpar.ops.kernels.common import MASK_KINDS, Kernel
from seqpar.ops.lse import NEG_INF, finite_or_zero, stat_dtype


def forward(q, k, v, *, scale, mask=None, is_causal=False):
    return _blockwise_forward(q, k, v, scale, mask, is_causal)


def backward(dout, q, k, v, out, lse, *, scale, mask=None, is_causal=False):
    return _blockwise_backward(dout, q, k, v, out, lse, scale, mask, is_causal)


KERNEL = Kernel(
    name="blockwise",
    summary="tiled online-softmax loop in plain torch (exact, O(tile) memory, slow)",
    devices=("any",),
    dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64),
    head_dims="any",
    masks=MASK_KINDS,
    gqa="native (K/V head h // (H / H_kv))",
    min_torch=(2, 4),
    deterministic="yes",
    out_dtype="float32",
    sdpa_backend=None,
    forward=forward,
    backward=backward,
    available=lambda: None,
    refuses=lambda q, k, v, kind: None,
)


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
