"""seqpar.kv_sharded_attention (keys/values split across gloo ranks) against the float64 formula.

Run: ``python -m pytest tests/test_kv_sharded.py -q``

Each case is a picklable dict; ``build`` makes the full q, k, v, mask and upstream gradient from it.
Rank r takes key columns ``[sum(split[:r]), sum(split[:r + 1]))`` (any split: a rank may hold one
key or none), runs the forward with weights and LSE, and the backward; the parent computes
``seqpar.ops.reference.attention`` (float64, autograd) on the same inputs and compares: ``out``,
``lse`` and ``dq`` against the full reference (and bitwise across ranks), ``weights``, ``dk``,
``dv`` as the concatenation of the ranks' columns. One pool call per (world size, dtype).
"""

from __future__ import annotations

import math

import pytest
import torch

import seqpar
from seqpar.ops import reference

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}
# max |x - x_ref| per dtype (inputs ~N(0, 1), D = 8): out and weights are rounded once to the dtype,
# lse is float32 (float64 for float64), dq is summed over ranks in float32 from per-rank partials
# that the local kernel returns in the input dtype. Measured worst cases over this grid (W = 1..4):
# out 1.3e-15 / 4.5e-7 / 7.7e-3 / 9.8e-4 (float64 / float32 / bfloat16 / float16), weights 1.3e-15 /
# 7.7e-7 / 2.0e-3 / 2.4e-4, lse 1.8e-15 / 6.9e-7 (all low-precision inputs), dq/dk/dv 3.6e-15 /
# 1.9e-6 / 1.8e-2 / 2.8e-3; with the 1e4 offsets, float32 up to 2.4e-3 (= 2 * 1e4 * eps32).
TOL_OUT = {"float64": 1e-13, "float32": 2e-6, "bfloat16": 2e-2, "float16": 3e-3}
TOL_W = {"float64": 1e-13, "float32": 4e-6, "bfloat16": 8e-3, "float16": 1e-3}
TOL_LSE = {"float64": 1e-13, "float32": 4e-6, "bfloat16": 4e-6, "float16": 4e-6}
TOL_GRAD = {"float64": 1e-12, "float32": 1e-5, "bfloat16": 6e-2, "float16": 8e-3}
# With a score offset of 1e4 the per-rank LSE (float32 for all but float64) is stored near 1e4 and
# rounds by ~1e4 * eps; the merge turns that into a relative error of the weights. Extra allowance:
HUGE_FACTOR = 8  # ... HUGE_FACTOR * 1e4 * eps(float32 or float64), added to every tolerance above
OFFSET = 1e4
WORLD_SIZES = (1, 2, 3, 4)
B, H, D = 2, 4, 8


pytestmark = pytest.mark.usefixtures("one_thread")


def _eps(dtype_name: str) -> float:
    return torch.finfo(torch.float64 if dtype_name == "float64" else torch.float32).eps


def _splits(n: int, world_size: int) -> dict[str, list[int]]:
    even = [len(p) for p in torch.tensor_split(torch.arange(n), world_size)]
    out = {"tensor_split": even}
    if world_size > 1:
        out["single_key"] = [n - (world_size - 1) * 2, *[2] * (world_size - 2), 1][::-1]  # rank 0: one key
        out["empty_rank"] = [*even[1:], 0]  # the last rank holds no key
        out["empty_rank"][0] += even[0]
    return out


MASKS = ("none", "bool", "bool_2d", "bool_b1", "keypad", "float", "dead_rank_bool", "dead_rank_float",
         "huge_pos", "huge_neg")


