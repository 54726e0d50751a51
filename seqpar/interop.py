"""numpy at the API edge: numpy arrays in, numpy arrays out (used with mpi4py communicators)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def to_torch(x: Any) -> tuple[Any, bool]:
    """``(tensor, was_numpy)``; None passes through."""
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x)), True
    return x, False


def back(x: Any, was_numpy: bool) -> Any:
    if was_numpy and isinstance(x, torch.Tensor):
        return x.detach().numpy()
    return x
