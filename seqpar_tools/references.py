"""What the tools compare against: the float64 formula (``seqpar verify``, the short check of ``seqpar run``) and
single-process SDPA on the whole sequence (the long check, and the time and memory baseline of ``seqpar run``
and ``seqpar bench``).

Errors are ``max |a - b| / max |ref|`` over out, dq, dk, dv; the tolerances per dtype are :data:`TOLERANCE`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from seqpar_tools.timing import max_over_ranks, timed

#: max |a - b| / max |ref| allowed, by the dtype of the inputs (the reference is float64 or float32).
TOLERANCE = {"float64": 1e-10, "float32": 2e-5, "bfloat16": 3e-2, "float16": 4e-3}


def rel_err(mine, ref) -> tuple[float, float]:
    """``(max |a - b|, max |ref|)`` in float64 on the CPU."""
    a, b = mine.detach().double().cpu(), ref.detach().double().cpu()
    return float((a - b).abs().max()) if a.numel() else 0.0, float(b.abs().max()) if b.numel() else 0.0


def document_ids(batch: int, seq_len: int, documents: int):
    """(B, S) int64: ``documents`` packed documents of (nearly) equal length; None for 0."""
    import torch

    if documents <= 0:
        return None
    return (torch.arange(seq_len) * documents // seq_len).expand(batch, seq_len).clone()


@dataclass
class Case:
    strategy: str
    layout: str
    is_causal: bool
    dtype: str
    seq_len: int
    batch: int = 1
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 16
    window_size: int | None = None
    documents: int = 0
    seed: int = 0


def exact_case(ctx, case: Case) -> dict[str, Any]:
    """One check against the float64 reference, forward and backward. Every rank makes the same full
    inputs from ``case.seed``, runs ``seqpar.attention`` on its shard and compares its shard of the
    output and of dq, dk, dv with the reference's. Returns ``{"err": rel, "parts": {...}}`` (all ranks)."""
    import torch

    import seqpar
    from seqpar.comm import get_communicator
    from seqpar.ops import reference

    comm = get_communicator(ctx.group)
    b, h, hkv, s, d = case.batch, case.heads, case.kv_heads, case.seq_len, case.head_dim
    dtype = getattr(torch, case.dtype)
    g = torch.Generator().manual_seed(case.seed)
    q, go = (torch.randn(b, h, s, d, generator=g, dtype=torch.float64).to(dtype) for _ in range(2))
    k, v = (torch.randn(b, hkv, s, d, generator=g, dtype=torch.float64).to(dtype) for _ in range(2))
    docs = document_ids(b, s, case.documents)
    mask = reference.sequence_mask(s, is_causal=case.is_causal, window_size=case.window_size, document_ids=docs)
    qr, kr, vr = (t.double().clone().requires_grad_() for t in (q, k, v))
    ref_out, _, _ = reference.attention(qr, kr, vr, mask=mask)
    ref_out.backward(go.double())

    def local(t, dim: int = 2):
        return seqpar.shard(t, dim=dim, layout=case.layout, group=ctx.group)

    ql, kl, vl = (local(t).to(ctx.device).requires_grad_() for t in (q, k, v))
    out = seqpar.attention(
        ql, kl, vl, group=ctx.group, is_causal=case.is_causal, layout=case.layout, strategy=case.strategy,
        window_size=case.window_size, document_ids=None if docs is None else local(docs, 1).to(ctx.device),
    )
    out.backward(local(go).to(ctx.device))
    pairs = {"out": (out, ref_out), "dq": (ql.grad, qr.grad), "dk": (kl.grad, kr.grad), "dv": (vl.grad, vr.grad)}
    stats = [x for name, (mine, ref) in pairs.items() for x in rel_err(mine, local(ref))]
    stats = max_over_ranks(comm, ctx.device, *stats)
    parts = {name: stats[2 * i] / max(stats[2 * i + 1], 1e-300) for i, name in enumerate(pairs)}
    return {"err": max(parts.values()), "parts": parts}


def sdpa_reference(q, k, v, go, *, is_causal: bool, window_size: int | None = None, backward: bool = True,
                   warmup: int = 0, repeats: int = 1) -> tuple[list, dict[str, Any]]:
    """Single-process ``torch.nn.functional.scaled_dot_product_attention`` on the whole sequence, in the
    inputs' dtype on their device: ``([out, dq, dk, dv], {"fwd_s", "fwd_bwd_s", "peak_mem_added_bytes"})``.

    Times follow :func:`seqpar_tools.timing.timed` (median of ``repeats`` after ``warmup``) for the forward
    alone and for forward + backward; the outputs are the last fwd+bwd call's (dk, dv summed back to
    ``H_kv`` heads). GQA is spelled out with ``repeat_interleave`` (query head ``h`` uses K/V head
    ``h // (H / H_kv)``): SDPA's own ``enable_gqa`` takes a slow path for the backward on CPU (torch 2.13:
    fwd+bwd 25.1 s against 3.4 s at the default shapes of ``seqpar run``), which would flatter every strategy.
    A window is an explicit ``(S, S)`` bool mask. Peak memory: :class:`seqpar_tools.memory.PeakMemory` over fwd+bwd.
    """
    import torch
    import torch.nn.functional as F

    from seqpar.ops import reference
    from seqpar_tools.memory import PeakMemory

    h, hkv = q.shape[1], k.shape[1]
    g = h // hkv
    mask = None
    if window_size is not None:  # an explicit (1, 1, S, S) bool mask: S^2 bytes
        mask = reference.sequence_mask(q.shape[2], is_causal=is_causal, window_size=window_size).to(q.device)

    def sdpa(q, k, v):
        if g > 1:
            k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal and mask is None)

    def fwd():
        with torch.no_grad():
            return sdpa(q, k, v)

    def fwd_bwd():
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        out = sdpa(*leaves)
        out.backward(go)
        return [out.detach(), *(t.grad for t in leaves)]

    stats: dict[str, Any] = {}
    stats["fwd_s"], _, out = timed(fwd, None, q.device, warmup, repeats)
    result = [out]
    if backward:
        mem = PeakMemory(q.device)
        stats["fwd_bwd_s"], _, result = timed(fwd_bwd, None, q.device, warmup, repeats, mem=mem)
        stats["peak_mem_added_bytes"] = mem.peak() - mem.base
    return result, stats
