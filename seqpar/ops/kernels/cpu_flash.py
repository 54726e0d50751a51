"""``cpu_flash``: ``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward op.

Fused, O(S * D) memory, native GQA (query head h uses K/V head h // (H / H_kv)), bool or float masks
(passed as a 4-D additive float32 mask), ``is_causal`` top-left. Schema unchanged torch 2.4 - 2.13.
bf16/fp16 inputs are computed in float32 (the op is no faster in bf16 on CPU, measured on torch 2.13),
so partials are exact to float32 before the merge. Rows that see no key come back with lse 0; the
registry sets them to -inf. Honours ``torch.nn.attention.sdpa_kernel`` (the FLASH_ATTENTION switch
governs SDPA's CPU flash path too).
"""

from __future__ import annotations

import torch

from seqpar.ops.kernels import blockwise
from seqpar.ops.kernels.common import MASK_KINDS, Kernel, row_valid
from seqpar.ops.lse import NEG_INF, stat_dtype

_FWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_BWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
FWD_ARGS = ("query", "key", "value", "dropout_p", "is_causal")  # positional; attn_mask, scale keyword-only
BWD_ARGS = ("grad_out", "query", "key", "value", "out", "logsumexp", "dropout_p", "is_causal")


def _upcast(*ts: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """bf16/fp16 -> float32 (no slower on CPU, and partials stay exact to float32)."""
    if ts[0].dtype in (torch.bfloat16, torch.float16):
        return tuple(t.float() for t in ts)
    return ts


def _float_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Additive 4-D mask (the op accepts only 2-D or 4-D masks; 1-D/3-D ones broadcast too)."""
    if mask is None:
        return None
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, NEG_INF)
    return mask.to(dtype)


def forward(q, k, v, *, scale, mask=None, is_causal=False):
    q, k, v = _upcast(q, k, v)
    sd = stat_dtype(q.dtype)
    out, lse = _FWD(q, k, v, 0.0, is_causal, attn_mask=_float_mask(mask, sd), scale=scale)  # mask never bf16
    lse = lse.to(sd).contiguous()  # the op's LSE is (B, S, H) in memory
    if _lost_nan(lse, mask):  # rare: recompute the call with the exact plain-torch loop
        return blockwise.forward(q, k, v, scale=scale, mask=mask, is_causal=is_causal)
    return out, lse


def _lost_nan(lse: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Whether the op may have turned a row into 0 that should be NaN.

    torch 2.13's kernel returns out 0, lse 0 -- as for a fully masked row -- for a row ALL of whose scores
    are NaN (a NaN query row; a causal row whose only visible key is NaN) when the call is small (Sq, Sk up to
    ~8), and NaN when it is larger: ``q[0, 0, 1] = nan`` gives 0 for (1, 1, 4, 8) x (1, 1, 6, 8), NaN for
    13 x 13. An LSE of exactly 0 on a row that sees a key is that case (or, rarely, a true LSE of 0.0, which
    then only costs the recomputation). One comparison over the (B, H, Sq) LSE per call.
    """
    zero = lse == 0
    if not bool(zero.any()):
        return False
    if mask is not None:  # fully masked rows also come back with lse 0: they are not suspects
        zero = zero & row_valid(mask)
    return bool(zero.any())


def backward(dout, q, k, v, out, lse, *, scale, mask=None, is_causal=False):
    q, k, v, dout, out = _upcast(q, k, v, dout, out)
    sd = stat_dtype(q.dtype)
    # dout and out as they come (the op reads any strides; it makes its own (B, S, H, D) copy of dout, torch 2.13):
    # a contiguous copy here would add 2 * |out| of the block to the backward's peak.
    return _BWD(dout, q, k, v, out, lse.to(sd), 0.0, is_causal, attn_mask=_float_mask(mask, sd), scale=scale)


def _refuses(q, k, v, kind):
    if q.device.type != "cpu":
        return f"device {q.device.type}, not cpu"
    if not torch.backends.cuda.flash_sdp_enabled():
        return "FLASH_ATTENTION disabled by torch.nn.attention.sdpa_kernel"
    return None


KERNEL = Kernel(
    name="cpu_flash",
    summary="aten._scaled_dot_product_flash_attention_for_cpu (+ backward): fused, float masks, LSE",
    devices=("cpu",),
    dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64),
    head_dims="any",
    masks=MASK_KINDS,
    gqa="native",
    min_torch=(2, 4),
    deterministic="yes",
    out_dtype="float32",
    sdpa_backend="FLASH_ATTENTION",
    forward=forward,
    backward=backward,
    available=lambda: None if _FWD is not None and _BWD is not None else f"torch {torch.__version__} lacks the op",
    refuses=_refuses,
)
