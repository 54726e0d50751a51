"""strategy="ulysses" (or "ulysses_ring") over mpi4py (``group=MPI.COMM_WORLD``): the all-to-all with uneven counts.

Launch (what tests/test_ulysses.py runs)::

    mpiexec -n 3 python tests/mpi_ulysses_case.py
    mpiexec -n 4 -genv LOCAL_WORLD_SIZE 2 python tests/mpi_ulysses_case.py ulysses_ring   # 2 "nodes" x 2 ranks

S = 11 over 3 ranks (4, 4, 3 tokens), H = 4 heads (2, 1, 1 per rank), GQA with H_kv = 2 < W (K/V head copies)
and MHA; float64 and bfloat16; forward and dq/dk/dv against the float64 reference (errors max over ranks);
bytes counted against :func:`seqpar.plan.bytes_sent`. Rank 0 prints ``ok <case>`` or ``FAIL <case>`` per case.
"""

from __future__ import annotations

import sys

import torch
from mpi4py import MPI

import seqpar
import seqpar.checks
import seqpar.strategies.ulysses_ring
from seqpar.comm import get_communicator
from seqpar.ops import reference
from seqpar.plan import bytes_sent

COMM = MPI.COMM_WORLD
RANK, W = COMM.Get_rank(), COMM.Get_size()
STRATEGY = sys.argv[1] if len(sys.argv) > 1 else "ulysses"
INNER = seqpar.strategies.ulysses_ring.inner_size(W) if STRATEGY == "ulysses_ring" else None
TOL = {torch.float64: 1e-12, torch.bfloat16: 4e-2}
B, H, S, D = 2, 4, 11, 8
failed = False
for dtype in (torch.float64, torch.bfloat16):
    for kv_heads in (2, 4):
        gen = torch.Generator().manual_seed(kv_heads)
        q, k, v, g = (torch.randn(B, h, S, D, generator=gen, dtype=torch.float64).to(dtype)
                      for h in (H, kv_heads, kv_heads, H))
        mask = reference.sequence_mask(S, is_causal=True)
        qr, kr, vr = (t.double().clone().requires_grad_() for t in (q, k, v))
        ref = reference.attention(qr, kr, vr, mask=mask)[0]
        refs = [ref.detach(), *torch.autograd.grad(ref, (qr, kr, vr), g.double())]
        idx = seqpar.layout.positions(S, W, RANK, "zigzag")
        leaves = [t[:, :, idx].clone().requires_grad_() for t in (q, k, v)]
        comm = get_communicator(COMM)
        out = seqpar.attention(*leaves, group=COMM, is_causal=True, layout="zigzag", strategy=STRATEGY)
        out.backward(g[:, :, idx])
        errs = [float((x.detach().double() - r[:, :, idx]).abs().max() / max(1.0, float(r.abs().max())))
                for x, r in zip([out, *(t.grad for t in leaves)], refs)]
        err = COMM.allreduce(max(errs), op=MPI.MAX)
        want = bytes_sent(STRATEGY, batch=B, heads=H, kv_heads=kv_heads, seq_len=S, head_dim=D, world_size=W,
                          element_size=q.element_size(), layout="zigzag", rank=RANK, inner=INNER)["fwd"]
        comm.reset_stats()
        seqpar.checks.agree(comm, "probe", lambda: None)
        check = comm.bytes_sent
        comm.reset_stats()
        seqpar.attention(*(t.detach() for t in leaves), group=COMM, is_causal=True, layout="zigzag",
                         strategy=STRATEGY)
        got = comm.bytes_sent - check
        bytes_ok = COMM.allreduce(int(got == want), op=MPI.MIN)
        ok = err <= TOL[dtype] and bytes_ok
        failed |= not ok
        if RANK == 0:
            print(f"{'ok' if ok else 'FAIL'} {STRATEGY} (inner {INNER}) {dtype} H_kv={kv_heads}: max rel err "
                  f"{err:.1e}, bytes match: {bool(bytes_ok)}", flush=True)
sys.exit(1 if failed else 0)
