"""CPU emulations of the fused CUDA SDPA ops, with the conventions and input checks the real kernels have.

Written from ``shared/reference/cuda-sdpa-ops.md`` (not from seqpar's wrappers): each fake computes the float64
formula and returns what the CUDA op returns -- outputs in q's dtype, flash's +inf LSE on rows with no key
and bottom-right causal for Sq != Sk, efficient's (B, H, ceil32(Sq)) LSE with a +inf tail, BSHD-strided
outputs, LSE 0 on fully masked rows, cuDNN's (B, H, Sq, 1) LSE from torch 2.9 -- and raises where the
real op refuses or reads garbage (LSE dtype/shape/contiguity, bias dtype/rank/alignment, GQA in the
efficient backward, out/dout dtypes and strides, cuDNN's max_q/max_k). ``install(monkeypatch)`` replaces
the ops the wrappers call; ``calls`` records (op, kwargs summary) per call.
"""

from __future__ import annotations

import math

import torch

from seqpar.ops.kernels import common, cuda_cudnn, cuda_efficient, cuda_flash

calls: list[tuple[str, dict]] = []


def _check(cond, msg):
    if not cond:
        raise RuntimeError(msg)


def _scores(q, k, scale, bias, causal):
    """float64 scores (B, H, Sq, Sk); GQA by head groups; causal 'tl' | 'br' | None."""
    g = q.shape[1] // k.shape[1]
    s = (q.double() @ k.double().repeat_interleave(g, 1).transpose(-1, -2)) * scale
    if bias is not None:
        s = s + bias.double()
    if causal:
        sq, sk = s.shape[-2:]
        i = torch.arange(sq)[:, None]
        j = torch.arange(sk)[None, :]
        s = s.masked_fill(j > i + (0 if causal == "tl" else sk - sq), float("-inf"))
    return s


def _fwd(q, k, v, scale, bias, causal):
    """out (float64), lse (float64, -inf on rows with no key)."""
    s = _scores(q, k, scale, bias, causal)
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse.nan_to_num(neginf=0.0)[..., None])
    g = q.shape[1] // k.shape[1]
    return p @ v.double().repeat_interleave(g, 1), lse


def _bwd(dout, q, k, v, out, lse, scale, bias, causal):
    """Flash-style backward from the given (global) out and lse; grads float64, dk/dv with K/V's heads."""
    g = q.shape[1] // k.shape[1]
    kr, vr = k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    s = _scores(q, k, scale, bias, causal)
    p = torch.exp(s - lse.double()[..., None])
    do = dout.double()
    dv = p.transpose(-1, -2) @ do
    ds = p * (do @ vr.transpose(-1, -2) - (do * out.double()).sum(-1, keepdim=True))
    dq = ds @ kr * scale
    dk = ds.transpose(-1, -2) @ q.double() * scale

    def fold(t):
        return t.unflatten(1, (k.shape[1], g)).sum(2)

    return dq, fold(dk), fold(dv)


def _half(q):
    _check(q.dtype in (torch.float16, torch.bfloat16), f"FlashAttention only supports fp16/bf16, got {q.dtype}")


def _unit(*ts):
    for t in ts:
        _check(t.stride(-1) == 1, "Input tensor must have contiguous last dimension")


def flash_fwd(q, k, v, dropout_p, is_causal, return_debug_mask, *, scale):
    calls.append(("flash_fwd", dict(sq=q.shape[2], sk=k.shape[2], causal=is_causal, hkv=k.shape[1])))
    _half(q)
    _unit(q, k, v)
    _check(q.shape[-1] % 8 == 0 and q.shape[-1] <= 256, "head dim")
    out, lse = _fwd(q, k, v, scale, None, "br" if is_causal else None)  # flash-attn 2: bottom-right
    lse = torch.where(torch.isneginf(lse), torch.full_like(lse, math.inf), lse)  # flash: +inf on empty rows
    if common.torch_version() >= (2, 7):
        rng = (torch.zeros(2, dtype=torch.uint64), torch.zeros((), dtype=torch.uint64))
    else:
        rng = (torch.zeros((), dtype=torch.int64), torch.zeros((), dtype=torch.int64))
    return (out.to(q.dtype), lse.float(), None, None, q.shape[2], k.shape[2], *rng, torch.empty(0, dtype=q.dtype))


def flash_bwd(grad_out, q, k, v, out, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal,
              philox_seed, philox_offset, *, scale):
    calls.append(("flash_bwd", dict(sq=q.shape[2], sk=k.shape[2], causal=is_causal)))
    _half(q)
    _unit(q, k, v, out, grad_out)
    # mha_bwd reads the LSE by pointer: anything but float32 contiguous (B, H, Sq) is silently wrong
    _check(logsumexp.dtype == torch.float32 and logsumexp.is_contiguous(), "LSE not float32 contiguous")
    _check(tuple(logsumexp.shape) == (q.shape[0], q.shape[1], q.shape[2]), f"LSE shape {tuple(logsumexp.shape)}")
    _check(out.dtype == q.dtype and grad_out.dtype == q.dtype, "out/dout must have q's dtype")
    _check(cum_seq_q is None and cum_seq_k is None, "dense path only")
    want = (torch.uint64, (2,)) if common.torch_version() >= (2, 7) else (torch.int64, ())
    _check((philox_seed.dtype, tuple(philox_seed.shape)) == want, f"rng_state {philox_seed.dtype}")
    g = _bwd(grad_out, q, k, v, out, logsumexp, scale, None, "br" if is_causal else None)
    return tuple(t.to(q.dtype) for t in g)


