"""``seqpar verify``: exactness only, for the user's shapes, dtypes, layouts and world size.

Forward and dq/dk/dv of ``seqpar.attention`` against the naive float64 formula, for every combination of the
options; exit 1 on a mismatch. Every size is checked before any rank starts (a case with nothing in it cannot
fail, so it is refused), and so is the memory the float64 reference needs.
"""

from __future__ import annotations

import itertools
import json
import math

from seqpar_tools.config import ConfigError
from seqpar_tools.names import DTYPES
from seqpar_tools.references import TOLERANCE, Case, exact_case


def verify_rank(ctx, cases: list[Case], tolerance: dict[str, float]) -> list[dict]:
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


def validate(args) -> None:
    """Every flag of ``seqpar verify`` that needs no rank: a ConfigError naming the flag and its value."""
    problems = []
    for flag, val, low in (("--batch", args.batch, 1), ("--heads", args.heads, 1), ("--kv-heads", args.kv_heads, 1),
                           ("--head-dim", args.head_dim, 1), ("--documents", args.documents, 0)):
        if val < low:
            problems.append(f"{flag} {val}: must be >= {low}")
    if args.world_size is not None and args.world_size < 0:
        problems.append(f"--world-size {args.world_size}: must be >= 1 (or 0: the launcher's)")
    for s in args.seq_lens:
        if s < 1:
            problems.append(f"--seq-lens {s}: must be >= 1")
    if args.window is not None and args.window < 0:
        problems.append(f"--window {args.window}: must be >= 0")
    if not (math.isfinite(args.timeout) and args.timeout > 0):
        problems.append(f"--timeout {args.timeout}: must be a finite number of seconds > 0")
    if args.rtol is not None and not (math.isfinite(args.rtol) and args.rtol > 0):
        problems.append(f"--rtol {args.rtol}: must be a finite number > 0")
    if args.kv_heads >= 1 and args.heads >= 1 and args.heads % args.kv_heads:
        problems.append(f"--heads {args.heads}: must be a multiple of --kv-heads {args.kv_heads}")
    if problems:
        raise ConfigError("command line: " + "\ncommand line: ".join(problems))


def verify_command(args) -> int:
    """``seqpar verify`` from parsed arguments; exit code 0 (all match), 1 (a mismatch or a failed rank)."""
    from pathlib import Path

    from rich.table import Table

    from seqpar.distributed import launcher, launcher_world_size
    from seqpar_tools.config import RunSection
    from seqpar_tools.memory import check_fits, estimate_verify
    from seqpar_tools.run import check_writable, execute, resolve_device
    from seqpar_tools.runner import launched_rank
    from seqpar_tools.terminal import make_console

    validate(args)
    kind, launched = launcher(), launcher_world_size()
    if launched is not None and args.world_size not in (None, 0, launched):
        raise ConfigError(f"command line: --world-size {args.world_size}, but {kind} started {launched} ranks "
                          "(drop --world-size to take the launcher's)")
    w = launched or args.world_size or 2
    if min(args.seq_lens) < 2 * w:
        raise ConfigError(f"command line: --seq-lens {min(args.seq_lens)} must be >= 2 * world size = {2 * w}")
    if args.json_out:
        check_writable(Path(args.json_out).parent, "--json (its directory)")
    run_cfg = RunSection(world_size=w, device=args.device, group=args.group, timeout_s=args.timeout)
    device, backend = resolve_device(run_cfg, lambda key: "command line (--device)")
    if kind is None and args.group == "mpi":
        raise ConfigError("command line: --group mpi uses mpi4py's COMM_WORLD: start under mpiexec (launch/mpirun.sh)")
    problem = check_fits(estimate_verify(seq_len=max(args.seq_lens), batch=args.batch, heads=args.heads,
                                         kv_heads=args.kv_heads, head_dim=args.head_dim),
                         "cpu", w, f"--seq-lens {max(args.seq_lens)}")
    if problem:
        raise ConfigError(f"command line: {problem}")
    tolerance = {d: args.rtol for d in DTYPES} if args.rtol else dict(TOLERANCE)
    cases = verify_cases(
        seq_lens=args.seq_lens, dtypes=args.dtypes, layouts=args.layouts,
        causal={"yes": [True], "no": [False], "both": [False, True]}[args.causal], strategies=args.strategies,
        batch=args.batch, heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim,
        window_size=args.window, documents=args.documents, seed=args.seed,
    )
    rank0 = kind is None or launched_rank() == 0
    plan = {"device": device, "backend": backend, "world_size": w, "launcher": kind, "rank0": rank0}
    console = make_console()
    rows, how = execute(verify_rank, (cases, tolerance), run_cfg=run_cfg, plan=plan,
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
    if not rows:
        console.print("[bold red]no case was checked[/]")
        return 1
    bad = sum(not r["ok"] for r in rows)
    if bad:
        console.print(f"[bold red]{bad} of {len(rows)} cases do not match[/]")
        return 1
    console.print(f"[green]all {len(rows)} cases match[/] ({how['world_size']} ranks, {how['launcher']})")
    return 0


