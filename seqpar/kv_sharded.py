"""KV-sharded attention: every rank holds all queries and a slice of the keys/values.

The decode / long-prefix form (flash-decoding across ranks)::

    rank r:  (out_r, lse_r) = attention(q, k_r, v_r)            fused local kernel, no S x S
    m      = all-reduce MAX  lse_r
    z      = all-reduce SUM  exp(lse_r - m)                      } one all-reduce of
    out    = all-reduce SUM  exp(lse_r - m) * out_r / z          } (B, H, Sq, D + 1) float32
    lse    = m + log z

Backward (the gradient ``dout`` of the replicated ``out`` is the same on every rank): the local
block backward with the global ``out``/``lse`` gives ``dk_r, dv_r`` (kept local) and a partial
``dq`` that is all-reduced.

Non-finite values: a NaN partial (``out_r`` or ``lse_r``) on any rank reaches every rank through the
SUM all-reduce (never through the MAX one), so a row is NaN exactly when single-device SDPA makes it
NaN on the local kernel; rows that see no key (every ``lse_r = -inf``, so ``z = 0``) stay exactly 0.

Cross-rank check: besides shapes, dtype, scale and mask kind, the one all-gather of
:func:`seqpar.checks.agree` carries a bit fingerprint of ``q`` (three int64 sums of its bits, one read
of q: see ``checks.fingerprint``), so a q that is not identical on every rank raises ``ValueError`` on
every rank instead of giving a wrong result. ``SEQPAR_CHECK=0`` switches the comparison off.
"""

from __future__ import annotations

from typing import Any

import torch

from seqpar import checks
from seqpar.comm import Communicator, get_communicator
from seqpar.interop import back, to_torch
from seqpar.ops.kernels import attention_backward, attention_forward
from seqpar.ops.lse import NEG_INF, finite_or_zero, global_lse_from_max_sum, stat_dtype


