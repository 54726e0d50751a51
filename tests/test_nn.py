"""seqpar.nn: shard_batch, sequence_parallel_loss, SequenceParallelAttention, sync_gradients.

Run: ``python -m pytest tests/test_nn.py -q``

References are independent: the layout as ``torch.tensor_split`` gives it (test_attention's
``expected_positions``), the single-device ``F.cross_entropy(reduction="mean")`` in float64, and the
float64 attention formula of ``seqpar.ops.reference``. Tolerances: float64 1e-12, float32 1e-5.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_attention import expected_positions

import seqpar.nn
from seqpar.comm import Communicator
from seqpar.ops import reference

LAYOUTS = ("contiguous", "zigzag")


class FakeComm(Communicator):
    """A rank of a group without processes: shard_batch only needs rank and world size."""

    def __init__(self, rank: int, world_size: int) -> None:
        super().__init__()
        self.rank, self.world_size = rank, world_size


# --- shard_batch ---------------------------------------------------------------------------------


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_shard_batch_slices_shifts_globally_and_creates_global_positions(world_size, layout):
    b, s = 2, 4 * world_size + 3  # uneven shards
    ids = torch.randint(0, 50, (b, s), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[1, :5] = -100
    keep = torch.ones(b, s, dtype=torch.long)
    keep[1, -2:] = 0
    emb = torch.randn(b, s, 3)
    got_ids, got_labels, got_pos = [], [], []
    for rank in range(world_size):
        out = seqpar.nn.shard_batch(
            {"input_ids": ids, "labels": labels, "attention_mask": keep, "inputs_embeds": emb},
            layout=layout, group=FakeComm(rank, world_size),
        )
        pos = expected_positions(s, world_size, rank, layout)
        assert set(out) == {"input_ids", "shift_labels", "attention_mask", "inputs_embeds", "position_ids"}
        assert torch.equal(out["input_ids"], ids[:, pos])
        assert torch.equal(out["attention_mask"], keep[:, pos])
        assert torch.equal(out["inputs_embeds"], emb[:, pos])
        assert torch.equal(out["position_ids"], pos.expand(b, -1)) and out["position_ids"].dtype == torch.int64
        got_ids.append(out["input_ids"])
        got_labels.append(out["shift_labels"])
        got_pos.append(pos)
    # the target of every token is the next token of the *global* sequence, wherever it lives
    order = torch.cat(got_pos)
    full_ids, full_targets = torch.empty_like(ids), torch.empty_like(ids)
    full_ids[:, order], full_targets[:, order] = torch.cat(got_ids, 1), torch.cat(got_labels, 1)
    assert torch.equal(full_ids, ids)
    assert torch.equal(full_targets[:, :-1], labels[:, 1:])
    assert (full_targets[:, -1] == -100).all()


def test_shard_batch_keeps_given_positions_and_shift_labels():
    s = 11
    pos = torch.arange(100, 100 + s).expand(2, -1)
    targets = torch.arange(s).expand(2, -1)
    out = seqpar.nn.shard_batch(
        {"input_ids": torch.zeros(2, s, dtype=torch.long), "position_ids": pos, "shift_labels": targets},
        layout="zigzag", group=FakeComm(1, 2),
    )
    want = expected_positions(s, 2, 1, "zigzag")
    assert torch.equal(out["position_ids"], pos[:, want])
    assert torch.equal(out["shift_labels"], targets[:, want])  # already shifted: not shifted again


def test_shard_batch_seq_dim_0():
    ids = torch.arange(10)
    out = seqpar.nn.shard_batch({"input_ids": ids, "labels": ids}, layout="zigzag", group=FakeComm(0, 2), seq_dim=0)
    assert out["input_ids"].tolist() == [0, 1, 2, 8, 9]
    assert out["shift_labels"].tolist() == [1, 2, 3, 9, -100]
    assert out["position_ids"].tolist() == [0, 1, 2, 8, 9]


@pytest.mark.parametrize(
    "batch, match",
    [
        ({"input_ids": torch.zeros(1, 8), "loss_mask": torch.zeros(1, 8)}, r"keys \['loss_mask'\]; allowed: input_ids"),
        ({"input_ids": torch.zeros(1, 8), "labels": torch.zeros(1, 8), "shift_labels": torch.zeros(1, 8)}, "not both"),
        ({"input_ids": torch.zeros(1, 8), "labels": torch.zeros(1, 7)}, r"batch\['labels'\] has shape \(1, 7\)"),
        ({"input_ids": torch.zeros(1, 8), "attention_mask": torch.zeros(1, 1, 8, 8)}, "only a 2-D"),
        ({"labels": torch.zeros(1, 8)}, "needs input_ids or inputs_embeds"),
        ({"input_ids": torch.zeros(1, 8)}, "layout='ring'"),
    ],
)
def test_shard_batch_errors(batch, match):
    layout = "ring" if match.startswith("layout") else "contiguous"
    with pytest.raises(ValueError, match=match):
        seqpar.nn.shard_batch(batch, layout=layout, group=FakeComm(0, 2))


# --- sequence_parallel_loss ----------------------------------------------------------------------

LOSS_CASES = {  # name -> which labels are ignored (on top of the global shift's last position)
    "plain": lambda lab: lab,
    "padding": lambda lab: lab.index_fill(1, torch.arange(13, 23), -100),  # right padding: later ranks have none
    "ignore_most": lambda lab: lab.masked_fill(torch.arange(23) % 5 != 0, -100),
    "all_ignored": lambda lab: torch.full_like(lab, -100),
}


def _loss_data(dtype: torch.dtype) -> tuple[torch.Tensor, dict]:
    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(2, 23, 7, generator=g, dtype=torch.float64) * 3).to(dtype)
    labels = torch.randint(0, 7, (2, 23), generator=g)
    return logits, {name: f(labels) for name, f in LOSS_CASES.items()}


def _loss_worker(rank: int, world_size: int, layout: str, dtype: torch.dtype) -> dict:
    """Per case: (loss on this rank, d loss / d full logits from this rank's shard)."""
    logits, labels = _loss_data(dtype)
    out = {}
    for name, lab in labels.items():
        full = logits.clone().requires_grad_(True)
        b = seqpar.nn.shard_batch({"input_ids": lab, "labels": lab}, layout=layout)
        local = seqpar.shard(full, dim=1, layout=layout)
        loss = seqpar.nn.sequence_parallel_loss(local, shift_labels=b["shift_labels"])
        loss.backward()
        out[name] = (loss.detach(), full.grad)
    return out


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_loss_equals_single_device_mean_forward_and_backward(dist, dtype):
    logits, labels = _loss_data(dtype)
    # loss: relative; bf16 logits are exact in float64 and the CE runs in float32, hence 1e-5.
    # gradients: relative to max|grad|; the gradient of bf16 logits is rounded to bf16 (2^-8).
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-5}[dtype]
    grad_tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 8e-3}[dtype]
    for world_size in (2, 3):
        for layout in LAYOUTS:
            per_rank = dist(world_size, _loss_worker, layout, dtype)
            for name, lab in labels.items():
                full = logits.to(torch.float64).clone().requires_grad_(True)
                targets = torch.cat([lab[:, 1:], torch.full_like(lab[:, :1], -100)], 1)
                if (targets != -100).any():
                    want = F.cross_entropy(full.transpose(1, 2), targets, ignore_index=-100)
                    want.backward()
                    want_grad = full.grad
                else:  # no valid token anywhere: the loss is defined as 0 (not nan), with zero gradients
                    want, want_grad = torch.zeros((), dtype=torch.float64), torch.zeros_like(full)
                grads = [r[name][1].to(torch.float64) for r in per_rank]
                got_grad = torch.stack(grads).sum(0)  # each rank holds the gradient of its own positions
                case = f"W={world_size} {layout} {name}"
                for rank, r in enumerate(per_rank):
                    assert abs(r[name][0].item() - want.item()) <= tol * max(1, abs(want.item())), (case, rank)
                assert (got_grad - want_grad).abs().max() <= grad_tol * want_grad.abs().max(), case


