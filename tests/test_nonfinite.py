"""NaN and +-inf propagate exactly as the attention formula / torch.softmax on the whole data, at every W.

Run: ``python -m pytest tests/test_nonfinite.py -q``

For each case a NaN or an infinity is put into q, k, v or the scores (on the last rank's shard, so
that with W > 1 the healthy ranks must learn of it through the collectives), and the result of every
path -- ``attention`` with each strategy, ``kv_sharded_attention``, ``softmax`` -- is compared with
what the float64 formula (``seqpar.ops.reference``: what SDPA computes, see ``_sdpa``) / ``torch.softmax``
give on the unsharded tensors: the same NaN positions, the same infinities, the finite values within the
dtype's tolerance.
(Before, ``z > 0`` guards turned NaN rows into 0, and in ``softmax`` a +inf or NaN on one rank zeroed
the finite rows on the others.) Rows that see no key stay exactly 0 with LSE -inf (``torch.softmax``
gives NaN there; seqpar's documented choice).

Rows ALL of whose scores in one kernel call are NaN (a NaN query row; a causal row whose only visible key
is NaN) are covered too: torch 2.13's fused CPU kernel returns out 0, lse 0 for them when the call is small
(Sq, Sk <~ 8) and NaN when it is larger, so SDPA's own CPU flash path disagrees with itself; seqpar's
cpu_flash wrapper recomputes such calls exactly (``seqpar/ops/kernels/cpu_flash.py``); SDPA on the whole
13-token tensor is large enough to give NaN.
"""

from __future__ import annotations

import pytest
import torch

import seqpar
from seqpar.ops import reference

NAN, INF = float("nan"), float("inf")
TOL = {torch.float32: 2e-5, torch.float64: 1e-12}
S, SQ = 13, 5


def _compare(mine: torch.Tensor, ref: torch.Tensor, tol: float) -> str:
    """'' if NaN masks, infinities and finite values (within tol) agree, else what differs."""
    mine, ref = mine.detach().double(), ref.detach().double()
    if not torch.equal(mine.isnan(), ref.isnan()):
        return f"NaN at {mine.isnan().sum()} places, reference {ref.isnan().sum()}"
    if not torch.equal(mine.isinf(), ref.isinf()) or not torch.equal(mine[mine.isinf()], ref[ref.isinf()]):
        return "infinities differ"
    fin = ref.isfinite()
    err = float((mine[fin] - ref[fin]).abs().max()) if fin.any() else 0.0
    return "" if err <= tol * max(1.0, float(ref[fin].abs().max()) if fin.any() else 1.0) else f"max err {err:.3g}"


def _inputs(case: str, dtype: torch.dtype, sq: int = S):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, sq, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 2, S, 8, generator=g, dtype=torch.float64) for _ in range(2))
    j = S - 2  # a key on the last rank (any W <= 4)
    i = 1  # a query row on rank 0
    if case == "nan k causal":  # key 1: its zigzag piece also holds key 0 at W <= 4, so no row's block is all NaN
        k[0, 1, 1, 3] = NAN
    elif case == "+inf k causal":
        k[1, 0, 1, :] = INF
    elif case == "nan k":
        k[0, 1, j, 3] = NAN
    elif case == "nan v":
        v[1, 0, j, 5] = NAN
    elif case == "+inf k":
        k[0, 0, j, :] = INF
    elif case == "-inf v":
        v[0, 1, j, 2] = -INF
    elif case == "nan k0 causal":  # key 0: query 0 sees only it, in a block of its own at every W
        k[0, 1, 0, 2] = NAN
    elif case == "nan q row":
        q[1, 2, i, :] = NAN
    elif case == "nan q element":
        q[0, 3, i, 4] = NAN
    elif case != "finite":
        raise AssertionError(case)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _sdpa(q, k, v, *, is_causal=False, attn_mask=None):
    """What SDPA computes, by the formula: SDPA's own CPU path zeroes all-NaN rows in some shapes and not in
    others (above), and its MATH backend spreads a NaN key into rows the causal mask hides it from (it adds
    the mask as a -inf bias)."""
    mask = reference.sequence_mask(q.shape[2], is_causal=True) if is_causal else attn_mask
    return reference.attention(q, k, v, mask=mask)[0].to(q.dtype)


ATTN_CASES = ("finite", "nan k", "nan v", "+inf k", "-inf v", "nan q row", "nan q element")
# v non-finite + causal: SDPA's result depends on its tiles (0 * inf where a tile is masked)
CAUSAL_CASES = ("finite", "nan k causal", "nan k0 causal", "+inf k causal")


