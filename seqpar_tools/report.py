"""Result reports: a table on the terminal, ``report.json`` and a PNG plot in one call.

    from seqpar_tools.report import write_report
    paths = write_report(rows, Path("seqpar-out"), title="seqpar run", meta={"world_size": 2})
    # -> {"json": seqpar-out/report.json, "png": seqpar-out/report.png}

``rows`` is a list of flat dicts, one per measured configuration. Keys this module knows (others are
kept in the JSON, and shown in the table when named in ``columns``):

    impl / strategy            series label (``impl`` wins when present)
    seq_len, causal, layout, dtype, world_size
    fwd_s, fwd_bwd_s           seconds (median of the slowest rank)
    fwd_ratio, fwd_bwd_ratio   time / the single-process baseline's time measured in the same run
    fwd_vs_peer, ...           time / the peer's (bench)
    analytic_bytes_fwd         what the algorithm must send per rank (fwd; seqpar.plan.bytes_sent)
    analytic_bytes_fwd_bwd     what the algorithm must send per rank (fwd+bwd)
    bytes_per_rank_fwd, bytes_per_rank_fwd_bwd
    peak_mem_bytes             peak resident memory of the worst rank
    peak_mem_added_bytes       ... above what that rank held before the measurement
    err_float64, err_long      max |a - b| / max |ref| of the checks
    ok                         True / False

The plot (:func:`plot_run`, :func:`plot_bench`) has one idea per panel: time as a ratio to the single-process
baseline of the same run, bytes against the analytic figure, peak memory per rank against single-process, and
(run) the errors against their tolerances; legends sit outside the data. matplotlib is imported lazily with the
Agg backend; without it the PNG is skipped with a warning. The JSON is ``{"title", "meta", "rows"}``.
"""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path
from typing import Any

#: key -> (column header, formatter); the table shows these in this order when present.
COLUMNS: dict[str, tuple[str, Any]] = {
    "impl": ("impl", str),
    "strategy": ("strategy", str),
    "seq_len": ("S", str),
    "causal": ("causal", lambda v: "yes" if v else "no"),
    "layout": ("layout", str),
    "dtype": ("dtype", str),
    "world_size": ("W", str),
    "fwd_s": ("fwd s", lambda v: f"{v:.3f}"),
    "fwd_ratio": ("fwd x", lambda v: f"{v:.2f}"),
    "fwd_bwd_s": ("fwd+bwd s", lambda v: f"{v:.3f}"),
    "fwd_bwd_ratio": ("f+b x", lambda v: f"{v:.2f}"),
    "fwd_bwd_vs_peer": ("f+b x peer", lambda v: f"{v:.2f}"),
    "bytes_per_rank_fwd": ("MB/rank fwd", lambda v: f"{v / 1e6:.1f}"),
    "bytes_per_rank_fwd_bwd": ("MB/rank f+b", lambda v: f"{v / 1e6:.1f}"),
    "analytic_bytes_fwd_bwd": ("analytic MB f+b", lambda v: f"{v / 1e6:.1f}"),
    "peak_mem_bytes": ("peak MB", lambda v: f"{v / 1e6:.0f}"),
    "peak_mem_added_bytes": ("peak +MB", lambda v: f"{v / 1e6:.0f}"),
    "err_float64": ("err f64", lambda v: f"{v:.1e}"),
    "err_long": ("err long", lambda v: f"{v:.1e}"),
    "ok": ("ok", lambda v: "[green]yes[/]" if v else "[bold red]NO[/]"),
}


def make_console(**kwargs: Any):
    from seqpar_tools.terminal import make_console as _make

    return _make(**kwargs)


_SHARED = ("seq_len", "causal", "layout", "dtype", "world_size")


def _label(row: dict) -> str:
    return str(row.get("impl") or row.get("strategy") or "?")


def print_table(rows: list[dict], *, title: str, columns: list[str] | None = None, console: Any = None) -> None:
    """Print ``rows`` as a rich table (only the columns some row has; ``impl`` hides ``strategy``)."""
    from rich.table import Table

    console = console or make_console()
    caption = None
    if columns is None:
        present = {k for r in rows for k in r}
        columns = [k for k in COLUMNS if k in present]
        if "impl" in columns and "strategy" in columns:
            columns.remove("strategy")
        same = [k for k in _SHARED if k in columns and len(rows) > 1 and len({repr(r.get(k)) for r in rows}) == 1]
        if same:  # the same in every row: say it once, under the table
            caption = ", ".join(
                f"{COLUMNS[k][0]} = {COLUMNS[k][1](rows[0][k])}" for k in same if rows[0].get(k) is not None
            )
            columns = [k for k in columns if k not in same]
    table = Table(title=title, caption=caption)
    for key in columns:
        header = COLUMNS.get(key, (key, str))[0]
        table.add_column(header, justify="left" if key in ("impl", "strategy", "layout", "dtype") else "right")
    for r in rows:
        cells = []
        for key in columns:
            fmt = COLUMNS.get(key, (key, str))[1]
            v = r.get(key)
            cells.append("-" if v is None else fmt(v))
        table.add_row(*cells)
    console.print(table)


