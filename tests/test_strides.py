"""Any memory layout a user can pass gives the exact result: every public function, forward and backward.

Run: ``python -m pytest tests/test_strides.py -q``

Each input is given in one of these layouts (same values, other strides), and so is the incoming
gradient of the backward:

- ``transposed``: ``x.transpose(2, 3).contiguous().transpose(2, 3)`` -- the last dim is not stride-1
  (the fused CPU kernel read such rows as if contiguous and returned 1e19..1e36 or NaN);
- ``expanded``: a dimension of stride 0 (K/V heads or the batch broadcast with ``expand``);
- ``sliced``: every other element of a tensor twice as long (``big[..., ::2]``);
- ``bshd``: ``(B, S, H, D)`` storage seen as ``(B, H, S, D)`` (what Hugging Face models pass).

The reference is the float64 formula (``seqpar.ops.reference``) on contiguous copies of the same
values; float64 inputs, tolerance 1e-12 (measured: <= 2e-15). W = 2 and 3 gloo ranks (uneven shards).
"""

from __future__ import annotations

import pytest
import torch

import seqpar
import seqpar.nn
from seqpar.ops import reference

LAYOUTS = ("transposed", "expanded", "sliced", "bshd")
TOL = 1e-12


def odd(x: torch.Tensor, how: str) -> torch.Tensor:
    """``x``'s values in the layout ``how``. ``expanded``: stride 0 along dim 1 when its slices are equal
    (the K/V heads and softmax inputs here are built so); other tensors (q) fall back to ``transposed``."""
    if how == "contiguous":
        return x.contiguous()
    if how == "transposed":
        return x.transpose(-1, -2).contiguous().transpose(-1, -2)
    if how == "expanded":
        first = x[:, :1]
        if x.shape[1] > 1 and torch.equal(first.expand_as(x), x):
            return first.expand_as(x)
        return odd(x, "transposed")
    if how == "sliced":
        big = torch.stack([x, torch.full_like(x, float("nan"))], dim=-1).flatten(-2)  # NaN between: a wrong read shows
        return big[..., ::2]
    if how == "bshd":
        return x.transpose(1, 2).contiguous().transpose(1, 2) if x.dim() == 4 else x.contiguous()
    raise AssertionError(how)


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    d = torch.where(a == b, torch.zeros_like(a), (a - b).abs())  # equal infinities (lse of empty rows) agree
    return float(d.nan_to_num(nan=float("inf")).max()) if d.numel() else 0.0


def _inputs(s: int, heads: int = 4, kv_heads: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, heads, s, 8, generator=g, dtype=torch.float64)
    k1, v1 = (torch.randn(2, 1, s, 8, generator=g, dtype=torch.float64) for _ in range(2))
    k, v = k1.expand(2, kv_heads, s, 8).contiguous(), v1.expand(2, kv_heads, s, 8).contiguous()  # equal kv heads
    dout = torch.randn(2, heads, s, 8, generator=g, dtype=torch.float64)
    return q, k, v, dout


def _attention_cases(rank, world_size):
    """seqpar.attention (each strategy, causal zigzag and plain contiguous) and SequenceParallelAttention."""
    s = 4 * world_size + 3
    q, k, v, dout = _inputs(s)
    mask = reference.sequence_mask(s, is_causal=True)
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    r_out = reference.attention(qr, kr, vr, mask=mask)[0]
    refs = (r_out, *torch.autograd.grad(r_out, (qr, kr, vr), dout))
    errs = {}
    for how in LAYOUTS:
        for strategy in ("allreduce", "ring", "allgather", "module"):
            ql, kl, vl = (seqpar.shard(t, layout="zigzag").detach() for t in (q, k, v))
            ql, kl, vl = (odd(t, how).requires_grad_() for t in (ql, kl, vl))
            if strategy == "module":
                attn = seqpar.nn.SequenceParallelAttention(is_causal=True, layout="zigzag")
                out = attn(ql, kl, vl)
            else:
                out = seqpar.attention(ql, kl, vl, is_causal=True, layout="zigzag", strategy=strategy)
            g = odd(seqpar.shard(dout, layout="zigzag"), "transposed" if how != "transposed" else "sliced")
            mine = (out, *torch.autograd.grad(out, (ql, kl, vl), g))
            errs[(how, strategy)] = max(_err(a, seqpar.shard(b, layout="zigzag")) for a, b in zip(mine, refs))
    # the gradient of out.sum() arrives expanded (stride 0 everywhere)
    ql, kl, vl = (odd(seqpar.shard(t), "transposed").requires_grad_() for t in (q, k, v))
    out = seqpar.attention(ql, kl, vl, strategy="ring")
    out.sum().backward()
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    reference.attention(qr, kr, vr)[0].sum().backward()
    pairs = zip((ql, kl, vl), (qr, kr, vr))
    errs[("expanded dout", "ring")] = max(_err(a.grad, seqpar.shard(b.grad)) for a, b in pairs)
    return errs


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world_size", [2, 3])
def test_attention_any_layout_forward_backward(dist, world_size, one_thread):
    errs = {}
    for r in dist(world_size, _attention_cases, timeout=240):
        for case, e in r.items():
            errs[case] = max(errs.get(case, 0.0), e)
    bad = {c: e for c, e in errs.items() if not e <= TOL}
    assert not bad, bad
    assert len(errs) == len(LAYOUTS) * 4 + 1


