"""Contract of the CUDA kernel wrappers against the real aten ops of the installed torch, on ``device="meta"``.

The fused CUDA ops have meta kernels (torch >= 2.5), so on a CPU-only build the wrappers can be driven with
meta tensors: argument order and arity for this torch version, output shapes, strides and dtypes, the LSE
as the registry hands it on. Meta kernels check neither values nor the LSE a backward is given
(``shared/reference/probes``), so the LSE normalisers are tested here on fake op outputs, and the numerics
of the wrappers in ``test_kernels_registry.py`` with emulated ops. Covered: the torch installed here
(2.13 in CI); the other versions' code paths only through emulated ops.

Run: ``python -m pytest tests/test_kernels_meta.py -q``
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from seqpar.ops import kernels
from seqpar.ops.kernels import common, cpu_flash, cuda_cudnn, cuda_efficient, cuda_flash, registry

WRAPPERS = {"cuda_flash": cuda_flash, "cuda_efficient": cuda_efficient, "cuda_cudnn": cuda_cudnn}
B, H, SQ, SK, D = 2, 4, 40, 72, 64
INF = math.inf

pytestmark = [pytest.mark.skipif(common.TORCH_VERSION < (2, 5), reason="meta kernels of the SDPA ops: torch >= 2.5"),
              pytest.mark.usefixtures("kernel_registry_reset")]


def _live_positional(op_name: str) -> tuple[tuple[str, ...], list[str]]:
    schema = getattr(torch.ops.aten, op_name).default._schema
    return (tuple(a.name for a in schema.arguments if not a.kwarg_only),
            [a.name for a in schema.arguments if a.kwarg_only])


@pytest.mark.parametrize("name", list(WRAPPERS))
def test_schema_table_matches_installed_torch(name):
    """The positional order the wrapper uses for this torch version is the op's live schema."""
    mod = WRAPPERS[name]
    for op_name, table in mod.SCHEMAS.items():
        positional, kwonly = _live_positional(op_name)
        assert common.schema_at(table, common.TORCH_VERSION) == positional, op_name
        assert "scale" in kwonly


def test_cpu_op_schema():
    assert _live_positional("_scaled_dot_product_flash_attention_for_cpu")[0] == cpu_flash.FWD_ARGS
    assert _live_positional("_scaled_dot_product_flash_attention_for_cpu_backward")[0] == cpu_flash.BWD_ARGS


def _meta(*shape, dtype=torch.bfloat16, layout="bhsd"):
    if layout == "bshd":  # a (B, S, H, D) buffer viewed as (B, H, S, D): the layout.py / HF layout
        b, h, s, d = shape
        return torch.empty(b, s, h, d, dtype=dtype, device="meta").transpose(1, 2)
    if layout == "lastdim":  # stride(-1) != 1
        return torch.empty(*shape[:-2], shape[-1], shape[-2], dtype=dtype, device="meta").transpose(-1, -2)
    return torch.empty(*shape, dtype=dtype, device="meta")


def _spy(monkeypatch, mod):
    """Record the tensors each real op receives."""
    seen = []
    real = mod._op

    def op(i):
        def run(*args, **kw):
            seen.append((i, args))
            return real(i)(*args, **kw)
        return run

    monkeypatch.setattr(mod, "_op", op)
    return seen


