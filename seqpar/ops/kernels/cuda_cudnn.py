"""``cuda_cudnn``: ``aten._scaled_dot_product_cudnn_attention`` (+ ``_backward``), cuDNN's fused attention --
the fastest op on H100 (628-662 TFLOP/s forward, bf16, D=128; flash: 318-350, anchors in benchmarks/gpu_check.py).

=================  ==========================================================================================
inputs             fp16 / bf16, sm80+, head dim <= 128 and % 8 == 0 (256 on sm90/sm10x with cuDNN > 9.22)
masks              none, or ``is_causal`` (top-left) on diagonal blocks. The op takes an additive bias from
                   torch 2.5, but with a mask it gives NaN dQ on H100/H200 (pytorch #196678): seqpar gives
                   masked blocks to ``cuda_efficient`` instead
GQA                from torch 2.9 (accepted by sdp_utils, dK/dV allocated like K/V); below 2.9 refused here
                   (unverified there) -- flash takes those blocks
LSE                (B, H, Sq) float32 in torch 2.5 - 2.8, (B, H, Sq, 1) from 2.9 -> (B, H, Sq) contiguous here;
                   +inf on empty rows (unverified) -> -inf
out / grads        q's dtype
Q/K/V              made contiguous (torch CP: "Without making key and value contiguous(), the loss curve is bad";
                   and sdp_utils' cuDNN layout checks)
gate               ``torch.backends.cuda.can_use_cudnn_attention`` is asked per block shape before the op runs
backward           LSE in the rank the forward returned in this torch version, contiguous; out and dout
                   contiguous (cuDNN < 9.5.1 asserts on differing strides, pytorch #134001 / #176915);
                   max_q/max_k = the true Sq/Sk (used as s_q/s_kv and in the graph cache); defined int64
                   philox tensors; attn_bias None
determinism        never deterministic: refused under ``torch.use_deterministic_algorithms(True)``
torch              2.5+ (2.4's schema has no LSE flag and a different backward order; not wrapped)
order              first on sm90 / sm100 / sm103 with torch >= 2.9 (where recent torch's sdp_utils ranks cuDNN
                   first too, ``check_prefer_cudnn_attention``; 1.8-1.9x flash on H100) unless
                   ``TORCH_CUDNN_SDPA_DEPRIORITIZED=1``; elsewhere only when named (``SEQPAR_KERNEL=cuda_cudnn,...``)
=================  ==========================================================================================

Sources: ``shared/reference/cuda-sdpa-ops.md`` sections 1, 2, 5.3, pitfalls 1-6.
"""

from __future__ import annotations

import os

import torch

from seqpar.ops.kernels.common import (
    Kernel,
    call,
    cuda_available,
    in_dtype,
    lse_for_cudnn_backward,
    lse_from_cudnn,
    sdp_refuses,
    torch_version,
)

OPS = ("_scaled_dot_product_cudnn_attention", "_scaled_dot_product_cudnn_attention_backward")
SCHEMAS = {  # positional argument names by the torch version that introduced them (``scale`` is keyword-only)
    OPS[0]: {
        (2, 4): ("query", "key", "value", "dropout_p", "is_causal", "return_debug_mask"),  # no LSE flag: not wrapped
        (2, 5): ("query", "key", "value", "attn_bias", "compute_log_sumexp", "dropout_p", "is_causal",
                 "return_debug_mask"),
    },
    OPS[1]: {
        (2, 4): ("grad_out", "query", "key", "value", "out", "logsumexp", "cum_seq_q", "cum_seq_k", "max_q", "max_k",
                 "dropout_p", "is_causal", "philox_seed", "philox_offset"),
        (2, 5): ("grad_out", "query", "key", "value", "out", "logsumexp", "philox_seed", "philox_offset", "attn_bias",
                 "cum_seq_q", "cum_seq_k", "max_q", "max_k", "dropout_p", "is_causal"),  # philox moved, bias added
    },
}
MIN_TORCH = (2, 5)


def _op(i: int):
    return getattr(torch.ops.aten, OPS[i])


