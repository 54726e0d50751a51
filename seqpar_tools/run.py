"""The main job (``seqpar run``) and the exactness check (``seqpar verify``).

    seqpar run                                   # built-in default: 2 spawned CPU ranks over gloo, S = 16384
    seqpar run configs/gpu.toml --out gpu-out    # a config; flags override its values
    launch/torchrun.sh configs/multinode.toml    # under torchrun / mpirun it joins the job instead of spawning
    seqpar verify --world-size 3 --seq-lens 61 --dtypes float64 float32

``seqpar run`` does, for every strategy in the config:

1. float64 check: at ``check.seq_len`` (small), forward and dq/dk/dv against the naive float64
   formula (:mod:`seqpar.ops.reference`), on every rank's shard;
2. timing at ``attention.seq_len``: fwd and fwd+bwd, median over ``measure.repeats`` of the slowest
   rank's wall time; bytes sent per rank (``Communicator.bytes_sent`` over one call); peak memory
   per rank (CPU: Linux ``VmHWM`` reset per strategy through ``/proc/self/clear_refs``, elsewhere
   ``getrusage`` ``ru_maxrss``, which cannot be reset; CUDA: ``torch.cuda.max_memory_allocated``);
3. long check: the output and gradients, gathered on rank 0, against single-process
   ``torch.nn.functional.scaled_dot_product_attention`` on the full sequence (float32 or wider).

Errors are ``max |a - b| / max |ref|`` over out, dq, dk, dv; the tolerances per dtype are
:data:`TOLERANCE`. Results: a table, ``<out>/report.json``, ``<out>/report.png``; exit code 1 when a
check fails.
"""

from __future__ import annotations

import itertools
import os
import platform
import statistics
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from seqpar_tools.config import Config, check_world_size
from seqpar.distributed import launcher, launcher_world_size
from seqpar_tools.runner import RankContext, join, spawn
from seqpar.layout import shard_sizes
from seqpar_tools.memory import PeakMemory
from seqpar_tools.report import make_console

#: max |a - b| / max |ref| allowed, by the dtype of the inputs (the reference is float64 or float32).
TOLERANCE = {"float64": 1e-10, "float32": 2e-5, "bfloat16": 3e-2, "float16": 4e-3}


# --- shared pieces ------------------------------------------------------------------------------


def _max_over_ranks(comm, device: torch.device, *values: float) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    comm.all_reduce(t, "max")
    return t.tolist()


