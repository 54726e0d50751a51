"""Run under ``mpiexec -n 2`` by tests/test_mpi.py: rank 1 raises before a collective that rank 0 enters.

``python tests/mpi_abort_case.py init``   the ranks join through seqpar.init_distributed (gloo group)
``python tests/mpi_abort_case.py world``  seqpar's collectives go through mpi4py's COMM_WORLD

seqpar's MPI excepthook must abort the job (exit code != 0) at once; without it rank 0 would wait in
its collective (forever with COMM_WORLD). SEQPAR_TIMEOUT_S is set high by the test, so only the abort
can end the job quickly.
"""

from __future__ import annotations

import sys
import time

import torch

import seqpar

mode = sys.argv[1]
if mode == "init":
    rank, _ = seqpar.init_distributed()
    group = None
else:
    from mpi4py import MPI

    group = MPI.COMM_WORLD
    rank = group.Get_rank()
    seqpar.softmax(torch.zeros(2, 3), group=group)  # a first call: every rank is inside seqpar's MPI setup
if rank == 1:
    raise RuntimeError("rank 1 fails before a collective")
t0 = time.monotonic()
seqpar.softmax(torch.zeros(2, 3), group=group)
print(f"rank {rank}: the collective returned after {time.monotonic() - t0:.1f} s (it should have been aborted)")
