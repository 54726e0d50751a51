"""The float64 formula, written out naively, as the yardstick for every check.

Nothing here is shared with the implementation: scores are materialised in full, the softmax is
spelled ``exp(beta - m) / sum exp(beta - m)`` with ``m`` the row max, GQA repeats K/V explicitly.
Use it on sizes where an S x S float64 matrix fits in memory.
"""

from __future__ import annotations

import torch


def softmax(scores: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """alpha_ij = exp(beta_ij - m_i) / sum_k exp(beta_ik - m_i); rows of only -inf give 0; a NaN or +inf
    score makes its row NaN (as the formula does: +inf - +inf)."""
    x = scores.to(torch.float64)
    m = x.amax(dim=dim, keepdim=True)
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    e = torch.exp(x - m)
    z = e.sum(dim=dim, keepdim=True)
    return torch.where(z == 0, torch.zeros_like(e), e / torch.where(z == 0, torch.ones_like(z), z))


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(out, lse, weights)`` in float64.

    q (B, H, Sq, D), k/v (B, H_kv, Sk, D) (query head h uses kv head h // (H / H_kv)),
    mask broadcastable to (B, H, Sq, Sk): bool (True = attend) or additive float.
    """
    q, k, v = (t.to(torch.float64) for t in (q, k, v))
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = q @ k.transpose(-1, -2) * scale
    if mask is not None:
        if mask.dtype == torch.bool:
            s = s.masked_fill(~mask, float("-inf"))
        else:
            s = s + mask.to(torch.float64)
    w = softmax(s, dim=-1)
    m = s.amax(-1)
    lse = torch.where(torch.isfinite(m), torch.log(torch.exp(s - m.unsqueeze(-1)).sum(-1)) + m, m)
    return w @ v, lse, w


def sequence_mask(
    seq_len: int,
    *,
    is_causal: bool = False,
    window_size: int | None = None,
    document_ids: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The (B|1, 1, S, S) bool mask over global positions, rule by rule, with explicit loops' meaning:

    causal: j <= i;  window w: 0 <= i - j <= w (causal) or |i - j| <= w;
    documents: doc[b, i] == doc[b, j];  padding: keep[b, j].
    """
    i = torch.arange(seq_len).view(-1, 1)
    j = torch.arange(seq_len).view(1, -1)
    allowed = torch.ones(1, seq_len, seq_len, dtype=torch.bool)
    if is_causal:
        allowed = allowed & (j <= i)
    if window_size is not None:
        allowed = allowed & ((i - j >= 0) & (i - j <= window_size) if is_causal else (i - j).abs() <= window_size)
    if document_ids is not None:
        allowed = allowed & (document_ids[:, :, None] == document_ids[:, None, :])
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, :]
    return allowed[:, None]
