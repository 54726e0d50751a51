"""seqpar over mpi4py (``group=MPI.COMM_WORLD``) against the float64 reference.

Launch (what tests/test_mpi.py runs)::

    mpiexec -n 3 python tests/mpi_cases.py

Every rank builds the same full inputs from a seed and takes its (uneven) slice of the keys/scores.
Cases: seqpar.softmax and seqpar.kv_sharded_attention on numpy arrays (float32, float64; uneven
shards incl. a rank with a single key; a bool mask with a fully masked row; weights and LSE) whose
results must come back as numpy; the same on CPU torch tensors through the MPI communicator (plus
the backward and bfloat16 softmax); and a cross-rank mismatch that must raise ValueError on every
rank; odd layouts (numpy transposed / Fortran-order / strided views, torch non-stride-1 views) against the
reference; and local argument errors on ONE rank that must raise on every rank within a bound and leave
COMM_WORLD usable. Rank 0 prints one line per case with the max error over all ranks; the exit code is 1 when any
case fails on any rank.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch
from mpi4py import MPI

import seqpar
from seqpar.ops import reference

TOL = {"float64": 1e-12, "float32": 4e-6, "bfloat16": 4e-3}  # max |x - x_ref|, inputs ~N(0, 1)
B, H, HKV, SQ, D = 2, 4, 2, 7, 8
COMM = MPI.COMM_WORLD
RANK, W = COMM.Get_rank(), COMM.Get_size()
SPLIT = [1, *[2 + r for r in range(1, W)]]  # rank 0 holds a single key; the others 3, 4, ...
NK = sum(SPLIT)
COLS = slice(sum(SPLIT[:RANK]), sum(SPLIT[: RANK + 1]))
DT = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}

results: list[tuple[str, float, float, str]] = []  # (case, max err on this rank, tol, problem)


def record(name: str, err: float, tol: float, problem: str = "") -> None:
    results.append((name, err, tol, problem))


def err(a, b) -> float:
    a = torch.as_tensor(a).double()
    b = torch.as_tensor(b).double()
    same_inf = torch.isinf(a) & torch.isinf(b) & (torch.sign(a) == torch.sign(b))
    d = torch.where(same_inf, torch.zeros_like(a), (a - b).abs()).nan_to_num(nan=float("inf"))
    return float(d.max()) if d.numel() else 0.0


def full_inputs(dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, SQ, D, generator=g).to(dtype)
    k, v = (torch.randn(B, HKV, NK, D, generator=g).to(dtype) for _ in range(2))
    mask = torch.rand(B, 1, SQ, NK, generator=g) > 0.3
    mask[:, :, 2, :] = False  # a row that sees no key
    return q, k, v, mask


def case_kv_numpy(dtype_name: str) -> None:
    q, k, v, mask = full_inputs(DT[dtype_name], seed=1)
    out, w, lse = seqpar.kv_sharded_attention(
        q.numpy(), k[:, :, COLS].numpy(), v[:, :, COLS].numpy(), group=COMM, attn_mask=mask[..., COLS].numpy(),
        return_weights=True, return_lse=True,
    )
    problem = "" if all(isinstance(x, np.ndarray) for x in (out, w, lse)) else "results are not numpy arrays"
    if not problem and (out.dtype != q.numpy().dtype or w.dtype != q.numpy().dtype):
        problem = f"dtype {out.dtype}/{w.dtype}, want {q.numpy().dtype}"
    r_out, r_lse, r_w = reference.attention(q, k, v, mask=mask)
    e = max(err(out, r_out), err(w, r_w[..., COLS]), err(lse, r_lse))
    if not problem and not (np.all(out[:, :, 2] == 0) and np.all(np.isneginf(lse[:, :, 2]))):
        problem = "fully masked row: out not 0 or lse not -inf"
    record(f"kv_sharded_attention numpy {dtype_name} split={SPLIT} mask", e, TOL[dtype_name], problem)


def case_softmax_numpy(dtype_name: str) -> None:
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(3, 4, NK, generator=g) * 3).to(DT[dtype_name])
    x[1, 2, :] = float("-inf")  # a row of only -inf -> zeros
    x[0, :, SPLIT[0] : SPLIT[0] + SPLIT[1]] = float("-inf")  # rank 1's whole shard, for batch 0
    y = seqpar.softmax(x[..., COLS].numpy(), group=COMM)
    problem = "" if isinstance(y, np.ndarray) and y.dtype == x.numpy().dtype else f"result {type(y)}"
    record(f"softmax numpy {dtype_name} split={SPLIT}", err(y, reference.softmax(x)[..., COLS]), TOL[dtype_name],
           problem)


def case_kv_torch_backward() -> None:
    q, k, v, mask = full_inputs(torch.float64, seed=3)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ql = q.clone().requires_grad_()
    kl, vl = k[:, :, COLS].clone().requires_grad_(), v[:, :, COLS].clone().requires_grad_()
    out = seqpar.kv_sharded_attention(ql, kl, vl, group=COMM, attn_mask=mask[..., COLS])
    dq, dk, dv = torch.autograd.grad(out, (ql, kl, vl), dout)
    q64, k64, v64 = (t.clone().requires_grad_() for t in (q, k, v))
    r_out, _, _ = reference.attention(q64, k64, v64, mask=mask)
    r_dq, r_dk, r_dv = torch.autograd.grad(r_out, (q64, k64, v64), dout)
    problem = "" if isinstance(out, torch.Tensor) else f"result {type(out)}"
    e = max(err(out.detach(), r_out.detach()), err(dq, r_dq), err(dk, r_dk[:, :, COLS]), err(dv, r_dv[:, :, COLS]))
    record("kv_sharded_attention torch float64 forward+backward (MPI communicator)", e, TOL["float64"], problem)


def case_softmax_torch(dtype_name: str) -> None:
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(2, NK, 3, generator=g) * 3).to(DT[dtype_name])
    gout = torch.randn(x.shape, generator=g).to(DT[dtype_name])
    xl = x[:, COLS].clone().requires_grad_()
    y = seqpar.softmax(xl, group=COMM, dim=1)
    (dx,) = torch.autograd.grad(y, xl, gout[:, COLS])
    x64 = x.double().requires_grad_()
    r = reference.softmax(x64, dim=1)
    (r_dx,) = torch.autograd.grad(r, x64, gout.double())
    e = max(err(y.detach(), r[:, COLS].detach()), err(dx, r_dx[:, COLS]) / 4)  # |grad| <= ~4 max|g|
    record(f"softmax torch {dtype_name} dim=1 forward+backward (MPI communicator)", e, TOL[dtype_name],
           "" if y.dtype == x.dtype else f"dtype {y.dtype}")


def case_attention_torch(strategy: str) -> None:
    """seqpar.attention (sequence-parallel, causal, zigzag) through the mpi4py communicator, fwd+bwd."""
    s = 4 * W + 3
    g = torch.Generator().manual_seed(7)
    q = torch.randn(1, 4, s, 8, generator=g, dtype=torch.float64)
    k, v, dout = (torch.randn(1, 2 if i < 2 else 4, s, 8, generator=g, dtype=torch.float64) for i in range(3))
    q64, k64, v64 = (t.clone().requires_grad_() for t in (q, k, v))
    r_out, _, _ = reference.attention(q64, k64, v64, mask=reference.sequence_mask(s, is_causal=True))
    refs = (r_out, *torch.autograd.grad(r_out, (q64, k64, v64), dout))
    ql, kl, vl = (seqpar.shard(t, layout="zigzag", group=COMM).requires_grad_() for t in (q, k, v))
    out = seqpar.attention(ql, kl, vl, group=COMM, is_causal=True, layout="zigzag", strategy=strategy)
    mine = (out, *torch.autograd.grad(out, (ql, kl, vl), seqpar.shard(dout, layout="zigzag", group=COMM)))
    e = max(err(a.detach(), seqpar.shard(b.detach(), layout="zigzag", group=COMM)) for a, b in zip(mine, refs))
    record(f"attention {strategy} zigzag causal GQA float64 forward+backward (MPI communicator)", e, TOL["float64"])


def case_mismatch() -> None:
    q, k, v, _ = full_inputs(torch.float32, seed=6)
    try:
        seqpar.kv_sharded_attention(q.numpy(), k[:, :, COLS].numpy(), v[:, :, COLS].numpy(), group=COMM,
                                    scale=0.5 if RANK == W - 1 else 0.25)
        problem = "no error"
    except ValueError as e:
        msg = str(e)
        want = ["'scale' differs", f"rank {RANK}", "rank 0: 0.25", f"rank {W - 1}: 0.5"]
        problem = "" if all(x in msg for x in want) else f"message lacks one of {want}: {msg}"
    record("cross-rank scale mismatch -> ValueError on every rank", 0.0, 0.0, problem)


def odd_np(a: np.ndarray, how: str) -> np.ndarray:
    """The same values as ``a`` in another memory layout (a numpy view, not contiguous)."""
    if how == "transposed":  # last dim not stride-1
        return np.ascontiguousarray(np.swapaxes(a, -1, -2)).swapaxes(-1, -2)
    if how == "fortran":
        return np.asfortranarray(a)
    if how == "strided":  # every other element of a doubled array
        big = np.repeat(a, 2, axis=-1)
        return big[..., ::2]
    raise AssertionError(how)


def case_kv_numpy_layouts() -> None:
    q, k, v, mask = full_inputs(torch.float64, seed=11)
    r_out, r_lse, _ = reference.attention(q, k, v, mask=mask)
    e, problem = 0.0, ""
    for how in ("transposed", "fortran", "strided"):
        qn, kn, vn = (odd_np(t.numpy(), how) for t in (q, k[:, :, COLS], v[:, :, COLS]))
        if qn.flags.c_contiguous:
            problem = f"{how}: the test input is contiguous"
        out, lse = seqpar.kv_sharded_attention(qn, kn, vn, group=COMM, attn_mask=odd_np(mask[..., COLS].numpy(), how),
                                               return_lse=True)
        e = max(e, err(out, r_out), err(lse, r_lse))
    record("kv_sharded_attention numpy float64, transposed/Fortran/strided views", e, TOL["float64"], problem)


def case_attention_torch_layouts() -> None:
    """q, k, v whose last dim is not stride-1 (and an expanded K/V head dim) through the MPI communicator."""
    s = 3 * W + 2
    g = torch.Generator().manual_seed(12)
    q = torch.randn(1, 4, s, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(1, 1, s, 8, generator=g, dtype=torch.float64) for _ in range(2))
    r_out, _, _ = reference.attention(q, k, v, mask=reference.sequence_mask(s, is_causal=True))
    e = 0.0
    for strategy in ("allreduce", "ring", "allgather"):
        ql, kl, vl = (seqpar.shard(t, layout="zigzag", group=COMM) for t in (q, k, v))
        ql = ql.transpose(2, 3).contiguous().transpose(2, 3)
        kl = kl.expand(1, 2, *kl.shape[2:])  # stride 0 over the kv heads
        vl = vl.transpose(2, 3).contiguous().transpose(2, 3).expand(1, 2, *vl.shape[2:])
        out = seqpar.attention(ql, kl, vl, group=COMM, is_causal=True, layout="zigzag", strategy=strategy)
        ref = seqpar.shard(reference.attention(q, k.expand(1, 2, s, 8), v.expand(1, 2, s, 8),
                                               mask=reference.sequence_mask(s, is_causal=True))[0],
                           layout="zigzag", group=COMM)
        e = max(e, err(out, ref))
    del r_out
    record("attention (3 strategies) torch float64, non-stride-1 and expanded inputs (MPI communicator)", e,
           TOL["float64"])


def case_local_error_one_rank() -> None:
    """A local argument error on the last rank only: every rank raises within 10 s, COMM_WORLD still works."""
    bad = RANK == W - 1
    q = torch.zeros(1, 4, 3, 8)
    calls = {
        "kv H % H_kv": lambda: seqpar.kv_sharded_attention(q, torch.zeros(1, 3 if bad else 2, 2, 8),
                                                           torch.zeros(1, 3 if bad else 2, 2, 8), group=COMM),
        "softmax dim": lambda: seqpar.softmax(np.zeros((2, 3)), group=COMM, dim=5 if bad else -1),
        "attention layout": lambda: seqpar.attention(q, q, q, group=COMM, layout="zz" if bad else "zigzag"),
        "unshard length": lambda: seqpar.unshard(torch.zeros(1, 2 if bad else 3), dim=1, seq_len=3 * W, group=COMM),
    }
    problems = []
    worst = 0.0
    for name, call in calls.items():
        t0 = time.monotonic()
        try:
            call()
            problems.append(f"{name}: no error")
        except (ValueError, TypeError) as e:
            worst = max(worst, time.monotonic() - t0)
            if not bad and f"rank(s) [{W - 1}]" not in str(e):
                problems.append(f"{name}: message does not name rank {W - 1}: {e}")
        after = seqpar.softmax(np.zeros((2, 3)), group=COMM)  # the communicator still works
        if not np.allclose(after.sum(-1), 1 / W * 1):  # 3 keys per rank out of 3W, equal scores
            problems.append(f"{name}: the call afterwards gave {after}")
    if worst > 10:
        problems.append(f"raised only after {worst:.1f} s")
    record(f"a local error on rank {W - 1} only raises on every rank within 10 s (worst {worst:.2f} s)", 0.0, 0.0,
           "; ".join(problems))


def case_broadcast() -> None:
    """seqpar's communicator over COMM_WORLD: a broadcast from the last rank (the service's step bus)."""
    from seqpar.comm import get_communicator

    t = torch.arange(6, dtype=torch.float32) * (RANK + 1)
    get_communicator(COMM).broadcast(t, W - 1)
    record("broadcast from the last rank (seqpar.comm)", err(t, torch.arange(6, dtype=torch.float32) * W), 0.0)


def main() -> int:
    torch.set_num_threads(1)
    for dt in ("float32", "float64"):
        case_kv_numpy(dt)
        case_softmax_numpy(dt)
    case_kv_torch_backward()
    case_softmax_torch("float32")
    case_softmax_torch("bfloat16")
    for strategy in ("allreduce", "ring", "allgather"):
        case_attention_torch(strategy)
    case_mismatch()
    case_kv_numpy_layouts()
    case_attention_torch_layouts()
    case_local_error_one_rank()
    case_broadcast()
    failed = 0
    for name, e, tol, problem in results:
        e_all = COMM.allreduce(e, op=MPI.MAX)
        problems = [p for p in COMM.allgather(f"rank {RANK}: {problem}" if problem else "") if p]
        ok = e_all <= tol and not problems
        failed += not ok
        if RANK == 0:
            print(f"{'PASS' if ok else 'FAIL'} {name}: max err {e_all:.3g} (tol {tol:g})"
                  + ("" if not problems else " " + "; ".join(problems)), flush=True)
    if RANK == 0:
        print(f"{len(results) - failed}/{len(results)} cases passed on {W} MPI ranks", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
