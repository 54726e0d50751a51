r"""Hugging Face ``transformers`` integration: ``attn_implementation="seqpar"``.

Importing this module registers ``"seqpar"`` in transformers' ``AttentionInterface`` (and a mask
hook in ``AttentionMaskInterface``), so any model that dispatches attention through that interface
(Llama, Mistral, Qwen2/3, Gemma, ... -- transformers >= 5) runs exact sequence-parallel attention::

    import seqpar.hf, seqpar.nn
    seqpar.hf.register(layout="zigzag", group=None)        # optional: options (default contiguous)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="seqpar")

    b = seqpar.nn.shard_batch({"input_ids": ids, "labels": ids, "attention_mask": pad},
                              layout="zigzag")             # this rank's slice; global position_ids
    logits = model(input_ids=b["input_ids"], position_ids=b["position_ids"],
                   attention_mask=b["attention_mask"], use_cache=False).logits
    loss = seqpar.nn.sequence_parallel_loss(logits, shift_labels=b["shift_labels"])

What the model must be given, and what transformers passes on to the attention function:

- ``input_ids``: this rank's shard only (``seqpar.nn.shard_batch``).
- ``position_ids``: the *global* positions of the shard (rotary embeddings). Required: without them
  the model numbers the shard from 0. Checked against the layout once per forward (layer 0: 5 ints
  per rank in the attention call's one cross-rank exchange; every rank raises the same ``ValueError`` on
  a mismatch); skipped with
  ``seqpar_document_ids`` (packed sequences may restart positions per document) or ``SEQPAR_CHECK=0``.
- Causal (and sliding-window, from the ``sliding_window`` kwarg models such as Mistral pass) masking
  is done by seqpar on global positions: whatever mask transformers would build from the *local*
  length is never used.
- ``attention_mask``: only a 2-D ``(B, S_local)`` padding mask (1 = real token), the shard of the
  full mask. The registered mask hook hands it through unchanged and it becomes seqpar's
  ``key_padding_mask``. 4-D masks, custom ``or_mask_function``/``and_mask_function`` overlays, KV
  caches with past tokens, dropout, ``softcap``, attention sinks, flash-attention packing kwargs
  (``cu_seq_lens_*``) and ``output_attentions`` raise ``ValueError``: seqpar cannot honour them.
- ``labels=``: do not pass them to a sequence-parallel model (transformers would shift them inside
  the shard and average per rank); use ``seqpar.nn.sequence_parallel_loss`` on the logits.
- Packed sequences: pass ``seqpar_document_ids=`` (``(B, S_local)`` int, the shard) to the model's
  forward; transformers forwards extra kwargs to the attention function.

GQA (``num_key_value_heads < num_attention_heads``) runs without repeating K/V. ``transformers`` is
the optional ``hf`` extra: ``pip install -e ".[hf]"`` in a seqpar checkout. Verified with transformers 5.24.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from seqpar.attention import _attention
from seqpar.comm import get_communicator
from seqpar.layout import check_layout, positions
from seqpar.plan import STRATEGIES

try:
    import transformers
except ImportError as e:
    raise ImportError('seqpar.hf needs transformers: pip install -e ".[hf]" in a seqpar checkout') from e
try:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"seqpar.hf needs transformers' AttentionInterface and AttentionMaskInterface; transformers "
        f'{transformers.__version__} is too old: pip install -U "transformers>=5"'
    ) from e

NAME = "seqpar"
_OPTIONS: dict[str, Any] = {"group": None, "layout": "contiguous", "strategy": "auto"}

# kwargs transformers may pass that change the attention result and that seqpar cannot honour
_UNSUPPORTED = ("softcap", "s_aux", "sinks", "position_bias", "cu_seq_lens_q", "cu_seq_lens_k", "head_mask")


def register(*, group: Any = None, layout: str = "contiguous", strategy: str = "auto", name: str = NAME) -> str:
    """Register (or re-configure) the ``attn_implementation`` called ``name``; returns ``name``.

    Args:
        group: the sequence-parallel group (None: the default torch.distributed group; a
            ``ProcessGroup``; an mpi4py ``Comm``).
        layout: ``"contiguous"`` or ``"zigzag"`` -- must be the layout the batch was sharded with.
        strategy: ``"auto"`` or a name of ``seqpar.strategies.registry.STRATEGIES`` (see :func:`seqpar.plan`).

    The options are process-wide (every model using ``name``). Importing :mod:`seqpar.hf` already
    registers ``"seqpar"`` with the defaults.
    """
    check_layout(layout)
    if strategy != "auto" and strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r}; allowed: 'auto', {', '.join(map(repr, STRATEGIES))}")
    _OPTIONS.update(group=group, layout=layout, strategy=strategy)
    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, mask_forward)
    return name


def mask_forward(
    *,
    attention_mask: torch.Tensor | None = None,
    q_length: int | None = None,
    kv_length: int | None = None,
    q_offset: Any = 0,
    kv_offset: Any = 0,
    use_vmap: bool = False,
    **kwargs: Any,
) -> torch.Tensor | None:
    """transformers' mask hook: pass the 2-D ``(B, S_local)`` padding mask through (as bool), or None.

    The causal/sliding pattern transformers would build here refers to *local* indices; seqpar
    builds its own from global positions, so only the padding is kept.
    """
    if use_vmap:
        raise ValueError(
            "seqpar: this model overlays custom mask functions (or_mask_function/and_mask_function) on the "
            "causal mask; seqpar cannot honour them -- use attn_implementation='sdpa' without sequence parallelism"
        )
    if int(q_offset) != 0 or int(kv_offset) != 0 or (kv_length is not None and kv_length != q_length):
        raise ValueError(
            f"seqpar: KV cache with past tokens (q_offset={int(q_offset)}, kv_length={kv_length}, "
            f"q_length={q_length}) is not supported; call the model with use_cache=False"
        )
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        raise ValueError(f"seqpar: attention_mask has shape {tuple(attention_mask.shape)}; expected (B, S_local)")
    return attention_mask.bool()


def _stats(pos: torch.Tensor) -> list[int]:
    """``[S_local, sum, sum of squares, #breaks (p[i+1] != p[i] + 1)]`` of a 1-D position row."""
    p = pos.to(torch.int64)
    breaks = int((p[1:] != p[:-1] + 1).sum()) if p.numel() > 1 else 0
    return [p.numel(), int(p.sum()), int((p * p).sum()), breaks]


def _position_fields(position_ids: torch.Tensor) -> list[int]:
    """This rank's ``[S_local, sum, sum of squares, #breaks, rows differ]`` of its position ids."""
    rows = position_ids.reshape(-1, position_ids.shape[-1])  # (B or 1, S_local)
    return [*_stats(rows[0]), int(bool((rows != rows[:1]).any()))]


def _check_positions(table: dict[str, list[tuple[int, ...]]], rank: int, w: int, layout: str, first: list) -> None:
    """Raise on every rank when some rank's position ids are not its global positions under ``layout``.

    The 5 ints per rank travel in the attention call's one exchange (no extra collective); compared
    with what the layout gives (catches local ``arange`` positions and a wrong layout).
    """
    per_rank = [list(v) for v in table["position_ids stats"]]
    seq_len = sum(r[0] for r in per_rank)
    bad = [r for r in range(w) if per_rank[r] != [*_stats(positions(seq_len, w, r, layout)), 0]]
    if bad:
        raise ValueError(
            f"seqpar (rank {rank}): position_ids on rank(s) {bad} are not the global positions of their "
            f"shard for layout {layout!r} (S={seq_len}, {w} ranks; this rank got {first}...) -- "
            "pass position_ids=seqpar.nn.shard_batch(...)['position_ids'], the same layout to "
            "seqpar.hf.register(layout=...), or seqpar_document_ids= for packed sequences whose positions restart"
        )


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,  # (B, H, S_local, D)
    key: torch.Tensor,  # (B, H_kv, S_local, D)
    value: torch.Tensor,  # (B, H_kv, S_local, D)
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The ``AttentionInterface`` function: returns ``(attn_output (B, S_local, H, D), None)``.

    Its checks (unsupported arguments, mask form, position ids) run inside the attention call's one
    cross-rank exchange: an error on one rank raises on every rank, never leaving the others waiting.
    """
    group, layout, strategy = _OPTIONS["group"], _OPTIONS["layout"], _OPTIONS["strategy"]
    comm = get_communicator(group)
    rank = comm.rank
    document_ids = kwargs.get("seqpar_document_ids")
    is_causal = kwargs.get("is_causal")
    is_causal = getattr(module, "is_causal", True) if is_causal is None else bool(is_causal)
    window = kwargs.get("sliding_window")
    ok_mask = (
        isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2 and attention_mask.dtype == torch.bool
    )
    key_padding_mask = attention_mask if ok_mask else None  # anything else: refused by extra() below
    position_ids = kwargs.get("position_ids")
    check_pos = (
        position_ids is not None and document_ids is None and getattr(module, "layer_idx", 0) == 0
        and os.environ.get("SEQPAR_CHECK", "1") != "0"
    )  # once per forward (layer 0): the ids are shared by the layers

    def extra() -> dict[str, Any]:
        if dropout:
            raise ValueError(
                f"seqpar (rank {rank}): attention dropout={dropout} is not supported; set attention_dropout=0"
            )
        bad = [k for k in _UNSUPPORTED if kwargs.get(k) is not None]
        if bad:
            raise ValueError(f"seqpar (rank {rank}): unsupported attention arguments {bad}")
        if kwargs.get("output_attentions"):
            raise ValueError(
                f"seqpar (rank {rank}): output_attentions=True is not supported (weights are never formed)"
            )
        if query.shape[2] != key.shape[2]:
            raise ValueError(
                f"seqpar (rank {rank}): {query.shape[2]} queries but {key.shape[2]} keys (a KV cache with past "
                "tokens?); call the model with use_cache=False"
            )
        if attention_mask is not None and not ok_mask:
            raise ValueError(
                f"seqpar (rank {rank}): got a {getattr(attention_mask, 'dim', lambda: '?')()}-D "
                f"{getattr(attention_mask, 'dtype', type(attention_mask).__name__)} attention mask; only "
                "the 2-D (B, S_local) padding mask passed as attention_mask= can be honoured (causal masking is "
                "done by seqpar on global positions; packed sequences: seqpar_document_ids=)"
            )
        if window is not None and not is_causal:
            raise ValueError(f"seqpar (rank {rank}): sliding_window={window} without causal masking is not supported")
        return {"position_ids stats": _position_fields(position_ids) if check_pos else [-1] * 5}

    def after(table: dict[str, list[tuple[int, ...]]]) -> None:
        checked = [r for r, v in enumerate(table["position_ids stats"]) if v[0] != -1]
        if checked and len(checked) != comm.world_size:
            raise ValueError(
                f"seqpar (rank {rank}): position_ids were given (layer 0, no seqpar_document_ids, SEQPAR_CHECK on) "
                f"on rank(s) {checked} only; every rank must call the model the same way"
            )
        if checked:
            first = position_ids.reshape(-1, position_ids.shape[-1])[0, :6].tolist()
            _check_positions(table, rank, comm.world_size, layout, first)

    window_size = None if window is None else int(window) - 1  # HF: key j visible when i - j < sliding_window
    out = _attention(
        query, key, value, group=group, is_causal=is_causal, scale=scaling, layout=layout, strategy=strategy,
        key_padding_mask=key_padding_mask, window_size=window_size, document_ids=document_ids,
        op="hf attention", extra=extra, after=after,
    )  # (B, H, S_local, D)
    return out.transpose(1, 2).contiguous(), None  # (B, S_local, H, D)


register()
