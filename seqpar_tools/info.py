"""Versions, backends and kernels on this machine (``seqpar info``), and the version block every report carries."""

from __future__ import annotations

import sys
from typing import Any


def versions() -> dict[str, str | None]:
    """seqpar, torch, python and mpi4py versions (the one place reports and ``seqpar info`` take them from)."""
    import importlib.metadata as md
    import platform

    import torch

    from seqpar_tools.names import version

    try:
        mpi4py = md.version("mpi4py")
    except md.PackageNotFoundError:
        mpi4py = None
    return {"seqpar": version(), "torch": torch.__version__, "python": platform.python_version(), "mpi4py": mpi4py}


def info() -> dict[str, Any]:
    """What ``seqpar info`` reports, as a dict."""
    import os
    import platform
    import shutil

    import torch
    import torch.distributed as dist

    from seqpar.distributed import launcher
    from seqpar.ops.kernels import describe

    v = versions()
    mpi_library = None
    if v["mpi4py"]:
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
    kernels = {k["name"]: k for k in describe()}  # the registry's records (seqpar.ops.kernels.describe)
    return {
        "versions": {**v, "mpi library": mpi_library, "cuda (torch built with)": torch.version.cuda},
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


def print_info(as_json: bool) -> int:
    import json

    data = info()
    if as_json:
        print(json.dumps(data, indent=1))
        return 0
    from rich.table import Table

    from seqpar_tools.terminal import make_console

    table = Table(title="seqpar info", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    table.add_column("")
    for section, values in data.items():
        for i, (k, v) in enumerate(values.items()):
            if isinstance(v, dict):  # a kernel record: available or why not
                shown = (f"[green]yes[/] ({', '.join(v['devices'])}; {', '.join(v['dtypes'])}; masks "
                         f"{', '.join(v['masks'])}; torch >= {v['min_torch']}{'' if v['selected'] else '; excluded'})"
                         if v["available"] else f"no: {v['why_not']}")
            elif isinstance(v, (bool, type(None))):
                shown = {True: "[green]yes[/]", False: "no", None: "-"}[v]
            else:
                shown = ", ".join(v) or "-" if isinstance(v, list) else str(v)
            table.add_row(section if i == 0 else "", k, shown)
        table.add_section()
    make_console().print(table)
    return 0
