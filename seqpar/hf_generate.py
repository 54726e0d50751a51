r"""Hugging Face ``generate()`` over a sharded KV cache: ``attn_implementation="seqpar_decode"``.

Importing this module registers ``"seqpar_decode"`` in transformers' ``AttentionInterface`` (and a
mask hook in ``AttentionMaskInterface``). With a :class:`SeqparCache` (a ``transformers`` ``Cache``
subclass over :class:`seqpar.KVCache`) every rank runs the same replicated model, keeps only its
share of the K/V, and gets the same tokens::

    import seqpar.hf_generate as hg
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=hg.NAME)      # same weights everywhere
    cache = hg.SeqparCache(model.config, batch_size=ids.shape[0], max_cache_len=ids.shape[1] + 64)
    out = model.generate(ids, attention_mask=pad, past_key_values=cache, max_new_tokens=64, do_sample=False)

What happens in each attention layer (:func:`attention_forward`): the cache's ``update`` hands the new
K/V through, and :func:`seqpar.decode_attention` stores the positions this rank owns and attends the
replicated queries over this rank's keys, causal on global (cache) positions, with the 2-D padding
mask and the model's ``sliding_window``; one combining collective merges the ranks' partials exactly.

Prefill, two ways:

- by default the prompt runs through the same path (queries replicated, ``T`` = prompt length, K/V
  sharded on arrival) -- the KV-sharded form: prompt activations are replicated, only the cache is split;
- :func:`prefill` first (prompts without padding): each rank runs its contiguous shard of the prompt
  through the model with sequence-parallel attention (``seqpar.hf``) and keeps its K/V shard
  (:meth:`seqpar.KVCache.prefill`); ``generate()`` then continues from the cached prefix.

Not supported (raise ``ValueError``): beam search / ``num_return_sequences > 1`` (cache reordering),
cache cropping (assisted decoding), dropout, ``output_attentions``, 4-D masks, softcapping / sinks.
"""

from __future__ import annotations

from typing import Any

import torch

from seqpar.cache import KVCache
from seqpar.decode import decode_attention

try:
    from transformers import AttentionInterface
    from transformers.cache_utils import Cache, CacheLayerMixin
    from transformers.masking_utils import AttentionMaskInterface
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError('seqpar.hf_generate needs transformers >= 5: pip install -e ".[hf]" in a seqpar checkout') from e

NAME = "seqpar_decode"
_UNSUPPORTED = ("softcap", "s_aux", "sinks", "position_bias", "cu_seq_lens_q", "cu_seq_lens_k", "head_mask")


class SeqparLayer(CacheLayerMixin):
    """One layer of a :class:`SeqparCache`: the view of layer ``layer_idx`` of the shared :class:`KVCache`."""

    is_compileable = False
    is_croppable = False
    is_sliding = False
    supports_early_init = False

    attention = NAME  # the attn_implementation whose function consumes this layer's K/V

    def __init__(self, kv: KVCache, layer_idx: int, slots: list[int], config: Any = None):
        super().__init__()
        self.kv, self.layer_idx, self.slots, self.config = kv, layer_idx, slots, config
        self.is_initialized = True
        self.batch_size = len(slots)
        self.prompt_len: int | None = None  # set while prefill() runs the sharded prompt
        self.handed: torch.Tensor | None = None

    def _hand(self, key_states: torch.Tensor) -> None:
        """Tag the new K/V for the attention function -- after checking that the model's attention IS that function:
        any other (e.g. ``sdpa``) would attend the new tokens only, with this cache's keys skipped, a silently wrong
        result. Checked from the model's config, and from the last K/V handed out (never consumed: some other
        function attended them)."""
        impl = getattr(self.config, "_attn_implementation", None)
        unconsumed = self.handed is not None and getattr(self.handed, "_seqpar_layer", None) is self
        if (impl is not None and impl != self.attention) or unconsumed:
            raise ValueError(
                f"{self.attention}: the model's attention implementation is {impl!r}, not {self.attention!r}: it "
                "would skip the K/V in this cache (a wrong result). Build the model with "
                f"attn_implementation={self.attention!r} (note: transformers rewrites the attention implementation of "
                "a config object another model is later built from)")
        key_states._seqpar_layer = self  # read by the attention function (the only consumer of these tensors)
        self.handed = key_states

    def lazy_initialization(self, key_states, value_states) -> None:  # storage is preallocated
        return None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        """Hands the new K/V through, tagged with this layer: the attention function stores and attends them.

        During :func:`prefill` (sequence-parallel prompt) the K/V are this rank's shard: stored here directly.
        """
        if self.prompt_len is not None:
            self.kv.prefill(self.layer_idx, self.slots, key_states, value_states, self.prompt_len)
            return key_states, value_states
        self._hand(key_states)
        return key_states, value_states

    def get_seq_length(self) -> int:
        return self.kv.lengths[self.layer_idx][self.slots[0]]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if self.prompt_len is not None:  # sharded prompt: the local shard only (seqpar.hf masks on global positions)
            return query_length, 0
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return self.kv.max_seq_len

    def reset(self) -> None:
        for s in self.slots:
            self.kv.lengths[self.layer_idx][s] = 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise ValueError("seqpar_decode: beam search (cache reordering) is not supported; use num_beams=1")

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError("seqpar_decode: cropping the cache (assisted decoding) is not supported")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise ValueError("seqpar_decode: num_return_sequences > 1 / expanding the batch is not supported")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise ValueError("seqpar_decode: selecting batch rows of the cache is not supported")


