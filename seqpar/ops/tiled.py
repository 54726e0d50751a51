"""Attention of a set of query tokens over a set of key tokens, block by block, merged by LSE.

This is the local computation every strategy runs: it skips the blocks the mask leaves empty,
calls a kernel (:mod:`seqpar.ops.kernels`) on the rest, and merges the partials in float32.

The kernel is chosen per block from what the block loop knows of it (:mod:`seqpar.ops.kernels.registry`):
an unmasked block (``mask=None``) or a diagonal causal one (``is_causal``, Sq == Sk, top-left) goes to
the fastest fused op (CUDA: cuDNN where torch prefers it, else flash; CPU: the CPU flash op); a block a
window, document or padding mask cuts partly carries its bool mask and goes to an op taking an additive
bias (CUDA: memory-efficient) or to ``blockwise``. :func:`block_kernels` lists the choice per block.

Shapes::

    q       (B, H,    Sq, D)     queries, with tokens ``qt``  (len Sq)
    k, v    (B, H_kv, Sk, D)     keys/values, with tokens ``kt`` (len Sk)
    out     (B, H,    Sq, D)     float32 (float64; q's dtype: see tiled_forward); 0 where a row sees nothing
    lse     (B, H,    Sq)        float32 (float64); -inf where a row sees nothing
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from seqpar.ops.kernels import attention_backward, attention_forward, candidates
from seqpar.ops.kernels.common import mask_kind
from seqpar.ops.lse import NEG_INF, merge_into, stat_dtype
from seqpar.ops.masks import Block, MaskSpec, Tokens, blocks


def block_kernels(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qt: Tokens, kt: Tokens, spec: MaskSpec
) -> list[tuple[Block, str]]:
    """Each non-empty block of queries ``qt`` x keys ``kt`` with the backend :func:`tiled_forward` runs it on."""
    return [
        (blk, candidates(q[:, :, blk.q], k[:, :, blk.k], v[:, :, blk.k], mask_kind(blk.mask, blk.is_causal))[0].name)
        for blk in blocks(qt, kt, spec)
    ]


def tiled_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    qt: Tokens,
    kt: Tokens,
    spec: MaskSpec,
    scale: float,
    acc: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of ``q`` over ``k, v``, merged into ``acc`` (updated in place) when given.

    ``out`` is float32 (float64) -- except for a single kernel call without ``acc``, whose result comes back as is
    (q's dtype from the fused CUDA ops: no pass over it). Passed back as ``acc``, such an ``out`` is upcast once.
    """
    todo = list(blocks(qt, kt, spec))
    if acc is None and len(todo) == 1 and _covers(todo[0], q, k):  # one kernel call: its result as is
        blk = todo[0]
        return attention_forward(q, k, v, scale=scale, mask=blk.mask, is_causal=blk.is_causal)
    sd = stat_dtype(q.dtype)
    if acc is not None and acc[0].dtype != sd and todo:  # a single call's q-dtype result: merge in float32
        acc = (acc[0].to(sd), acc[1])
    if acc is None:
        acc = (
            torch.zeros(*q.shape[:-1], v.shape[-1], dtype=sd, device=q.device),
            torch.full(q.shape[:-1], NEG_INF, dtype=sd, device=q.device),
        )
    out, lse = acc
    for blk in todo:
        o, l = attention_forward(
            q[:, :, blk.q], k[:, :, blk.k], v[:, :, blk.k], scale=scale, mask=blk.mask, is_causal=blk.is_causal
        )
        merge_into(out[:, :, blk.q], lse[:, :, blk.q], o, l)
        del o, l  # not held while the next block's kernel runs
    return out, lse


def _covers(blk, q: torch.Tensor, k: torch.Tensor) -> bool:
    return blk.q == slice(0, q.shape[2]) and blk.k == slice(0, k.shape[2])


def tiled_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    qt: Tokens,
    kt: Tokens,
    spec: MaskSpec,
    scale: float,
    acc: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradient contributions of these keys given the *global* ``out``/``lse`` of the queries.

    Returns float32 (float64) accumulators ``dq (B, H, Sq, D)``, ``dk, dv (B, H_kv, Sk, D)``; with ``acc``
    (such accumulators, or views of them) the contributions are added into it in place and it is returned:
    no second set of full-size buffers. ``dout`` and ``out`` are in q's dtype.
    """
    todo = list(blocks(qt, kt, spec))
    if acc is None and len(todo) == 1 and _covers(todo[0], q, k):  # one kernel call: its gradients as they are
        blk = todo[0]
        return attention_backward(dout, q, k, v, out, lse, scale=scale, mask=blk.mask, is_causal=blk.is_causal)
    if acc is None:
        sd = stat_dtype(q.dtype)
        acc = (torch.zeros(q.shape, dtype=sd, device=q.device), torch.zeros(k.shape, dtype=sd, device=k.device),
               torch.zeros(v.shape, dtype=sd, device=v.device))
    dq, dk, dv = acc
    for ks, gk, gv in backward_blocks(dout, q, k, v, out, lse, qt, kt, spec, scale, dq, todo):
        dk[:, :, ks] += gk
        dv[:, :, ks] += gv
        del gk, gv
    return dq, dk, dv


def backward_blocks(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    qt: Tokens,
    kt: Tokens,
    spec: MaskSpec,
    scale: float,
    dq: torch.Tensor,
    todo: list[Block] | None = None,
) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor]]:
    """:func:`tiled_backward` one block at a time: adds each block's dq into ``dq`` (float32/float64, in place)
    and yields ``(key slice, dk, dv)`` of the block as the kernel returned them (float32/float64,
    ``(B, H_kv, len(slice), D)``), for the caller to add where it wants (ring: into an accumulator that is
    still in flight when the block is done)."""
    for blk in blocks(qt, kt, spec) if todo is None else todo:
        gq, gk, gv = attention_backward(
            dout[:, :, blk.q], q[:, :, blk.q], k[:, :, blk.k], v[:, :, blk.k], out[:, :, blk.q], lse[:, :, blk.q],
            scale=scale, mask=blk.mask, is_causal=blk.is_causal,
        )
        dq[:, :, blk.q] += gq
        del gq
        yield blk.k, gk, gv
        del gk, gv  # not held here while the next block runs (the caller drops its references too)
