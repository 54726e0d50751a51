"""The math layer without processes: LSE merges, local kernels, mask blocks vs the float64 formula.

Run: ``python -m pytest tests/test_ops.py -q``
"""

from __future__ import annotations

import math

import pytest
import torch

from seqpar.layout import positions
from seqpar.ops import kernels, reference
from seqpar.ops.kernels import blockwise
from seqpar.ops.lse import finite_or_zero, global_lse_from_max_sum, merge_many, merge_partials, stat_dtype
from seqpar.ops.masks import MaskSpec, Tokens, blocks

# max |impl - float64 reference| allowed, per input dtype: (out, lse, grads).
# out/grads are rounded to the input dtype once; lse is float32 for every non-float64 input.
TOL_OUT = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2e-2, torch.float16: 3e-3}
TOL_LSE = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2e-6, torch.float16: 2e-6}
TOL_GRAD = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 6e-2, torch.float16: 1e-2}
HUGE_LSE_FACTOR = 4  # merge error allowed at |lse| ~ 1e4, in units of |lse| * eps (see the test)
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
B, H, SQ, SK, D = 2, 4, 7, 9, 8


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| with matching -inf treated as equal (a mismatch of infinities is inf)."""
    a, b = a.detach().double(), b.detach().double()
    assert not torch.isnan(a).any(), "NaN in implementation output"
    both_inf = torch.isinf(a) & torch.isinf(b) & (torch.sign(a) == torch.sign(b))
    diff = torch.where(both_inf, torch.zeros_like(a), (a - b).abs())
    return float(diff.max()) if diff.numel() else 0.0


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _mask(kind: str, b: int, h: int, sq: int, sk: int, g: torch.Generator) -> torch.Tensor | None:
    """A mask of the given kind with row 1 fully masked (every kind but 'none')."""
    if kind == "none":
        return None
    if kind == "bool":  # (B, H, Sq, Sk)
        m = torch.rand(b, h, sq, sk, generator=g) > 0.3
        m[:, :, 1, :] = False
        return m
    if kind == "bool_b1":  # (B, 1, Sq, Sk): broadcast over heads
        m = torch.rand(b, 1, sq, sk, generator=g) > 0.3
        m[:, :, 1, :] = False
        return m
    if kind == "bool_3d":  # (H, Sq, Sk)
        m = torch.rand(h, sq, sk, generator=g) > 0.3
        m[:, 1, :] = False
        return m
    if kind == "keypad":  # (B, 1, 1, Sk): batch 1 sees no key at all
        m = torch.rand(b, 1, 1, sk, generator=g) > 0.4
        m[0, ..., 0] = True
        m[1] = False
        return m
    if kind == "float":  # additive, finite values and -inf
        m = torch.randn(b, h, sq, sk, generator=g) * 2
        m = m.masked_fill(torch.rand(b, h, sq, sk, generator=g) < 0.25, float("-inf"))
        m[:, :, 1, :] = float("-inf")
        return m
    raise ValueError(kind)


def _full_rows_masked(mask: torch.Tensor | None, shape) -> torch.Tensor:
    """(B, H, Sq) bool: rows that see no key under the reference semantics."""
    if mask is None:
        return torch.zeros(shape, dtype=torch.bool)
    m = mask if mask.dtype == torch.bool else mask > float("-inf")
    while m.dim() < 4:
        m = m.unsqueeze(0)
    return (~m.any(-1)).expand(shape)


# --- LSE merges ------------------------------------------------------------------------------


def _partial(q, k, v, cols, mask):
    """Reference partial (out, lse) over key columns ``cols`` (float64)."""
    m = None if mask is None else mask[..., cols]
    out, lse, _ = reference.attention(q, k[:, :, cols], v[:, :, cols], scale=0.5, mask=m)
    return out, lse


@pytest.mark.parametrize("mask_kind", ["none", "bool", "float"])
def test_merge_partials_equals_softmax_over_union(mask_kind):
    g = _gen(1)
    q = torch.randn(B, H, SQ, D, generator=g, dtype=torch.float64)
    k, v = (torch.randn(B, H, 6, D, generator=g, dtype=torch.float64) for _ in range(2))
    mask = _mask(mask_kind, B, H, SQ, k.shape[2], g)
    if mask is not None:  # the second subset is fully masked for row 3 only: a -inf partial
        mask[:, :, 3, 2:] = False if mask.dtype == torch.bool else float("-inf")
    full_out, full_lse, _ = reference.attention(q, k, v, scale=0.5, mask=mask)
    a, b = list(range(0, 2)), list(range(2, 6))
    out, lse = merge_partials(*_partial(q, k, v, a, mask), *_partial(q, k, v, b, mask))
    assert _err(out, full_out) < 1e-14
    assert _err(lse, full_lse) < 1e-14
    assert torch.equal(torch.isneginf(lse), torch.isneginf(full_lse))


def test_merge_partials_with_minus_inf_partials_gives_zero_no_nan():
    g = _gen(2)
    out_a = torch.randn(2, 3, 4, generator=g)
    lse_a = torch.randn(2, 3, generator=g)
    lse_a[0, 1] = float("-inf")
    out_a[0, 1] = 0
    out_b, lse_b = torch.zeros(2, 3, 4), torch.full((2, 3), float("-inf"))  # partial over no key
    out, lse = merge_partials(out_a, lse_a, out_b, lse_b)
    assert torch.equal(out, out_a) and torch.equal(lse, lse_a)  # merging "nothing" is the identity
    out, lse = merge_partials(out_b, lse_b, out_b, lse_b)  # both empty
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_merge_many_equals_softmax_over_union(dtype):
    g = _gen(3)
    q = torch.randn(B, H, SQ, D, generator=g, dtype=torch.float64)
    k, v = (torch.randn(B, 2, 10, D, generator=g, dtype=torch.float64) for _ in range(2))  # GQA
    mask = _mask("bool", B, H, SQ, 10, g)
    mask[:, :, :, 7:] = False  # the last subset is -inf for every row
    mask[:, :, 4, 3:] = False
    full_out, full_lse, _ = reference.attention(q, k, v, scale=0.5, mask=mask)
    subsets = [[0, 1, 2], [3], [4, 5, 6], [7, 8, 9]]
    parts = [_partial(q, k, v, c, mask) for c in subsets]
    out, lse = merge_many([o.to(dtype) for o, _ in parts], [x.to(dtype) for _, x in parts])
    assert out.dtype == stat_dtype(dtype) and lse.dtype == stat_dtype(dtype)
    tol = 1e-14 if dtype == torch.float64 else 2e-6
    assert _err(out, full_out) < tol
    assert _err(lse, full_lse) < tol
    assert torch.equal(out[:, :, 1], torch.zeros_like(out[:, :, 1]))  # fully masked row
    assert torch.isneginf(lse[:, :, 1]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_merges_with_huge_lse_do_not_overflow(dtype):
    """Partials whose LSE is ~1e4: finite, and as exact as an LSE of that size can be.

    An LSE stored in ``dtype`` near 1e4 carries an absolute rounding of ~1e4 * eps, which becomes a
    relative error of the merge weights; so the bound is ``HUGE_LSE_FACTOR * |lse| * eps``.
    """
    g = _gen(7)
    q = torch.randn(1, 2, 9, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(1, 2, 12, 8, generator=g, dtype=torch.float64) for _ in range(2))
    mask = torch.full((1, 1, 9, 12), 1e4, dtype=torch.float64) + torch.randint(-3, 4, (1, 1, 9, 12), generator=g)
    full_out, full_lse, _ = reference.attention(q, k, v, scale=0.5, mask=mask)
    subsets = [list(range(5)), list(range(5, 8)), list(range(8, 12))]
    parts = [tuple(t.to(dtype) for t in _partial(q, k, v, c, mask)) for c in subsets]
    bound = HUGE_LSE_FACTOR * 1e4 * torch.finfo(dtype).eps
    o2, l2 = merge_partials(*parts[0], *parts[1])
    o3, l3 = merge_many([o for o, _ in parts], [x for _, x in parts])
    two = reference.attention(q, k[:, :, :8], v[:, :, :8], scale=0.5, mask=mask[..., :8])
    assert torch.isfinite(o2).all() and torch.isfinite(o3).all()
    assert _err(o2, two[0]) < bound and _err(l2, two[1]) < bound
    assert _err(o3, full_out) < bound and _err(l3, full_lse) < bound


def test_finite_or_zero_and_global_lse():
    m = torch.tensor([float("-inf"), 3.0, -2.0])
    assert torch.equal(finite_or_zero(m), torch.tensor([0.0, 3.0, -2.0]))
    s = torch.tensor([0.0, math.e, 1.0])
    lse = global_lse_from_max_sum(m, s)
    assert torch.isneginf(lse[0]) and abs(float(lse[1]) - 4.0) < 1e-6 and abs(float(lse[2]) + 2.0) < 1e-6


# --- local kernels ---------------------------------------------------------------------------


KERNEL_ENV = {"cpu_flash": "cpu_flash", "blockwise": "blockwise", "blockwise_tiles": "blockwise"}


@pytest.fixture(params=list(KERNEL_ENV))
def kernel(request, monkeypatch):
    """Select the local kernel; 'blockwise_tiles' also cuts queries and keys into tiles of 2 x 3, so
    the tile loop, the online softmax across key tiles and the mask slicing per tile all run."""
    name = request.param
    if name == "cpu_flash":  # the default on CPU
        monkeypatch.delenv("SEQPAR_KERNEL", raising=False)
    else:
        monkeypatch.setenv("SEQPAR_KERNEL", KERNEL_ENV[name])
    if name == "blockwise_tiles":
        monkeypatch.setattr(blockwise, "_tiles", lambda b, h, sq, sk: (2, 3))
    kernels.reset()  # SEQPAR_KERNEL is read once per process: re-read it
    yield name
    monkeypatch.undo()
    kernels.reset()


def _kernel_case(dtype, hkv, mask_kind, seed=4):
    g = _gen(seed)
    q = torch.randn(B, H, SQ, D, generator=g).to(dtype)
    k = torch.randn(B, hkv, SK, D, generator=g).to(dtype)
    v = torch.randn(B, hkv, SK, D, generator=g).to(dtype)
    mask = _mask(mask_kind, B, H, SQ, SK, g)
    dout = torch.randn(B, H, SQ, D, generator=g).to(dtype)
    return q, k, v, mask, dout


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hkv", [4, 2, 1])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "bool_b1", "bool_3d", "keypad", "float"])
def test_kernel_forward_backward_vs_reference(kernel, dtype, hkv, mask_kind):
    assert kernels.kernel_name(torch.zeros(1)) == KERNEL_ENV[kernel]
    q, k, v, mask, dout = _kernel_case(dtype, hkv, mask_kind)
    out, lse = kernels.attention_forward(q, k, v, scale=0.4, mask=mask)
    assert out.dtype in (dtype, stat_dtype(dtype)) and lse.dtype == stat_dtype(dtype)  # bf16/fp16: f32 allowed
    assert out.shape == (B, H, SQ, D) and lse.shape == (B, H, SQ)

    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    r_out, r_lse, _ = reference.attention(q64, k64, v64, scale=0.4, mask=mask)
    r_dq, r_dk, r_dv = torch.autograd.grad(r_out, (q64, k64, v64), dout.double())
    assert _err(out, r_out) < TOL_OUT[dtype]
    assert _err(lse, r_lse) < TOL_LSE[dtype]
    dead = _full_rows_masked(mask, (B, H, SQ))
    assert torch.equal(torch.isneginf(lse), dead)  # lse = -inf exactly on rows that see no key
    assert (out[dead] == 0).all()

    dq, dk, dv = kernels.attention_backward(dout, q, k, v, out, lse, scale=0.4, mask=mask)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    for name, got, want in (("dq", dq, r_dq), ("dk", dk, r_dk), ("dv", dv, r_dv)):
        assert _err(got, want) < TOL_GRAD[dtype], name
    assert (dq[dead] == 0).all()


@pytest.mark.parametrize("hkv", [4, 1])
def test_kernel_causal_diagonal_block(kernel, hkv):
    q, k, v, _, dout = _kernel_case(torch.float64, hkv, "none", seed=5)
    k, v = k[:, :, :SQ], v[:, :, :SQ]
    out, lse = kernels.attention_forward(q, k, v, scale=0.4, is_causal=True)
    causal = reference.sequence_mask(SQ, is_causal=True)
    q64, k64, v64 = (t.clone().requires_grad_() for t in (q, k, v))
    r_out, r_lse, _ = reference.attention(q64, k64, v64, scale=0.4, mask=causal)
    assert _err(out, r_out) < 1e-12 and _err(lse, r_lse) < 1e-12
    grads = kernels.attention_backward(dout, q, k, v, out, lse, scale=0.4, is_causal=True)
    for got, want in zip(grads, torch.autograd.grad(r_out, (q64, k64, v64), dout)):
        assert _err(got, want) < 1e-12


def test_kernel_name_rejects_unknown(monkeypatch):
    monkeypatch.setenv("SEQPAR_KERNEL", "flash3")
    kernels.reset()
    try:
        with pytest.raises(ValueError, match="flash3.*allowed.*cpu_flash.*blockwise"):
            kernels.kernel_name(torch.zeros(1))
    finally:
        monkeypatch.undo()
        kernels.reset()


# --- mask blocks -----------------------------------------------------------------------------

S_MASK = 13


def _position_sets():
    """(name, query positions, key positions) incl. contiguous and zigzag shards and odd sets."""
    sets = [("all", torch.arange(S_MASK), torch.arange(S_MASK))]
    for w in (2, 3):
        for layout in ("contiguous", "zigzag"):
            for qr in range(w):
                for kr in range(w):
                    sets.append((f"{layout}{w}:q{qr}k{kr}", positions(S_MASK, w, qr, layout),
                                 positions(S_MASK, w, kr, layout)))
    sets.append(("scattered", torch.tensor([0, 1, 5, 6, 7, 12]), torch.tensor([2, 3, 4, 8, 9, 11, 12])))
    sets.append(("single", torch.tensor([6]), torch.tensor([6])))
    return sets


RULES = {
    "causal": dict(is_causal=True),
    "window3": dict(window_size=3),
    "causal_window2": dict(is_causal=True, window_size=2),
    "doc": dict(doc=True),
    "causal_doc_pad": dict(is_causal=True, doc=True, pad=True),
    "window1_pad": dict(window_size=1, pad=True),
    "pad": dict(pad=True),
    "none": dict(),
}


@pytest.mark.parametrize("rule", list(RULES))
def test_blocks_cover_exactly_the_reference_mask_and_are_never_empty(rule):
    cfg = RULES[rule]
    g = _gen(6)
    doc = torch.sort(torch.randint(0, 3, (2, S_MASK), generator=g), dim=1).values if cfg.get("doc") else None
    keep = (torch.rand(2, S_MASK, generator=g) > 0.3) if cfg.get("pad") else None
    spec = MaskSpec(is_causal=cfg.get("is_causal", False), window_size=cfg.get("window_size"))
    ref = reference.sequence_mask(S_MASK, is_causal=spec.is_causal, window_size=spec.window_size,
                                  document_ids=doc, key_padding_mask=keep)  # (B|1, 1, S, S)
    n_blocks = 0
    for name, qp, kp in _position_sets():
        qt = Tokens(qp, None if doc is None else doc[:, qp])
        kt = Tokens(kp, None if doc is None else doc[:, kp], None if keep is None else keep[:, kp])
        want = ref[:, :, qp][:, :, :, kp].to(torch.int64)  # (B|1, 1, Sq, Sk)
        count = torch.zeros(want.shape[0], 1, len(qp), len(kp), dtype=torch.int64)
        for blk in blocks(qt, kt, spec):
            n_blocks += 1
            nq, nk = blk.q.stop - blk.q.start, blk.k.stop - blk.k.start
            assert nq > 0 and nk > 0, (name, blk)
            if blk.mask is not None:
                cell = blk.mask.to(torch.int64)
                assert not blk.is_causal
            elif blk.is_causal:
                assert torch.equal(qp[blk.q], kp[blk.k]), (name, "diagonal block off the diagonal")
                cell = torch.ones(nq, nk, dtype=torch.int64).tril()
            else:
                cell = torch.ones(nq, nk, dtype=torch.int64)
            assert int(cell.sum()) > 0, (name, "empty block yielded")
            count[..., blk.q, blk.k] += cell
        assert torch.equal(count, want.expand_as(count)), name  # covered exactly once, nothing else
    assert n_blocks > 0


def test_blocks_skip_fully_masked_pairs():
    """Causal: keys entirely after the queries give no block at all (work is skipped, not masked)."""
    qt, kt = Tokens(torch.arange(0, 4)), Tokens(torch.arange(4, 8))
    assert list(blocks(qt, kt, MaskSpec(is_causal=True))) == []
    keep = torch.zeros(1, 4, dtype=torch.bool)
    assert list(blocks(Tokens(torch.arange(4)), Tokens(torch.arange(4), keep=keep), MaskSpec())) == []
