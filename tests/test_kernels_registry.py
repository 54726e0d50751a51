"""The kernel registry without a GPU: resolution, per-block dispatch, fallback, and the CUDA wrappers' plumbing.

The CUDA backends run here on CPU tensors through ``tests/fake_cuda_ops.py``: emulations of the fused ops with
their conventions (q-dtype outputs, flash's +inf LSE and bottom-right causal, efficient's padded LSE and
BSHD outputs, cuDNN's 4-D LSE from torch 2.9) and their input checks. Every result is compared with the
float64 formula, so a wrong LSE normalisation, causal alignment or argument order fails here.

Run: ``python -m pytest tests/test_kernels_registry.py -q``
"""

from __future__ import annotations

import warnings

import fake_cuda_ops as fake
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from seqpar.ops import kernels, masks, reference
from seqpar.ops.kernels import common, cuda_cudnn, registry
from seqpar.ops.lse import stat_dtype
from seqpar.ops.masks import MaskSpec, Tokens, dense_mask
from seqpar.ops.tiled import block_kernels, tiled_backward, tiled_forward

pytestmark = pytest.mark.usefixtures("kernel_registry_reset")

CUDA = ("cuda_cudnn", "cuda_flash", "cuda_efficient")
TOL = {torch.bfloat16: (2e-2, 8e-2), torch.float16: (3e-3, 1e-2), torch.float32: (1e-5, 1e-4),
       torch.float64: (1e-12, 1e-11)}  # (out, grads) max |err| vs float64 on the same inputs


@pytest.fixture
def emulated(monkeypatch):
    """The CUDA backends 'available' on CPU tensors with emulated ops; cpu_flash left out."""
    fake.install(monkeypatch)
    with registry.pretend_available(*CUDA, device="cpu"), warnings.catch_warnings():
        warnings.filterwarnings("error", message="seqpar: kernel")  # an emulated op refusing a call fails the test
        kernels.configure(exclude=("cpu_flash",))
        yield fake.calls


def _problem(s_q, s_k, *, dtype=torch.bfloat16, h=4, hkv=4, d=16, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, s_q, d, generator=g).to(dtype)
    k = torch.randn(b, hkv, s_k, d, generator=g).to(dtype)
    v = torch.randn(b, hkv, s_k, d, generator=g).to(dtype)
    dout = torch.randn(b, h, s_q, d, generator=g).to(dtype)
    return q, k, v, dout


def _err(a, b):
    a, b = a.detach().double(), b.detach().double()
    assert not torch.isnan(a).any()
    return float((a - b).abs().max())


def _run_tiled(q, k, v, dout, qt, kt, spec, scale=0.3):
    """seqpar's block loop forward + backward vs the float64 formula with the dense mask; returns errors."""
    out, lse = tiled_forward(q, k, v, qt, kt, spec, scale)
    dq, dk, dv = tiled_backward(dout, q, k, v, out.to(q.dtype), lse, qt, kt, spec, scale)
    m = dense_mask(qt, kt, spec)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    r_out, r_lse, _ = reference.attention(q64, k64, v64, scale=scale, mask=m)
    r_grads = torch.autograd.grad(r_out, (q64, k64, v64), dout.double())
    dead = torch.isneginf(r_lse)
    assert torch.equal(torch.isneginf(lse), dead) and (out[dead] == 0).all()
    return _err(out, r_out), max(_err(g, r) for g, r in zip((dq, dk, dv), r_grads))


def _tokens(pos, b=2, doc=None, keep=None):
    return Tokens(torch.as_tensor(pos), doc, keep)


# --- resolution -----------------------------------------------------------------------------------


def test_env_is_read_once_and_reset_rereads(monkeypatch):
    q = torch.zeros(1, 1, 4, 8)
    monkeypatch.setenv("SEQPAR_KERNEL", "blockwise")
    assert kernels.kernel_name(q) == "blockwise"
    monkeypatch.setenv("SEQPAR_KERNEL", "cpu_flash")
    assert kernels.kernel_name(q) == "blockwise"  # resolved once, not per call
    kernels.reset()
    assert kernels.kernel_name(q) == "cpu_flash"