class SeqparCache(Cache):
    """A ``transformers`` ``Cache`` whose K/V live split across the ranks of ``group``.

    Args:
        config: the model's config (layers, kv heads, head dim, dtype are read from it).
        batch_size: rows of the batch ``generate`` is called with.
        max_cache_len: prompt (padded) length + new tokens.
        group, placement, block_size, combine: as for :class:`seqpar.KVCache`.
        dtype: cache dtype (default: the config's ``dtype``, else float32).
    """

    def __init__(self, config: Any, *, batch_size: int, max_cache_len: int, group: Any = None,
                 placement: str = "round_robin", block_size: int = 16, combine: str = "auto",
                 dtype: torch.dtype | None = None):
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        dtype = dtype or getattr(text, "dtype", None) or torch.float32
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        self.kv = KVCache(num_layers=text.num_hidden_layers, max_batch=batch_size, max_seq_len=max_cache_len,
                          kv_heads=kv_heads, head_dim=head_dim, dtype=dtype, placement=placement,
                          block_size=block_size, combine=combine, group=group)
        self.slots = self.kv.allocate(batch_size)
        super().__init__(layers=[SeqparLayer(self.kv, i, self.slots, text) for i in range(text.num_hidden_layers)])


def prefill(model: Any, input_ids: torch.Tensor, cache: SeqparCache, *, group: Any = None) -> int:
    """Sequence-parallel prefill: all but the last prompt token, each rank running its contiguous shard.

    Each rank feeds its ``seqpar.layout`` contiguous shard of ``input_ids[:, :-1]`` through the model
    with ``attn_implementation="seqpar"`` (:mod:`seqpar.hf`, exact sequence-parallel attention) and keeps the
    K/V of its shard in ``cache`` -- nothing is gathered. Then ``model.generate(input_ids, cache=cache, ...)``
    continues from the cached prefix: the last prompt token and every new token go through the decode path.
    Prompts without padding only (``seqpar.hf`` needs the global positions; HF derives per-row positions from a
    padding mask). Returns the number of tokens prefilled.
    """
    import seqpar.hf
    import seqpar.nn

    p = input_ids.shape[1] - 1
    if p < 1 or any(layer.get_seq_length() for layer in cache.layers):
        raise ValueError(f"seqpar_decode prefill: needs an empty cache and a prompt of >= 2 tokens (got {p + 1})")
    shard = seqpar.nn.shard_batch({"input_ids": input_ids[:, :p]}, layout="contiguous", group=group)
    seqpar.hf.register(layout="contiguous", group=group)
    previous = model.config._attn_implementation
    for layer in cache.layers:
        layer.prompt_len = p
    try:
        model.config._attn_implementation = seqpar.hf.NAME
        with torch.no_grad():
            model(input_ids=shard["input_ids"], position_ids=shard["position_ids"], cache=cache, use_cache=True)
    finally:
        model.config._attn_implementation = previous
        for layer in cache.layers:
            layer.prompt_len = None
    return p


def mask_forward(*, attention_mask: torch.Tensor | None = None, use_vmap: bool = False, **kwargs: Any):
    """transformers' mask hook: the 2-D ``(B, kv_length)`` padding mask over cache positions, as bool, or None.

    Causal and sliding-window masking is done by :func:`seqpar.decode_attention` on global positions.
    """
    if use_vmap:
        raise ValueError("seqpar_decode: custom mask functions (or_mask_function/and_mask_function) are not supported")
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        raise ValueError(f"seqpar_decode: attention_mask has shape {tuple(attention_mask.shape)}; expected (B, S)")
    return attention_mask.bool()


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,  # (B, H, T, D)
    key: torch.Tensor,  # (B, H_kv, T, D): the new tokens' keys
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The ``AttentionInterface`` function: returns ``(attn_output (B, T, H, D), None)``."""
    layer = getattr(key, "_seqpar_layer", None)
    if layer is None:
        raise ValueError(
            "seqpar_decode: the model was not given a seqpar.hf_generate.SeqparCache "
            "(pass past_key_values=SeqparCache(model.config, batch_size=..., max_cache_len=...))")
    key._seqpar_layer = None
    if dropout:
        raise ValueError(f"seqpar_decode: attention dropout={dropout} is not supported")
    bad = [k for k in _UNSUPPORTED if kwargs.get(k) is not None]
    if bad or kwargs.get("output_attentions"):
        raise ValueError(f"seqpar_decode: unsupported attention arguments {bad or ['output_attentions']}")
    if attention_mask is not None and (attention_mask.dim() != 2 or attention_mask.dtype != torch.bool):
        raise ValueError(f"seqpar_decode: got a {attention_mask.dim()}-D {attention_mask.dtype} mask; only the "
                         "2-D padding mask can be honoured")
    window = kwargs.get("sliding_window")
    out = decode_attention(
        layer.kv, layer.layer_idx, query, key, value, slots=layer.slots, scale=scaling,
        window_size=None if window is None else int(window) - 1, key_padding_mask=attention_mask,
    )  # (B, H, T, D)
    return out.transpose(1, 2).contiguous(), None


def register(name: str = NAME) -> str:
    """Register the attention function and mask hook under ``name`` (done on import)."""
    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, mask_forward)
    return name


register()
