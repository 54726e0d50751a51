"""The ``seqpar`` command (``python -m seqpar_tools`` is the same).

    seqpar run [CONFIG] [flags]   the main job: every strategy checked, timed, measured; report in --out
    seqpar verify [flags]         exactness only, for your shapes / dtypes / world size; exit 1 on mismatch
    seqpar bench [args]           the benchmark (``seqpar bench --help``)
    seqpar info [--json]          versions, backends, kernels on this machine
    seqpar serve [CONFIG] [flags] the attention service: ranks holding sharded KV caches answer (HTTP, ZeroMQ)
    seqpar --version

``run`` and ``verify`` spawn their ranks (gloo over 127.0.0.1) unless started by torchrun or
mpiexec, in which case they join that job (``launch/torchrun.sh``, ``launch/mpirun.sh``). Only rank
0 logs unless ``--log-all-ranks``; a failing rank's traceback is printed with the rank named, and the
exit code is non-zero. Every argument is checked before any rank starts. Exit codes: 0 ok, 1 a check
failed or a rank failed, 2 bad arguments/config (``seqpar: error: ...`` naming the key or flag and value).

torch is imported only once a command runs: ``seqpar --help`` and ``--version`` stay fast.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from seqpar_tools.config import ConfigError, load_config, parse_override
from seqpar_tools.names import DTYPES, LAYOUTS, STRATEGIES, version
from seqpar_tools.runner import RankError

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
    p.add_argument("--version", action="version", version=f"seqpar {version()}")
    sub = p.add_subparsers(dest="command", metavar="{run,verify,bench,info,serve}", required=True)

    r = sub.add_parser("run", help="the main job (default config: 2 CPU ranks, S=16384, every strategy)",
                       description="Check, time and measure every strategy; write report.json and report.png.")
    r.add_argument("config", nargs="?", help="a TOML config (default: the built-in one = configs/default.toml)")
    g = r.add_argument_group("overrides (each flag sets one config key)")
    g.add_argument("--world-size", type=int,
                   help="run.world_size (default: the launcher's under torchrun/mpirun, else 2 CPU ranks or every GPU)")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"])
    g.add_argument("--backend", choices=["auto", "gloo", "nccl"])
    g.add_argument("--group", choices=["torch", "mpi"])
    g.add_argument("--threads", type=int, help="run.threads_per_rank")
    g.add_argument("--timeout", type=float, help="run.timeout_s")
    g.add_argument("--out", help="run.out: output directory (default seqpar-out/<config name>)")
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

    sub.add_parser("bench", help="the benchmark: each strategy against single-process SDPA (seqpar bench --help)",
                   add_help=False)
    i = sub.add_parser("info", help="versions, backends and kernels on this machine")
    i.add_argument("--json", action="store_true", help="print JSON")

    s = sub.add_parser("serve", help="the attention service (README: The attention service)",
                       description="Start the ranks (or join torchrun/mpirun) and serve attention over HTTP and a "
                                   "ZeroMQ tensor door; prints one 'ready on http://HOST:PORT' line; SIGTERM/Ctrl-C "
                                   "drain and exit 0.")
    s.add_argument("config", nargs="?", help="a TOML config with a [serve] table (default: configs/default.toml's)")
    s.add_argument("--host", help="serve.host (not loopback: a token is required)")
    s.add_argument("--port", type=int, help="serve.port (0 = a free port)")
    s.add_argument("--token", help="required on every request (Authorization: Bearer); default $SEQPAR_SERVE_TOKEN")
    s.add_argument("--world-size", type=int, help="run.world_size (spawned ranks; default 2)")
    s.add_argument("--timeout", type=float, help="serve.timeout_s")
    s.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="any config key, e.g. --set serve.batch_window_ms=2 (repeatable)")
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
        if args.command == "serve":
            return _serve(args)
        return _info(args)
    except ConfigError as e:
        print("\n".join(f"seqpar: error: {line}" for line in str(e).splitlines()), file=sys.stderr)
        return 2
    except RankError as e:
        print(f"seqpar {args.command}: {e}", file=sys.stderr)
        return 1


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


def _serve(args: argparse.Namespace) -> int:
    import os

    from seqpar_tools.serve.command import TOKEN_ENV, serve_command

    overrides: dict[str, Any] = {}
    for dest, key in (("host", "serve.host"), ("port", "serve.port"), ("world_size", "run.world_size"),
                      ("timeout", "serve.timeout_s")):
        if getattr(args, dest) is not None:
            overrides[key] = getattr(args, dest)
    for item in args.set:
        key, val = parse_override(item)
        overrides[key] = val
    cfg = load_config(args.config, overrides)
    return serve_command(cfg, args.token or os.environ.get(TOKEN_ENV) or None)


def _verify(args: argparse.Namespace) -> int:
    from seqpar_tools.verify import verify_command

    return verify_command(args)


def _info(args: argparse.Namespace) -> int:
    from seqpar_tools.info import print_info

    return print_info(args.json)


if __name__ == "__main__":
    raise SystemExit(main())