def _kv_cases(rank, world_size):
    split = [1 + 2 * r for r in range(world_size)]  # uneven shards of the keys
    cols = slice(sum(split[:rank]), sum(split[: rank + 1]))
    _, k, v, _ = _inputs(sum(split), seed=1)
    q = _inputs(5, seed=5)[0]  # 5 queries, replicated
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    mask = torch.rand(2, 1, 5, sum(split), generator=torch.Generator().manual_seed(3)) > 0.3
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    r_out, r_lse, r_w = reference.attention(qr, kr, vr, mask=mask)
    r_grads = torch.autograd.grad(r_out, (qr, kr, vr), dout)
    errs = {}
    for how in LAYOUTS:
        ql = odd(q, how).requires_grad_()
        kl, vl = (odd(t[:, :, cols].contiguous(), how).requires_grad_() for t in (k, v))
        m = odd(mask[..., cols].contiguous(), "transposed" if how == "expanded" else how)
        out, w, lse = seqpar.kv_sharded_attention(ql, kl, vl, attn_mask=m, return_weights=True, return_lse=True)
        dq, dk, dv = torch.autograd.grad(out, (ql, kl, vl), odd(dout, "transposed"))
        errs[how] = max(_err(out, r_out), _err(lse, r_lse), _err(w, r_w[..., cols]), _err(dq, r_grads[0]),
                        _err(dk, r_grads[1][:, :, cols]), _err(dv, r_grads[2][:, :, cols]))
    return errs


@pytest.mark.timeout(240)
@pytest.mark.parametrize("world_size", [2, 3])
def test_kv_sharded_any_layout_forward_backward(dist, world_size, one_thread):
    for r in dist(world_size, _kv_cases, timeout=180):
        bad = {c: e for c, e in r.items() if not e <= TOL}
        assert not bad and len(r) == len(LAYOUTS), r


def _softmax_and_layout_cases(rank, world_size):
    g = torch.Generator().manual_seed(4)
    n = 3 * world_size + 1
    x = (torch.randn(2, 1, 5, n, generator=g, dtype=torch.float64) * 3).expand(2, 3, 5, n).contiguous()
    gout = torch.randn(x.shape, generator=g, dtype=torch.float64)
    cols = torch.tensor_split(torch.arange(n), world_size)[rank]
    xr = x.clone().requires_grad_()
    ref = reference.softmax(xr)
    (r_dx,) = torch.autograd.grad(ref, xr, gout)
    errs = {}
    for how in LAYOUTS:
        xl = odd(x[..., cols].contiguous(), how).requires_grad_()
        y = seqpar.softmax(xl)
        (dx,) = torch.autograd.grad(y, xl, odd(gout[..., cols].contiguous(), "sliced"))
        errs[f"softmax {how}"] = max(_err(y, ref[..., cols]), _err(dx, r_dx[..., cols]))
        full = odd(x, how)  # shard / unshard of an odd layout, both layouts of the sequence
        for layout in ("contiguous", "zigzag"):
            part = seqpar.shard(full, dim=3, layout=layout)
            back = seqpar.unshard(odd(part.contiguous(), how), dim=3, layout=layout, seq_len=n)
            errs[f"shard/unshard {how} {layout}"] = _err(back, x)
    return errs


@pytest.mark.timeout(240)
@pytest.mark.parametrize("world_size", [2, 3])
def test_softmax_shard_unshard_any_layout(dist, world_size, one_thread):
    for r in dist(world_size, _softmax_and_layout_cases, timeout=180):
        bad = {c: e for c, e in r.items() if not e <= TOL}
        assert not bad and len(r) == 3 * len(LAYOUTS), r
