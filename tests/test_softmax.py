"""seqpar.softmax (a row split across gloo ranks) against the float64 formula, forward and backward.

Run: ``python -m pytest tests/test_softmax.py -q``

Every case is described by a small picklable dict; ``build`` turns it into the full scores and
upstream gradient (deterministic from the seed). The ranks slice their part with the case's split,
run ``seqpar.softmax`` and its backward; the parent computes ``seqpar.ops.reference.softmax`` and
its autograd on the same full tensors and compares. All cases of one world size run in one pool call.
"""

from __future__ import annotations

import math

import pytest
import torch

import seqpar
from seqpar.ops import reference

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}
# max |w - w_ref| (weights lie in [0, 1]; one rounding to the dtype) and max |dscores - ref|
# (|grad| <= ~2 max|g| here). Measured worst cases: ~1e-16, ~1e-7, ~2e-3, ~2.4e-4 (see the report).
TOL_W = {"float64": 1e-14, "float32": 1e-6, "bfloat16": 4e-3, "float16": 5e-4}
TOL_GRAD = {"float64": 1e-13, "float32": 1e-6, "bfloat16": 8e-3, "float16": 1e-3}
WORLD_SIZES = (1, 2, 3, 4)


pytestmark = pytest.mark.usefixtures("one_thread")


# --- worked examples from the formula alpha_ij = exp(beta_ij) / sum_k exp(beta_ik) ------------

E = math.e
EXAMPLES = {  # scores -> weights written out from the formula
    "1,2,3": ([1.0, 2.0, 3.0], [E / (E + E**2 + E**3), E**2 / (E + E**2 + E**3), E**3 / (E + E**2 + E**3)]),
    "2,1,0.5": ([2.0, 1.0, 0.5], [E**2 / (E**2 + E + E**0.5), E / (E**2 + E + E**0.5), E**0.5 / (E**2 + E + E**0.5)]),
}


def test_worked_examples_reference():
    w = reference.softmax(torch.tensor([1.0, 2.0, 3.0]))
    assert abs(float(w[1]) - 0.2447) < 1e-4  # e^2 / (e + e^2 + e^3)
    w = reference.softmax(torch.tensor([2.0, 1.0, 0.5]))
    assert abs(float(w[0]) - 0.6285) < 1e-4
    for scores, want in EXAMPLES.values():
        x = torch.tensor(scores, dtype=torch.float64)
        assert torch.allclose(reference.softmax(x), torch.tensor(want, dtype=torch.float64), atol=1e-15, rtol=0)
        assert torch.allclose(reference.softmax(x + 10), torch.tensor(want, dtype=torch.float64), atol=1e-15, rtol=0)


def _worked(rank, world_size, dtype_name):
    """Each rank holds its tensor_split part of every example row (and of the row + 10)."""
    dt = DTYPES[dtype_name]
    out = {}
    for name, (scores, _) in EXAMPLES.items():
        for shift in (0.0, 10.0):
            row = torch.tensor(scores, dtype=dt) + shift
            out[(name, shift)] = seqpar.softmax(torch.tensor_split(row, world_size)[rank])
    return out


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("dtype_name", ["float64", "float32"])
def test_worked_examples_split_across_ranks(dist, world_size, dtype_name):
    per_rank = dist(world_size, _worked, dtype_name)
    for name, (_, want) in EXAMPLES.items():
        for shift in (0.0, 10.0):
            got = torch.cat([r[(name, shift)] for r in per_rank]).double()
            assert torch.allclose(got, torch.tensor(want, dtype=torch.float64), atol=TOL_W[dtype_name], rtol=0), (
                name, shift, got)
    w = torch.cat([r[("1,2,3", 0.0)] for r in per_rank])
    assert abs(float(w[1]) - 0.2447) < 1e-4
    assert abs(float(torch.cat([r[("2,1,0.5", 10.0)] for r in per_rank])[0]) - 0.6285) < 1e-4


# --- the grid ----------------------------------------------------------------------------------


def _splits(n: int, world_size: int) -> dict[str, list[int]]:
    """Named ways to cut a row of length n over the ranks (lengths per rank)."""
    even = [len(p) for p in torch.tensor_split(torch.arange(n), world_size)]
    out = {"tensor_split": even}
    if world_size > 1:
        out["single_first"] = [1, *[len(p) for p in torch.tensor_split(torch.arange(n - 1), world_size - 1)]]
        out["empty_rank"] = [0, *[len(p) for p in torch.tensor_split(torch.arange(n), world_size - 1)]][::-1]
    return out


