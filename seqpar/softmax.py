"""Distributed softmax: each rank holds a slice of every row's scores, gets its slice of weights.

::

    m_local = max_j beta_ij (this rank)    -> all-reduce MAX -> m
    z_local = sum_j exp(beta_ij - m)       -> all-reduce SUM -> z
    alpha_ij = exp(beta_ij - m) / z        (0 for rows whose scores are all -inf)

Statistics are float32 (float64 for float64 input); the result has the input dtype.
Differentiable: the backward all-reduces ``sum_j alpha_ij g_ij`` once.

Non-finite scores propagate as in ``torch.softmax`` on the whole row, whichever rank holds them: a NaN
or +inf anywhere in a row makes that row NaN on every rank (the rank holding it gets NaN in its exp-sum,
and the SUM all-reduce carries the NaN to all; no rank relies on the MAX all-reduce propagating NaN).
A row whose scores are all -inf gives 0 (``torch.softmax`` gives NaN there): ``z == 0`` happens only
then, since otherwise the row's maximum contributes ``exp(0) = 1``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from seqpar import checks
from seqpar.comm import Communicator, get_communicator
from seqpar.interop import back, to_torch
from seqpar.ops.lse import finite_or_zero, stat_dtype


class _DistSoftmax(torch.autograd.Function):
    """
    ===========  =========================  =====================================
    scores       (..., N_local, ...)        this rank's slice of each row (``dim``)
    weights      (..., N_local, ...)        this rank's slice of the global softmax
    ===========  =========================  =====================================
    """

    @staticmethod
    def forward(ctx, scores: torch.Tensor, comm: Communicator, dim: int) -> torch.Tensor:
        x = scores.to(stat_dtype(scores.dtype))
        if x.shape[dim] == 0:
            m = torch.full_like(x.sum(dim, keepdim=True), float("-inf"))
        else:
            m = x.amax(dim, keepdim=True).contiguous()
        comm.all_reduce(m, "max")
        e = torch.exp(x - finite_or_zero(m))
        z = e.sum(dim, keepdim=True).contiguous()
        comm.all_reduce(z, "sum")
        w = e / z.masked_fill(z == 0, 1)  # z == 0: every score -inf -> e == 0 -> w == 0; NaN z stays NaN
        ctx.save_for_backward(w)
        ctx.comm, ctx.dim = comm, dim
        return w.to(scores.dtype)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (w,) = ctx.saved_tensors
        dot = (w * g.to(w.dtype)).sum(ctx.dim, keepdim=True).contiguous()
        ctx.comm.all_reduce(dot, "sum")
        return (w * (g.to(w.dtype) - dot)).to(g.dtype), None, None


def softmax(scores_local: Any, *, group: Any = None, dim: int = -1) -> Any:
    """Softmax over ``dim`` of a row split across the ranks of ``group``.

    Args:
        scores_local: this rank's slice of the scores (torch tensor; numpy with an mpi4py group).
            Every rank's tensor has the same shape except along ``dim``, where lengths may differ.
        group: None (default torch.distributed group), a ``ProcessGroup``, or an ``mpi4py`` ``Comm``.
        dim: the dimension the rows are split along.

    Returns:
        This rank's slice of the weights, same shape and dtype (numpy in, numpy out). Any strides.

    Errors never hang: a local argument error (not a floating tensor, ``dim`` out of range) is carried
    through the one cross-rank exchange (:func:`seqpar.checks.agree`), so every rank raises; shapes
    (except along ``dim``), dtype and ``dim`` that differ across ranks raise ``ValueError`` on every rank.
    """
    x, was_np = to_torch(scores_local)
    comm = get_communicator(group)

    def validate():
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            got = f"{type(x).__name__} of dtype {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise TypeError(f"rank {comm.rank}: scores_local must be a floating tensor or array, got {got}")
        if not -x.dim() <= dim < x.dim():
            raise ValueError(
                f"rank {comm.rank}: dim={dim} is out of range for scores_local of shape {tuple(x.shape)}; "
                f"allowed: {-x.dim()} .. {x.dim() - 1}"
            )
        d = dim % x.dim()
        other = [s for i, s in enumerate(x.shape) if i != d]
        if len(other) > 4:  # the check packs at most 5 ints per field: fold the trailing sizes
            other = [*other[:3], math.prod(other[3:])]
        return {"scores_local.shape (without dim)": [x.dim(), *other],
                "scores_local.dtype": checks.dtype_code(x.dtype), "dim": d}, {}

    checks.agree(comm, "softmax", validate)
    return back(_DistSoftmax.apply(x, comm, dim % x.dim()), was_np)