def test_loss_rejects_mismatched_shapes_and_float_labels():
    comm = FakeComm(0, 1)
    with pytest.raises(ValueError, match=r"expected \(\.\.\., S_local, V\)"):
        seqpar.nn.sequence_parallel_loss(torch.zeros(2, 5, 7), shift_labels=torch.zeros(2, 4, dtype=torch.long),
                                         group=comm)
    with pytest.raises(ValueError, match="int dtype"):
        seqpar.nn.sequence_parallel_loss(torch.zeros(2, 5, 7), shift_labels=torch.zeros(2, 5), group=comm)
    with pytest.raises(TypeError):
        seqpar.nn.sequence_parallel_loss(torch.zeros(2, 5, 7), torch.zeros(2, 5, dtype=torch.long))  # keyword-only


# --- SequenceParallelAttention ---------------------------------------------------------------------


def _module_worker(rank: int, world_size: int, layout: str) -> tuple[float, float]:
    """Max error of forward and dq/dk/dv (full, from all ranks' shards) vs the float64 formula."""
    g = torch.Generator().manual_seed(5)
    b, h, h_kv, s, d = 2, 4, 2, 4 * world_size + 3, 8
    q = torch.randn(b, h, s, d, generator=g, dtype=torch.float64)
    k, v = (torch.randn(b, h_kv, s, d, generator=g, dtype=torch.float64) for _ in range(2))
    keep = torch.rand(b, s, generator=g) > 0.2
    keep[:, 0] = True
    docs = torch.sort(torch.randint(0, 2, (b, s), generator=g), dim=1).values
    grad_out = torch.randn(b, h, s, d, generator=g, dtype=torch.float64)
    mod = seqpar.nn.SequenceParallelAttention(is_causal=True, layout=layout, scale=0.3, window_size=4)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    sh = [seqpar.shard(t, dim=2, layout=layout) for t in leaves]
    out = mod(*sh, key_padding_mask=seqpar.shard(keep, dim=1, layout=layout),
              document_ids=seqpar.shard(docs, dim=1, layout=layout))
    out.backward(seqpar.shard(grad_out, dim=2, layout=layout))
    full_out = seqpar.unshard(out.detach(), dim=2, layout=layout, seq_len=s)
    grads = [  # each rank's gradient of its own positions, gathered
        seqpar.unshard(seqpar.shard(t.grad, dim=2, layout=layout), dim=2, layout=layout, seq_len=s) for t in leaves
    ]
    # the float64 formula on the full sequence
    ref_leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    mask = reference.sequence_mask(s, is_causal=True, window_size=4, document_ids=docs, key_padding_mask=keep)
    want, _, _ = reference.attention(*ref_leaves, scale=0.3, mask=mask)
    want.backward(grad_out)
    err_out = (full_out - want).abs().max().item()
    err_grad = max((a - r.grad).abs().max().item() for a, r in zip(grads, ref_leaves))
    return err_out, err_grad