def test_env_list_and_errors(monkeypatch):
    monkeypatch.setenv("SEQPAR_KERNEL", " cuda_flash , cpu_flash")
    assert registry._resolve() == ("cuda_flash", "cpu_flash", "blockwise")  # blockwise closes every list
    monkeypatch.setenv("SEQPAR_KERNEL", "cpu_flash,flash3")
    kernels.reset()
    with pytest.raises(ValueError, match=r"SEQPAR_KERNEL='flash3'; allowed: 'cpu_flash', .*'blockwise'"):
        kernels.kernel_name(torch.zeros(1, 1, 1, 8))
    with pytest.raises(ValueError, match="exclude='blockwise'"):
        kernels.configure(exclude=("blockwise",))
    with pytest.raises(ValueError, match="order='nope'"):
        kernels.configure(order=("nope",))


def test_use_exclude_configure():
    q = torch.zeros(1, 2, 4, 8)
    assert kernels.kernel_name(q) == "cpu_flash"
    with kernels.use("blockwise"):
        assert kernels.kernel_name(q) == "blockwise"
        with kernels.use(exclude=("cpu_flash",)):
            assert kernels.kernel_name(q) == "blockwise"
        assert kernels.kernel_name(q) == "blockwise"
    assert kernels.kernel_name(q) == "cpu_flash"
    kernels.exclude("cpu_flash")
    assert kernels.kernel_name(q) == "blockwise"
    kernels.configure()
    assert kernels.kernel_name(q) == "cpu_flash"


def test_sdpa_kernel_choice_is_honoured():
    q = torch.zeros(1, 2, 4, 8)
    with sdpa_kernel([SDPBackend.MATH]):
        assert kernels.kernel_name(q) == "blockwise"  # the CPU flash op is SDPA's FLASH_ATTENTION backend
    assert kernels.kernel_name(q) == "cpu_flash"


def test_describe_lists_every_backend():
    rows = {r["name"]: r for r in kernels.describe()}
    assert list(rows) == ["cpu_flash", "cuda_cudnn", "cuda_flash", "cuda_efficient", "blockwise"]
    for r in rows.values():
        assert {"available", "why_not", "devices", "dtypes", "head_dims", "masks", "gqa", "min_torch",
                "deterministic", "out_dtype", "selected"} <= set(r)
        assert (r["why_not"] is None) == r["available"]
    assert rows["cpu_flash"]["available"] and rows["blockwise"]["available"]
    assert rows["cuda_cudnn"]["min_torch"] == "2.5" and rows["cuda_flash"]["min_torch"] == "2.4"
    if not torch.cuda.is_available():
        assert all("no CUDA device" in rows[n]["why_not"] for n in CUDA)


# --- per-block dispatch (emulated CUDA ops) ---------------------------------------------------------


def _kinds(calls):
    return sorted({(name, c.get("causal", False), c.get("bias", False)) for name, c in calls})


def test_causal_zigzag_blocks_go_to_flash(emulated):
    """Causal, two zigzag shards: diagonal blocks run flash with is_causal (Sq == Sk), the others flash
    unmasked; no block needs a mask; result and grads match the formula."""
    s, w = 32, 2
    from seqpar.layout import positions
    q, k, v, dout = _problem(16, 16)
    qt, kt = _tokens(positions(s, w, 0, "zigzag")), _tokens(positions(s, w, 1, "zigzag"))
    spec = MaskSpec(is_causal=True)
    names = [n for _, n in block_kernels(q, k, v, qt, qt, spec)] + [n for _, n in block_kernels(q, k, v, qt, kt, spec)]
    assert set(names) == {"cuda_flash"}
    for kt_ in (qt, kt):
        emulated.clear()
        e_out, e_grad = _run_tiled(q, k, v, dout, qt, kt_, spec)
        assert e_out < TOL[q.dtype][0] and e_grad < TOL[q.dtype][1]
        assert all(c["sq"] == c["sk"] for n, c in emulated if c["causal"])
        assert {n for n, _ in emulated} == {"flash_fwd", "flash_bwd"}


def test_window_cut_tiles_go_to_efficient_with_bias(emulated, monkeypatch):
    """A sliding window: tiles inside it run flash unmasked, tiles it cuts run efficient with a bias."""
    monkeypatch.setattr(masks, "TILE", 8)
    q, k, v, dout = _problem(48, 48, hkv=2)
    pos = torch.arange(48)
    spec = MaskSpec(is_causal=True, window_size=20)
    chosen = block_kernels(q, k, v, _tokens(pos), _tokens(pos), spec)
    by_kind = {(blk.mask is not None, blk.is_causal): n for blk, n in chosen}
    assert by_kind == {(False, False): "cuda_flash", (False, True): "cuda_flash", (True, False): "cuda_efficient"}
    e_out, e_grad = _run_tiled(q, k, v, dout, _tokens(pos), _tokens(pos), spec)
    assert e_out < TOL[q.dtype][0] and e_grad < TOL[q.dtype][1]
    assert ("eff_fwd", False, True) in _kinds(emulated) and ("flash_fwd", True, False) in _kinds(emulated)


