"""``cuda_flash``: ``aten._scaled_dot_product_flash_attention`` (+ ``_backward``), FlashAttention-2 in torch.

=================  ==========================================================================================
inputs             fp16 / bf16, sm80+, head dim % 8 == 0 and <= 256 (the op does not pad; SDPA does)
masks              none, or ``is_causal`` on diagonal blocks only: with Sq != Sk the op's causal is
                   *bottom-right* (flash-attn 2 convention), seqpar's is top-left; the two agree for Sq == Sk
GQA                native (H % H_kv == 0; dK/dV summed over groups inside the kernel)
LSE                (B, H, Sq) float32 contiguous; +inf on rows that see no key -> -inf here
out / grads        q's dtype (rounded before the float32 merge)
K/V                made contiguous (torch CP: "Without making key and value contiguous(), the loss curve is bad")
gate               ``torch.backends.cuda.can_use_flash_attention`` is asked per block shape before the op runs
backward           reads LSE by pointer (no checks): float32, contiguous (B, H, Sq); out/dout in q's dtype,
                   contiguous; cum_seq None, max_q/max_k = Sq/Sk (unused on the dense path); rng tensors are
                   only read with dropout: int64 scalars up to torch 2.6, uint64 (2,) + () from 2.7
determinism        deterministic backward under ``torch.use_deterministic_algorithms(True)``
torch              2.4+ (schema unchanged 2.4 - 2.13 apart from the rng outputs' names/dtypes at 2.7)
=================  ==========================================================================================

Sources: ``shared/reference/cuda-sdpa-ops.md`` sections 1, 2, pitfalls 12-17.
"""

from __future__ import annotations

import torch

from seqpar.ops.kernels.common import (
    Kernel,
    call,
    cuda_available,
    in_dtype,
    lse_from_flash,
    sdp_refuses,
    torch_version,
)

OPS = ("_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_backward")
_BWD = ("grad_out", "query", "key", "value", "out", "logsumexp", "cum_seq_q", "cum_seq_k", "max_q", "max_k",
        "dropout_p", "is_causal")
SCHEMAS = {  # positional argument names by the torch version that introduced them (``scale`` is keyword-only)
    OPS[0]: {(2, 4): ("query", "key", "value", "dropout_p", "is_causal", "return_debug_mask")},
    # names unchanged 2.4 - 2.13 (the forward's rng outputs were renamed rng_state/unused and became uint64 at 2.7;
    # only the low-level _flash_attention_backward renamed its arguments)
    OPS[1]: {(2, 4): (*_BWD, "philox_seed", "philox_offset")},
}
MIN_TORCH = (2, 4)


def _op(i: int):
    return getattr(torch.ops.aten, OPS[i])


def rng_placeholders(device) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward's rng outputs as the backward expects them (read only with dropout, which seqpar never uses)."""
    if torch_version() >= (2, 7):
        return torch.empty(2, dtype=torch.uint64, device=device), torch.empty((), dtype=torch.uint64, device=device)
    return torch.empty((), dtype=torch.int64, device=device), torch.empty((), dtype=torch.int64, device=device)


def forward(q, k, v, *, scale, mask=None, is_causal=False):
    assert mask is None and (not is_causal or q.shape[2] == k.shape[2]), "flash: no mask, causal only if Sq == Sk"
    args = dict(query=q, key=k.contiguous(), value=v.contiguous(), dropout_p=0.0, is_causal=is_causal,
                return_debug_mask=False)
    r = call(_op(0), SCHEMAS[OPS[0]], args, scale=scale)
    return r[0], lse_from_flash(r[1])


def backward(dout, q, k, v, out, lse, *, scale, mask=None, is_causal=False):
    seed, offset = rng_placeholders(q.device)
    args = dict(grad_out=in_dtype(dout, q), query=q, key=k.contiguous(), value=v.contiguous(), out=in_dtype(out, q),
                logsumexp=lse.float().contiguous(), cum_seq_q=None, cum_seq_k=None, max_q=q.shape[2],
                max_k=k.shape[2], dropout_p=0.0, is_causal=is_causal, philox_seed=seed, philox_offset=offset)
    dq, dk, dv = call(_op(1), SCHEMAS[OPS[1]], args, scale=scale)
    return dq, dk, dv


def _refuses(q, k, v, kind):
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {q.dtype} (fp16/bf16 only)"
    d = q.shape[-1]
    if d % 8 or d > 256 or v.shape[-1] != d:
        return f"head dim {d}/{v.shape[-1]} (needs equal, % 8 == 0, <= 256)"
    if kind not in ("none", "causal"):
        return f"mask kind {kind!r} (flash takes no mask)"
    if kind == "causal" and q.shape[2] != k.shape[2]:
        return "causal with Sq != Sk (flash's causal is bottom-right)"
    if not torch.backends.cuda.flash_sdp_enabled():
        return "FLASH_ATTENTION disabled by torch.nn.attention.sdpa_kernel"
    return sdp_refuses("flash", q, k, v, kind == "causal")


KERNEL = Kernel(
    name="cuda_flash",
    summary="aten._scaled_dot_product_flash_attention (+ backward): FlashAttention-2, no mask",
    devices=("cuda",),
    dtypes=(torch.float16, torch.bfloat16),
    head_dims="% 8 == 0, <= 256 (sm86/89/120: backward <= 192)",
    masks=("none", "causal"),
    gqa="native",
    min_torch=MIN_TORCH,
    deterministic="under torch.use_deterministic_algorithms(True)",
    out_dtype="q",
    sdpa_backend="FLASH_ATTENTION",
    forward=forward,
    backward=backward,
    available=lambda: cuda_available(OPS, MIN_TORCH, (8, 0)),
    refuses=_refuses,
)