def _ceil32(n):
    return -(-n // 32) * 32


def _bshd(t):
    """Same values, BSHD memory (as the efficient kernel allocates its outputs)."""
    return t.transpose(1, 2).contiguous().transpose(1, 2)


def _bias_ok(bias, q, k):
    if bias is None:
        return
    _check(bias.dtype == q.dtype, "invalid dtype for bias - should match query's dtype")
    _check(bias.dim() == 4 and tuple(bias.shape) == (q.shape[0], q.shape[1], q.shape[2], k.shape[2]),
           f"bias shape {tuple(bias.shape)}")
    _check(bias.stride(-1) == 1, "attn_bias last dim stride")
    for s in bias.stride()[:-1]:
        _check(s % (8 if q.dtype != torch.float32 else 4) == 0, "attn_bias is not correctly aligned")


def eff_fwd(q, k, v, attn_bias, compute_log_sumexp, dropout_p, is_causal, *, scale):
    calls.append(("eff_fwd", dict(sq=q.shape[2], sk=k.shape[2], causal=is_causal, bias=attn_bias is not None)))
    _check(q.dtype in (torch.float16, torch.bfloat16, torch.float32), f"dtype {q.dtype}")
    _check(q.shape[1] == k.shape[1], "efficient attention: query and key must have the same number of heads")
    _unit(q, k, v)
    _bias_ok(attn_bias, q, k)
    out, lse = _fwd(q, k, v, scale, attn_bias, "tl" if is_causal else None)
    dead = torch.isneginf(lse)
    out, lse = out.masked_fill(dead[..., None], 0), lse.masked_fill(dead, 0.0)  # torch 2.5+: out 0, LSE 0
    pad = torch.full((*lse.shape[:-1], _ceil32(q.shape[2])), math.inf, dtype=torch.float32)
    pad[..., : q.shape[2]] = lse
    seed = torch.zeros((), dtype=torch.int64)
    return _bshd(out.to(q.dtype)), pad, seed, seed


def eff_bwd(grad_out_, q, k, v, attn_bias, out, logsumexp, philox_seed, philox_offset, dropout_p, grad_input_mask,
            is_causal, *, scale):
    calls.append(("eff_bwd", dict(sq=q.shape[2], sk=k.shape[2], causal=is_causal, bias=attn_bias is not None)))
    _check(q.shape[1] == k.shape[1], "TORCH_CHECK(query.size(2) == key.size(2))")
    _unit(q, k, v, out, grad_out_)
    _bias_ok(attn_bias, q, k)
    _check(out.dtype == q.dtype and grad_out_.dtype == q.dtype, "out/dout must have q's dtype")
    _check(logsumexp.dtype == torch.float32 and tuple(logsumexp.shape) == (*q.shape[:2], _ceil32(q.shape[2])),
           f"LSE must be the forward's padded buffer, got {tuple(logsumexp.shape)}")
    _check(bool(torch.isposinf(logsumexp[..., q.shape[2]:]).all()), "LSE padding must be +inf")
    _check(list(grad_input_mask)[:3] == [True, True, True], "grad_input_mask")
    g = _bwd(grad_out_, q, k, v, out, logsumexp[..., : q.shape[2]], scale, attn_bias, "tl" if is_causal else None)
    return (*(_bshd(t.to(q.dtype)) for t in g), None)


def cudnn_fwd(q, k, v, attn_bias, compute_log_sumexp, dropout_p, is_causal, return_debug_mask, *, scale):
    calls.append(("cudnn_fwd", dict(sq=q.shape[2], sk=k.shape[2], causal=is_causal)))
    _half(q)
    _unit(q, k, v)
    _check(compute_log_sumexp is True, "compute_log_sumexp")
    out, lse = _fwd(q, k, v, scale, attn_bias, "tl" if is_causal else None)
    lse = lse.float()
    if common.torch_version() >= (2, 9):
        lse = lse.unsqueeze(-1)
    seed = torch.zeros((), dtype=torch.int64)
    return out.to(q.dtype), lse, None, None, q.shape[2], k.shape[2], seed, seed, None


def cudnn_bwd(grad_out, q, k, v, out, logsumexp, philox_seed, philox_offset, attn_bias, cum_seq_q, cum_seq_k, max_q,
              max_k, dropout_p, is_causal, *, scale):
    calls.append(("cudnn_bwd", dict(sq=q.shape[2], sk=k.shape[2], causal=is_causal)))
    _half(q)
    _check(grad_out.stride() == out.stride() and out.is_contiguous(), "same_strides(o, dO)")
    _check((max_q, max_k) == (q.shape[2], k.shape[2]), f"max_q/max_k {max_q}/{max_k} != Sq/Sk")
    rank = 4 if common.torch_version() >= (2, 9) else 3
    _check(logsumexp.dim() == rank and logsumexp.is_contiguous() and logsumexp.dtype == torch.float32,
           f"stats must be the forward's contiguous rank-{rank} LSE")
    _check(philox_seed is not None and philox_seed.dtype == torch.int64, "philox")
    lse = logsumexp.reshape(q.shape[0], q.shape[1], q.shape[2])
    g = _bwd(grad_out, q, k, v, out, lse, scale, attn_bias, "tl" if is_causal else None)
    return tuple(t.to(q.dtype) for t in g)


FAKES = {
    cuda_flash: (flash_fwd, flash_bwd),
    cuda_efficient: (eff_fwd, eff_bwd),
    cuda_cudnn: (cudnn_fwd, cudnn_bwd),
}


def install(monkeypatch) -> None:
    """Route the three CUDA wrappers to these fakes (for the test's duration)."""
    calls.clear()
    for mod, (f, b) in FAKES.items():
        monkeypatch.setattr(mod, "_op", lambda i, f=f, b=b: (f, b)[i])
