"""The terminal side of a job: a rich console and the renderer of ranks' events (logs, a progress bar)."""

from __future__ import annotations

import time
from typing import Any


def make_console(**kwargs: Any):
    """A rich Console for tables and logs; 160 columns wide when writing to a file or pipe (CI logs)."""
    import os

    from rich.console import Console

    console = Console(highlight=False, **kwargs)
    if not console.is_terminal and "width" not in kwargs and "COLUMNS" not in os.environ:
        console = Console(highlight=False, width=160, **kwargs)
    return console


class Terminal:
    """Renders ranks' events: log lines (rank-prefixed when several ranks log) and a rich progress bar.
    ``("partial", value)`` events are kept in :attr:`partial` (what rank 0 has measured so far)."""

    def __init__(self, *, console=None, show_progress: bool = True, prefix_ranks: bool = False):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = console or make_console()
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=self.console, transient=True,
                                 disable=not show_progress)
        self.prefix_ranks = prefix_ranks
        self.task = None
        self.partial: Any = None
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
        elif kind == "partial":
            self.partial = payload
