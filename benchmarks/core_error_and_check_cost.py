"""Measurements for the core API (not a test): accuracy per dtype and the cost of the cross-rank check.

    python benchmarks/core_error_and_check_cost.py            # both parts
    python benchmarks/core_error_and_check_cost.py --errors   # only the error table
    python benchmarks/core_error_and_check_cost.py --check    # only the check cost

1. Max |x - ref| against seqpar.ops.reference (float64 formula) at W = 1 and W = 4, per dtype, for
   kv_sharded_attention (out, weights, lse, dq, dk, dv; GQA 8/2 heads, keys split unevenly, a bool
   mask with ~30% masked and one fully masked row) and seqpar.softmax (weights, gradient).
2. Median wall time per kv_sharded_attention call at W = 2 with SEQPAR_CHECK=1 vs 0 (interleaved
   calls, same process group), small shape, many iterations.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import torch

from seqpar_tools.runner import Pool

DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
B, H, HKV, SQ, SK, D = 2, 8, 2, 64, 203, 64  # SK not divisible by 4: uneven shards


def _inputs(dtype):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, SQ, D, generator=g).to(dtype)
    k, v = (torch.randn(B, HKV, SK, D, generator=g).to(dtype) for _ in range(2))
    mask = torch.rand(B, 1, SQ, SK, generator=g) > 0.3
    mask[:, :, 3] = False
    dout = torch.randn(B, H, SQ, D, generator=g).to(dtype)
    scores = (torch.randn(4, 8, 1001, generator=g) * 3).to(dtype)
    gsm = torch.randn(4, 8, 1001, generator=g).to(dtype)
    return q, k, v, mask, dout, scores, gsm


def _errors_worker(rank, world_size):
    import seqpar

    res = {}
    for name, dt in DTYPES.items():
        q, k, v, mask, dout, scores, gsm = _inputs(dt)
        cols = torch.tensor_split(torch.arange(SK), world_size)[rank]
        ql = q.clone().requires_grad_()
        kl, vl = k[:, :, cols].clone().requires_grad_(), v[:, :, cols].clone().requires_grad_()
        out, w, lse = seqpar.kv_sharded_attention(ql, kl, vl, attn_mask=mask[..., cols], return_weights=True,
                                                  return_lse=True)
        dq, dk, dv = torch.autograd.grad(out, (ql, kl, vl), dout)
        xs = torch.tensor_split(scores, world_size, dim=-1)[rank].clone().requires_grad_()
        y = seqpar.softmax(xs)
        (dx,) = torch.autograd.grad(y, xs, torch.tensor_split(gsm, world_size, dim=-1)[rank])
        res[name] = dict(out=out.detach(), w=w, lse=lse, dq=dq, dk=dk, dv=dv, sm=y.detach(), sm_grad=dx)
    return res


def _err(a, b):
    a, b = a.double(), b.double()
    same = torch.isinf(a) & torch.isinf(b) & (torch.sign(a) == torch.sign(b))
    return float(torch.where(same, torch.zeros_like(a), (a - b).abs()).nan_to_num(nan=float("inf")).max())


def errors() -> None:
    from seqpar.ops import reference

    rows = []
    for world_size in (1, 4):
        pool = Pool(world_size, timeout_s=600)
        per_rank = pool.run(_errors_worker, timeout=600)
        pool.close()
        for name, dt in DTYPES.items():
            q, k, v, mask, dout, scores, gsm = _inputs(dt)
            q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
            r_out, r_lse, r_w = reference.attention(q64, k64, v64, mask=mask)
            r_dq, r_dk, r_dv = torch.autograd.grad(r_out, (q64, k64, v64), dout.double())
            x64 = scores.double().requires_grad_()
            r_sm = reference.softmax(x64)
            (r_dx,) = torch.autograd.grad(r_sm, x64, gsm.double())
            got = {key: torch.cat([r[name][key] for r in per_rank], dim=(2 if key in ("dk", "dv") else -1))
                   for key in ("w", "dk", "dv", "sm", "sm_grad")}
            got.update({key: per_rank[0][name][key] for key in ("out", "lse", "dq")})
            ref = dict(out=r_out, w=r_w, lse=r_lse, dq=r_dq, dk=r_dk, dv=r_dv, sm=r_sm, sm_grad=r_dx)
            rows.append((world_size, name, {key: _err(got[key], ref[key].detach()) for key in ref}))
    keys = ["out", "w", "lse", "dq", "dk", "dv", "sm", "sm_grad"]
    print(f"\nmax |x - float64 reference|; kv: B={B} H={H} H_kv={HKV} Sq={SQ} Sk={SK} D={D}, bool mask (30% masked,"
          f" one fully masked row); softmax: (4, 8, 1001) scores ~3*N(0,1)")
    print(f"{'W':>2} {'dtype':>9} " + " ".join(f"{k:>9}" for k in keys))
    for world_size, name, e in rows:
        print(f"{world_size:>2} {name:>9} " + " ".join(f"{e[k]:9.2e}" for k in keys))


def _check_worker(rank, world_size, iters, shape):
    import seqpar

    b, h, sq, sk, d = shape
    torch.manual_seed(0)
    q = torch.randn(b, h, sq, d)  # replicated: the same on every rank (the check compares a fingerprint)
    torch.manual_seed(1 + rank)
    k, v = torch.randn(b, h, sk, d), torch.randn(b, h, sk, d)
    times = {"1": [], "0": []}
    for i in range(iters + 50):
        for mode in ("1", "0"):  # interleaved: drift and load hit both alike
            os.environ["SEQPAR_CHECK"] = mode
            t0 = time.perf_counter()
            seqpar.kv_sharded_attention(q, k, v)
            if i >= 50:  # warm-up
                times[mode].append(time.perf_counter() - t0)
    os.environ["SEQPAR_CHECK"] = "1"
    return {m: statistics.median(t) * 1e6 for m, t in times.items()}


def check_cost(iters: int = 3000) -> None:
    shape = (1, 4, 16, 32, 64)
    pool = Pool(2, timeout_s=600)
    per_rank = pool.run(_check_worker, iters, shape, timeout=600)
    pool.close()
    print(f"\nkv_sharded_attention at W=2 (gloo, 1 thread/rank), q (1, 4, 16, 64), k/v per rank (1, 4, 32, 64), "
          f"{iters} interleaved calls each, median per call:")
    for r, t in enumerate(per_rank):
        print(f"  rank {r}: SEQPAR_CHECK=1 {t['1']:8.1f} us   SEQPAR_CHECK=0 {t['0']:8.1f} us   "
              f"check cost {t['1'] - t['0']:7.1f} us ({(t['1'] / t['0'] - 1) * 100:5.1f} %)")


def check_python_cost(iters: int = 20000) -> None:
    """The check's local work alone (validate, fingerprint q, pack, gather from a fake 2-rank comm,
    compare): no network."""
    from seqpar import checks
    from seqpar.comm import Communicator

    class Loopback(Communicator):
        def __init__(self):
            super().__init__()
            self.rank, self.world_size = 0, 2

        def _all_gather(self, out, t):
            out.view(2, -1).copy_(t.view(1, -1))

    comm = Loopback()
    q = torch.randn(1, 4, 16, 64)
    fields = {"q.shape": (1, 4, 16, 64), "k_local.shape (B, H_kv, D)": (1, 4, 64),
              "v_local.shape (B, H_kv, D)": (1, 4, 64), "dtype": 0, "scale": checks.float_code(0.125),
              "attn_mask.dtype": -1}
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        checks.agree(comm, "kv_sharded_attention", lambda: ({**fields, "q fingerprint": checks.fingerprint(q)}, {}))
        times.append(time.perf_counter() - t0)
    print(f"  local part of the check (fingerprint + pack + compare, loopback all-gather, {len(fields) + 1} fields, "
          f"{checks.ROW_BYTES} bytes/rank): median {statistics.median(times[100:]) * 1e6:.1f} us")


if __name__ == "__main__":
    args = set(sys.argv[1:]) or {"--errors", "--check"}
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()}")
    if "--errors" in args:
        errors()
    if "--check" in args:
        check_cost()
        check_python_cost()