def _rel_err(mine: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """``(max |a - b|, max |ref|)`` in float64 on the CPU."""
    a, b = mine.detach().double().cpu(), ref.detach().double().cpu()
    return float((a - b).abs().max()) if a.numel() else 0.0, float(b.abs().max()) if b.numel() else 0.0


def _document_ids(batch: int, seq_len: int, documents: int) -> torch.Tensor | None:
    """(B, S) int64: ``documents`` packed documents of (nearly) equal length; None for 0."""
    if documents <= 0:
        return None
    return (torch.arange(seq_len) * documents // seq_len).expand(batch, seq_len).clone()


@dataclass
class Case:
    strategy: str
    layout: str
    is_causal: bool
    dtype: str
    seq_len: int
    batch: int = 1
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 16
    window_size: int | None = None
    documents: int = 0
    seed: int = 0


def exact_case(ctx: RankContext, case: Case) -> dict[str, Any]:
    """One check against the float64 reference, forward and backward. Every rank makes the same full
    inputs from ``case.seed``, runs ``seqpar.attention`` on its shard and compares its shard of the
    output and of dq, dk, dv with the reference's. Returns ``{"err": rel, "parts": {...}}`` (all ranks)."""
    import seqpar
    from seqpar.comm import get_communicator
    from seqpar.ops import reference

    comm = get_communicator(ctx.group)
    b, h, hkv, s, d = case.batch, case.heads, case.kv_heads, case.seq_len, case.head_dim
    dtype = getattr(torch, case.dtype)
    g = torch.Generator().manual_seed(case.seed)
    q, go = (torch.randn(b, h, s, d, generator=g, dtype=torch.float64).to(dtype) for _ in range(2))
    k, v = (torch.randn(b, hkv, s, d, generator=g, dtype=torch.float64).to(dtype) for _ in range(2))
    docs = _document_ids(b, s, case.documents)
    mask = reference.sequence_mask(s, is_causal=case.is_causal, window_size=case.window_size, document_ids=docs)
    qr, kr, vr = (t.double().clone().requires_grad_() for t in (q, k, v))
    ref_out, _, _ = reference.attention(qr, kr, vr, mask=mask)
    ref_out.backward(go.double())

    def local(t: torch.Tensor, dim: int = 2) -> torch.Tensor:
        return seqpar.shard(t, dim=dim, layout=case.layout, group=ctx.group)

    ql, kl, vl = (local(t).to(ctx.device).requires_grad_() for t in (q, k, v))
    out = seqpar.attention(
        ql, kl, vl, group=ctx.group, is_causal=case.is_causal, layout=case.layout, strategy=case.strategy,
        window_size=case.window_size, document_ids=None if docs is None else local(docs, 1).to(ctx.device),
    )
    out.backward(local(go).to(ctx.device))
    pairs = {"out": (out, ref_out), "dq": (ql.grad, qr.grad), "dk": (kl.grad, kr.grad), "dv": (vl.grad, vr.grad)}
    stats = [x for name, (mine, ref) in pairs.items() for x in _rel_err(mine, local(ref))]
    stats = _max_over_ranks(comm, ctx.device, *stats)
    parts = {name: stats[2 * i] / max(stats[2 * i + 1], 1e-300) for i, name in enumerate(pairs)}
    return {"err": max(parts.values()), "parts": parts}


@contextmanager
def _threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


# --- seqpar run: one rank's work -----------------------------------------------------------------


def _timed(fn: Callable[[], Any], comm, device, warmup: int, repeats: int) -> tuple[float, int, Any]:
    """``(median seconds of the slowest rank, bytes this rank sent in the first call, last result)``."""
    times, nbytes, result = [], None, None
    for i in range(warmup + repeats):
        _max_over_ranks(comm, device, 0.0)  # start together
        comm.reset_stats()
        t0 = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        if nbytes is None:
            nbytes = comm.bytes_sent
        if i >= warmup:
            times.append(_max_over_ranks(comm, device, dt)[0])
    return statistics.median(times), int(nbytes or 0), result


def _reference(full: list[torch.Tensor], a, backward: bool) -> tuple[list[torch.Tensor], float]:
    """Single-process SDPA on the full sequence (float32 at least): out (+ dq, dk, dv), seconds."""
    import torch.nn.functional as F

    from seqpar.ops import reference

    wide = torch.float64 if a.dtype == "float64" else torch.float32
    q, k, v, go = (t.to(wide) for t in full)
    g = a.heads // a.kv_heads
    if g > 1:  # GQA spelled out: query head h uses kv head h // g (gradients summed back below)
        k, v = (t.repeat_interleave(g, dim=1) for t in (k, v))
    q, k, v = (t.detach().requires_grad_(backward) for t in (q, k, v))
    mask = None
    if a.window_size is not None:  # an explicit (1, 1, S, S) bool mask: S^2 bytes
        mask = reference.sequence_mask(a.seq_len, is_causal=a.is_causal, window_size=a.window_size).to(q.device)
    t0 = time.perf_counter()
    with torch.set_grad_enabled(backward):
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=a.is_causal and mask is None)
        if backward:
            out.backward(go)
    if q.device.type == "cuda":
        torch.cuda.synchronize(q.device)
    seconds = time.perf_counter() - t0
    grads = []
    if backward:
        grads = [q.grad] + [t.grad.unflatten(1, (a.kv_heads, g)).sum(2) for t in (k, v)]  # (B, H_kv, S, D)
    return [out.detach(), *grads], seconds


def run_rank(ctx: RankContext, cfg: Config) -> dict[str, Any]:
    """Everything ``seqpar run`` does on one rank; rank 0 returns ``{"rows", "meta"}``."""
    import seqpar
    from seqpar.comm import get_communicator
    from seqpar.ops.kernels import kernel_name

    comm = get_communicator(ctx.group)
    a, m, c = cfg.attention, cfg.measure, cfg.check
    dtype = getattr(torch, a.dtype)
    tol = c.rtol if c.rtol is not None else TOLERANCE[a.dtype]
    tol64 = c.rtol if c.rtol is not None else TOLERANCE["float64"]
    n = len(a.strategies)
    ctx.task("seqpar run", n * (2 + m.backward) + (c.long and 1))
    ctx.log(f"{ctx.world_size} ranks on {ctx.device.type}, B={a.batch} H={a.heads} H_kv={a.kv_heads} "
            f"S={a.seq_len} D={a.head_dim} {a.dtype} causal={a.is_causal} layout={a.layout}")
    rows = [{"strategy": s, "seq_len": a.seq_len, "world_size": ctx.world_size, "causal": a.is_causal,
             "layout": a.layout, "dtype": a.dtype} for s in a.strategies]

    for row in rows:  # 1. float64 against the naive formula
        case = Case(row["strategy"], a.layout, a.is_causal, "float64", c.seq_len, a.batch, a.heads, a.kv_heads,
                    a.head_dim, a.window_size, seed=cfg.run.seed)
        r = exact_case(ctx, case)
        row["err_float64"], row["ok"] = r["err"], r["err"] <= tol64
        ctx.log(f"float64 check S={c.seq_len} {row['strategy']}: max rel err {r['err']:.1e} (tol {tol64:.0e})")
        ctx.advance(f"float64 check: {row['strategy']}")

    # 2. this rank's shard of the long inputs (the global tensors are whatever the shards make)
    g = torch.Generator().manual_seed(cfg.run.seed * 1000 + ctx.rank)
    s_local = shard_sizes(a.seq_len, ctx.world_size, a.layout)[ctx.rank]
    ql, kl, vl, gl = (torch.randn(a.batch, hh, s_local, a.head_dim, generator=g).to(ctx.device, dtype)
                      for hh in (a.heads, a.kv_heads, a.kv_heads, a.heads))
    opts = dict(group=ctx.group, is_causal=a.is_causal, layout=a.layout, window_size=a.window_size)
    mem = PeakMemory(ctx.device)
    ref, ref_s = None, None
    ref_threads = min(os.cpu_count() or 1, ctx.local_world_size * max(1, cfg.run.threads_per_rank))
    if c.long:  # the single-process reference, once, on rank 0 (with this node's cores)
        full = [seqpar.unshard(t, layout=a.layout, seq_len=a.seq_len, group=ctx.group) for t in (ql, kl, vl, gl)]
        if ctx.rank == 0:
            with _threads(ref_threads):
                ref, ref_s = _reference(full, a, m.backward and c.grads)
            ctx.log(f"reference: single-process SDPA on S={a.seq_len}, {ref_s:.2f} s")
        del full
        ctx.advance("single-process reference")

    for row in rows:
        name = row["strategy"]

        def fwd(name=name):
            with torch.no_grad():
                return (seqpar.attention(ql, kl, vl, strategy=name, **opts),)

        def fwd_bwd(name=name):
            leaves = [t.detach().requires_grad_() for t in (ql, kl, vl)]
            out = seqpar.attention(*leaves, strategy=name, **opts)
            out.backward(gl)
            return (out.detach(), *(t.grad for t in leaves))

        mem.reset()
        row["fwd_s"], row["bytes_per_rank_fwd"], got = _timed(fwd, comm, ctx.device, m.warmup, m.repeats)
        ctx.log(f"{name}: fwd {row['fwd_s']:.3f} s, {row['bytes_per_rank_fwd'] / 1e6:.1f} MB sent per rank")
        ctx.advance(f"{name}: fwd")
        if m.backward:
            row["fwd_bwd_s"], row["bytes_per_rank_fwd_bwd"], got = _timed(
                fwd_bwd, comm, ctx.device, m.warmup, m.repeats)
            ctx.log(f"{name}: fwd+bwd {row['fwd_bwd_s']:.3f} s, "
                    f"{row['bytes_per_rank_fwd_bwd'] / 1e6:.1f} MB sent per rank")
            ctx.advance(f"{name}: fwd+bwd")
        peak = mem.peak()
        peaks = comm.all_gather(torch.tensor([peak, peak - mem.base], dtype=torch.int64, device=ctx.device))
        row["peak_mem_bytes_per_rank"] = peaks[:, 0].tolist()
        row["peak_mem_bytes"] = max(row["peak_mem_bytes_per_rank"])
        row["peak_mem_added_bytes"] = int(peaks[:, 1].max())
        if c.long:  # 3. gathered on rank 0 against the single-process reference
            got = [seqpar.unshard(t, layout=a.layout, seq_len=a.seq_len, group=ctx.group) for t in got]
            if ctx.rank == 0:
                names = ("out", "dq", "dk", "dv")
                parts = {nm: e / max(r, 1e-300) for nm, (e, r) in
                         zip(names, (_rel_err(x, y) for x, y in zip(got, ref)))}
                row["err_long"], row["err_long_parts"] = max(parts.values()), parts
                row["ok"] = row["ok"] and row["err_long"] <= tol
                ctx.log(f"{name}: S={a.seq_len} vs single-process SDPA ({', '.join(parts)}): "
                        f"max rel err {row['err_long']:.1e} (tol {tol:.0e})")
            del got
    meta = {
        "config": cfg.to_dict(), "config_source": cfg.source, "overrides": cfg.overrides, "world_size": ctx.world_size,
        "device": str(ctx.device), "kernel": kernel_name(ql), "tolerance": {"float64": tol64, a.dtype: tol},
        "memory": mem.method, "reference": None if ref_s is None else {
            "impl": "torch SDPA, 1 process, full sequence", "fwd_bwd_s" if m.backward and c.grads else "fwd_s": ref_s,
            "threads": ref_threads},
    }
    return {"rows": rows, "meta": meta}


# --- seqpar verify: one rank's work ------------------------------------------------------------


def verify_rank(ctx: RankContext, cases: list[Case], tolerance: dict[str, float]) -> list[dict]:
    ctx.task("seqpar verify", len(cases))
    rows = []
    for case in cases:
        r = exact_case(ctx, case)
        tol = tolerance[case.dtype]
        row = {**{k: v for k, v in vars(case).items() if k != "seed"}, "err": r["err"], "tol": tol,
               "ok": r["err"] <= tol, **{f"err_{k}": v for k, v in r["parts"].items()}}
        rows.append(row)
        if not row["ok"]:
            ctx.log(f"MISMATCH {case}: {r['parts']}")
        ctx.advance(f"{case.strategy} {case.layout} causal={case.is_causal} {case.dtype} S={case.seq_len}")
    return rows


def verify_cases(
    *, seq_lens, dtypes, layouts, causal, strategies, batch, heads, kv_heads, head_dim, window_size, documents, seed
) -> list[Case]:
    return [Case(st, lay, cz, dt, s, batch, heads, kv_heads, head_dim, window_size, documents, seed)
            for s, dt, lay, cz, st in itertools.product(seq_lens, dtypes, layouts, causal, strategies)]


# --- the terminal side -----------------------------------------------------------------------------


class Terminal:
    """Renders ranks' events: log lines (rank-prefixed when several ranks log) and a rich progress bar."""

    def __init__(self, *, console=None, show_progress: bool = True, prefix_ranks: bool = False):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = console or make_console()
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=self.console, transient=True,
                                 disable=not show_progress)
        self.prefix_ranks = prefix_ranks
        self.task = None
        self.t0 = time.monotonic()

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()

    def on_event(self, rank: int, kind: str, payload: Any) -> None:
        if kind == "log":
            from rich.markup import escape

            who = f"[rank {rank}] " if self.prefix_ranks else ""
            self.console.print(f"[dim]{time.monotonic() - self.t0:7.1f}s[/] {escape(who + str(payload))}")
        elif kind == "task":
            self.task = self.progress.add_task(payload[0], total=payload[1])
        elif kind == "advance" and self.task is not None:
            self.progress.update(self.task, advance=1, description=payload)