def forward(q, k, v, *, scale, mask=None, is_causal=False):
    assert mask is None, "cudnn: masked blocks go to cuda_efficient"
    args = dict(query=q.contiguous(), key=k.contiguous(), value=v.contiguous(), attn_bias=None, compute_log_sumexp=True,
                dropout_p=0.0, is_causal=is_causal, return_debug_mask=False)
    r = call(_op(0), SCHEMAS[OPS[0]], args, scale=scale)
    return r[0], lse_from_cudnn(r[1], q)


def backward(dout, q, k, v, out, lse, *, scale, mask=None, is_causal=False):
    seed = torch.empty((), dtype=torch.int64, device=q.device)
    args = dict(grad_out=in_dtype(dout, q), query=q.contiguous(), key=k.contiguous(), value=v.contiguous(),
                out=in_dtype(out, q),
                logsumexp=lse_for_cudnn_backward(lse), philox_seed=seed, philox_offset=seed, attn_bias=None,
                cum_seq_q=None, cum_seq_k=None, max_q=q.shape[2], max_k=k.shape[2], dropout_p=0.0, is_causal=is_causal)
    dq, dk, dv = call(_op(1), SCHEMAS[OPS[1]], args, scale=scale)
    return dq, dk, dv


def _refuses(q, k, v, kind):
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {q.dtype} (fp16/bf16 only)"
    d = q.shape[-1]
    if d % 8 or d > 128 or v.shape[-1] != d:
        return f"head dim {d}/{v.shape[-1]} (seqpar uses cuDNN for equal head dims % 8 == 0, <= 128)"
    if kind not in ("none", "causal"):
        return f"mask kind {kind!r} (cuDNN with a mask: NaN dQ, pytorch #196678)"
    if kind == "causal" and q.shape[2] != k.shape[2]:
        return "causal with Sq != Sk (top-left in recent cuDNN graphs; unverified for older ones)"
    if k.shape[1] != q.shape[1] and torch_version() < (2, 9):
        return "GQA below torch 2.9 (unverified)"
    if k.shape[2] == 1:
        return "Sk == 1 (sdp_utils refuses it)"
    if torch.are_deterministic_algorithms_enabled():
        return "deterministic algorithms requested (cuDNN attention is not deterministic)"
    if not torch.backends.cuda.cudnn_sdp_enabled():
        return "CUDNN_ATTENTION disabled by torch.nn.attention.sdpa_kernel"
    return sdp_refuses("cudnn", q.contiguous(), k, v, kind == "causal")


def _available() -> str | None:
    why = cuda_available(OPS, MIN_TORCH, (8, 0))
    if why is None and not torch.backends.cudnn.is_available():
        why = "cuDNN not available to torch"
    return why


def preferred(device: torch.device) -> bool:
    """Whether seqpar puts cuDNN first on this device by default (as sdp_utils ``check_prefer_cudnn_attention`` does
    on sm90/sm10x in recent torch; the cuDNN-version condition there is not checked here)."""
    if device.type != "cuda" or os.environ.get("TORCH_CUDNN_SDPA_DEPRIORITIZED") == "1" or torch_version() < (2, 9):
        return False
    return torch.cuda.get_device_capability(device) in ((9, 0), (10, 0), (10, 3))


KERNEL = Kernel(
    name="cuda_cudnn",
    summary="aten._scaled_dot_product_cudnn_attention (+ backward): cuDNN fused attention, no mask",
    devices=("cuda",),
    dtypes=(torch.float16, torch.bfloat16),
    head_dims="% 8 == 0, <= 128",
    masks=("none", "causal"),
    gqa="native from torch 2.9; refused below",
    min_torch=MIN_TORCH,
    deterministic="no (refused in deterministic mode)",
    out_dtype="q",
    sdpa_backend="CUDNN_ATTENTION",
    forward=forward,
    backward=backward,
    available=_available,
    refuses=_refuses,
    default_on=lambda device: preferred(device),  # looked up per call: tests patch it
)
