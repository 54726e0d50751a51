"""Training parity: sequence-parallel training gives the single-device run's losses and gradients.

Run: ``python -m pytest tests/test_train_parity.py -q``

The same tiny Llama (2 layers, hidden 32, 4 heads, 2 kv heads: GQA), the same data and seed,
``STEPS`` AdamW steps in float32:

- single process: ``attn_implementation="sdpa"`` on the full sequence, transformers' own loss
  (``model(labels=...)``: mean cross entropy over valid tokens), run in the test process;
- W = 2 and 3 gloo ranks, contiguous and zigzag layouts: ``attn_implementation="seqpar"``,
  ``seqpar.nn.shard_batch`` / ``sequence_parallel_loss`` / ``sync_gradients``.

S = 101 gives uneven shards (51/50; 34/34/33; zigzag pieces of 17 and 16); one batch row is
right-padded (its labels -100 there) and some labels are -100 (prompt tokens), so the loss weighting
across ranks matters. Asserted per step: loss within ``LOSS_RTOL`` = 1e-4 relative and the global
gradient norm (before the optimizer step) within ``GRAD_RTOL`` = 1e-4 relative. Measured: losses
<= 3e-7, gradient norms <= 9e-6 (AdamW amplifies float32 rounding as the steps go on).
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

V, S, B, STEPS, LR = 61, 101, 2, 12, 1e-2
LOSS_RTOL = GRAD_RTOL = 1e-4


def make_model(attn_implementation: str):
    cfg = transformers.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, attention_dropout=0.0,
    )
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn_implementation).float()


def make_batches() -> list[dict]:
    """One full-sequence batch per step: input_ids, attention_mask (right padding), labels (-100 masked).

    The same random tokens every step (memorised: the loss falls fast, so the steps really move the
    weights), with a different amount of padding each step.
    """
    ids = torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(1))
    out = []
    for step in range(STEPS):
        keep = torch.ones(B, S, dtype=torch.long)
        keep[1, S - 17 - step :] = 0  # right padding, a different amount every step
        labels = ids.masked_fill(keep == 0, -100)
        labels[0, :9] = -100  # "prompt" tokens without loss
        out.append({"input_ids": ids, "attention_mask": keep, "labels": labels})
    return out


def grad_norm(model) -> float:
    return torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters() if p.grad is not None)).item()


def single_device_run() -> tuple[list[float], list[float]]:
    model = make_model("sdpa")
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    losses, norms = [], []
    for batch in make_batches():
        opt.zero_grad()
        loss = model(**batch, use_cache=False).loss  # transformers' own shift and mean
        loss.backward()
        losses.append(loss.item())
        norms.append(grad_norm(model))
        opt.step()
    return losses, norms


def sequence_parallel_run(rank: int, world_size: int, layout: str) -> tuple[list[float], list[float]]:
    import seqpar.hf
    import seqpar.nn

    seqpar.hf.register(layout=layout)
    model = make_model("seqpar")
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    losses, norms = [], []
    for batch in make_batches():
        b = seqpar.nn.shard_batch(batch, layout=layout)
        opt.zero_grad()
        logits = model(input_ids=b["input_ids"], position_ids=b["position_ids"],
                       attention_mask=b["attention_mask"], use_cache=False).logits
        loss = seqpar.nn.sequence_parallel_loss(logits, shift_labels=b["shift_labels"])
        loss.backward()
        seqpar.nn.sync_gradients(model)
        losses.append(loss.item())
        norms.append(grad_norm(model))
        opt.step()
    seqpar.hf.register()
    return losses, norms


@pytest.fixture(scope="module")
def single():
    return single_device_run()


def _rel(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_losses_and_grad_norms_match_single_device(dist, single, world_size, layout):
    ref_losses, ref_norms = single
    assert ref_losses[-1] < 0.7 * ref_losses[0]  # it trains: the steps move the weights
    per_rank = dist(world_size, sequence_parallel_run, layout)
    for rank, (losses, norms) in enumerate(per_rank):
        assert len(losses) == STEPS
        assert losses == per_rank[0][0], f"rank {rank}: the loss differs across ranks"
        assert _rel(losses, ref_losses) < LOSS_RTOL, (rank, losses, ref_losses)
        assert _rel(norms, ref_norms) < GRAD_RTOL, (rank, norms, ref_norms)