@pytest.mark.parametrize("what", ["padding", "documents"])
def test_data_masks_go_to_efficient(emulated, what):
    """Key padding / document ids cut blocks by data: efficient with an additive bias; a batch row whose
    keys are all padding sees nothing (out 0, lse -inf)."""
    q, k, v, dout = _problem(24, 24, hkv=1)
    pos = torch.arange(24)
    g = torch.Generator().manual_seed(3)
    if what == "padding":
        keep = torch.rand(2, 24, generator=g) > 0.3
        keep[1] = False
        qt, kt = _tokens(pos), _tokens(pos, keep=keep)
    else:
        doc = torch.tensor([[0] * 10 + [1] * 14, [0] * 5 + [1] * 5 + [2] * 14])
        qt, kt = _tokens(pos, doc=doc), _tokens(pos, doc=doc)
    spec = MaskSpec(is_causal=True)
    assert {n for _, n in block_kernels(q, k, v, qt, kt, spec)} == {"cuda_efficient"}
    e_out, e_grad = _run_tiled(q, k, v, dout, qt, kt, spec)
    assert e_out < TOL[q.dtype][0] and e_grad < TOL[q.dtype][1]


@pytest.mark.parametrize(("dtype", "d", "want"), [
    (torch.float16, 16, "cuda_flash"), (torch.float32, 16, "cuda_efficient"), (torch.float64, 16, "blockwise"),
    (torch.bfloat16, 12, "blockwise"), (torch.bfloat16, 264, "cuda_efficient"),
])
def test_dtype_and_head_dim_rules(emulated, dtype, d, want):
    q, k, v, dout = _problem(8, 8, dtype=dtype, d=d, b=1)
    assert kernels.candidates(q, k, v, "none")[0].name == want
    out, lse = kernels.attention_forward(q, k, v, scale=0.2)
    r_out, r_lse, _ = reference.attention(q.double(), k.double(), v.double(), scale=0.2)
    native = dtype if registry.BACKENDS[want].out_dtype == "q" else stat_dtype(dtype)
    assert out.dtype == native and lse.dtype == stat_dtype(dtype) and lse.is_contiguous()
    assert _err(out, r_out) < TOL[dtype][0] and _err(lse, r_lse) < 1e-5


def test_causal_with_unequal_lengths_never_reaches_flash(emulated):
    """Flash's causal is bottom-right for Sq != Sk; seqpar's is top-left: such a block must not get flash."""
    q, k, v, dout = _problem(5, 9)
    assert kernels.candidates(q, k, v, "causal")[0].name == "cuda_efficient"
    out, lse = kernels.attention_forward(q, k, v, scale=0.3, is_causal=True)
    tl = reference.sequence_mask(9, is_causal=True)[..., :5, :]  # query i sees keys j <= i
    r_out = reference.attention(q.double(), k.double(), v.double(), scale=0.3, mask=tl)[0]
    assert _err(out, r_out) < TOL[q.dtype][0]


@pytest.mark.parametrize("preferred", [True, False])
def test_cudnn_first_only_where_torch_prefers_it(emulated, monkeypatch, preferred):
    monkeypatch.setattr(cuda_cudnn, "preferred", lambda device: preferred)
    q, k, v, dout = _problem(16, 16)
    pos = _tokens(torch.arange(16))
    chosen = {n for _, n in block_kernels(q, k, v, pos, pos, MaskSpec(is_causal=True))}
    assert chosen == ({"cuda_cudnn"} if preferred else {"cuda_flash"})
    e_out, e_grad = _run_tiled(q, k, v, dout, pos, pos, MaskSpec(is_causal=True))
    assert e_out < TOL[q.dtype][0] and e_grad < TOL[q.dtype][1]
    keep = torch.ones(2, 16, dtype=torch.bool)
    keep[:, 3] = False
    masked = {n for _, n in block_kernels(q, k, v, pos, _tokens(torch.arange(16), keep=keep), MaskSpec())}
    assert masked == {"cuda_efficient"}  # cuDNN never gets a mask (NaN dQ, pytorch #196678)