def build(case: dict) -> dict:
    """Full tensors of a case: q (B,H,Sq,D), k/v (B,Hkv,Sk,D), mask (.., Sq, Sk) | None, dout."""
    g = torch.Generator().manual_seed(case["seed"])
    dt = DTYPES[case["dtype"]]
    sq, sk, hkv = case["sq"], sum(case["split"]), case["hkv"]
    q = torch.randn(B, H, sq, D, generator=g).to(dt)
    k = torch.randn(B, hkv, sk, D, generator=g).to(dt)
    v = torch.randn(B, hkv, sk, D, generator=g).to(dt)
    dout = torch.randn(B, H, sq, D, generator=g).to(dt)
    kind = case["mask"]
    mask = None
    ninf = float("-inf")
    if kind in ("bool", "dead_rank_bool"):
        mask = torch.rand(B, H, sq, sk, generator=g) > 0.3
        mask[:, :, 1, :] = False  # a row that sees no key anywhere
    elif kind == "bool_2d":  # (Sq, Sk), broadcast over batch and heads
        mask = torch.rand(sq, sk, generator=g) > 0.3
        mask[1, :] = False
    elif kind == "bool_b1":  # (B, 1, Sq, Sk)
        mask = torch.rand(B, 1, sq, sk, generator=g) > 0.3
        mask[:, :, 1, :] = False
    elif kind == "keypad":  # (B, 1, 1, Sk): batch 1 sees no key at all
        mask = torch.rand(B, 1, 1, sk, generator=g) > 0.3
        mask[0, ..., 0] = True
        mask[1] = False
    elif kind in ("float", "dead_rank_float"):  # additive: finite biases and -inf
        mask = (torch.randn(B, H, sq, sk, generator=g) * 2).to(dt)
        mask[torch.rand(B, H, sq, sk, generator=g) < 0.25] = ninf
        mask[:, :, 1, :] = ninf
    elif kind in ("huge_pos", "huge_neg"):  # +-1e4 plus integer biases, in the input dtype
        sign = 1 if kind == "huge_pos" else -1
        mask = (sign * OFFSET + torch.randint(-4, 5, (B, H, sq, sk), generator=g).double()).to(dt)
    if kind.startswith("dead_rank"):  # the first rank holding keys has every one of them masked
        first = next(r for r, s in enumerate(case["split"]) if s > 0)
        a = sum(case["split"][:first])
        mask[..., a : a + case["split"][first]] = False if mask.dtype == torch.bool else ninf
    return dict(q=q, k=k, v=v, mask=mask, dout=dout)


def cases(world_size: int, dtype: str) -> list[dict]:
    """Every mask kind once, rotating through GQA (H_kv = 4, 2, 1) and the splits so that, over the
    four dtypes, each world size sees every (mask, split) and every (mask, H_kv) pair."""
    splits = list(_splits(2 * world_size + 3, world_size).items())
    d = list(DTYPES).index(dtype)
    out = []
    for i, mask in enumerate(MASKS):
        split_name, split = splits[(i + d) % len(splits)]
        hkv = (4, 2, 1)[(i + 2 * d) % 3]
        out.append(dict(dtype=dtype, hkv=hkv, split=split, split_name=split_name, mask=mask,
                        sq=5 + (i % 3) * 4, seed=1000 * world_size + 100 * d + i))
    return out


def _cols(case: dict, rank: int) -> slice:
    a = sum(case["split"][:rank])
    return slice(a, a + case["split"][rank])


