"""The main job, ``seqpar run``: every strategy checked, timed and measured against a single-process baseline.

    seqpar run                                   # built-in default: 2 spawned CPU ranks over gloo, S = 16384
    seqpar run configs/gpu.toml --out gpu-out    # a config; flags override its values
    launch/torchrun.sh configs/multinode.toml    # under torchrun / mpirun it joins the job instead of spawning

For every strategy in the config:

1. float64 check: at ``check.seq_len`` (small), forward and dq/dk/dv against the naive float64
   formula (:mod:`seqpar.ops.reference`), on every rank's shard;
2. timing at ``attention.seq_len``: fwd and fwd+bwd (:func:`seqpar_tools.timing.timed`: median over
   ``measure.repeats`` of the slowest rank's wall time); bytes sent per rank (``Communicator.bytes_sent``
   over one call) next to the analytic figure (:func:`seqpar.plan.bytes_sent`); peak memory per rank
   (:class:`seqpar_tools.memory.PeakMemory`);
3. long check: the output and gradients, gathered on rank 0, against single-process SDPA on the full
   sequence (:func:`seqpar_tools.references.sdpa_reference`, float32 or wider), which is also the time
   and memory baseline (same dtype, the same cores, timed the same way).

Before any work: the world size is resolved (under a launcher the launcher's, unless the user set one),
the device is checked, the output directory is created and written to, and the memory per rank is
estimated from the shapes (:func:`seqpar_tools.memory.estimate_run`); any problem is a
:class:`~seqpar_tools.config.ConfigError` (exit 2). Results: a table, ``<out>/report.json``,
``<out>/report.png``; exit 1 when a check fails or a rank fails (the report then holds what was measured
and names the failed rank).
"""

from __future__ import annotations

import copy
import os
import platform
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from seqpar_tools.config import Config, ConfigError, resolve_world_size
from seqpar_tools.references import TOLERANCE, Case, exact_case, rel_err, sdpa_reference
from seqpar_tools.runner import RankContext, RankError, join, launched_rank, local_world_size, spawn
from seqpar_tools.terminal import Terminal, make_console
from seqpar_tools.timing import timed