def test_cudnn_refused_in_deterministic_mode(emulated):
    q, k, v, _ = _problem(8, 8)
    with kernels.use("cuda_cudnn", "cuda_flash"):
        assert kernels.candidates(q, k, v, "none")[0].name == "cuda_cudnn"
        old = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)
        try:
            assert kernels.candidates(q, k, v, "none")[0].name == "cuda_flash"
        finally:
            torch.use_deterministic_algorithms(old)


def test_sdpa_kernel_switches_cuda_backends(emulated):
    q, k, v, _ = _problem(8, 8)
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
        assert kernels.candidates(q, k, v, "none")[0].name == "cuda_efficient"
    with sdpa_kernel([SDPBackend.MATH]):
        assert kernels.candidates(q, k, v, "none")[0].name == "blockwise"


# --- per torch version: the wrappers' version branches against the emulated ops of that version -------


@pytest.mark.parametrize("version", [(2, 4), (2, 6), (2, 7), (2, 8), (2, 9), (2, 13)])
@pytest.mark.parametrize("backend", CUDA)
def test_wrappers_per_torch_version(emulated, monkeypatch, version, backend):
    """Each version's code path (flash rng dtypes at 2.7, cuDNN's LSE rank at 2.9, cuDNN from 2.5 only)
    against emulated ops that check that version's contract; GQA and causal diagonal blocks."""
    monkeypatch.setattr(common, "TORCH_VERSION", version)
    kernels.configure(order=(backend,), exclude=("cpu_flash",))
    q, k, v, dout = _problem(16, 16, hkv=2)
    if backend == "cuda_cudnn":
        k, v = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)  # GQA: cuDNN only from 2.9
    pos = _tokens(torch.arange(16))
    ran = {n for _, n in block_kernels(q, k, v, pos, pos, MaskSpec(is_causal=True))}
    if backend == "cuda_cudnn" and version < (2, 5):
        assert ran == {"blockwise"}
        assert "needs torch >= 2.5" in cuda_cudnn.KERNEL.available()
        return
    assert ran == {backend}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback would warn: the emulated op must accept every call
        e_out, e_grad = _run_tiled(q, k, v, dout, pos, pos, MaskSpec(is_causal=True))
    assert e_out < TOL[q.dtype][0] and e_grad < TOL[q.dtype][1]


# --- fallback ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("phase", ["fwd", "bwd"])
def test_op_error_falls_back_once_with_same_result(emulated, monkeypatch, phase):
    q, k, v, dout = _problem(16, 16)
    pos = _tokens(torch.arange(16))
    spec = MaskSpec(is_causal=True)
    with kernels.use(exclude=("cpu_flash", "cuda_flash")):
        want = _run_tiled(q, k, v, dout, pos, pos, spec)
        ref_out, ref_lse = tiled_forward(q, k, v, pos, pos, spec, 0.3)
    broken = {"n": 0}

    def boom(*a, **kw):
        broken["n"] += 1
        raise RuntimeError("CUDA error: no kernel image is available")

    import seqpar.ops.kernels.cuda_flash as cf
    real = cf._op
    monkeypatch.setattr(cf, "_op", lambda i: boom if (i == 0) == (phase == "fwd") else real(i))
    with pytest.warns(RuntimeWarning, match="kernel 'cuda_flash' failed.*no kernel image.*'cuda_efficient'") as rec:
        got = _run_tiled(q, k, v, dout, pos, pos, spec)
        out, lse = tiled_forward(q, k, v, pos, pos, spec, 0.3)
        _run_tiled(q, k, v, dout, pos, pos, spec)
    assert len([w for w in rec if "failed" in str(w.message)]) == 1  # one warning, however many calls
    assert broken["n"] == 1  # dropped for that block signature after the first error
    assert got == want and torch.equal(out, ref_out) and torch.equal(lse, ref_lse)


def test_blockwise_errors_propagate():
    q = torch.zeros(1, 2, 4, 8)
    with kernels.use("blockwise"), pytest.raises(RuntimeError):
        kernels.attention_forward(q, torch.zeros(1, 2, 4, 9), torch.zeros(1, 2, 4, 9), scale=1.0)


