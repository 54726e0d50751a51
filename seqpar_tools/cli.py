"""The ``seqpar`` command.

    seqpar run [CONFIG] [flags]   the main job: every strategy checked, timed, measured; report in --out
    seqpar verify [flags]         exactness only, for your shapes / dtypes / world size; exit 1 on mismatch
    seqpar bench [args]           the benchmark (seqpar_tools.bench; ``seqpar bench --help``)
    seqpar info [--json]          versions, backends, kernels on this machine

``run`` and ``verify`` spawn their ranks (gloo over 127.0.0.1) unless started by torchrun or
mpiexec, in which case they join that job (``launch/torchrun.sh``, ``launch/mpirun.sh``). Only rank
0 logs unless ``--log-all-ranks``; a failing rank's traceback is printed with the rank named, and the
exit code is non-zero. Exit codes: 0 ok, 1 a check failed or a rank failed, 2 bad arguments/config.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from seqpar_tools.config import DTYPES, ConfigError, load_config, parse_override
from seqpar.layout import LAYOUTS
from seqpar.plan import STRATEGIES
from seqpar_tools.report import make_console

# run flags -> config keys (flag dest, key)
_RUN_FLAGS = {
    "world_size": "run.world_size", "device": "run.device", "backend": "run.backend", "group": "run.group",
    "threads": "run.threads_per_rank", "timeout": "run.timeout_s", "out": "run.out", "seed": "run.seed",
    "batch": "attention.batch", "heads": "attention.heads", "kv_heads": "attention.kv_heads",
    "head_dim": "attention.head_dim", "seq_len": "attention.seq_len", "dtype": "attention.dtype",
    "causal": "attention.is_causal", "layout": "attention.layout", "window": "attention.window_size",
    "strategies": "attention.strategies", "warmup": "measure.warmup", "repeats": "measure.repeats",
    "backward": "measure.backward", "check_seq_len": "check.seq_len", "long_check": "check.long",
    "rtol": "check.rtol",
}


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-all-ranks", action="store_true", help="log from every rank, not only rank 0")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="seqpar", description="Exact sequence-parallel attention: jobs and checks.")
    sub = p.add_subparsers(dest="command", metavar="{run,verify,bench,info}", required=True)

    r = sub.add_parser("run", help="the main job (default config: 2 CPU ranks, S=16384, every strategy)",
                       description="Check, time and measure every strategy; write report.json and report.png.")
    r.add_argument("config", nargs="?", help="a TOML config (default: the built-in one = configs/default.toml)")
    g = r.add_argument_group("overrides (each flag sets one config key)")
    g.add_argument("--world-size", type=int, help="run.world_size (0: the launcher's)")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"])
    g.add_argument("--backend", choices=["auto", "gloo", "nccl"])
    g.add_argument("--group", choices=["torch", "mpi"])
    g.add_argument("--threads", type=int, help="run.threads_per_rank")
    g.add_argument("--timeout", type=float, help="run.timeout_s")
    g.add_argument("--out", help="run.out: output directory (default seqpar-out)")
    g.add_argument("--seed", type=int)
    g.add_argument("--batch", type=int)
    g.add_argument("--heads", type=int)
    g.add_argument("--kv-heads", type=int)
    g.add_argument("--head-dim", type=int)
    g.add_argument("--seq-len", type=int)
    g.add_argument("--dtype", choices=DTYPES)
    g.add_argument("--causal", action=argparse.BooleanOptionalAction)
    g.add_argument("--layout", choices=LAYOUTS)
    g.add_argument("--window", type=int, help="attention.window_size")
    g.add_argument("--strategies", nargs="+", choices=STRATEGIES)
    g.add_argument("--warmup", type=int)
    g.add_argument("--repeats", type=int)
    g.add_argument("--backward", action=argparse.BooleanOptionalAction, help="measure.backward")
    g.add_argument("--check-seq-len", type=int, help="check.seq_len (float64 check)")
    g.add_argument("--long-check", action=argparse.BooleanOptionalAction, help="check.long")
    g.add_argument("--rtol", type=float, help="check.rtol")
    g.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="any config key, e.g. --set measure.repeats=5 (repeatable)")
    _common(r)

    v = sub.add_parser("verify", help="exactness only, against the float64 reference; exit 1 on mismatch",
                       description="Forward and dq/dk/dv of seqpar.attention against the naive float64 formula "
                                   "for every combination of the given options.")
    v.add_argument("--world-size", type=int, default=None,
                   help="ranks to spawn (default 2; under a launcher: the launcher's, and must match it if given)")
    v.add_argument("--seq-lens", type=int, nargs="+", default=[509])
    v.add_argument("--dtypes", nargs="+", choices=DTYPES, default=["float64", "float32"])
    v.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=list(LAYOUTS))
    v.add_argument("--causal", choices=["yes", "no", "both"], default="both")
    v.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    v.add_argument("--batch", type=int, default=1)
    v.add_argument("--heads", type=int, default=4)
    v.add_argument("--kv-heads", type=int, default=2)
    v.add_argument("--head-dim", type=int, default=16)
    v.add_argument("--window", type=int, default=None, help="sliding window size")
    v.add_argument("--documents", type=int, default=0, help="pack this many documents (document_ids)")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--rtol", type=float, default=None, help="one tolerance for all dtypes (default: per dtype)")
    v.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu")
    v.add_argument("--group", choices=["torch", "mpi"], default="torch",
                   help="mpi: mpi4py's COMM_WORLD (under mpiexec) instead of the torch group")
    v.add_argument("--timeout", type=float, default=300.0)
    v.add_argument("--json", dest="json_out", metavar="PATH", help="also write the results as JSON")
    _common(v)

    sub.add_parser("bench", help="the benchmark (seqpar_tools.bench); arguments pass through", add_help=False)
    i = sub.add_parser("info", help="versions, backends and kernels on this machine")
    i.add_argument("--json", action="store_true", help="print JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":  # everything after it belongs to the benchmark's own parser
        import importlib

        return importlib.import_module("seqpar_tools.bench").main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            return _run(args)
        if args.command == "verify":
            return _verify(args)
        return _info(args)
    except ConfigError as e:
        print(f"seqpar: error: {e}", file=sys.stderr)
        return 2
    except _rank_error() as e:
        print(f"seqpar {args.command}: {e}", file=sys.stderr)
        return 1


def _rank_error():
    from seqpar_tools.runner import RankError

    return RankError


def _run(args: argparse.Namespace) -> int:
    from seqpar_tools.run import run_job

    overrides: dict[str, Any] = {}
    for dest, key in _RUN_FLAGS.items():
        val = getattr(args, dest)
        if val is not None:
            overrides[key] = val
    for item in args.set:
        key, val = parse_override(item)
        overrides[key] = val
    cfg = load_config(args.config, overrides)
    return run_job(cfg, log_all_ranks=args.log_all_ranks, show_progress=args.progress)


def _verify(args: argparse.Namespace) -> int:
    from rich.table import Table

    from seqpar_tools.config import RunSection
    from seqpar.distributed import launcher, launcher_world_size
    from seqpar_tools.run import TOLERANCE, execute, verify_cases, verify_rank

    if args.heads % args.kv_heads:
        raise ConfigError(f"command line: --heads {args.heads} must be a multiple of --kv-heads {args.kv_heads}")
    launched = launcher_world_size()
    if launched is not None and args.world_size not in (None, 0, launched):
        raise ConfigError(f"command line: --world-size {args.world_size}, but {launcher()} started {launched} ranks")
    w = launched or args.world_size or 2
    if min(args.seq_lens) < 2 * w:
        raise ConfigError(f"command line: --seq-lens {min(args.seq_lens)} must be >= 2 * world size = {2 * w}")
    tolerance = {d: args.rtol for d in DTYPES} if args.rtol else dict(TOLERANCE)
    cases = verify_cases(
        seq_lens=args.seq_lens, dtypes=args.dtypes, layouts=args.layouts,
        causal={"yes": [True], "no": [False], "both": [False, True]}[args.causal], strategies=args.strategies,
        batch=args.batch, heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim,
        window_size=args.window, documents=args.documents, seed=args.seed,
    )
    run_cfg = RunSection(world_size=w, device=args.device, group=args.group, timeout_s=args.timeout)
    console = make_console()
    rows, how = execute(verify_rank, (cases, tolerance), run_cfg=run_cfg, world_size=w,
                        log_all_ranks=args.log_all_ranks, show_progress=args.progress, console=console)
    if rows is None:  # not rank 0
        return 0
    table = Table(title=f"seqpar verify: {how['world_size']} ranks ({how['launcher']}), max |a-b| / max |ref| "
                        "over out, dq, dk, dv vs float64 reference")
    for col in ("strategy", "layout", "causal", "dtype", "S", "err", "tol", "ok"):
        table.add_column(col, justify="left" if col in ("strategy", "layout", "dtype") else "right")
    for r in rows:
        table.add_row(r["strategy"], r["layout"], "yes" if r["is_causal"] else "no", r["dtype"], str(r["seq_len"]),
                      f"{r['err']:.1e}", f"{r['tol']:.0e}", "[green]yes[/]" if r["ok"] else "[bold red]NO[/]")
    console.print(table)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"world_size": how["world_size"], "launcher": how["launcher"], "rows": rows}, f, indent=1)
    bad = sum(not r["ok"] for r in rows)
    if bad:
        console.print(f"[bold red]{bad} of {len(rows)} cases do not match[/]")
        return 1
    console.print(f"[green]all {len(rows)} cases match[/] ({how['world_size']} ranks, {how['launcher']})")
    return 0


def info() -> dict[str, Any]:
    """What ``seqpar info`` reports, as a dict."""
    import importlib.metadata as md
    import os
    import platform
    import shutil

    import torch
    import torch.distributed as dist

    import seqpar
    from seqpar.distributed import launcher
    from seqpar.ops.kernels import kernel_name

    def version(pkg: str) -> str | None:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    mpi_library = None
    if version("mpi4py"):
        try:
            import mpi4py

            if "mpi4py.MPI" not in sys.modules:  # the library version needs no MPI_Init
                mpi4py.rc.initialize = False
                mpi4py.rc.finalize = False
            from mpi4py import MPI

            mpi_library = MPI.Get_library_version().strip().splitlines()[0]
        except Exception as e:  # noqa: BLE001 - a broken MPI install is worth showing, not failing on
            mpi_library = f"unusable: {type(e).__name__}: {e}"
    cuda = torch.cuda.is_available()
    kernels = {"cpu": kernel_name(torch.empty(1, 1, 1, 1))}
    if cuda:
        kernels["cuda"] = kernel_name(torch.empty(1, 1, 1, 1, device="cuda"))
    return {
        "versions": {"seqpar": seqpar.__version__, "torch": torch.__version__, "python": platform.python_version(),
                     "mpi4py": version("mpi4py"), "mpi library": mpi_library,
                     "cuda (torch built with)": torch.version.cuda},
        "backends": {
            "gloo": dist.is_available() and dist.is_gloo_available(),
            "nccl": dist.is_available() and dist.is_nccl_available() and cuda,
            "mpi (torch's own backend)": dist.is_available() and dist.is_mpi_available(),
            "mpi (mpi4py communicator / gloo bootstrap)": bool(mpi_library) and not mpi_library.startswith("unusable"),
            "mpiexec": shutil.which("mpiexec"),
        },
        "kernels": kernels,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch threads": torch.get_num_threads(),
                    "cuda devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
                    if cuda else [], "launcher": launcher() or "none (seqpar run/verify spawn their ranks)"},
    }


def _info(args: argparse.Namespace) -> int:
    data = info()
    if args.json:
        print(json.dumps(data, indent=1))
        return 0
    from rich.table import Table

    table = Table(title="seqpar info", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    table.add_column("")
    for section, values in data.items():
        for i, (k, v) in enumerate(values.items()):
            if isinstance(v, (bool, type(None))):
                shown = {True: "[green]yes[/]", False: "no", None: "-"}[v]
            else:
                shown = ", ".join(v) or "-" if isinstance(v, list) else str(v)
            table.add_row(section if i == 0 else "", k, shown)
        table.add_section()
    make_console().print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
