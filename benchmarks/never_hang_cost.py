"""What "never hang" costs (not a test): bounded waits vs plain blocking collectives, and the q fingerprint.

    python benchmarks/never_hang_cost.py --wait          # gloo, W=2: plain call vs async_op + bounded wait
    python benchmarks/never_hang_cost.py --fingerprint   # one process: checks.fingerprint(q) vs q.sum()
    python benchmarks/never_hang_cost.py --exchange      # gloo, W=2: the verdict exchange vs a tiny all-reduce
    mpiexec -n 2 python benchmarks/never_hang_cost.py --mpi   # mpi4py: blocking vs non-blocking + Test loop

1. torch.distributed over gloo, 2 ranks x 1 thread: median time of ``dist.all_reduce`` / all-gather /
   reduce-scatter called plainly (blocking) vs through seqpar's Communicator (``async_op=True`` and
   ``work.wait(timeout=...)``; reduce-scatter: a plain ``wait()`` handed to a helper thread, awaited
   until the deadline), for a small (8 floats) and a large (4 M floats = 16 MB) tensor, interleaved.
2. The fingerprint of a replicated q (three int64 sums of its bits) at decode and prefill sizes.
3. mpi4py: ``Allreduce`` vs ``Iallreduce`` + the Test/sleep loop seqpar uses.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))  # dist_pool

import torch  # noqa: E402

SIZES = {"8 floats": 8, "4M floats (16 MB)": 4 * 1024 * 1024}


def _wait_worker(rank, world_size, iters):
    import torch.distributed as dist

    from seqpar.comm import get_communicator
    from seqpar.comm.communicator import _ALL_GATHER, _REDUCE_SCATTER

    comm = get_communicator(None)
    res = {}
    for label, n in SIZES.items():
        it = iters if n < 1000 else max(5, iters // 100)
        t = torch.ones(n)
        out = torch.empty(n * world_size)
        half = torch.empty(n // world_size)
        ops = {
            "all_reduce": (lambda: dist.all_reduce(t), lambda: comm._all_reduce(t, "sum")),
            "all_gather": (lambda: _ALL_GATHER(out, t), lambda: comm._all_gather(out, t)),
            "reduce_scatter": (lambda: _REDUCE_SCATTER(half, t), lambda: comm._reduce_scatter(half, t)),
        }
        for name, (plain, bounded) in ops.items():
            times = {"plain": [], "bounded": []}
            for i in range(it + 5):
                order = (("plain", plain), ("bounded", bounded))
                for mode, fn in order if i % 2 else order[::-1]:  # alternate which goes first
                    dist.barrier()
                    t0 = time.perf_counter()
                    fn()
                    if i >= 5:
                        times[mode].append(time.perf_counter() - t0)
            res[(name, label)] = {m: statistics.median(v) * 1e6 for m, v in times.items()}
    return res


def wait_cost(iters: int = 400) -> None:
    from dist_pool import Pool

    pool = Pool(2)
    per_rank = pool.run(_wait_worker, iters, timeout=900)
    pool.close()
    print("\ngloo, W=2, 1 thread/rank: median us per call (slowest rank), plain blocking vs bounded wait")
    for key in per_rank[0]:
        plain = max(r[key]["plain"] for r in per_rank)
        bounded = max(r[key]["bounded"] for r in per_rank)
        print(f"  {key[0]:>14} {key[1]:>18}: plain {plain:10.1f}   bounded {bounded:10.1f}   "
              f"diff {bounded - plain:+9.1f} us ({(bounded / plain - 1) * 100:+5.1f} %)")


def _exchange_worker(rank, world_size, iters):
    import torch.distributed as dist

    import seqpar
    from seqpar import checks
    from seqpar.comm import get_communicator

    comm = get_communicator(None)
    q = torch.randn(1, 4, 16, 64, generator=torch.Generator().manual_seed(0))
    k, v = torch.randn(1, 4, 32, 64), torch.randn(1, 4, 32, 64)
    fields = {f"field {i}": (1, 2, 3) for i in range(8)}
    tiny = torch.ones(8)
    calls = {
        "all_reduce of 8 floats": lambda: comm.all_reduce(tiny),
        "exchange (checks.agree, 8 fields)": lambda: checks.agree(comm, "bench", lambda: (fields, {})),
        "kv_sharded_attention, whole call": lambda: seqpar.kv_sharded_attention(q, k, v),
    }
    times = {name: [] for name in calls}
    for i in range(iters + 20):
        names = list(calls) if i % 2 else list(calls)[::-1]
        for name in names:
            dist.barrier()
            t0 = time.perf_counter()
            calls[name]()
            if i >= 20:
                times[name].append(time.perf_counter() - t0)
    return {n: statistics.median(t) * 1e6 for n, t in times.items()}


def exchange_cost(iters: int = 1000) -> None:
    from dist_pool import Pool

    pool = Pool(2)
    per_rank = pool.run(_exchange_worker, iters, timeout=900)
    pool.close()
    print("\ngloo, W=2, 1 thread/rank, interleaved after a barrier: median us per call (slowest rank)")
    for name in per_rank[0]:
        print(f"  {name:>36}: {max(r[name] for r in per_rank):8.1f} us")


def fingerprint_cost() -> None:
    from seqpar import checks

    torch.set_num_threads(1)
    print("\nfingerprint of q (1 thread): median of 20")
    for shape in ((1, 32, 1, 128), (1, 32, 64, 128), (1, 32, 4096, 128), (1, 8, 16384, 64)):
        for dtype in (torch.float32, torch.bfloat16):
            q = torch.randn(shape).to(dtype)
            f, s = [], []
            for _ in range(20):
                t0 = time.perf_counter()
                checks.fingerprint(q)
                f.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                q.sum()
                s.append(time.perf_counter() - t0)
            print(f"  q {str(shape):>20} {str(dtype):>15}: fingerprint {statistics.median(f) * 1e6:9.1f} us   "
                  f"(q.sum() {statistics.median(s) * 1e6:8.1f} us)")


def mpi_cost(iters: int = 400) -> None:
    from mpi4py import MPI

    from seqpar.comm import get_communicator

    world = MPI.COMM_WORLD
    comm = get_communicator(world)
    for label, n in SIZES.items():
        it = iters if n < 1000 else max(5, iters // 100)
        t = torch.ones(n)
        times = {"plain": [], "bounded": []}
        for i in range(it + 5):
            for mode in ("plain", "bounded") if i % 2 else ("bounded", "plain"):
                world.Barrier()
                t0 = time.perf_counter()
                if mode == "plain":
                    world.Allreduce(MPI.IN_PLACE, t.numpy(), op=MPI.SUM)
                else:
                    comm._all_reduce(t, "sum")
                if i >= 5:
                    times[mode].append(time.perf_counter() - t0)
        med = {m: statistics.median(v) * 1e6 for m, v in times.items()}
        worst = {m: world.allreduce(v, op=MPI.MAX) for m, v in med.items()}
        if world.Get_rank() == 0:
            print(f"  mpi4py all_reduce {label:>18}: Allreduce {worst['plain']:10.1f} us   Iallreduce + Test loop "
                  f"{worst['bounded']:10.1f} us   diff {worst['bounded'] - worst['plain']:+9.1f} us")


if __name__ == "__main__":
    args = set(sys.argv[1:]) or {"--wait", "--fingerprint", "--exchange"}
    if "--mpi" in args:
        mpi_cost()
        sys.exit(0)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()}")
    if "--wait" in args:
        wait_cost()
    if "--fingerprint" in args:
        fingerprint_cost()
    if "--exchange" in args:
        exchange_cost()
