r"""Training with sequence parallelism: a drop-in attention module, batch sharding, the loss.

The two-line change to a training step (every rank of ``group`` runs the same code)::

    batch = seqpar.nn.shard_batch(batch, layout="zigzag", group=group)        # 1. shard the sequence
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    loss = seqpar.nn.sequence_parallel_loss(logits, shift_labels=batch["shift_labels"], group=group)  # 2.
    loss.backward()
    seqpar.nn.sync_gradients(model, group=group)   # sum the ranks' parameter gradients
    optimizer.step()

where the model's attention is :class:`SequenceParallelAttention` (your own model) or
``attn_implementation="seqpar"`` (Hugging Face, :mod:`seqpar.hf`).

Three rules this module enforces so the result equals single-device training:

1. **Shift labels on the global sequence, then shard.** A causal LM predicts token ``t+1`` at
   position ``t``; the target of a rank's last token lives on another rank. :func:`shard_batch`
   takes HF-style ``labels`` (aligned with ``input_ids``), shifts them *before* splitting and returns
   ``shift_labels`` -- never ``labels`` -- and :func:`sequence_parallel_loss` only accepts
   ``shift_labels=`` (keyword-only), so labels cannot be shifted twice or shifted per shard.
2. **Position ids stay global** (rotary embeddings): :func:`shard_batch` shards given
   ``position_ids`` or creates them from the layout (:func:`seqpar.layout.positions`).
3. **The loss is token-count weighted across ranks**: sum of per-token cross entropy over valid
   tokens, all-reduced, divided by the all-reduced count of valid tokens -- the same value on every
   rank, equal to the single-device mean for any padding, ``ignore_index`` and uneven shards. Its
   backward gives each rank the exact gradient of that global loss w.r.t. its local logits, so the
   parameter gradients of the ranks must be **summed** (:func:`sync_gradients`), not averaged. (With
   ``DistributedDataParallel`` over the sequence-parallel ranks, which averages, back-propagate
   ``loss * world_size`` instead.)

Run the example: ``NPROC=2 launch/torchrun.sh examples/train_recall.py`` (see ``examples/train_recall.py``).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from seqpar import checks
from seqpar.attention import attention
from seqpar.comm import get_communicator
from seqpar.layout import check_layout, pieces, positions

# Keys of a batch that are split along the sequence; everything else is refused (see shard_batch).
SEQUENCE_KEYS = (
    "input_ids", "labels", "shift_labels", "attention_mask", "position_ids", "document_ids",
    "inputs_embeds", "token_type_ids",
)


class SequenceParallelAttention(torch.nn.Module):
    """Exact attention over a sequence split across the ranks of ``group`` (wraps :func:`seqpar.attention`).

    Use it in place of ``F.scaled_dot_product_attention`` inside any model; the model's other layers
    are per-token and need no change. ``forward(q, k, v)`` takes this rank's ``(B, H, S_local, D)``
    queries and ``(B, H_kv, S_local, D)`` keys/values (GQA/MQA: ``H % H_kv == 0``, never repeated) and
    returns ``(B, H, S_local, D)``. Causal and window masks use *global* positions from ``layout``.
    """

    def __init__(
        self,
        *,
        group: Any = None,
        is_causal: bool = False,
        layout: str = "contiguous",
        strategy: str = "auto",
        scale: float | None = None,
        window_size: int | None = None,
    ) -> None:
        super().__init__()
        check_layout(layout)
        self.group = group
        self.is_causal = is_causal
        self.layout = layout
        self.strategy = strategy
        self.scale = scale
        self.window_size = window_size

    def forward(
        self,
        q: torch.Tensor,  # (B, H, S_local, D)
        k: torch.Tensor,  # (B, H_kv, S_local, D)
        v: torch.Tensor,  # (B, H_kv, S_local, D)
        *,
        key_padding_mask: torch.Tensor | None = None,  # (B, S_local) bool, True = attend
        document_ids: torch.Tensor | None = None,  # (B, S_local) int
    ) -> torch.Tensor:  # (B, H, S_local, D)
        return attention(
            q, k, v, group=self.group, is_causal=self.is_causal, scale=self.scale, layout=self.layout,
            strategy=self.strategy, key_padding_mask=key_padding_mask, window_size=self.window_size,
            document_ids=document_ids,
        )

    def extra_repr(self) -> str:
        return (
            f"is_causal={self.is_causal}, layout={self.layout!r}, strategy={self.strategy!r}, "
            f"scale={self.scale}, window_size={self.window_size}"
        )


def _shard(x: torch.Tensor, dim: int, seq_len: int, world_size: int, rank: int, layout: str) -> torch.Tensor:
    parts = [x.narrow(dim, a, b - a) for a, b in pieces(seq_len, world_size, rank, layout)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def shift_global_labels(labels: torch.Tensor, *, seq_dim: int = 1, ignore_index: int = -100) -> torch.Tensor:
    """Causal-LM targets on the *global* sequence: ``out[..., t] = labels[..., t + 1]``, last = ignore_index."""
    pad_shape = list(labels.shape)
    pad_shape[seq_dim] = 1
    rest = labels.narrow(seq_dim, 1, labels.shape[seq_dim] - 1)
    return torch.cat([rest, labels.new_full(pad_shape, ignore_index)], dim=seq_dim)


def shard_batch(
    batch: Mapping[str, torch.Tensor],
    *,
    layout: str = "contiguous",
    group: Any = None,
    seq_dim: int = 1,
    ignore_index: int = -100,
) -> dict[str, torch.Tensor]:
    """This rank's slice of a batch of *full* sequences, ready for a sequence-parallel model.

    Args:
        batch: full-length tensors, sequence along ``seq_dim``: any of ``input_ids``, ``labels``
            (HF convention: aligned with ``input_ids``, *not* shifted), ``shift_labels`` (already
            shifted; instead of ``labels``), ``attention_mask`` (2-D padding mask, 1/True = real
            token), ``position_ids`` (global), ``document_ids``, ``inputs_embeds``, ``token_type_ids``.
            Any other key is refused (``ValueError``) rather than silently left unsharded.
        layout: ``"contiguous"`` or ``"zigzag"`` (the same one the attention uses).
        group: None (default torch.distributed group), a ``ProcessGroup`` or an mpi4py ``Comm``.
        seq_dim: the sequence dimension of every tensor (1 for ``(B, S)`` / ``(B, S, E)``).
        ignore_index: label of the last position after the shift.

    Returns:
        A new dict with the sharded tensors. ``labels`` is replaced by ``shift_labels``: the labels
        shifted on the *global* sequence before sharding (the target of each rank's last token is the
        next rank's first token). ``position_ids`` are the global positions of this rank's tokens,
        created from the layout when absent (shape of ``input_ids``' shard, int64).
    """
    check_layout(layout)  # no collective here: a local error cannot leave another rank waiting
    comm = get_communicator(group)
    rank, w = comm.rank, comm.world_size
    unknown = sorted(set(batch) - set(SEQUENCE_KEYS))
    if unknown:
        raise ValueError(f"rank {rank}: shard_batch got keys {unknown}; allowed: {', '.join(SEQUENCE_KEYS)}")
    if "labels" in batch and "shift_labels" in batch:
        raise ValueError(f"rank {rank}: pass either labels (unshifted) or shift_labels (shifted), not both")
    ref = "input_ids" if "input_ids" in batch else ("inputs_embeds" if "inputs_embeds" in batch else None)
    if ref is None:
        raise ValueError(f"rank {rank}: shard_batch needs input_ids or inputs_embeds; got keys {sorted(batch)}")
    seq_len = batch[ref].shape[seq_dim]
    for key, t in batch.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"rank {rank}: batch[{key!r}] must be a torch.Tensor, got {type(t).__name__}")
        if key == "attention_mask" and t.dim() != 2:
            raise ValueError(
                f"rank {rank}: attention_mask has shape {tuple(t.shape)}; only a 2-D (B, S) padding mask "
                "can be sharded (causal/window/document masks are options of the attention)"
            )
        if t.dim() <= seq_dim or t.shape[seq_dim] != seq_len:
            raise ValueError(
                f"rank {rank}: batch[{key!r}] has shape {tuple(t.shape)}; expected length {seq_len} "
                f"(the length of {ref}) along seq_dim={seq_dim}"
            )
    out: dict[str, torch.Tensor] = {}
    for key, t in batch.items():
        if key == "labels":
            key, t = "shift_labels", shift_global_labels(t, seq_dim=seq_dim, ignore_index=ignore_index)
        out[key] = _shard(t, seq_dim, seq_len, w, rank, layout)
    if "position_ids" not in out:
        pos = positions(seq_len, w, rank, layout).to(batch[ref].device)  # (S_local,)
        shape = [1] * (seq_dim + 1)
        shape[seq_dim] = pos.numel()
        out["position_ids"] = pos.view(shape).expand(*batch[ref].shape[:seq_dim], pos.numel())
    return out


class _SumAcrossRanks(torch.autograd.Function):
    """``sum_r t_r`` on every rank. Backward: identity. Every rank evaluates the *same* function of
    the sum and back-propagates its own copy, so ``d loss / d t_r`` is the incoming gradient itself
    (an all-reduce in backward would count it ``world_size`` times)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, comm: Any) -> torch.Tensor:
        return comm.all_reduce(t.detach().clone().contiguous(), "sum")

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def sequence_parallel_loss(
    logits_local: torch.Tensor,
    *,
    shift_labels: torch.Tensor,
    group: Any = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Mean cross entropy over the valid tokens of the *whole* sequence (all ranks); differentiable.

    Args:
        logits_local: ``(..., S_local, V)`` this rank's logits (any float dtype; computed in float32,
            or float64 for float64 logits).
        shift_labels: ``(..., S_local)`` int targets *already shifted on the global sequence* -- the
            ``shift_labels`` of :func:`shard_batch`. Keyword-only on purpose: passing HF ``labels``
            (unshifted) here would train the model to copy its input.
        group: the sequence-parallel group.
        ignore_index: targets equal to it are not counted (padding, prompt tokens, the last token).

    Returns:
        A scalar, the same on every rank: ``all_reduce(sum CE) / all_reduce(#valid)`` (0 when no rank
        has a valid token). Backward gives each rank the gradient of this global loss w.r.t. its own
        logits; sum parameter gradients across ranks with :func:`sync_gradients`.
    """
    comm = get_communicator(group)

    def validate():
        for name, t in (("logits_local", logits_local), ("shift_labels", shift_labels)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"rank {comm.rank}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if logits_local.dim() < 2 or tuple(logits_local.shape[:-1]) != tuple(shift_labels.shape):
            raise ValueError(
                f"rank {comm.rank}: logits_local has shape {tuple(logits_local.shape)} but shift_labels has "
                f"{tuple(shift_labels.shape)}; expected (..., S_local, V) and (..., S_local)"
            )
        if not logits_local.is_floating_point():
            raise ValueError(f"rank {comm.rank}: logits_local.dtype={logits_local.dtype}; expected a float dtype")
        if shift_labels.is_floating_point() or shift_labels.dtype == torch.bool:
            raise ValueError(f"rank {comm.rank}: shift_labels.dtype={shift_labels.dtype}; expected an int dtype")
        return {"vocabulary size V": logits_local.shape[-1], "ignore_index": int(ignore_index),
                "loss dtype (float64 logits or not)": int(logits_local.dtype == torch.float64)}, {}

    checks.agree(comm, "sequence_parallel_loss", validate)
    dtype = torch.float64 if logits_local.dtype == torch.float64 else torch.float32
    logits = logits_local.reshape(-1, logits_local.shape[-1]).to(dtype)  # (N_local, V)
    labels = shift_labels.reshape(-1).to(logits.device)  # (N_local,)
    ce_sum = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
    count = (labels != ignore_index).sum().to(dtype)
    total = _SumAcrossRanks.apply(torch.stack([ce_sum, count]), comm)  # (2,) [sum CE, #valid]
    return total[0] / total[1].clamp_min(1)


def sync_gradients(params: torch.nn.Module | Iterable[torch.nn.Parameter], *, group: Any = None) -> None:
    """Sum ``.grad`` of every trainable parameter over the ranks of ``group`` (one all-reduce per dtype).

    A parameter without a gradient counts as zeros (and gets a zero gradient), so every rank sends
    the same buffer layout. Every rank must pass the same parameters (count, shapes, dtypes): checked
    in the one exchange of :func:`seqpar.checks.agree` (a CRC of the list of shapes and dtypes), so a
    mismatch raises ``ValueError`` on every rank instead of a crash or a silent mix-up of gradients.
    """
    comm = get_communicator(group)
    if isinstance(params, torch.nn.Module):
        params = params.parameters()
    params = list(params)
    ps: list[torch.Tensor] = []

    def validate():
        for p in params:
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"rank {comm.rank}: sync_gradients got a {type(p).__name__} among the parameters")
            if p.requires_grad:
                ps.append(p)
        for p in ps:
            if p.grad is not None and (p.grad.shape != p.shape or p.grad.dtype != p.dtype):
                raise ValueError(
                    f"rank {comm.rank}: a parameter of shape {tuple(p.shape)} {p.dtype} has a gradient of shape "
                    f"{tuple(p.grad.shape)} {p.grad.dtype}"
                )
        sig = ";".join(f"{tuple(p.shape)}{p.dtype}" for p in ps).encode()
        return {"parameters (count, elements)": (len(ps), sum(p.numel() for p in ps)),
                "parameter shapes and dtypes (CRC32)": zlib.crc32(sig)}, {}

    checks.agree(comm, "sync_gradients", validate)
    by_key: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for p in ps:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        by_key.setdefault((p.dtype, p.device), []).append(p)
    if comm.world_size == 1:
        return
    for group_ps in by_key.values():
        flat = torch.cat([p.grad.reshape(-1) for p in group_ps])
        comm.all_reduce(flat, "sum")
        off = 0
        for p in group_ps:
            n = p.grad.numel()
            p.grad.copy_(flat[off : off + n].view_as(p.grad))
            off += n
