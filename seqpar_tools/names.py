"""Names the library owns (layouts, strategies), read without importing torch, and the dtype names the tools take.

``LAYOUTS`` and ``STRATEGIES`` are ``seqpar.layout.LAYOUTS`` and ``seqpar.strategies.registry.STRATEGIES``: read
from those modules' source (a literal tuple) so that ``seqpar --help`` does not pay for importing torch; imported for
real if the source is not a literal.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import os
import re


def _package_dir() -> str:
    spec = importlib.util.find_spec("seqpar")  # finds the package without importing it (nor torch)
    return os.path.dirname(spec.origin)


def library_constant(module: str, name: str):
    """The literal value of ``seqpar.<module>.<name>``, read from the source; imported when not a literal."""
    try:
        with open(os.path.join(_package_dir(), *module.split(".")) + ".py") as f:
            tree = ast.parse(f.read())
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
                return ast.literal_eval(node.value)
    except (OSError, ValueError, SyntaxError):
        pass
    return getattr(importlib.import_module(f"seqpar.{module}"), name)


def version() -> str:
    """``seqpar.__version__``, read from the source (no torch import)."""
    try:
        return library_constant("__init__", "__version__")
    except Exception:  # noqa: BLE001 - a last resort
        with open(os.path.join(_package_dir(), "__init__.py")) as f:
            return re.search(r"__version__ = \"([^\"]+)\"", f.read()).group(1)


LAYOUTS: tuple[str, ...] = tuple(library_constant("layout", "LAYOUTS"))
STRATEGIES: tuple[str, ...] = tuple(library_constant("strategies.registry", "STRATEGIES"))
#: input dtypes the tools accept (the library takes these four floating types)
DTYPES = ("float32", "float64", "bfloat16", "float16")
