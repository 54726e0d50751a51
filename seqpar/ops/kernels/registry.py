"""Which backend runs a block, and the one entry point every caller uses.

Dispatch rules (per block call; the block loop in :mod:`seqpar.ops.tiled` passes each block's own mask):

1. Candidates, in order: ``SEQPAR_KERNEL`` (comma-separated backend names, read once -- :func:`reset`
   re-reads it), else :func:`configure` / :func:`use` from Python, else the default order
   ``cpu_flash, cuda_cudnn, cuda_flash, cuda_efficient, blockwise`` in which ``cuda_cudnn`` takes part
   only where torch itself ranks cuDNN first (sm90 / sm10x, torch >= 2.9). ``blockwise`` always closes
   the list: it runs anything. :func:`exclude` / ``use(..., exclude=...)`` drop backends.
2. A backend is skipped when it is not available here (device, op, torch version: :func:`describe`
   says why) or refuses the block: its device, dtype, head dim, the block's mask kind
   (``none`` unmasked, ``causal`` diagonal top-left, ``bool`` / ``bias`` a mask that cuts the block
   partly), GQA, deterministic mode, or ``torch.nn.attention.sdpa_kernel`` having switched its SDPA
   backend off. So on CUDA unmasked and diagonal-causal blocks go to cuDNN / flash, blocks a window,
   document or padding mask cuts partly to ``cuda_efficient`` (additive bias), float64 to blockwise.
3. The choice is cached per block signature (device, dtype, q/k shapes, q strides, mask kind, SDPA
   switches, deterministic mode): one dict lookup per call. On CUDA, torch's own gate
   (``torch.backends.cuda.can_use_flash_attention`` / ``_cudnn_``) is asked once per signature.
4. An op that raises is dropped for blocks of that device, dtype and mask kind, and the next candidate
   runs the same block; one warning per backend. The result is never a partial one: a backend returns or
   raises.

Contract of :func:`attention_forward` / :func:`attention_backward`: see :mod:`seqpar.ops.kernels.common`;
``lse`` float32 ``(B, H, Sq)`` contiguous with -inf exactly on rows that see no key; ``out`` in the backend's
native dtype (q's dtype for the fused CUDA ops, else float32 / float64); ``dq``, ``dk``, ``dv`` in float32
(float64) whatever the backend, since callers sum them over blocks and sources.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator

import torch

from seqpar.ops.kernels import blockwise, cpu_flash, cuda_cudnn, cuda_efficient, cuda_flash
from seqpar.ops.kernels.common import Kernel, mask_kind, row_valid, torch_version
from seqpar.ops.lse import NEG_INF, finite_or_zero, stat_dtype

BACKENDS: dict[str, Kernel] = {
    k.name: k for k in (cpu_flash.KERNEL, cuda_cudnn.KERNEL, cuda_flash.KERNEL, cuda_efficient.KERNEL, blockwise.KERNEL)
}
DEFAULT_ORDER = tuple(BACKENDS)
ENV = "SEQPAR_KERNEL"


class _State:
    def __init__(self) -> None:
        self.order: tuple[str, ...] | None = None  # None: not resolved yet
        self.explicit = False  # order named by the user (env / configure / use): cuDNN's default_on ignored
        self.excluded: frozenset[str] = frozenset()
        self.pretend: dict[str, str] = {}  # test hook: backend -> device type it is treated as available on
        self.cache: dict = {}
        self.available: dict[str, str | None] = {}
        self.warned: set[str] = set()
        self.failed: set[tuple] = set()  # (backend, device, dtype, mask kind) whose op raised


_state = _State()


def _check_names(names, what: str) -> tuple[str, ...]:
    names = tuple(names)
    bad = [n for n in names if n not in BACKENDS]
    if bad:
        allowed = ", ".join(repr(n) for n in BACKENDS)
        raise ValueError(f"{what}={bad[0]!r}; allowed: {allowed}")
    return names


def _with_fallback(names: tuple[str, ...]) -> tuple[str, ...]:
    return names if "blockwise" in names else (*names, "blockwise")


def _resolve() -> tuple[str, ...]:
    if _state.order is None:
        raw = os.environ.get(ENV, "")
        names = _check_names([n.strip() for n in raw.split(",") if n.strip()], ENV) if raw.strip() else ()
        _state.order, _state.explicit = (_with_fallback(names), True) if names else (DEFAULT_ORDER, False)
    return _state.order


def _invalidate() -> None:
    _state.cache.clear()
    _state.available.clear()


def reset() -> None:
    """Forget every choice: re-read ``SEQPAR_KERNEL`` on the next call, clear caches, failures, warnings."""
    global _state
    _state = _State()


def configure(order: list[str] | tuple[str, ...] | None = None, exclude: list[str] | tuple[str, ...] = ()) -> None:
    """Set the candidate order from Python (``None``: the default order) and the backends to leave out.

    Overrides ``SEQPAR_KERNEL`` until :func:`reset`. ``blockwise`` is always appended as the last resort and
    cannot be excluded."""
    names = _check_names(order or (), "order")
    ex = frozenset(_check_names(exclude, "exclude"))
    if "blockwise" in ex:
        raise ValueError("exclude='blockwise': it is the fallback that runs any block; allowed: the other backends")
    _state.order, _state.explicit = (_with_fallback(names), True) if names else (DEFAULT_ORDER, False)
    _state.excluded = ex
    _invalidate()


def exclude(*names: str) -> None:
    """Leave these backends out from now on (e.g. ``exclude("cuda_cudnn")``)."""
    _resolve()
    configure(_state.order if _state.explicit else None, tuple(_state.excluded | set(_check_names(names, "exclude"))))


@contextlib.contextmanager
def use(*order: str, exclude: tuple[str, ...] = ()) -> Iterator[None]:
    """Within the block: these backends in this order (none named: the default order), minus ``exclude``."""
    _resolve()
    saved = (_state.order, _state.explicit, _state.excluded)
    configure(order or None, exclude)
    try:
        yield
    finally:
        _state.order, _state.explicit, _state.excluded = saved
        _invalidate()


@contextlib.contextmanager
def pretend_available(*names: str, device: str = "meta") -> Iterator[None]:
    """Test hook: treat these backends as available, running tensors of ``device`` (``"meta"``; or ``"cpu"``
    with the ops replaced by CPU emulations)."""
    saved = _state.pretend
    _state.pretend = {**saved, **{n: device for n in _check_names(names, "pretend")}}
    _invalidate()
    try:
        yield
    finally:
        _state.pretend = saved
        _invalidate()


def _why_unavailable(kern: Kernel) -> str | None:
    if torch_version() < kern.min_torch:
        return f"needs torch >= {kern.min_torch[0]}.{kern.min_torch[1]}"
    if kern.name in _state.pretend:
        return None
    if kern.name not in _state.available:
        _state.available[kern.name] = kern.available()
    return _state.available[kern.name]


def _on_device(kern: Kernel, device: torch.device) -> bool:
    if "any" in kern.devices or device.type in kern.devices:
        return True
    return _state.pretend.get(kern.name) == device.type


# the switches torch.nn.attention.sdpa_kernel sets, read directly (the torch.backends wrappers cost 4x more)
_flash_on, _efficient_on = torch._C._get_flash_sdp_enabled, torch._C._get_mem_efficient_sdp_enabled
_cudnn_on, _deterministic = torch._C._get_cudnn_sdp_enabled, torch._C._get_deterministic_algorithms


def candidates(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kind: str) -> tuple[Kernel, ...]:
    """The backends that may run this block, best first (the last one, blockwise, runs anything)."""
    key = (q.device, q.dtype, q.shape, q.stride(), k.shape, v.shape[-1], kind,
           _flash_on(), _efficient_on(), _cudnn_on(), _deterministic())  # whole shapes: cheapest to hash
    found = _state.cache.get(key)
    if found is None:
        if len(_state.cache) > 4096:  # many distinct block shapes (variable lengths): start over
            _state.cache.clear()
        order = _resolve()
        found = tuple(
            kern for kern in (BACKENDS[n] for n in order)
            if kern.name not in _state.excluded and _on_device(kern, q.device) and _why_unavailable(kern) is None
            and (kern.name, q.device, q.dtype, kind) not in _state.failed
            and (_state.explicit or kern.default_on(q.device))
            and kern.refuses(q, k, v, kind) is None
        )
        _state.cache[key] = found = found if found and found[-1] is blockwise.KERNEL else (*found, blockwise.KERNEL)
    return found


def _drop(kind: str, q: torch.Tensor, kern: Kernel, err: Exception, nxt: Kernel, phase: str) -> None:
    """``kern`` raised: not used again for blocks of this device, dtype and mask kind (until :func:`reset`);
    one warning per backend."""
    _state.failed.add((kern.name, q.device, q.dtype, kind))
    _state.cache.clear()
    if kern.name not in _state.warned:
        _state.warned.add(kern.name)
        msg = str(err).strip().splitlines()
        warnings.warn(
            f"seqpar: kernel {kern.name!r} failed in {phase} ({type(err).__name__}: {msg[0][:200] if msg else ''}); "
            f"running these blocks with {nxt.name!r} instead", RuntimeWarning, stacklevel=3,
        )


def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    """Fused ops read rows as if ``stride(-1) == 1`` (the CPU op returns garbage otherwise)."""
    return t if t.is_contiguous() or t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def kernel_name(q: torch.Tensor) -> str:
    """The backend an unmasked block shaped like ``q`` (keys too; any tensor of q's device and dtype) runs on."""
    if q.dim() != 4:
        q = q.new_empty(1, 1, 1, q.shape[-1] if q.dim() else 1)
    return candidates(q, q, q, "none")[0].name


def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    mask: torch.Tensor | None = None,
    is_causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q (B, H, Sq, D)`` over ``k, v (B, H_kv, Sk, D)``: ``(out, lse)``; ``lse`` float32 (float64),
    ``out`` in the backend's ``out_dtype``: q's dtype from the fused CUDA ops (no extra pass over it; callers
    merging partials upcast once, as :func:`seqpar.ops.tiled.tiled_forward` does), else float32 (float64)."""
    q, k, v = _unit_stride(q), _unit_stride(k), _unit_stride(v)
    kind = mask_kind(mask, is_causal)
    found = candidates(q, k, v, kind)
    for i, kern in enumerate(found):
        try:
            out, lse = kern.forward(q, k, v, scale=scale, mask=mask, is_causal=is_causal)
            break
        except Exception as err:
            if i + 1 == len(found):
                raise
            _drop(kind, q, kern, err, found[i + 1], "forward")
    valid = row_valid(mask)
    if valid is not None:  # the fused ops report lse 0 (CPU, efficient 2.5+) on fully masked rows
        lse = torch.where(valid, lse, torch.full_like(lse, NEG_INF))
        out = out.masked_fill(~valid.unsqueeze(-1), 0)
    return out, lse


def attention_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    scale: float,
    mask: torch.Tensor | None = None,
    is_causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of this block given the *global* ``out`` and ``lse`` of its query rows.

    Returns ``dq (B, H, Sq, D)``, ``dk, dv (B, H_kv, Sk, D)`` in float32 (float64 for float64 input):
    callers accumulate in float32 and round to the input dtype once.
    """
    # Rows that see nothing anywhere have lse = -inf and out = 0: their P is 0 whatever finite lse
    # we use, so use 0 to keep exp(S - lse) free of NaN.
    lse = finite_or_zero(lse)
    q, k, v, dout, out = (_unit_stride(t) for t in (q, k, v, dout, out))
    kind = mask_kind(mask, is_causal)
    found = candidates(q, k, v, kind)
    for i, kern in enumerate(found):
        try:
            grads = kern.backward(dout, q, k, v, out, lse, scale=scale, mask=mask, is_causal=is_causal)
            break
        except Exception as err:
            if i + 1 == len(found):
                raise
            _drop(kind, q, kern, err, found[i + 1], "backward")
    sd = stat_dtype(q.dtype)
    return tuple(g if g.dtype == sd else g.to(sd) for g in grads)


def describe() -> list[dict]:
    """One dict per backend, in the default order: what it supports, whether it is available here and why not,
    and whether the current selection (``SEQPAR_KERNEL`` / :func:`configure`) leaves it out."""
    order = _resolve()
    rows = []
    for kern in BACKENDS.values():
        d = kern.describe()
        d["selected"] = kern.name in order and kern.name not in _state.excluded
        rows.append(d)
    return rows