def _attention_cases(rank, world_size, dtype_name):
    dtype = getattr(torch, dtype_name)
    problems = {}
    for is_causal in (False, True):
        for case in CAUSAL_CASES if is_causal else ATTN_CASES:
            q, k, v = _inputs(case, dtype)
            ref = _sdpa(q, k, v, is_causal=is_causal)
            for strategy in ("allreduce", "ring", "allgather"):
                layout = "zigzag" if is_causal else "contiguous"
                ql, kl, vl = (seqpar.shard(t, layout=layout) for t in (q, k, v))
                out = seqpar.attention(ql, kl, vl, is_causal=is_causal, layout=layout, strategy=strategy)
                p = _compare(out, seqpar.shard(ref, layout=layout), TOL[dtype])
                if p:
                    problems[f"attention {strategy} causal={is_causal} {case}"] = p
    for case in ATTN_CASES:  # kv-sharded: all queries, keys split
        q, k, v = _inputs(case, dtype, sq=SQ)
        mask = torch.ones(q.shape[2], S, dtype=torch.bool)
        mask[2] = False  # a row that sees no key: 0, lse -inf
        ref = _sdpa(q, k, v, attn_mask=mask)
        ref[:, :, 2] = 0  # SDPA gives 0 there too on CPU; the contract, whatever the backend
        cols = torch.tensor_split(torch.arange(S), world_size)[rank]
        out, lse = seqpar.kv_sharded_attention(q, k[:, :, cols], v[:, :, cols], attn_mask=mask[:, cols],
                                               return_lse=True)
        p = _compare(out, ref, TOL[dtype])
        if not p and not (torch.equal(out[:, :, 2], torch.zeros_like(out[:, :, 2])) and lse[:, :, 2].isneginf().all()):
            p = "fully masked row: out not 0 or lse not -inf"
        if p:
            problems[f"kv_sharded_attention {case}"] = p
    return problems


@pytest.mark.timeout(300)
@pytest.mark.parametrize("dtype_name", ["float32", "float64"])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_attention_non_finite_like_sdpa(dist, world_size, dtype_name, one_thread):
    for r, problems in enumerate(dist(world_size, _attention_cases, dtype_name, timeout=240)):
        assert not problems, f"rank {r}: {problems}"


SOFTMAX_CASES = ("finite", "nan", "+inf", "-inf element", "-inf row", "nan and -inf row", "+inf and -inf")


def _scores(case: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, S, generator=g, dtype=torch.float64) * 3
    j = S - 1  # on the last rank
    if case == "nan":
        x[0, 1, j] = NAN
    elif case == "+inf":
        x[1, 2, j] = INF
    elif case == "-inf element":
        x[2, 0, j] = -INF
    elif case == "-inf row":
        x[0, 0, :] = -INF
    elif case == "nan and -inf row":
        x[1, 1, :] = -INF
        x[1, 1, j] = NAN
    elif case == "+inf and -inf":
        x[2, 3, :] = -INF
        x[2, 3, 0] = INF  # on rank 0
    return x


def _softmax_cases(rank, world_size):
    problems = {}
    cols = torch.tensor_split(torch.arange(S), world_size)[rank]
    for case in SOFTMAX_CASES:
        x = _scores(case)
        ref = torch.softmax(x, -1)
        all_neg_inf = x.isneginf().all(-1, keepdim=True)
        ref = torch.where(all_neg_inf, torch.zeros_like(ref), ref)  # seqpar: rows of only -inf give 0
        xl = x[..., cols].clone().requires_grad_()
        y = seqpar.softmax(xl)
        p = _compare(y, ref[..., cols], TOL[torch.float64])
        g = torch.ones_like(y)
        (dx,) = torch.autograd.grad(y, xl, g)
        xr = x.clone().requires_grad_()
        (r_dx,) = torch.autograd.grad(torch.softmax(xr, -1), xr, torch.ones_like(x))
        r_dx = torch.where(all_neg_inf, torch.zeros_like(r_dx), r_dx)
        p = p or _compare(dx, r_dx[..., cols], 1e-12)
        if p:
            problems[case] = p
    return problems


@pytest.mark.timeout(200)
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_softmax_non_finite_like_torch_softmax(dist, world_size, one_thread):
    for r, problems in enumerate(dist(world_size, _softmax_cases, timeout=120)):
        assert not problems, f"rank {r}: {problems}"