@pytest.mark.parametrize("backend", CUDA)
def test_unmasked_block_unequal_lengths(emulated, backend):
    """An off-diagonal unmasked block (Sq != Sk), as the ring gives it: forward and backward with the
    block's own (out, lse) -- which are the global ones here -- through each CUDA wrapper."""
    kernels.configure(order=(backend,), exclude=("cpu_flash",))
    q, k, v, dout = _problem(12, 20, dtype=torch.float16)
    assert kernels.candidates(q, k, v, "none")[0].name == backend
    out, lse = kernels.attention_forward(q, k, v, scale=0.3)
    grads = kernels.attention_backward(dout, q, k, v, out, lse, scale=0.3)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    r_out, r_lse, _ = reference.attention(q64, k64, v64, scale=0.3)
    r_grads = torch.autograd.grad(r_out, (q64, k64, v64), dout.double())
    assert _err(out, r_out) < TOL[q.dtype][0] and _err(lse, r_lse) < 1e-5
    assert max(_err(g, r) for g, r in zip(grads, r_grads)) < TOL[q.dtype][1]
    assert all(g.dtype == torch.float32 for g in grads)


def test_q_dtype_partials_merge_in_float32(emulated):
    """The ring's pattern: step 0's single fused call returns q's dtype (no extra pass); merging the next
    partial into it upcasts once, so the merge itself is float32, not bf16."""
    q, k, v, _ = _problem(16, 32)
    qt, spec = _tokens(torch.arange(16)), MaskSpec()
    o0, l0 = tiled_forward(q, k[:, :, :16], v[:, :, :16], qt, _tokens(torch.arange(16)), spec, 0.3)
    assert o0.dtype == torch.bfloat16 and l0.dtype == torch.float32
    o1, l1 = kernels.attention_forward(q, k[:, :, 16:], v[:, :, 16:], scale=0.3)
    o0, l0, acc = o0.clone(), l0.clone(), (o0, l0)  # the accumulator is updated in place
    out, lse = tiled_forward(q, k[:, :, 16:], v[:, :, 16:], qt, _tokens(torch.arange(16, 32)), spec, 0.3, acc)
    assert out.dtype == torch.float32
    tot = torch.logaddexp(l0.double(), l1.double())
    want = o0.double() * torch.exp(l0 - tot)[..., None] + o1.double() * torch.exp(l1 - tot)[..., None]
    assert _err(out, want) < 1e-6 and _err(lse, tot) < 1e-6  # a bf16 accumulator is off by ~1e-3


def test_torch_sdpa_gate_is_asked(emulated, monkeypatch):
    """On CUDA the registry asks torch.backends.cuda.can_use_{flash,cudnn}_attention before using the op
    (here on CPU tensors through the test hook): refused -> next backend; a gate that raises is no verdict."""
    monkeypatch.setattr(common, "SDP_CHECK_DEVICES", ("cpu",))
    seen = []

    def gate(answer):
        def can_use(params, debug=False):
            seen.append((params.is_causal, params.enable_gqa, params.key.shape[1]))
            if isinstance(answer, Exception):
                raise answer
            return answer
        return can_use

    q, k, v, _ = _problem(8, 8, hkv=2)
    monkeypatch.setattr(torch.backends.cuda, "can_use_flash_attention", gate(False))
    kernels.configure(exclude=("cpu_flash",))
    assert kernels.candidates(q, k, v, "causal")[0].name == "cuda_efficient"
    assert seen == [(True, True, 2)]  # causal and GQA passed on, K/V not repeated
    monkeypatch.setattr(torch.backends.cuda, "can_use_flash_attention", gate(True))
    kernels.configure(exclude=("cpu_flash",))
    assert kernels.candidates(q, k, v, "none")[0].name == "cuda_flash"
    monkeypatch.setattr(torch.backends.cuda, "can_use_flash_attention", gate(RuntimeError("no verdict")))
    kernels.configure(exclude=("cpu_flash",))
    assert kernels.candidates(q, k, v, "none")[0].name == "cuda_flash"
    monkeypatch.setattr(torch.backends.cuda, "can_use_cudnn_attention", gate(False))
    kernels.configure(order=("cuda_cudnn", "cuda_flash"))
    asked = len(seen)
    assert kernels.candidates(q, k, v, "none")[0].name == "cuda_flash"
    assert len(seen) == asked + 2  # the cuDNN gate (refusing), then flash's
