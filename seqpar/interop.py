"""numpy at the API edge: numpy arrays in, numpy arrays out (used with mpi4py communicators)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def to_torch(x: Any) -> tuple[Any, bool]:
    """``(tensor, was_numpy)``; None passes through.

    Any numpy layout is accepted: views with any strides (transposed, Fortran-order, sliced,
    ``np.broadcast_to``) and non-native byte order are copied into a C-contiguous, native array
    (mpi4py and torch need one); a C-contiguous native array is shared, not copied."""
    if isinstance(x, np.ndarray):
        native = x.dtype.newbyteorder("=") if x.dtype.byteorder not in ("=", "|") else x.dtype
        arr = np.ascontiguousarray(x, dtype=native)
        if not arr.flags.writeable:  # torch.from_numpy warns on read-only memory (e.g. np.broadcast_to)
            arr = arr.copy()
        return torch.from_numpy(arr), True
    return x, False


def back(x: Any, was_numpy: bool) -> Any:
    if was_numpy and isinstance(x, torch.Tensor):
        return x.detach().numpy()
    return x
