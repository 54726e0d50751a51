"""Log-sum-exp (LSE) statistics: how partial softmax results merge exactly.

A partial attention result over a subset of keys is ``(out, lse)`` with

    lse_i = log sum_j exp(s_ij),      out_i = sum_j exp(s_ij - lse_i) v_j

Two partials over disjoint key sets merge exactly (flash-decoding, Tree Attention):

    lse = logaddexp(lse_a, lse_b)
    out = exp(lse_a - lse) out_a + exp(lse_b - lse) out_b

Rows that see no key at all carry ``lse = -inf`` and ``out = 0``; every function here keeps them at
exactly that (no NaN), so a rank or block whose keys are all masked never poisons the result.
Non-finite partials propagate: a NaN (or +inf) ``lse`` or a NaN in ``out`` makes the merged row NaN,
as it would be in one softmax over all keys. The guards test ``z == 0`` (only possible when every
partial's lse is -inf), never ``z > 0``, which would also be false for NaN and turn it into 0.
"""

from __future__ import annotations

import torch

NEG_INF = float("-inf")


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are kept in: float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def finite_or_zero(m: torch.Tensor) -> torch.Tensor:
    """``m`` with -inf (rows that see nothing) replaced by 0, so ``x - m`` stays -inf, never NaN."""
    return torch.where(torch.isneginf(m), torch.zeros_like(m), m)


def merge_into(out: torch.Tensor, lse: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor) -> None:
    """Merge the partial ``(out_b, lse_b)`` into the accumulator ``(out, lse)`` in place.

    out ``(..., S, D)``, lse ``(..., S)``; the accumulator may be a view (a block of rows). No
    temporary of out's size is made. Weights are renormalised: ``lse = logaddexp(lse_a, lse_b)``
    carries a rounding error of ulp(|lse|) (6e-5 in float32 at |lse| = 1000), so
    ``exp(lse_a - lse) + exp(lse_b - lse)`` is 1 only up to that error. Dividing by their sum keeps
    ``out`` an exact convex combination of the partials; without it the error grows with |lse| and
    the backward, which subtracts ``rowsum(dout * out)``, amplifies it (measured: float32 dq 1e-3
    instead of 3e-5 relative with logits ~ 1000).
    """
    new = torch.logaddexp(lse, lse_b)  # (-inf, -inf) -> -inf
    safe = finite_or_zero(new)
    wa = torch.exp(lse - safe)  # 0 where lse = -inf
    wb = torch.exp(lse_b.to(lse.dtype) - safe)
    z = wa + wb  # 0 only on rows that see nothing; NaN stays NaN
    z = z.masked_fill(z == 0, 1)
    out.mul_((wa / z).unsqueeze(-1).to(out.dtype)).addcmul_(out_b, (wb / z).unsqueeze(-1).to(out.dtype))
    lse.copy_(new)


def merge_partials(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two partial results over disjoint key sets (see :func:`merge_into`).

    out_* ``(..., S, D)``, lse_* ``(..., S)``. Returns new ``(out, lse)`` with out in the dtype of
    ``out_a`` (pass float32 accumulators to keep the merge exact to float32).
    """
    out, lse = out_a.clone(), lse_a.clone()
    merge_into(out, lse, out_b, lse_b)
    return out, lse


def merge_many(outs: list[torch.Tensor], lses: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge any number of partials (in list order) in the statistics dtype, renormalised as above."""
    lse_stack = torch.stack([x.to(stat_dtype(x.dtype)) for x in lses])  # (P, ..., S)
    lse = torch.logsumexp(lse_stack, dim=0)  # -inf when every partial is -inf
    w = torch.exp(lse_stack - finite_or_zero(lse))  # (P, ..., S)
    acc = torch.zeros_like(outs[0], dtype=lse.dtype)
    for o, wi in zip(outs, w):
        acc += o.to(lse.dtype) * wi.unsqueeze(-1)
    z = w.sum(0).unsqueeze(-1)
    return acc / z.masked_fill(z == 0, 1), lse


def global_lse_from_max_sum(m: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``log(s) + m`` with (m=-inf, s=0) -> -inf: the LSE from an all-reduced max and exp-sum (NaN stays NaN)."""
    return torch.where(s == 0, torch.full_like(s, NEG_INF), torch.log(s) + finite_or_zero(m))