def write_json(rows: list[dict], path: Path, *, title: str, meta: dict) -> Path:
    path.write_text(json.dumps({"title": title, "meta": meta, "rows": rows}, indent=1, default=str) + "\n")
    return path


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        import warnings

        warnings.warn("matplotlib is not installed: no plot (pip install matplotlib)", stacklevel=3)
        return None
    return plt


def _bars(ax, groups: list[str], series: dict[str, list[float]], *, marks: dict[str, list[float]] | None = None,
          mark_label: str = "", colors: dict[str, str] | None = None, fmt: str = "{:.2f}",
          floor: float | None = None) -> None:
    """Grouped bars: one group per ``groups`` entry, one bar per series (NaN: no bar, "n/a" written);
    ``marks`` draws a black tick on a series' bar (e.g. the analytic figure); every bar is labelled with its
    value (an exact 0 as "0"). ``floor``: the least bar height drawn (a log axis cannot show 0)."""
    n = max(len(series), 1)
    width = 0.8 / n
    for i, (name, vals) in enumerate(series.items()):
        xs = [j + (i - (n - 1) / 2) * width for j in range(len(groups))]
        color = (colors or {}).get(name, f"C{i}")
        heights = [0 if math.isnan(v) else v if floor is None else max(v, floor) for v in vals]
        bars = ax.bar(xs, heights, width * 0.92, label=name, color=color)
        for x, v, bar in zip(xs, vals, bars):
            if math.isnan(v):  # not measured (a failed run, a missing baseline): say so at the bottom
                ax.annotate("n/a", (x, 0), xycoords=("data", "axes fraction"), ha="center", va="bottom", fontsize=7,
                            xytext=(0, 2), textcoords="offset points")
            else:
                ax.annotate("0" if v == 0 else fmt.format(v), (x, bar.get_height()), ha="center", va="bottom",
                            fontsize=7, xytext=(0, 2), textcoords="offset points")
        if marks and name in marks:
            pts = [(x, m) for x, m in zip(xs, marks[name]) if not math.isnan(m)]
            if pts:
                ax.hlines([m for _, m in pts], [x - width * 0.46 for x, _ in pts], [x + width * 0.46 for x, _ in pts],
                          colors="black", linewidths=2.5, zorder=3, label=mark_label if i == 0 else None)
    ax.set_xticks(range(len(groups)), groups)
    ax.margins(y=0.15)
    ax.grid(axis="y", alpha=0.3)


def _legend_outside(ax) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False, borderaxespad=0)


def _get(rows: list[dict], key: str, scale: float = 1.0) -> list[float]:
    return [math.nan if r.get(key) is None else r[key] * scale for r in rows]


