"""Result reports: a table on the terminal, ``report.json`` and a PNG plot in one call.

    from seqpar_tools.report import write_report
    paths = write_report(rows, Path("seqpar-out"), title="seqpar run", meta={"world_size": 2})
    # -> {"json": seqpar-out/report.json, "png": seqpar-out/report.png}

``rows`` is a list of flat dicts, one per measured configuration. Keys this module knows (others are
kept in the JSON, and shown in the table when named in ``columns``):

    impl / strategy            series label (``impl`` wins when present)
    seq_len, causal, layout, dtype, world_size
    fwd_s, fwd_bwd_s           seconds (median of the slowest rank)
    fwd_ratio, fwd_bwd_ratio   time / the baseline's time measured in the same run
    analytic_bytes_fwd_bwd     what the algorithm must send per rank (fwd+bwd)
    bytes_per_rank_fwd, bytes_per_rank_fwd_bwd
    peak_mem_bytes             peak resident memory of the worst rank
    peak_mem_added_bytes       ... above what that rank held before the measurement
    err_float64, err_long      max |a - b| / max |ref| of the checks
    ok                         True / False

The plot has two panels, time and bytes per rank, one series per strategy against ``seq_len``
(grouped bars when there is one sequence length). matplotlib is imported lazily with the Agg
backend; without it the PNG is skipped with a warning. The JSON is ``{"title", "meta", "rows"}``.
"""

from __future__ import annotations

import json
import math
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
    """A rich Console for tables and logs; 160 columns wide when writing to a file or pipe (CI logs)."""
    import os

    from rich.console import Console

    console = Console(highlight=False, **kwargs)
    if not console.is_terminal and "width" not in kwargs and "COLUMNS" not in os.environ:
        console = Console(highlight=False, width=160, **kwargs)
    return console


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


def plot(rows: list[dict], path: Path, *, title: str) -> Path | None:
    """Time and bytes per rank per series against ``seq_len``; None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        import warnings

        warnings.warn("matplotlib is not installed: no plot (pip install matplotlib)", stacklevel=2)
        return None
    causal_values = {r.get("causal") for r in rows}

    def label(r: dict) -> str:
        return _label(r) + (" causal" if len(causal_values) > 1 and r.get("causal") else "")

    series: dict[str, list[dict]] = {}
    for r in rows:
        if "seq_len" in r:
            series.setdefault(label(r), []).append(r)
    lens = sorted({r["seq_len"] for rs in series.values() for r in rs})
    panels = [("time (s)", [("fwd_s", "fwd", 0.45), ("fwd_bwd_s", "fwd+bwd", 1.0)]),
              ("bytes sent per rank (MB)", [("bytes_per_rank_fwd", "fwd", 0.45),
                                            ("bytes_per_rank_fwd_bwd", "fwd+bwd", 1.0)])]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, (ylabel, keys) in zip(axes, panels):
        scale = 1e-6 if "bytes" in keys[0][0] else 1.0
        if len(lens) == 1:  # grouped bars, one group per series
            names = list(series)
            width = 0.8 / len(keys)
            for i, (key, what, alpha) in enumerate(keys):
                vals = [next((r[key] * scale for r in series[n] if key in r), math.nan) for n in names]
                xs = [j + (i - (len(keys) - 1) / 2) * width for j in range(len(names))]
                ax.bar(xs, vals, width, label=what, alpha=alpha, color="C0")
            ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
            ax.set_xlabel(f"S = {lens[0]}")
        else:
            for j, (name, rs) in enumerate(series.items()):
                for key, what, alpha in keys:
                    pts = sorted((r["seq_len"], r[key] * scale) for r in rs if key in r)
                    if pts:
                        ax.plot(*zip(*pts), marker="o", color=f"C{j}", alpha=alpha,
                                linestyle="-" if what == "fwd+bwd" else "--", label=f"{name} {what}")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("sequence length")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


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
    png = plot(rows, out_dir / f"{stem}.png", title=title)
    if png is not None:
        paths["png"] = png
    return paths