def _run_cases(rank, world_size, case_list):
    """On every rank: forward (out, weights, lse) and the gradients of sum(out * dout)."""
    results = []
    for case in case_list:
        t = build(case)
        cols = _cols(case, rank)
        q = t["q"].clone().requires_grad_()
        k = t["k"][:, :, cols].clone().requires_grad_()
        v = t["v"][:, :, cols].clone().requires_grad_()
        mask = None if t["mask"] is None else t["mask"][..., cols]
        out, w, lse = seqpar.kv_sharded_attention(q, k, v, attn_mask=mask, return_weights=True, return_lse=True)
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), t["dout"])
        results.append(dict(out=out.detach(), w=w.detach(), w_requires_grad=w.requires_grad, lse=lse, dq=dq, dk=dk,
                            dv=dv))
    return results


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b|, where equal infinities count as 0 and NaN as inf."""
    a, b = a.detach().double(), b.detach().double()
    if a.numel() == 0:
        return 0.0
    same_inf = torch.isinf(a) & torch.isinf(b) & (torch.sign(a) == torch.sign(b))
    d = torch.where(same_inf, torch.zeros_like(a), (a - b).abs())
    return float(d.nan_to_num(nan=math.inf).max())


def reference_of(case: dict) -> dict:
    t = build(case)
    q, k, v = (t[n].double().requires_grad_() for n in ("q", "k", "v"))
    out, lse, w = reference.attention(q, k, v, mask=t["mask"])
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), t["dout"].double())
    dead = torch.isneginf(lse.detach())  # (B, H, Sq): rows that see no key
    return dict(out=out.detach(), w=w.detach(), lse=lse.detach(), dq=dq, dk=dk, dv=dv, dead=dead)


def check(case: dict, per_rank: list[dict]) -> list[str]:
    """Every problem of one case as a readable line (empty: the case passes)."""
    ref = reference_of(case)
    dt, name = DTYPES[case["dtype"]], case["dtype"]
    extra = HUGE_FACTOR * OFFSET * _eps(name) if case["mask"].startswith("huge") else 0.0
    got = dict(per_rank[0])
    for key in ("w", "dk", "dv"):
        got[key] = torch.cat([r[key] for r in per_rank], dim=-1 if key == "w" else 2)
    problems = []
    tol = dict(out=TOL_OUT[name], w=TOL_W[name], lse=TOL_LSE[name], dq=TOL_GRAD[name],
               dk=TOL_GRAD[name], dv=TOL_GRAD[name])
    for key, t in tol.items():
        want_dtype = (torch.float64 if name == "float64" else torch.float32) if key == "lse" else dt
        if got[key].dtype != want_dtype or got[key].shape != ref[key].shape:
            problems.append(f"{key}: dtype {got[key].dtype} shape {tuple(got[key].shape)}, "
                            f"want {want_dtype} {tuple(ref[key].shape)}")
            continue
        e = _err(got[key], ref[key])
        if not e <= t + extra:
            problems.append(f"{key}: max err {e:.3g} > tol {t + extra:.3g}")
    for key in ("out", "lse", "dq"):  # replicated results are bitwise identical on every rank
        if not all(torch.equal(r[key], per_rank[0][key]) for r in per_rank):
            problems.append(f"{key} differs across ranks")
    if any(r["w_requires_grad"] for r in per_rank):
        problems.append("weights carry an autograd graph (documented as not differentiable)")
    dead = ref["dead"]
    if not torch.equal(torch.isneginf(got["lse"]), dead):
        problems.append("lse = -inf not exactly on the rows that see no key")
    if dead.any():
        if (got["out"][dead] != 0).any() or (got["w"][dead] != 0).any() or (got["dq"][dead] != 0).any():
            problems.append("rows that see no key: out / weights / dq not exactly 0")
    return [f"{case}: {p}" for p in problems]


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_kv_sharded_grid_vs_reference(dist, world_size, dtype):
    case_list = cases(world_size, dtype)
    per_rank = dist(world_size, _run_cases, case_list)
    problems = []
    for i, case in enumerate(case_list):
        problems += check(case, [per_rank[r][i] for r in range(world_size)])
    assert not problems, "\n".join(problems)


# --- the worked example through attention: q . k_j = [1, 2, 3], v = identity -> out = weights ----


def _worked(rank, world_size, dtype_name, shift):
    dt = DTYPES[dtype_name]
    q = torch.tensor([1.0, 0, 0], dtype=dt).view(1, 1, 1, 3)
    k = torch.tensor([[1.0, 0, 0], [2.0, 0, 0], [3.0, 0, 0]], dtype=dt).view(1, 1, 3, 3)
    v = torch.eye(3, dtype=dt).view(1, 1, 3, 3)
    cols = torch.tensor_split(torch.arange(3), world_size)[rank]
    mask = torch.full((1, 1, 1, len(cols)), shift, dtype=dt)  # additive: every score + shift
    return seqpar.kv_sharded_attention(q, k[:, :, cols], v[:, :, cols], scale=1.0, attn_mask=mask,
                                       return_weights=True, return_lse=True)


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("dtype_name", ["float64", "float32"])
def test_worked_example_scores_1_2_3(dist, world_size, dtype_name):
    e = math.e
    want = torch.tensor([e, e**2, e**3], dtype=torch.float64) / (e + e**2 + e**3)
    for shift in (0.0, 10.0):
        per_rank = dist(world_size, _worked, dtype_name, shift)
        out, _, lse = per_rank[0]
        w = torch.cat([r[1] for r in per_rank], dim=-1)
        assert _err(out.view(3), want) < TOL_OUT[dtype_name]
        assert _err(w.view(3), want) < TOL_W[dtype_name]
        assert abs(float(out.view(3)[1]) - 0.2447) < 1e-4
        assert abs(float(lse) - (shift + math.log(e + e**2 + e**3))) < TOL_LSE[dtype_name] * 10


# --- return forms -----------------------------------------------------------------------------


def _forms(rank, world_size):
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 3, 4, generator=g) for _ in range(3))
    cols = torch.tensor_split(torch.arange(3), world_size)[rank]
    k, v = k[:, :, cols], v[:, :, cols]
    res = {}
    for rw in (False, True):
        for rl in (False, True):
            r = seqpar.kv_sharded_attention(q, k, v, return_weights=rw, return_lse=rl)
            res[(rw, rl)] = [tuple(x.shape) for x in r] if isinstance(r, tuple) else tuple(r.shape)
    return res


def test_return_forms(dist):
    r0, r1 = dist(2, _forms)
    assert r0[(False, False)] == (1, 2, 3, 4)
    assert r0[(True, False)] == [(1, 2, 3, 4), (1, 2, 3, 2)] and r1[(True, False)] == [(1, 2, 3, 4), (1, 2, 3, 1)]
    assert r0[(False, True)] == [(1, 2, 3, 4), (1, 2, 3)]
    assert r1[(True, True)] == [(1, 2, 3, 4), (1, 2, 3, 1), (1, 2, 3)]