def execute(fn: Callable[..., Any], args: tuple, *, run_cfg, world_size: int, log_all_ranks: bool,
            show_progress: bool, console=None) -> tuple[Any, dict[str, Any]]:
    """Run ``fn`` on every rank: join the launcher's job, or spawn ``world_size`` local ranks.
    Returns ``(rank 0's result or None, {"launcher", "world_size"})``."""
    kind = launcher()
    device_type = run_cfg.device
    if device_type == "auto":
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    backend = run_cfg.backend if run_cfg.backend != "auto" else ("nccl" if device_type == "cuda" else "gloo")
    if kind is None and run_cfg.group == "mpi":
        raise SystemExit("run.group = 'mpi' uses mpi4py's COMM_WORLD: start under mpiexec (launch/mpirun.sh)")
    if kind is not None:
        rank = int(os.environ.get("RANK", os.environ.get("PMI_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", 0))))
        term = Terminal(console=console, show_progress=show_progress and rank == 0, prefix_ranks=log_all_ranks)
        with term:
            result = join(fn, args, backend=backend, group=run_cfg.group, threads=run_cfg.threads_per_rank,
                          timeout_s=run_cfg.timeout_s, on_event=term.on_event, log_all_ranks=log_all_ranks)
        return result, {"launcher": kind, "world_size": launcher_world_size()}
    if device_type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("run.device = 'cuda' but torch.cuda.is_available() is False")
    if world_size == 0:
        world_size = torch.cuda.device_count() if device_type == "cuda" else 2
    term = Terminal(console=console, show_progress=show_progress, prefix_ranks=log_all_ranks)
    with term:
        result = spawn(fn, args, world_size=world_size, backend=backend, device_type=device_type,
                       threads=run_cfg.threads_per_rank, timeout_s=run_cfg.timeout_s, on_event=term.on_event,
                       log_all_ranks=log_all_ranks)
    return result, {"launcher": "spawned by seqpar", "world_size": world_size}