def plot_run(rows: list[dict], path: Path, *, title: str, meta: dict) -> Path | None:
    """``seqpar run``'s picture, one idea per panel: time as a ratio to the single-process SDPA baseline of the
    same run; bytes sent per rank against the analytic figure; peak memory added per rank against the
    baseline's; the errors of both checks against their tolerances. None when matplotlib is missing."""
    plt = _pyplot()
    if plt is None:
        return None
    names = [r["strategy"] for r in rows] or ["(nothing measured)"]
    ref = meta.get("reference") or {}
    fig, axes = plt.subplots(2, 2, figsize=(14, 8.5), layout="constrained")
    (ax_t, ax_b), (ax_m, ax_e) = axes

    if ref.get("fwd_s"):
        _bars(ax_t, names, {"fwd": _get(rows, "fwd_ratio"), "fwd+bwd": _get(rows, "fwd_bwd_ratio")})
        ax_t.axhline(1.0, color="black", lw=1, ls="--")
        secs = ", ".join(f"{k[:-2].replace('_', '+')} {ref[k]:.2f} s" for k in ("fwd_s", "fwd_bwd_s") if k in ref)
        ax_t.set_title(f"time ÷ single-process SDPA measured in this run\n(dashed line = 1 = {secs}, "
                       f"{ref.get('threads')} threads)", fontsize=10)
        ax_t.set_ylabel("× single-process time (lower is faster)")
    else:
        _bars(ax_t, names, {"fwd": _get(rows, "fwd_s"), "fwd+bwd": _get(rows, "fwd_bwd_s")}, fmt="{:.3f}")
        ax_t.set_title("time (s)\n(no single-process baseline: check.long = false)", fontsize=10)
        ax_t.set_ylabel("seconds (median of the slowest rank)")
    _legend_outside(ax_t)

    key = "fwd_bwd" if any("bytes_per_rank_fwd_bwd" in r for r in rows) else "fwd"
    _bars(ax_b, names, {f"counted ({key.replace('_', '+')})": _get(rows, f"bytes_per_rank_{key}", 1e-6)},
          marks={f"counted ({key.replace('_', '+')})": _get(rows, f"analytic_bytes_{key}", 1e-6)},
          mark_label="analytic (seqpar.plan.bytes_sent)", fmt="{:.1f}")
    ax_b.set_title(f"MB sent per rank, one {key.replace('_', '+')} call\ncounted (bars) vs analytic (black lines)",
                   fontsize=10)
    ax_b.set_ylabel("MB per rank")
    _legend_outside(ax_b)

    per_rank = [r.get("peak_mem_added_bytes_per_rank") or [] for r in rows]
    world = max((len(p) for p in per_rank), default=0)
    if world <= 4:
        series = {f"rank {k}": [p[k] / 1e6 if k < len(p) else math.nan for p in per_rank] for k in range(world)}
    else:
        series = {"largest rank": [max(p) / 1e6 if p else math.nan for p in per_rank],
                  "smallest rank": [min(p) / 1e6 if p else math.nan for p in per_rank]}
    _bars(ax_m, names, series or {"rank 0": [math.nan] * len(names)}, fmt="{:.0f}")
    if ref.get("peak_mem_added_bytes") is not None:
        ax_m.axhline(ref["peak_mem_added_bytes"] / 1e6, color="black", lw=1, ls="--",
                     label=f"single-process SDPA: {ref['peak_mem_added_bytes'] / 1e6:.0f} MB")
    ax_m.set_title("peak memory added per rank (timed calls)\nvs single-process SDPA fwd+bwd", fontsize=10)
    ax_m.set_ylabel(f"MB above the level before\n({meta.get('memory', '?').split(' (')[0]})")
    _legend_outside(ax_m)

    errs = {"float64 check (short S)": _get(rows, "err_float64"),
            "vs single-process SDPA (full S)": _get(rows, "err_long")}
    _bars(ax_e, names, errs, fmt="{:.0e}", floor=1e-18)  # an exact 0 is drawn at the floor, labelled "0"
    ax_e.set_yscale("log")
    tols = meta.get("tolerance") or {}
    for i, (dtype, check) in enumerate((("float64", "float64 check"), (meta.get("config", {}).get("attention", {})
                                                                          .get("dtype", ""), "full-S check"))):
        if dtype in tols:
            ax_e.axhline(tols[dtype], color=f"C{i}", lw=1.2, ls="--", label=f"tolerance, {check} ({dtype}): "
                                                                              f"{tols[dtype]:.0e}")
    for j, r in enumerate(rows):
        if r.get("ok") is False:
            ax_e.annotate("FAILED", (j, 1), xycoords=("data", "axes fraction"), ha="center", va="top", color="red",
                          fontweight="bold")
    ax_e.set_title("error: max |a − b| / max |ref| over out, dq, dk, dv\n(each bar below its dashed line = pass)",
                   fontsize=10)
    _legend_outside(ax_e)

    err = meta.get("error")
    title = textwrap.fill(title, 150)
    if err:
        title += "\n" + err["message"].splitlines()[0]
    fig.suptitle(title, fontsize=11, color="red" if err else "black")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_bench(rows: list[dict], path: Path, *, title: str, meta: dict) -> Path | None:
    """``seqpar bench``'s picture, one idea per panel: fwd+bwd and fwd time as a ratio to single-process SDPA
    measured in the same run, non-causal and causal side by side (the peer among the bars); bytes sent per
    rank against the analytic figure; peak memory added per rank against the baseline's."""
    plt = _pyplot()
    if plt is None:
        return None
    lens = sorted({r["seq_len"] for r in rows})
    causal_values = sorted({bool(r.get("causal")) for r in rows})
    impls = sorted(dict.fromkeys(_label(r) for r in rows if r.get("world_size") != 1),
                   key=lambda name: (not name.startswith("seqpar:"), name))  # seqpar's first, the peer last
    colors = {name: f"C{i}" for i, name in enumerate(impls)}
    base = {(r["seq_len"], bool(r.get("causal"))): r for r in rows if r.get("world_size") == 1}

    def row(impl, s, c):
        return next((r for r in rows if _label(r) == impl and r["seq_len"] == s and bool(r.get("causal")) == c), {})

    def groups(c, key):  # the baseline's time under each group: what "1" means there
        return [f"S={s}\nSDPA {base.get((s, c), {}).get(key, math.nan):.2f} s" for s in lens]

    ncol = len(causal_values)
    fig, axes = plt.subplots(3, ncol, figsize=(7.5 * ncol + 2, 12), layout="constrained", squeeze=False)
    for col, c in enumerate(causal_values):
        what = "causal (zigzag)" if c else "non-causal (contiguous)"
        for rowi, (key, label) in enumerate((("fwd_bwd_ratio", "fwd+bwd"), ("fwd_ratio", "fwd"))):
            ax = axes[rowi][col]
            _bars(ax, groups(c, key.replace("ratio", "s")), {i: [row(i, s, c).get(key, math.nan) for s in lens]
                                                             for i in impls}, colors=colors)
            ax.axhline(1.0, color="black", lw=1, ls="--", label="single-process SDPA = 1")
            ax.set_title(f"{label} time ÷ single-process SDPA (same run, same cores)\n{what}", fontsize=10)
            ax.set_ylabel("× SDPA (lower is faster)")
            _legend_outside(ax)
    ax_b, ax_m = axes[2][0], axes[2][-1] if ncol > 1 else None
    c0 = causal_values[0]
    seq_impls = [i for i in impls if i.startswith("seqpar:")]
    _bars(ax_b, [f"S={s}" for s in lens],
          {i: [row(i, s, c0).get("bytes_per_rank_fwd_bwd", math.nan) / 1e6 for s in lens] for i in seq_impls},
          marks={i: [row(i, s, c0).get("analytic_bytes_fwd_bwd", math.nan) / 1e6 for s in lens] for i in seq_impls},
          mark_label="analytic (seqpar.plan.bytes_sent)", colors=colors, fmt="{:.1f}")
    ax_b.set_title(f"MB sent per rank, one fwd+bwd call, {'causal' if c0 else 'non-causal'}\ncounted (bars) vs "
                   "analytic (black lines)", fontsize=10)
    ax_b.set_ylabel("MB per rank")
    _legend_outside(ax_b)
    if ax_m is None:
        return _save(fig, plt, path, title)
    cm = causal_values[-1]
    mem_impls = ["sdpa (1 process)", *impls]
    _bars(ax_m, [f"S={s}" for s in lens],
          {i: [((base.get((s, cm), {}) if i.startswith("sdpa") else row(i, s, cm)).get("peak_mem_added_bytes")
                or math.nan) / 1e6 for s in lens] for i in mem_impls},
          colors={"sdpa (1 process)": "0.5", **colors}, fmt="{:.0f}")
    ax_m.set_title(f"peak memory added per rank, fwd+bwd, {'causal' if cm else 'non-causal'}\n"
                   "(sdpa: the one process of the baseline)", fontsize=10)
    ax_m.set_ylabel("MB above the rank's level before")
    _legend_outside(ax_m)
    return _save(fig, plt, path, title)