def build(case: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Full scores (..., N, ...) in the case's dtype and the upstream gradient, split along case['dim']."""
    g = torch.Generator().manual_seed(case["seed"])
    n, dim, dt = case["n"], case["dim"], DTYPES[case["dtype"]]
    shape = [2, 3, n] if dim == -1 else [2, n, 3]
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 3
    kind = case["kind"]
    if kind in ("minus_inf", "dead_rank"):
        xm = x.movedim(dim, -1)  # view: (.., N)
        xm[torch.rand(xm.shape, generator=g) < 0.3] = float("-inf")
        xm[0, 1, :] = float("-inf")  # a row with no finite score -> all-zero weights
        if kind == "dead_rank":  # the first rank with any keys has only -inf scores in every row
            first = next(r for r, s in enumerate(case["split"]) if s > 0)
            a = sum(case["split"][:first])
            xm[..., a : a + case["split"][first]] = float("-inf")
    if kind == "offset_pos":
        x = x + 1e4
    if kind == "offset_neg":
        x = x - 1e4
    gout = torch.randn(shape, generator=g, dtype=torch.float64)
    return x.to(dt), gout.to(dt)


def cases(world_size: int) -> list[dict]:
    """dtype x dim x (length, split) x kind; the 1e4 offsets on the longest row along the last dim."""
    splits = _splits(13, world_size)
    shapes = [(13, "tensor_split", splits["tensor_split"])]
    if world_size > 1:  # a rank holding a single score; a rank holding none (row shorter than W)
        shapes.append((2 * world_size + 1, "single_first", _splits(2 * world_size + 1, world_size)["single_first"]))
        shapes.append((world_size, "empty_rank", _splits(world_size, world_size)["empty_rank"]))
    out = []
    for dtype in DTYPES:
        for dim in (-1, 1):
            for n, split_name, split in shapes:
                for kind in ("plain", "minus_inf", "dead_rank", "offset_pos", "offset_neg"):
                    if kind.startswith("offset") and (dim == 1 or split_name != "tensor_split"):
                        continue
                    out.append(dict(dtype=dtype, dim=dim, n=n, split=split, split_name=split_name, kind=kind,
                                    seed=len(out) + 1))
    return out


def _local(t: torch.Tensor, case: dict, rank: int) -> torch.Tensor:
    a = sum(case["split"][:rank])
    return t.narrow(case["dim"], a, case["split"][rank])


def _run_cases(rank, world_size, case_list):
    """On every rank: softmax of this rank's slice and the gradient of sum(w * g)."""
    results = []
    for case in case_list:
        x, gout = build(case)
        xl = _local(x, case, rank).clone().requires_grad_()
        w = seqpar.softmax(xl, dim=case["dim"])
        (dx,) = torch.autograd.grad(w, xl, _local(gout, case, rank))
        results.append((w.detach(), dx))
    return results


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max()) if a.numel() else 0.0


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_softmax_grid_vs_reference(dist, world_size):
    case_list = cases(world_size)
    per_rank = dist(world_size, _run_cases, case_list)
    problems = []
    for i, case in enumerate(case_list):
        x, gout = build(case)
        x64 = x.double().requires_grad_()
        w_ref = reference.softmax(x64, dim=case["dim"])
        (dx_ref,) = torch.autograd.grad(w_ref, x64, gout.double())
        w = torch.cat([per_rank[r][i][0] for r in range(world_size)], dim=case["dim"])
        dx = torch.cat([per_rank[r][i][1] for r in range(world_size)], dim=case["dim"])
        dt = DTYPES[case["dtype"]]
        if w.dtype != dt or dx.dtype != dt or w.shape != x.shape:
            problems.append((case, "dtype/shape", w.dtype, dx.dtype, tuple(w.shape)))
            continue
        if torch.isnan(w).any() or torch.isnan(dx).any():
            problems.append((case, "NaN"))
            continue
        e_w, e_g = _err(w, w_ref), _err(dx, dx_ref)
        if e_w > TOL_W[case["dtype"]] or e_g > TOL_GRAD[case["dtype"]]:
            problems.append((case, (f"weights err {e_w:.3g} (tol {TOL_W[case['dtype']]}), "
                                    f"grad err {e_g:.3g} (tol {TOL_GRAD[case['dtype']]})")))
        if case["kind"] in ("minus_inf", "dead_rank"):
            dead = w.movedim(case["dim"], -1)[0, 1]
            if not torch.equal(dead, torch.zeros_like(dead)):
                problems.append((case, "row of -inf scores does not give all-zero weights"))
    assert not problems, "\n".join(map(str, problems))


def _high_rank(rank, world_size):
    """6-D scores split along dim 2 (the argument check packs shapes of any rank)."""
    x = torch.randn(2, 1, 2 * world_size + 1, 2, 1, 3, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    return seqpar.softmax(torch.tensor_split(x, world_size, dim=2)[rank], dim=2)


def test_softmax_six_dims(dist):
    w = torch.cat(dist(2, _high_rank), dim=2)
    x = torch.randn(2, 1, 5, 2, 1, 3, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    assert _err(w, reference.softmax(x, dim=2)) < TOL_W["float64"]
