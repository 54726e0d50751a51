"""What every kernel backend shares: the record that describes it, and the LSE/mask normalisers.

One contract for all backends (:mod:`seqpar.ops.kernels.registry` enforces the last two points):

- ``forward(q, k, v, *, scale, mask, is_causal) -> (out, lse)``: ``lse`` float32 (float64 for float64
  input) ``(B, H, Sq)`` contiguous, -inf on rows that see no key; ``out (B, H, Sq, D)`` in the backend's
  ``out_dtype`` ("float32": the statistics dtype; "q": q's dtype, as the fused CUDA ops return it), any
  strides, returned as is (partials are merged into float32 accumulators by :mod:`seqpar.ops.tiled`).
- ``backward(dout, q, k, v, out, lse, *, scale, mask, is_causal) -> (dq, dk, dv)`` given the *global*
  ``out``/``lse`` of the block's query rows (``lse`` finite: -inf rows replaced by 0 by the registry);
  grads in ``out_dtype``, cast to float32 by the registry. ``dk, dv`` have K/V's ``H_kv`` heads.
- inputs may have any strides: the registry hands backends tensors whose last dimension has stride 1.
- ``mask`` is None, a bool mask (True = attend) or an additive float mask broadcastable to
  ``(B, H, Sq, Sk)``; ``is_causal`` is top-left and only set for blocks with ``Sq == Sk`` where query and
  key positions coincide (the diagonal blocks of :mod:`seqpar.ops.masks`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from seqpar.ops.lse import NEG_INF

MASK_KINDS = ("none", "causal", "bool", "bias")


def parse_version(v: str) -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", v)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


TORCH_VERSION = parse_version(torch.__version__)  # tests override it to drive older schemas' code paths


def torch_version() -> tuple[int, int]:
    """The torch (major, minor) the wrappers build their calls for (read at call time, so tests can patch it)."""
    return TORCH_VERSION


def mask_kind(mask: torch.Tensor | None, is_causal: bool) -> str:
    if mask is None:
        return "causal" if is_causal else "none"
    return "bool" if mask.dtype == torch.bool else "bias"


@dataclass(frozen=True)
class Kernel:
    """One backend: what it supports, and its forward/backward (see the module docstring)."""

    name: str
    summary: str
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    head_dims: str  # in words; ``refuses`` applies it
    masks: tuple[str, ...]  # subset of MASK_KINDS
    gqa: str  # how H_kv < H is handled
    min_torch: tuple[int, int]
    deterministic: str
    out_dtype: str  # "float32" (statistics dtype) or "q"
    sdpa_backend: str | None  # the torch.nn.attention.SDPBackend whose switch it honours
    forward: Callable
    backward: Callable
    available: Callable[[], str | None]  # None when usable on this machine, else why not
    refuses: Callable[..., str | None]  # (q, k, v, kind) -> None when this block can run here, else why not
    default_on: Callable[[torch.device], bool] = field(default=lambda device: True)  # in the default order there

    def describe(self) -> dict:
        why = self.available()
        return {
            "name": self.name, "available": why is None, "why_not": why, "summary": self.summary,
            "devices": list(self.devices), "dtypes": [str(d).replace("torch.", "") for d in self.dtypes],
            "head_dims": self.head_dims, "masks": list(self.masks), "gqa": self.gqa,
            "min_torch": ".".join(map(str, self.min_torch)), "deterministic": self.deterministic,
            "out_dtype": self.out_dtype, "sdpa_backend": self.sdpa_backend,
        }


# --- helpers shared by the CUDA wrappers ---------------------------------------------------------


def cuda_available(op_names: tuple[str, ...], min_torch: tuple[int, int], min_sm: tuple[int, int] | None) -> str | None:
    """Why a CUDA backend cannot run here (None: it can)."""
    if torch_version() < min_torch:
        return f"needs torch >= {min_torch[0]}.{min_torch[1]} (this is {torch.__version__})"
    for op in op_names:
        if not hasattr(torch.ops.aten, op):
            return f"torch {torch.__version__} has no aten.{op}"
    if not torch.cuda.is_available():
        return "no CUDA device" + (" (CPU build of torch)" if torch.version.cuda is None else "")
    if min_sm is not None and torch.cuda.get_device_capability() < min_sm:
        return f"needs sm{min_sm[0]}{min_sm[1]}+ (this GPU is sm%d%d)" % torch.cuda.get_device_capability()
    return None


SDP_CHECK_DEVICES = ("cuda",)  # where torch's own SDPA gate is asked (tests add "cpu" with a patched gate)


def sdp_refuses(backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool) -> str | None:
    """Ask torch's SDPA gate (``torch.backends.cuda.can_use_<backend>_attention``: arch, head dim per arch, cuDNN
    version, layouts, ``sdpa_kernel`` switches) before calling the op, so that what torch would not run is not
    tried (an unsupported CUDA call may not fail cleanly). None: allowed, or the gate is unavailable/raised."""
    if q.device.type not in SDP_CHECK_DEVICES:
        return None
    gate = getattr(torch.backends.cuda, f"can_use_{backend}_attention", None)
    if gate is None:
        return None
    k, v = k.contiguous(), v.contiguous()  # as the wrappers pass them
    try:
        if torch_version() >= (2, 5):
            params = torch.backends.cuda.SDPAParams(q, k, v, None, 0.0, is_causal, k.shape[1] != q.shape[1])
        else:
            params = torch.backends.cuda.SDPAParams(q, k, v, None, 0.0, is_causal)
        ok = gate(params, False)
    except Exception:  # noqa: BLE001 - no verdict: the op itself decides (and the registry falls back on errors)
        return None
    return None if ok else f"torch.backends.cuda.can_use_{backend}_attention refuses these inputs"


def in_dtype(t: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``t`` in q's dtype and contiguous (the fused backwards need out/dout like that)."""
    return t.to(q.dtype).contiguous()