def _save(fig, plt, path: Path, title: str) -> Path:
    fig.suptitle(title, fontsize=11)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot(rows: list[dict], path: Path, *, title: str, meta: dict | None = None) -> Path | None:
    """The bench picture when rows carry ``impl`` (several implementations), else the run picture."""
    meta = meta or {}
    if rows and any("impl" in r for r in rows):
        return plot_bench(rows, path, title=title, meta=meta)
    return plot_run(rows, path, title=title, meta=meta)


def write_report(
    rows: list[dict],
    out_dir: Path,
    *,
    title: str,
    meta: dict,
    columns: list[str] | None = None,
    console: Any = None,
    stem: str = "report",
) -> dict[str, Path]:
    """Print ``rows`` as a table and write ``<out_dir>/<stem>.json`` and ``<stem>.png``.

    Args:
        rows: one flat dict per measured configuration (keys: see the module docstring).
        out_dir: created if missing.
        title: table and plot title; stored in the JSON.
        meta: anything describing the run (versions, shapes, machine); stored in the JSON.
        columns: keys to show in the table (default: the known ones that some row has).
        console: a ``rich.console.Console`` to print to (default: stdout).
        stem: file name stem (``bench`` gives bench.json / bench.png).

    Returns:
        ``{"json": path, "png": path}`` (no ``"png"`` when matplotlib is missing).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    print_table(rows, title=title, columns=columns, console=console)
    paths = {"json": write_json(rows, out_dir / f"{stem}.json", title=title, meta=meta)}
    png = plot(rows, out_dir / f"{stem}.png", title=title, meta=meta)
    if png is not None:
        paths["png"] = png
    return paths