@pytest.mark.parametrize("world_size", [2, 3])
def test_module_matches_reference(dist, world_size):
    for layout in LAYOUTS:
        for rank, (e_out, e_grad) in enumerate(dist(world_size, _module_worker, layout)):
            assert e_out < 1e-12 and e_grad < 1e-12, (layout, rank, e_out, e_grad)


def test_module_rejects_unknown_layout_and_reprs_options():
    with pytest.raises(ValueError, match="layout='diagonal'; allowed: 'contiguous', 'zigzag'"):
        seqpar.nn.SequenceParallelAttention(layout="diagonal")
    assert "is_causal=True, layout='zigzag'" in repr(seqpar.nn.SequenceParallelAttention(is_causal=True,
                                                                                          layout="zigzag"))


# --- sync_gradients -------------------------------------------------------------------------------


def _sync_worker(rank: int, world_size: int) -> list[list[float]]:
    lin = torch.nn.Linear(2, 1).double()
    frozen = torch.nn.Parameter(torch.zeros(1), requires_grad=False)
    lin.weight.grad = torch.full_like(lin.weight, rank + 1.0)  # bias has no gradient on any rank
    seqpar.nn.sync_gradients([lin.weight, lin.bias, frozen])
    assert frozen.grad is None
    return [lin.weight.grad.tolist(), lin.bias.grad.tolist()]


def test_sync_gradients_sums(dist):
    for weight, bias in dist(3, _sync_worker):
        assert weight == [[6.0, 6.0]]  # 1 + 2 + 3: summed, not averaged
        assert bias == [0.0]