@contextmanager
def _threads(n: int):
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def run_rank(ctx: RankContext, cfg: Config) -> dict[str, Any]:
    """Everything ``seqpar run`` does on one rank; rank 0 returns ``{"rows", "meta"}`` (and emits it as
    ``("partial", ...)`` after every step, so that a failed job still reports what it measured)."""
    import torch

    import seqpar
    from seqpar.comm import get_communicator
    from seqpar.layout import shard_sizes
    from seqpar.ops.kernels import kernel_name
    from seqpar.plan import bytes_sent
    from seqpar.strategies.ulysses_ring import inner_size
    from seqpar_tools.memory import PeakMemory

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
    e = torch.empty((), dtype=dtype).element_size()
    for row in rows:
        ana = bytes_sent(row["strategy"], batch=a.batch, heads=a.heads, kv_heads=a.kv_heads, seq_len=a.seq_len,
                         head_dim=a.head_dim, world_size=ctx.world_size, element_size=e, layout=a.layout,
                         inner=inner_size(ctx.world_size) if row["strategy"] == "ulysses_ring" else None)
        row["analytic_bytes_fwd"], row["analytic_bytes_fwd_bwd"] = ana["fwd"], ana["fwd_bwd"]
    meta: dict[str, Any] = {
        "config": cfg.to_dict(), "config_source": cfg.source, "overrides": cfg.overrides,
        "world_size": ctx.world_size, "device": str(ctx.device), "tolerance": {"float64": tol64, a.dtype: tol},
    }
    result = {"rows": rows, "meta": meta}

    def report_progress() -> None:
        if ctx.rank == 0:  # a copy: the queue pickles it later, while this rank goes on filling ``result``
            ctx.emit("partial", copy.deepcopy(result))

    for row in rows:  # 1. float64 against the naive formula
        case = Case(row["strategy"], a.layout, a.is_causal, "float64", c.seq_len, a.batch, a.heads, a.kv_heads,
                    a.head_dim, a.window_size, seed=cfg.run.seed)
        r = exact_case(ctx, case)
        row["err_float64"], row["ok"] = r["err"], r["err"] <= tol64
        ctx.log(f"float64 check S={c.seq_len} {row['strategy']}: max rel err {r['err']:.1e} (tol {tol64:.0e})")
        ctx.advance(f"float64 check: {row['strategy']}")
        report_progress()

    # 2. this rank's shard of the long inputs (the global tensors are whatever the shards make)
    g = torch.Generator().manual_seed(cfg.run.seed * 1000 + ctx.rank)
    s_local = shard_sizes(a.seq_len, ctx.world_size, a.layout)[ctx.rank]
    ql, kl, vl, gl = (torch.randn(a.batch, hh, s_local, a.head_dim, generator=g).to(ctx.device, dtype)
                      for hh in (a.heads, a.kv_heads, a.kv_heads, a.heads))
    meta["kernel"] = kernel_name(ql)
    opts = dict(group=ctx.group, is_causal=a.is_causal, layout=a.layout, window_size=a.window_size)
    mem = PeakMemory(ctx.device)
    meta["memory"] = mem.method
    ref = None
    ref_threads = min(os.cpu_count() or 1, ctx.local_world_size * max(1, cfg.run.threads_per_rank))
    if c.long:  # the single-process baseline and reference, once, on rank 0 (with this node's cores)
        full = [seqpar.unshard(t, layout=a.layout, seq_len=a.seq_len, group=ctx.group) for t in (ql, kl, vl, gl)]
        if ctx.rank == 0:
            wide = torch.float64 if a.dtype == "float64" else torch.float32
            with _threads(ref_threads):
                ref, stats = sdpa_reference(*full, is_causal=a.is_causal, window_size=a.window_size,
                                            backward=m.backward, warmup=m.warmup, repeats=m.repeats)
                if dtype != wide:  # the check's reference: float32 or wider
                    ref, _ = sdpa_reference(*(t.to(wide) for t in full), is_causal=a.is_causal,
                                            window_size=a.window_size, backward=m.backward)
            if not c.grads:
                ref = ref[:1]
            meta["reference"] = {"impl": "torch SDPA, 1 process, full sequence", "dtype": a.dtype,
                                 "threads": ref_threads, **stats}
            secs = ", ".join(f"{k[:-2].replace('_', '+')} {v:.2f} s" for k, v in stats.items() if k.endswith("_s"))
            ctx.log(f"single-process SDPA baseline on S={a.seq_len} ({ref_threads} threads): {secs}")
            report_progress()
        del full
        ctx.advance("single-process baseline")

    base = meta.get("reference", {})
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

        row["fwd_s"], row["bytes_per_rank_fwd"], got = timed(
            fwd, comm, ctx.device, m.warmup, m.repeats, mem=None if m.backward else mem)
        ctx.log(f"{name}: fwd {row['fwd_s']:.3f} s, {row['bytes_per_rank_fwd'] / 1e6:.1f} MB sent per rank")
        ctx.advance(f"{name}: fwd")
        if m.backward:  # the peak of fwd+bwd (warm calls), not holding the forward's result
            got = None
            row["fwd_bwd_s"], row["bytes_per_rank_fwd_bwd"], got = timed(
                fwd_bwd, comm, ctx.device, m.warmup, m.repeats, mem=mem)
            ctx.log(f"{name}: fwd+bwd {row['fwd_bwd_s']:.3f} s, "
                    f"{row['bytes_per_rank_fwd_bwd'] / 1e6:.1f} MB sent per rank")
            ctx.advance(f"{name}: fwd+bwd")
        report_progress()
        for key in ("fwd", "fwd_bwd"):
            if f"{key}_s" in row and base.get(f"{key}_s"):
                row[f"{key}_ratio"] = row[f"{key}_s"] / base[f"{key}_s"]
        peak = mem.peak()
        peaks = comm.all_gather(torch.tensor([peak, peak - mem.base], dtype=torch.int64, device=ctx.device))
        row["peak_mem_bytes_per_rank"] = peaks[:, 0].tolist()
        row["peak_mem_added_bytes_per_rank"] = peaks[:, 1].tolist()
        row["peak_mem_bytes"] = max(row["peak_mem_bytes_per_rank"])
        row["peak_mem_added_bytes"] = max(row["peak_mem_added_bytes_per_rank"])
        report_progress()
        if c.long:  # 3. gathered on rank 0 against the single-process reference
            got = [seqpar.unshard(t, layout=a.layout, seq_len=a.seq_len, group=ctx.group) for t in got]
            if ctx.rank == 0:
                names = ("out", "dq", "dk", "dv")
                parts = {nm: e / max(r, 1e-300) for nm, (e, r) in zip(names, (rel_err(x, y) for x, y in zip(got, ref)))}
                row["err_long"], row["err_long_parts"] = max(parts.values()), parts
                row["ok"] = row["ok"] and row["err_long"] <= tol
                ctx.log(f"{name}: S={a.seq_len} vs single-process SDPA ({', '.join(parts)}): "
                        f"max rel err {row['err_long']:.1e} (tol {tol:.0e})")
                report_progress()
            del got
    return result