def repeat_kv(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, H_kv, S, D) -> (B, H, S, D), materialised and contiguous (expanded K/V give wrong results, pytorch
    #191937; torch CP makes K/V contiguous: "Without making key and value contiguous(), the loss curve is bad")."""
    g = heads // t.shape[1]
    return t.contiguous() if g == 1 else t.repeat_interleave(g, dim=1)


def sum_groups(t: torch.Tensor, hkv: int) -> torch.Tensor:
    """(B, H, S, D) grads of repeated K/V -> (B, H_kv, S, D): sum over each group of H / H_kv heads."""
    return t if t.shape[1] == hkv else t.unflatten(1, (hkv, t.shape[1] // hkv)).sum(2)


def additive_bias(mask: torch.Tensor, q: torch.Tensor, sk: int, align: int = 16) -> torch.Tensor:
    """Bool or float mask broadcastable to (B, H, Sq, Sk) -> additive ``(B, H, Sq, Sk)`` view in q's dtype.

    The memory-efficient op wants the bias in q's dtype, 4-D, ``stride(-1) == 1`` and the other strides
    multiples of its alignment: the rows are padded to ``align`` elements and broadcast dims are
    ``expand``ed (stride 0), as SDPA's own ``preprocess_mask`` does. Bool masks become 0 / -inf (exact
    in any dtype); float masks are rounded to q's dtype, as SDPA rounds them.
    """
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    b, h, sq = q.shape[0], q.shape[1], q.shape[2]
    mb, mh, mq, _ = mask.shape
    buf = torch.zeros(mb, mh, mq, -(-sk // align) * align, dtype=q.dtype, device=q.device)
    view = buf[..., :sk]
    if mask.dtype == torch.bool:
        view.masked_fill_(~mask.expand(mb, mh, mq, sk), NEG_INF)
    else:
        view.copy_(mask.expand(mb, mh, mq, sk))
    return view.expand(b, h, sq, sk)


# --- LSE normalisers: each op's LSE -> (B, H, Sq) float32 contiguous, -inf where no key is seen ----


def lse_no_key_neg_inf(lse: torch.Tensor) -> torch.Tensor:
    """Flash (and possibly cuDNN) report +inf on rows that see no key; seqpar's convention is -inf."""
    return lse.masked_fill(torch.isposinf(lse), NEG_INF)


def lse_from_flash(lse: torch.Tensor) -> torch.Tensor:
    """Flash: (B, H, Sq) float32 contiguous already; +inf on empty rows -> -inf."""
    return lse_no_key_neg_inf(lse.float().contiguous())


def lse_from_efficient(lse: torch.Tensor, sq: int) -> torch.Tensor:
    """Memory-efficient: (B, H, ceil32(Sq)) on CUDA with a +inf tail (unpadded on ROCm) -> first Sq."""
    return lse_no_key_neg_inf(lse[..., :sq].float().contiguous())


def lse_for_efficient_backward(lse: torch.Tensor, pad_to: int = 32) -> torch.Tensor:
    """The buffer the memory-efficient backward reads: (B, H, ceil32(Sq)) float32, tail +inf (as its forward
    returns it: the kernel skips bound checks on the padded rows). ROCm (unpadded forward): ``pad_to=1``."""
    sq = lse.shape[-1]
    n = -(-sq // pad_to) * pad_to
    buf = torch.full((*lse.shape[:-1], n), float("inf"), dtype=torch.float32, device=lse.device)
    buf[..., :sq] = lse
    return buf


def lse_from_cudnn(lse: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """cuDNN: (B, H, Sq) float32 in torch 2.5-2.8, (B, H, Sq, 1) from 2.9 (possibly strided) -> (B, H, Sq)."""
    return lse_no_key_neg_inf(lse.float().reshape(q.shape[0], q.shape[1], q.shape[2]).contiguous())


def lse_for_cudnn_backward(lse: torch.Tensor) -> torch.Tensor:
    """What the cuDNN backward reads: the rank its forward returned in this torch version, contiguous
    (cuDNN < 9.26 ignores the declared strides of the stats tensor on SM80, cudnn-frontend #304)."""
    lse = lse.float().contiguous()
    return lse.unsqueeze(-1) if torch_version() >= (2, 9) else lse


# --- calling an aten op by argument name, per torch version ----------------------------------------


def schema_at(table: dict[tuple[int, int], tuple[str, ...]], version: tuple[int, int]) -> tuple[str, ...] | None:
    """The positional argument names in force at ``version``: the entry of the latest version <= it."""
    since = [v for v in table if v <= version]
    return table[max(since)] if since else None


def call(op, table: dict[tuple[int, int], tuple[str, ...]], values: dict, **kwargs):
    """``op(*positional, **kwargs)`` with the positional arguments ordered by this torch version's schema."""
    names = schema_at(table, torch_version())
    if names is None:
        raise RuntimeError(f"no schema for torch {torch.__version__} in the wrapper's table")
    return op(*[values[n] for n in names], **kwargs)


def row_valid(mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B|1, H|1, Sq) bool: rows that see at least one key (None: all rows do)."""
    if mask is None:
        return None
    m = mask if mask.dtype == torch.bool else mask > NEG_INF
    while m.dim() < 4:
        m = m.unsqueeze(0)
    return m.any(-1)