CASES = [  # (backend, hkv, sq, sk, mask kind)
    ("cuda_flash", 4, SQ, SK, "none"), ("cuda_flash", 2, SQ, SK, "none"), ("cuda_flash", 2, SQ, SQ, "causal"),
    ("cuda_efficient", 4, SQ, SK, "none"), ("cuda_efficient", 2, SQ, SK, "bool"),
    ("cuda_efficient", 4, SQ, SK, "bias"), ("cuda_efficient", 2, SQ, SQ, "causal"),
    ("cuda_cudnn", 4, SQ, SK, "none"), ("cuda_cudnn", 2, SQ, SK, "none"), ("cuda_cudnn", 4, SQ, SQ, "causal"),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", ["bhsd", "bshd", "lastdim"])
@pytest.mark.parametrize(("backend", "hkv", "sq", "sk", "kind"), CASES)
def test_meta_contract_through_registry(monkeypatch, backend, hkv, sq, sk, kind, layout, dtype):
    """The registry runs the wrapper on meta tensors (no fallback, no warning): the op gets stride-1 rows,
    the LSE the contract promises comes back, grads have the inputs' shapes; out in q's dtype, grads float32."""
    mod = WRAPPERS[backend]
    if backend == "cuda_cudnn" and hkv != H and common.TORCH_VERSION < (2, 9):
        pytest.skip("cuDNN GQA from torch 2.9")
    seen = _spy(monkeypatch, mod)
    q = _meta(B, H, sq, D, dtype=dtype, layout=layout)
    k, v = (_meta(B, hkv, sk, D, dtype=dtype, layout=layout) for _ in range(2))
    mask = None
    if kind == "bool":
        mask = torch.empty(B, 1, sq, sk, dtype=torch.bool, device="meta")
    elif kind == "bias":
        mask = torch.empty(1, H, sq, sk, dtype=torch.float32, device="meta")
    with registry.pretend_available(*WRAPPERS), kernels.use(backend), warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kernels.candidates(q, k, v, common.mask_kind(mask, kind == "causal"))[0].name == backend
        out, lse = kernels.attention_forward(q, k, v, scale=0.125, mask=mask, is_causal=kind == "causal")
        assert out.shape == (B, H, sq, D) and out.dtype == dtype and out.device.type == "meta"  # q's dtype, as is
        assert lse.shape == (B, H, sq) and lse.dtype == torch.float32 and lse.is_contiguous()
        dq, dk, dv = kernels.attention_backward(out.to(dtype), q, k, v, out.to(dtype), lse, scale=0.125, mask=mask,
                                                is_causal=kind == "causal")
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    assert {t.dtype for t in (dq, dk, dv)} == {torch.float32}
    assert [i for i, _ in seen] == [0, 1]
    for _, args in seen:
        for t in args:
            if isinstance(t, torch.Tensor) and t.dim() == 4 and t.dtype == dtype:
                assert t.stride(-1) == 1
    fwd_args, bwd_args = seen[0][1], seen[1][1]
    assert fwd_args[1].is_contiguous() and fwd_args[2].is_contiguous()  # K/V contiguous (torch CP's finding)
    names = common.schema_at(mod.SCHEMAS[mod.OPS[1]], common.TORCH_VERSION)
    got = dict(zip(names, bwd_args))
    assert got["key"].is_contiguous() and got["value"].is_contiguous()
    lse_in = got["logsumexp"]
    assert lse_in.dtype == torch.float32 and lse_in.is_contiguous()
    if backend == "cuda_efficient":
        assert lse_in.shape == (B, H, -(-sq // 32) * 32)  # the forward's padded buffer
        assert got["key"].shape[1] == H  # K/V repeated: the backward rejects GQA
        assert got["grad_input_mask"] == [True, True, True, False]
        bias = got["attn_bias"]
        if mask is None:
            assert bias is None
        else:
            assert bias.shape == (B, H, sq, sk) and bias.dtype == dtype and bias.stride(-1) == 1
            assert all(s % 16 == 0 for s in bias.stride()[:-1])
    elif backend == "cuda_cudnn":
        assert lse_in.shape == ((B, H, sq, 1) if common.TORCH_VERSION >= (2, 9) else (B, H, sq))
        assert got["out"].is_contiguous() and got["grad_out"].stride() == got["out"].stride()
        assert (got["max_q"], got["max_k"]) == (sq, sk)
        assert got["key"].shape[1] == hkv  # GQA native
    else:
        assert lse_in.shape == (B, H, sq)
        assert got["out"].dtype == dtype and got["grad_out"].dtype == dtype
        assert got["key"].shape[1] == hkv  # GQA native
        assert got["philox_seed"].dtype == (torch.uint64 if common.TORCH_VERSION >= (2, 7) else torch.int64)
    assert fwd_args[0].dtype == dtype


def test_efficient_output_is_bshd_in_memory():
    """As the probe found: efficient's out is BSHD memory viewed as BHSD; merges handle any strides."""
    q = _meta(B, H, SQ, D)
    out, lse = cuda_efficient.forward(q, _meta(B, H, SK, D), _meta(B, H, SK, D), scale=0.1)
    assert out.stride() == (SQ * H * D, D, H * D, 1) and lse.shape == (B, H, SQ) and lse.is_contiguous()


# --- LSE normalisers on fake op outputs ------------------------------------------------------------


def test_flash_lse_plus_inf_rows_become_minus_inf():
    raw = torch.tensor([[[0.5, INF, -2.0]]])
    got = common.lse_from_flash(raw)
    assert got.tolist() == [[[0.5, -INF, -2.0]]] and got.is_contiguous()


def test_efficient_lse_padding_trimmed():
    raw = torch.full((2, 3, 64), INF)
    raw[..., :40] = torch.randn(2, 3, 40)
    raw[0, 0, 5] = 0.0  # a fully masked row: LSE 0 from torch 2.5 (the registry's row fix-up makes it -inf)
    got = common.lse_from_efficient(raw, 40)
    assert got.shape == (2, 3, 40) and got.is_contiguous() and torch.equal(got, raw[..., :40])
    unpadded = torch.randn(2, 3, 40)  # ROCm: not padded
    assert torch.equal(common.lse_from_efficient(unpadded, 40), unpadded)


def test_efficient_backward_lse_buffer():
    lse = torch.randn(2, 3, 40)
    buf = common.lse_for_efficient_backward(lse)
    assert buf.shape == (2, 3, 64) and buf.dtype == torch.float32 and buf.is_contiguous()
    assert torch.equal(buf[..., :40], lse) and bool(torch.isposinf(buf[..., 40:]).all())
    assert common.lse_for_efficient_backward(torch.randn(2, 3, 64)).shape == (2, 3, 64)  # already a multiple
    assert common.lse_for_efficient_backward(lse, pad_to=1).shape == (2, 3, 40)


def test_cudnn_lse_ranks_and_strides():
    q = torch.empty(2, 3, 5, 8)
    vals = torch.randn(2, 3, 5)
    vals[1, 2, 4] = INF
    want = vals.masked_fill(torch.isposinf(vals), -INF)
    assert torch.equal(common.lse_from_cudnn(vals, q), want)  # torch 2.5 - 2.8
    assert torch.equal(common.lse_from_cudnn(vals.unsqueeze(-1), q), want)  # torch 2.9+
    strided = vals.transpose(1, 2).contiguous().unsqueeze(-1).transpose(1, 2)  # AVOID_RECOMPILE layout
    assert not strided.is_contiguous()
    got = common.lse_from_cudnn(strided, q)
    assert got.is_contiguous() and torch.equal(got, want)


@pytest.mark.parametrize(("version", "rank"), [((2, 5), 3), ((2, 8), 3), ((2, 9), 4), ((2, 13), 4)])
def test_cudnn_backward_lse_rank_per_version(monkeypatch, version, rank):
    monkeypatch.setattr(common, "TORCH_VERSION", version)
    lse = torch.randn(2, 5, 3).transpose(1, 2)  # non-contiguous (B, H, Sq)
    got = common.lse_for_cudnn_backward(lse)
    assert got.dim() == rank and got.is_contiguous() and torch.equal(got.reshape(2, 3, 5), lse)


def test_additive_bias_layout():
    q = torch.empty(2, 4, 6, 8, dtype=torch.bfloat16)
    m = torch.rand(2, 1, 6, 13) > 0.5
    bias = common.additive_bias(m, q, 13)
    assert bias.shape == (2, 4, 6, 13) and bias.dtype == torch.bfloat16 and bias.stride(-1) == 1
    assert all(s % 16 == 0 for s in bias.stride()[:-1])
    assert torch.equal(bias == 0, m.expand(2, 4, 6, 13)) and bool(torch.isneginf(bias[~m.expand(2, 4, 6, 13)]).all())
    f = torch.randn(6, 13)
    assert torch.equal(common.additive_bias(f, q, 13)[1, 3], f.bfloat16())