def run_job(cfg: Config, *, log_all_ranks: bool = False, show_progress: bool = True, console=None) -> int:
    """``seqpar run``: exit code 0 when every check passed, 1 otherwise (report written either way)."""
    from seqpar_tools.report import write_report

    console = console or make_console()
    launched = launcher_world_size()
    if launched is not None:
        check_world_size(cfg, launched, launcher() or "the launcher")
    t0 = time.perf_counter()
    result, how = execute(run_rank, (cfg,), run_cfg=cfg.run, world_size=cfg.run.world_size,
                          log_all_ranks=log_all_ranks, show_progress=show_progress, console=console)
    if result is None:  # not rank 0 of a launched job
        return 0
    meta = {**result["meta"], **how, "wall_s": round(time.perf_counter() - t0, 2), **versions(),
            "host": platform.node(), "cpus": os.cpu_count()}
    out = Path(cfg.run.out)
    paths = write_report(result["rows"], out, title=f"seqpar run: {cfg.describe()}", meta=meta, console=console)
    ref = meta.get("reference")
    if ref:
        secs = ", ".join(f"{k} {v:.2f} s" for k, v in ref.items() if k.endswith("_s"))
        console.print(f"single-process reference ({ref['threads']} threads, one call): {secs}")
    console.print(f"wrote {', '.join(str(p) for p in paths.values())}")
    bad = [r["strategy"] for r in result["rows"] if not r["ok"]]
    if bad:
        console.print(f"[bold red]check failed[/] for {', '.join(bad)} (see err columns; tolerances in report.json)")
        return 1
    console.print(f"[green]all {len(result['rows'])} strategies match the references[/] "
                  f"(wall time {meta['wall_s']:.1f} s)")
    return 0


def versions() -> dict[str, str]:
    import seqpar

    return {"seqpar": seqpar.__version__, "torch": torch.__version__, "python": platform.python_version()}