def resolve_device(r, origin) -> tuple[str, str]:
    """``(device, backend)`` from a run section (``auto`` resolved); a CUDA request on a machine without CUDA
    is a ConfigError naming the key and ``origin(key)``, where its value came from."""
    import torch

    cuda = torch.cuda.is_available()
    for key, val, bad in (("run.device", r.device, "cuda"), ("run.backend", r.backend, "nccl")):
        if val == bad and not cuda:
            raise ConfigError(f"{origin(key)}: {key} = {val!r}: needs CUDA, and torch.cuda.is_available() is "
                              f"False here (torch {torch.__version__}); use {key} = "
                              f"{'cpu' if key == 'run.device' else 'gloo'!r} or 'auto'")
    device = r.device if r.device != "auto" else ("cuda" if cuda else "cpu")
    backend = r.backend if r.backend != "auto" else ("nccl" if device == "cuda" else "gloo")
    if backend == "nccl" and device == "cpu":
        raise ConfigError(f"{origin('run.backend')}: run.backend = 'nccl' moves CUDA tensors only, but "
                          f"run.device resolves to 'cpu'")
    return device, backend


def check_writable(out: Path, what: str) -> None:
    """Create ``out`` and write a probe file there, or raise a ConfigError naming ``what`` and the reason."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".seqpar-probe-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"{what} = {str(out)!r}: cannot write there ({e.strerror or e})") from None


def prepare(cfg: Config) -> dict[str, Any]:
    """Every check that needs no rank, before any work: ``{"device", "backend", "world_size", "launcher"}``."""
    import torch

    from seqpar.distributed import launcher, launcher_world_size
    from seqpar_tools.memory import check_fits, estimate_run

    kind = launcher()
    device, backend = resolve_device(cfg.run, cfg.origin)
    if kind is None and cfg.run.group == "mpi":
        raise ConfigError(f"{cfg.origin('run.group')}: run.group = 'mpi' uses mpi4py's COMM_WORLD: start under "
                          "mpiexec (launch/mpirun.sh)")
    spawn_default = (torch.cuda.device_count() if device == "cuda" else 2) or 1
    world = resolve_world_size(cfg, launcher_world_size(), kind, spawn_default)
    if kind is None and device == "cuda" and world > torch.cuda.device_count():
        raise ConfigError(f"{cfg.origin('run.world_size')}: run.world_size = {world}: one GPU per spawned rank, "
                          f"and this machine has {torch.cuda.device_count()}")
    rank0 = kind is None or launched_rank() == 0
    if rank0:
        check_writable(cfg.out_dir, f"{cfg.origin('run.out') if cfg.run.out else 'default'}: run.out")
    here = world if kind is None else local_world_size(world)
    problem = check_fits(estimate_run(cfg, world), device, here, f"attention.seq_len = {cfg.attention.seq_len}")
    if problem:
        raise ConfigError(f"{cfg.origin('attention.seq_len')}: {problem}")
    return {"device": device, "backend": backend, "world_size": world, "launcher": kind, "rank0": rank0}


def execute(fn, args: tuple, *, run_cfg, plan: dict[str, Any], log_all_ranks: bool, show_progress: bool,
            console=None, on_start=None, terminal: Terminal | None = None) -> tuple[Any, dict[str, Any]]:
    """Run ``fn`` on every rank: join the launcher's job, or spawn the local ranks ``plan`` names.
    Returns ``(rank 0's result or None, {"launcher", "world_size"})``."""
    term = terminal or Terminal(console=console, show_progress=show_progress and plan["rank0"],
                                prefix_ranks=log_all_ranks)
    with term:
        if plan["launcher"] is not None:
            result = join(fn, args, backend=plan["backend"], group=run_cfg.group, threads=run_cfg.threads_per_rank,
                          timeout_s=run_cfg.timeout_s, on_event=term.on_event, log_all_ranks=log_all_ranks)
            return result, {"launcher": plan["launcher"], "world_size": plan["world_size"]}
        result = spawn(fn, args, world_size=plan["world_size"], backend=plan["backend"], device_type=plan["device"],
                       threads=run_cfg.threads_per_rank, timeout_s=run_cfg.timeout_s, on_event=term.on_event,
                       log_all_ranks=log_all_ranks, on_start=on_start)
    return result, {"launcher": "spawned by seqpar", "world_size": plan["world_size"]}


def run_job(cfg: Config, *, log_all_ranks: bool = False, show_progress: bool = True, console=None) -> int:
    """``seqpar run``: exit code 0 when every check passed, 1 otherwise (report written either way)."""
    from seqpar_tools.info import versions
    from seqpar_tools.report import write_report

    console = console or make_console()
    plan = prepare(cfg)
    t0 = time.perf_counter()
    term = Terminal(console=console, show_progress=show_progress and plan["rank0"], prefix_ranks=log_all_ranks)
    failure = None
    try:
        result, how = execute(run_rank, (cfg,), run_cfg=cfg.run, plan=plan, log_all_ranks=log_all_ranks,
                              show_progress=show_progress, console=console, terminal=term)
    except RankError as e:
        failure = e
        result = term.partial
        how = {"launcher": plan["launcher"] or "spawned by seqpar", "world_size": plan["world_size"]}
        if not plan["rank0"]:
            raise
        if result is None:
            result = {"rows": [], "meta": {"config": cfg.to_dict(), "config_source": cfg.source}}
    if result is None:  # not rank 0 of a launched job
        return 0
    meta = {**result["meta"], **how, "wall_s": round(time.perf_counter() - t0, 2), **versions(),
            "host": platform.node(), "cpus": os.cpu_count()}
    title = f"seqpar run: {cfg.describe()}"
    if failure is not None:
        meta["error"] = {"ranks": list(failure.errors), "message": str(failure)}  # the cause first
        title += " (FAILED: partial)"
    paths = write_report(result["rows"], cfg.out_dir, title=title, meta=meta, console=console)
    ref = meta.get("reference")
    if ref:
        secs = ", ".join(f"{k[:-2].replace('_', '+')} {v:.2f} s" for k, v in ref.items() if k.endswith("_s"))
        console.print(f"single-process SDPA baseline ({ref['threads']} threads, {ref['dtype']}): {secs}")
    console.print(f"wrote {', '.join(str(p) for p in paths.values())}")
    if failure is not None:
        raise failure
    bad = [r["strategy"] for r in result["rows"] if not r["ok"]]
    if bad:
        console.print(f"[bold red]check failed[/] for {', '.join(bad)} (see err columns; tolerances in report.json)")
        return 1
    console.print(f"[green]all {len(result['rows'])} strategies match the references[/] "
                  f"(wall time {meta['wall_s']:.1f} s)")
    return 0