def _merge_across_ranks(comm: Communicator, out: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact LSE merge of per-rank partials (out (B,H,Sq,D), lse (B,H,Sq)) -> global (out f32, lse)."""
    m = lse.clone().contiguous()
    comm.all_reduce(m, "max")
    w = torch.exp(lse - finite_or_zero(m)).unsqueeze(-1)  # (B, H, Sq, 1); 0 for -inf partials
    buf = torch.cat([out.to(w.dtype) * w, w], dim=-1).contiguous()  # (B, H, Sq, D + 1)
    comm.all_reduce(buf, "sum")
    acc, z = buf[..., :-1], buf[..., -1:]
    out = acc / z.masked_fill(z == 0, 1)  # z == 0 only when every rank's lse is -inf (acc == 0); NaN stays NaN
    return out, global_lse_from_max_sum(m, z.squeeze(-1))


class _KVSharded(torch.autograd.Function):
    """
    ========  ======================  ==========================================
    q         (B, H, Sq, D)           identical on every rank
    k, v      (B, H_kv, Sk_r, D)      this rank's slice of the keys / values
    mask      (.., Sq, Sk_r) | None   this rank's columns of the mask
    out       (B, H, Sq, D)           identical on every rank
    lse       (B, H, Sq) float32      identical on every rank (not differentiable)
    ========  ======================  ==========================================
    """

    @staticmethod
    def forward(ctx, q, k, v, mask, comm, scale):
        if k.shape[2] == 0:
            out_r = q.new_zeros(*q.shape[:-1], v.shape[-1])
            lse_r = torch.full(q.shape[:-1], NEG_INF, dtype=stat_dtype(q.dtype))
        else:
            out_r, lse_r = attention_forward(q, k, v, scale=scale, mask=mask)
        out, lse = _merge_across_ranks(comm, out_r, lse_r)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, mask)
        ctx.comm, ctx.scale = comm, scale
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, mask = ctx.saved_tensors
        if k.shape[2] == 0:
            dq = torch.zeros(q.shape, dtype=stat_dtype(q.dtype))
            dk, dv = torch.zeros_like(k), torch.zeros_like(v)
        else:
            dq, dk, dv = attention_backward(dout, q, k, v, out, lse, scale=ctx.scale, mask=mask)
            dk, dv = dk.to(k.dtype), dv.to(v.dtype)
        dq = dq.to(stat_dtype(q.dtype)).contiguous()
        ctx.comm.all_reduce(dq, "sum")  # every rank, always: keeps the ranks in lock-step
        return dq.to(q.dtype), dk, dv, None, None, None


@torch.no_grad()  # documented as not differentiable: a graph here would miss the lse term
def _local_weights(q, k, mask, lse, scale) -> torch.Tensor:
    """alpha = exp(s - lse_global) on this rank's columns (B, H, Sq, Sk_r); materialised on request."""
    sd = stat_dtype(q.dtype)
    g = q.shape[1] // k.shape[1]
    s = q.to(sd) @ k.to(sd).repeat_interleave(g, dim=1).transpose(-1, -2) * scale
    if mask is not None:
        s = s.masked_fill(~mask, NEG_INF) if mask.dtype == torch.bool else s + mask.to(sd)
    return torch.exp(s - finite_or_zero(lse).unsqueeze(-1)).to(q.dtype)


def kv_sharded_attention(
    q: Any,
    k_local: Any,
    v_local: Any,
    *,
    group: Any = None,
    scale: float | None = None,
    attn_mask: Any = None,
    return_weights: bool = False,
    return_lse: bool = False,
) -> Any:
    """Exact softmax attention of all queries over keys/values split across ranks.

    Args:
        q: ``(B, H, Sq, D)``, identical on every rank.
        k_local, v_local: ``(B, H_kv, Sk_r, D)``: this rank's slice of the keys and values (any
            split, e.g. ``torch.tensor_split``; a rank may hold a single key or none). ``H`` must
            be a multiple of ``H_kv`` (GQA/MQA: query head h uses kv head ``h // (H / H_kv)``;
            K/V are never repeated).
        group: None (default torch.distributed group), a ``ProcessGroup``, or an ``mpi4py``
            ``Comm`` -- then numpy arrays are accepted and returned.
        scale: score scale, default ``D ** -0.5``.
        attn_mask: this rank's columns, broadcastable to ``(B, H, Sq, Sk_r)``; bool (True = attend)
            or additive float. Must be present on every rank or on none.
        return_weights: also return this rank's weights ``(B, H, Sq, Sk_r)`` (materialised; not
            differentiable).
        return_lse: also return the global log-sum-exp ``(B, H, Sq)`` (float32; float64 for
            float64 inputs; -inf on rows every key of which is masked).

    Returns:
        ``out (B, H, Sq, D)`` identical on every rank, in q's dtype (rows that see no key are 0),
        or ``(out, w_local)`` / ``(out, lse)`` / ``(out, w_local, lse)``.

    Differentiable in q, k_local and v_local (assuming the loss, and so ``dout``, is the same on
    every rank): ``dq`` is all-reduced, ``dk``/``dv`` stay local.
    """
    (q, np_q), (k, _), (v, _), (mask, _) = (to_torch(x) for x in (q, k_local, v_local, attn_mask))
    comm = get_communicator(group)
    rank = comm.rank

    def validate():
        checks.check_qkv(q, k, v, rank)
        sc = q.shape[-1] ** -0.5 if scale is None else float(scale)
        if mask is not None:
            if not isinstance(mask, torch.Tensor):
                raise TypeError(f"rank {rank}: attn_mask must be a tensor, got {type(mask).__name__}")
            if mask.dtype != torch.bool and not mask.is_floating_point():
                raise ValueError(f"rank {rank}: attn_mask.dtype={mask.dtype}; allowed: torch.bool or a float dtype")
            try:
                torch.broadcast_shapes(mask.shape, (*q.shape[:-1], k.shape[2]))
            except RuntimeError:
                raise ValueError(
                    f"rank {rank}: attn_mask shape {tuple(mask.shape)} does not broadcast to "
                    f"(B, H, Sq, Sk_local) = {(*q.shape[:-1], k.shape[2])}"
                ) from None
            if mask.dim() == 4 and mask.shape[1] not in (1, q.shape[1]):
                raise ValueError(f"rank {rank}: attn_mask head dim {mask.shape[1]}; allowed: 1 or H={q.shape[1]}")
        must = {
            "q.shape": tuple(q.shape),
            "k_local.shape (B, H_kv, D)": (k.shape[0], k.shape[1], k.shape[3]),
            "v_local.shape (B, H_kv, D)": (v.shape[0], v.shape[1], v.shape[3]),
            "dtype": checks.dtype_code(q.dtype),
            "scale": checks.float_code(sc),
            "attn_mask.dtype": checks.dtype_code(None if mask is None else mask.dtype),
        }
        if checks.enabled():
            must["q (bit fingerprint; q must be identical on every rank)"] = checks.fingerprint(q)
        return must, {}

    checks.agree(comm, "kv_sharded_attention", validate)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    out, lse = _KVSharded.apply(q, k, v, mask, comm, scale)
    result = [back(out, np_q)]
    if return_weights:
        result.append(back(_local_weights(q, k, mask, lse, scale), np_q))
    if return_lse:
        result.append(back(lse, np_q))
    return result[0] if len(result) == 1 else tuple(result)
