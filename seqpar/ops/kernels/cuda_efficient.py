"""``cuda_efficient``: ``aten._scaled_dot_product_efficient_attention`` (+ ``_backward``), the CUTLASS
memory-efficient kernel -- the fused op that takes an additive bias, so it runs the blocks a window,
document or padding mask cuts partly.

=================  ==========================================================================================
inputs             fp16 / bf16 / fp32 (bf16 needs sm80), head dims equal-q/k, multiple of 8 (half) / 4 (fp32)
masks              none; ``is_causal`` (top-left, also for Sq != Sk); bool or float masks as an additive bias in
                   q's dtype, 4-D (B, H, Sq, Sk), rows padded to 16 elements, broadcast dims expanded
GQA                K/V repeated to H heads (materialised), dK/dV summed over groups: the backward checks
                   ``query.size(2) == key.size(2)``, and SDPA itself never gives this op GQA inputs
LSE                (B, H, ceil32(Sq)) float32 with a +inf tail (ROCm: unpadded) -> first Sq here; rows that
                   see no key: out 0, LSE 0 (torch 2.5+) or -inf (2.4) -> -inf (the registry's row fix-up)
out / grads        q's dtype; out/grads are BSHD in memory (viewed as BHSD)
backward           LSE as the forward returns it: (B, H, ceil32(Sq)) float32 buffer, +inf tail; out/dout in
                   q's dtype; grad_input_mask [T, T, T, F] (no dbias)
determinism        deterministic mode forces one key split; otherwise split-keys with atomics
torch              2.4+ (schema unchanged 2.4 - 2.13)
=================  ==========================================================================================

Sources: ``shared/reference/cuda-sdpa-ops.md`` sections 1, 2, pitfalls 7-11.
"""

from __future__ import annotations

import torch

from seqpar.ops.kernels.common import (
    Kernel,
    additive_bias,
    call,
    cuda_available,
    in_dtype,
    lse_for_efficient_backward,
    lse_from_efficient,
    repeat_kv,
    sum_groups,
)

OPS = ("_scaled_dot_product_efficient_attention", "_scaled_dot_product_efficient_attention_backward")
SCHEMAS = {  # positional argument names by the torch version that introduced them (``scale`` is keyword-only)
    OPS[0]: {(2, 4): ("query", "key", "value", "attn_bias", "compute_log_sumexp", "dropout_p", "is_causal")},
    OPS[1]: {(2, 4): ("grad_out_", "query", "key", "value", "attn_bias", "out", "logsumexp", "philox_seed",
                      "philox_offset", "dropout_p", "grad_input_mask", "is_causal")},
}
MIN_TORCH = (2, 4)


def _op(i: int):
    return getattr(torch.ops.aten, OPS[i])


def _lse_pad() -> int:
    return 1 if torch.version.hip else 32


def forward(q, k, v, *, scale, mask=None, is_causal=False):
    h = q.shape[1]
    bias = None if mask is None else additive_bias(mask, q, k.shape[2])
    args = dict(query=q, key=repeat_kv(k, h), value=repeat_kv(v, h), attn_bias=bias, compute_log_sumexp=True,
                dropout_p=0.0, is_causal=is_causal)
    r = call(_op(0), SCHEMAS[OPS[0]], args, scale=scale)
    return r[0], lse_from_efficient(r[1], q.shape[2])


def backward(dout, q, k, v, out, lse, *, scale, mask=None, is_causal=False):
    h, hkv = q.shape[1], k.shape[1]
    bias = None if mask is None else additive_bias(mask, q, k.shape[2])
    seed = torch.empty((), dtype=torch.int64, device=q.device)
    args = dict(grad_out_=in_dtype(dout, q), query=q, key=repeat_kv(k, h), value=repeat_kv(v, h), attn_bias=bias,
                out=in_dtype(out, q), logsumexp=lse_for_efficient_backward(lse, _lse_pad()), philox_seed=seed,
                philox_offset=seed, dropout_p=0.0, grad_input_mask=[True, True, True, False], is_causal=is_causal)
    dq, dk, dv, _ = call(_op(1), SCHEMAS[OPS[1]], args, scale=scale)
    return dq, sum_groups(dk, hkv), sum_groups(dv, hkv)


def _refuses(q, k, v, kind):
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {q.dtype} (fp16/bf16/fp32 only)"
    d, align = q.shape[-1], (4 if q.dtype == torch.float32 else 8)
    if d % align or v.shape[-1] % align:
        return f"head dim {d}/{v.shape[-1]} (needs a multiple of {align})"
    if q.dtype == torch.bfloat16 and q.device.type == "cuda" and torch.cuda.get_device_capability(q.device) < (8, 0):
        return "bf16 needs sm80+"
    if not torch.backends.cuda.mem_efficient_sdp_enabled():
        return "EFFICIENT_ATTENTION disabled by torch.nn.attention.sdpa_kernel"
    return None


KERNEL = Kernel(
    name="cuda_efficient",
    summary="aten._scaled_dot_product_efficient_attention (+ backward): additive bias, fp32 too",
    devices=("cuda",),
    dtypes=(torch.float16, torch.bfloat16, torch.float32),
    head_dims="multiple of 8 (fp16/bf16) or 4 (fp32)",
    masks=("none", "causal", "bool", "bias"),
    gqa="K/V repeated to H heads (the backward rejects H_kv < H), dK/dV summed over groups",
    min_torch=MIN_TORCH,
    deterministic="under torch.use_deterministic_algorithms(True) (one key split)",
    out_dtype="q",
    sdpa_backend="EFFICIENT_ATTENTION",
    forward=forward,
    backward=backward,
    available=lambda: cuda_available(OPS, MIN_TORCH, (5, 0)),
    refuses=_refuses,
)
