"""A pool of gloo ranks shared by many test cases (process-group start-up is paid once per world size).

``pool.run(fn, *args)`` runs the module-level function ``fn(rank, world_size, *args)`` on every rank
and returns the per-rank results; an exception on any rank fails the call with the rank named, and
a rank that does not answer within ``timeout`` seconds fails it too (the pool is then torn down).
"""

from __future__ import annotations

import datetime
import os
import pickle
import sys
import traceback

import torch.multiprocessing as mp

from seqpar.distributed import free_port

RANK_TIMEOUT_S = float(os.environ.get("SEQPAR_TEST_TIMEOUT", "120"))


def _worker(rank, world_size, port, tasks, results, path):
    sys.path[:0] = [p for p in path if p not in sys.path]
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
        timeout=datetime.timedelta(seconds=RANK_TIMEOUT_S),
    )
    while True:
        task = tasks.get()
        if task is None:
            break
        fn, args, kwargs = task
        try:
            value = fn(rank, world_size, *args, **kwargs)
            pickle.dumps(value)  # an unpicklable result would be lost silently in the queue's thread
            results.put((rank, True, value))
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            results.put((rank, False, f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    dist.destroy_process_group()


class RankError(AssertionError):
    def __init__(self, errors: dict[int, str]):
        self.errors = errors
        super().__init__("\n".join(f"[rank {r}] {msg}" for r, msg in sorted(errors.items())))


class Pool:
    def __init__(self, world_size: int):
        ctx = mp.get_context("spawn")
        self.world_size = world_size
        self.tasks = [ctx.Queue() for _ in range(world_size)]
        self.results = ctx.Queue()
        port = free_port()
        self.procs = [
            ctx.Process(target=_worker, args=(r, world_size, port, self.tasks[r], self.results, sys.path), daemon=True)
            for r in range(world_size)
        ]
        for p in self.procs:
            p.start()
        self.broken = False

    def run(self, fn, *args, timeout: float = RANK_TIMEOUT_S, **kwargs) -> list:
        if self.broken:
            raise RuntimeError("pool is broken by an earlier timeout")
        for q in self.tasks:
            q.put((fn, args, kwargs))
        out, errors = {}, {}
        for _ in range(self.world_size):
            try:
                rank, ok, val = self.results.get(timeout=timeout)
            except Exception:
                self.broken = True
                self.close(force=True)
                raise TimeoutError(f"{fn.__name__}: a rank did not answer within {timeout} s (hang?)") from None
            (out if ok else errors)[rank] = val
        if errors:
            raise RankError(errors)
        return [out[r] for r in range(self.world_size)]

    def close(self, force: bool = False) -> None:
        if not force:
            for q in self.tasks:
                q.put(None)
            for p in self.procs:
                p.join(timeout=10)
        for p in self.procs:
            if p.is_alive():
                p.kill()
