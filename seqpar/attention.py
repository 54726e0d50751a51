r"""Sequence-parallel attention: every rank holds a slice of the sequence of q, k and v.

Which tokens each rank holds is the ``layout`` (:mod:`seqpar.layout`). Causal blocks with W = 2 and
the sequence cut into pieces P0..P3::

    contiguous (rank 0: P0 P1, rank 1: P2 P3)       zigzag (rank 0: P0 P3, rank 1: P1 P2)

                  keys  P0 P1 P2 P3                               keys  P0 P1 P2 P3
    rank 0  q P0        \  .  .  .                  rank 0  q P0        \  .  .  .
              P1        #  \  .  .                            P3        #  #  #  \
    rank 1  q P2        #  #  \  .                  rank 1  q P1        #  \  .  .
              P3        #  #  #  \                            P2        #  #  \  .

    ``#`` full block, ``\`` diagonal block (the causal kernel), ``.`` empty: skipped, never computed.
    Contiguous: rank 0 does 2 blocks' work, rank 1 does 6; zigzag: 4 each.

Window, document and padding masks are cut into the same blocks; a block they leave empty is skipped
too, and only partial blocks get a (block-sized) mask.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from seqpar import checks
from seqpar.comm import get_communicator
from seqpar.comm.communicator import (
    LocalCommunicator,
    TorchCommunicator,
    grid_communicator,
    grid_coordinates,
    grid_groups,
    is_grid,
)
from seqpar.layout import LAYOUTS, check_layout, positions, shard_sizes
from seqpar.ops.masks import MaskSpec, Tokens
from seqpar.plan import plan
from seqpar.strategies.registry import REGISTRY, STRATEGIES
from seqpar.strategies.setup import Setup
from seqpar.strategies.ulysses_ring import inner_size, mesh_setup


def attention(
    q_local: torch.Tensor,
    k_local: torch.Tensor,
    v_local: torch.Tensor,
    *,
    group: Any = None,
    is_causal: bool = False,
    scale: float | None = None,
    layout: str = "contiguous",
    strategy: str = "auto",
    key_padding_mask: torch.Tensor | None = None,
    window_size: int | None = None,
    document_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Exact attention over a sequence split across the ranks of ``group``; differentiable.

    Args:
        q_local: ``(B, H, S_r, D)``: this rank's queries (``S_r`` as the layout gives it).
        k_local, v_local: ``(B, H_kv, S_r, D)``: this rank's keys and values; ``H % H_kv == 0``
            (GQA/MQA; query head h uses kv head ``h // (H / H_kv)``; never repeated on the wire).
        group: None (default torch.distributed group), a ``ProcessGroup`` or an mpi4py ``Comm``; for
            ``strategy="ulysses_ring"`` also a 2-D ``DeviceMesh`` (dims (outer, inner)) or a pair
            ``(inner_group, outer_group)`` of ProcessGroups covering the default group (then ``"auto"`` means
            ``"ulysses_ring"``); with None or an mpi4py ``Comm`` the inner size is the launcher's ranks per node
            (``LOCAL_WORLD_SIZE``, Open MPI's or MPICH's local size; default: every rank).
        is_causal: key j is visible to query i when ``j <= i`` (global positions).
        scale: score scale, default ``D ** -0.5``.
        layout: ``"contiguous"`` or ``"zigzag"`` -- which global positions this rank holds.
        strategy: ``"auto"`` (:func:`seqpar.plan` with the launcher's ranks per node when ``group`` is None or
            an mpi4py ``Comm``: ``ulysses_ring`` is a candidate when they make several nodes of several ranks),
            ``"allreduce"``, ``"ring"``, ``"allgather"``, ``"ulysses"``, ``"ulysses_ring"``
            (:mod:`seqpar.strategies.registry`).
        key_padding_mask: ``(B, S_r)`` bool, True = attend to this key.
        window_size: int w; with causal key j is visible when ``0 <= i - j <= w``, else ``|i - j| <= w``.
        document_ids: ``(B, S_r)`` int: packed sequences; a query sees only keys of its document.

    Returns:
        ``(B, H, S_r, D)``: this rank's slice of the output, in q's dtype; rows that see no key are 0.
        Any strides are accepted (views, expanded, transposed).

    Errors never hang: local argument errors are carried through the one cross-rank exchange
    (:func:`seqpar.checks.agree`), so every rank raises (this rank its own error, the others a
    ``ValueError`` naming it); arguments that must agree (shapes except ``S_r``, dtype, scale,
    options) and differ raise ``ValueError`` on every rank naming the argument and the ranks' values.
    """
    return _attention(
        q_local, k_local, v_local, group=group, is_causal=is_causal, scale=scale, layout=layout, strategy=strategy,
        key_padding_mask=key_padding_mask, window_size=window_size, document_ids=document_ids,
    )


def _attention(
    q_local, k_local, v_local, *, group, is_causal, scale, layout, strategy, key_padding_mask, window_size,
    document_ids, op: str = "attention", extra: Callable[[], dict[str, Any]] | None = None,
    after: Callable[[dict[str, list[tuple[int, ...]]]], None] | None = None,
) -> torch.Tensor:
    """:func:`attention`, with hooks for integrations (:mod:`seqpar.hf`): ``extra()`` runs among the
    local checks (may raise; returns more info fields for the exchange), ``after(table)`` runs on every
    rank after the exchange (may raise: the same on every rank, it sees every rank's fields)."""
    grid = is_grid(group)
    if grid and strategy == "auto":
        strategy = "ulysses_ring"
    comm = get_communicator(None if grid else group)
    rank = comm.rank
    two_level = strategy == "ulysses_ring"
    nodes = _auto_nodes(comm, group) if strategy == "auto" and not grid else None

    def validate():
        checks.check_qkv(q_local, k_local, v_local, rank)
        b, h, s_r, d = q_local.shape
        if k_local.shape[2] != s_r:
            raise ValueError(f"rank {rank}: q_local holds {s_r} tokens but k_local holds {k_local.shape[2]}")
        check_layout(layout)
        if strategy != "auto" and strategy not in STRATEGIES:
            raise ValueError(f"strategy={strategy!r}; allowed: 'auto', {', '.join(map(repr, STRATEGIES))}")
        if window_size is not None and (
            isinstance(window_size, bool) or not isinstance(window_size, int) or window_size < 0
        ):
            raise ValueError(f"rank {rank}: window_size={window_size!r}; allowed: None or an int >= 0")
        for name, t, want in (("key_padding_mask", key_padding_mask, "bool"), ("document_ids", document_ids, "int")):
            if t is None:
                continue
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"rank {rank}: {name} must be a torch.Tensor, got {type(t).__name__}")
            if tuple(t.shape) != (b, s_r):
                raise ValueError(f"rank {rank}: {name} has shape {tuple(t.shape)}; expected (B, S_local) = {(b, s_r)}")
            if (want == "bool") != (t.dtype == torch.bool) or (want == "int" and t.is_floating_point()):
                raise ValueError(f"rank {rank}: {name}.dtype={t.dtype}; expected {want}")
        sc = d**-0.5 if scale is None else float(scale)
        info = {"S_local": s_r, **(extra() if extra is not None else {})}
        two = {"ulysses_ring inner size": 0}  # both fields always there: every rank's row has the same slots
        info["grid (inner id, inner rank, outer id, outer rank)"] = (-1, -1, -1, -1)
        if grid and not two_level:
            raise ValueError(f"rank {rank}: group= a DeviceMesh or a pair of groups needs strategy='ulysses_ring' "
                             f"or 'auto', got strategy={strategy!r}")
        if two_level:
            two["ulysses_ring inner size"], info["grid (inner id, inner rank, outer id, outer rank)"] = _grid_info(
                group, grid, comm)
        info["ranks per node (auto)"] = 0
        if nodes:  # auto may pick ulysses_ring over this rank's node: its grid coordinates travel along
            info["ranks per node (auto)"], info["grid (inner id, inner rank, outer id, outer rank)"] = _grid_info(
                group, grid, comm)
        return {
            "q_local.shape (B, H, D)": (b, h, d),
            "k_local.shape (B, H_kv, D)": (k_local.shape[0], k_local.shape[1], k_local.shape[3]),
            "v_local.shape (B, H_kv, D)": (v_local.shape[0], v_local.shape[1], v_local.shape[3]),
            "dtype": checks.dtype_code(q_local.dtype),
            "scale": checks.float_code(sc),
            "is_causal": int(bool(is_causal)),
            "window_size": -1 if window_size is None else window_size,
            "layout": LAYOUTS.index(layout),
            "strategy": -1 if strategy == "auto" else STRATEGIES.index(strategy),
            "key_padding_mask given": int(key_padding_mask is not None),
            "document_ids given": int(document_ids is not None),
            **two,
        }, info

    table = checks.agree(comm, op, validate)
    if after is not None:
        after(table)
    b, h, s_r, d = q_local.shape
    scale = d**-0.5 if scale is None else float(scale)
    sizes = [v[0] for v in table["S_local"]]
    seq_len, w = sum(sizes), comm.world_size
    expected = shard_sizes(seq_len, w, layout)
    if sizes != expected:
        raise ValueError(
            f"rank {rank}: shard lengths per rank {sizes} do not match layout {layout!r} for "
            f"S={seq_len} over {w} ranks: expected {expected} (use seqpar.shard to split)"
        )
    docs = keeps = [None] * w
    if document_ids is not None:
        docs = comm.all_gather_v(document_ids.to(torch.int64), sizes, dim=1)
    if key_padding_mask is not None:
        keeps = comm.all_gather_v(key_padding_mask.to(torch.uint8), sizes, dim=1)
        keeps = [t.bool() for t in keeps]
    dev = q_local.device
    tokens = [Tokens(positions(seq_len, w, r, layout).to(dev), docs[r], keeps[r]) for r in range(w)]
    setup = Setup(comm, scale, MaskSpec(bool(is_causal), window_size), sizes, tokens)
    if strategy == "auto":  # the ranks per node count when every rank reports the same (else: one node)
        per_node = {v[0] for v in table["ranks per node (auto)"]}
        strategy = plan(
            batch=b, heads=h, kv_heads=k_local.shape[1], seq_len=seq_len, head_dim=d, world_size=w,
            dtype=q_local.dtype, ranks_per_node=per_node.pop() if len(per_node) == 1 and 0 not in per_node else None,
        ).strategy
    if strategy == "ulysses_ring":
        grid_of = group if grid or not isinstance(comm, TorchCommunicator) else None  # None: the default group's grid
        setup = _mesh_setup(setup, grid_of, table["grid (inner id, inner rank, outer id, outer rank)"])
    return REGISTRY[strategy].fn.apply(q_local, k_local, v_local, setup)


def _grid_info(group, grid: bool, comm) -> tuple[int, tuple[int, int, int, int]]:
    """This rank's inner size and grid coordinates for ``strategy="ulysses_ring"`` (local checks only)."""
    rank, w = comm.rank, comm.world_size
    if not isinstance(comm, TorchCommunicator):  # an mpi4py communicator: cut into nodes of the inner size
        try:
            n = inner_size(w)
        except ValueError as e:
            raise ValueError(f"rank {rank}: {e}") from None
        return n, ((rank // n) * n, rank % n, rank % n, rank // n)
    if grid:
        inner, outer = grid_groups(group, None)
        import torch.distributed as dist

        n, m = dist.get_world_size(inner), dist.get_world_size(outer)
        if n * m != w:
            raise ValueError(f"rank {rank}: group= a grid of {m} x {n} ranks; the default group has {w}: "
                             "the grid must cover every rank")
        return n, grid_coordinates(inner, outer)
    try:
        n = inner_size(w)
    except ValueError as e:
        raise ValueError(f"rank {rank}: {e}") from None
    if 1 < n < w and comm.group is not None and comm.world_size != _default_world_size():
        raise ValueError(f"rank {rank}: strategy='ulysses_ring' with group={group!r} (a subgroup) and inner size "
                         f"{n} of {w}: pass None (the default group cut into nodes of LOCAL_WORLD_SIZE ranks), a 2-D "
                         "DeviceMesh or a pair (inner, outer)")
    return n, ((rank // n) * n, rank % n, rank % n, rank // n)


def _auto_nodes(comm, group) -> int | None:
    """``auto``'s ranks per node when they cut the group into several nodes of several ranks: the launcher's
    (:func:`inner_size`) for the default group or an mpi4py communicator; None otherwise (one node, or a
    subgroup, where ``ulysses_ring`` needs ``group=`` a grid)."""
    if isinstance(comm, TorchCommunicator) and (group is not None and comm.world_size != _default_world_size()):
        return None
    try:
        n = inner_size(comm.world_size)
    except ValueError:
        return None
    return n if 1 < n < comm.world_size else None


def _default_world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size()


def _mesh_setup(setup: Setup, group, coords: list[tuple[int, ...]]):
    """The grid of every rank's coordinates (from the argument exchange: the same on every rank, so an inconsistent
    grid raises the same error everywhere) -> this rank's :class:`MeshSetup`."""
    w, rank = setup.world_size, setup.rank
    inner_of: dict[int, dict[int, int]] = {}
    outer_of: dict[int, dict[int, int]] = {}
    for r, (ig, i, og, o) in enumerate(coords):
        inner_of.setdefault(ig, {})[i] = r
        outer_of.setdefault(og, {})[o] = r
    n, m = len(next(iter(inner_of.values()))), len(next(iter(outer_of.values())))
    ok = n * m == w and all(sorted(g) == list(range(n)) for g in inner_of.values()) and all(
        sorted(g) == list(range(m)) and len({coords[r][1] for r in g.values()}) == 1 for g in outer_of.values())
    if not ok:
        raise ValueError(f"rank {rank}: group= is not a grid: per rank (inner group, inner rank, outer group, outer "
                         f"rank) = {coords}; each outer group must hold one rank of one inner rank per inner group")
    ig, _, og, _ = coords[rank]

    def row(g: int) -> list[int]:
        return [inner_of[g][i] for i in range(n)]

    rows = [row(coords[outer_of[og][o]][0]) for o in range(m)]
    if group is None and n in (1, w):  # one level: the whole group and a group of one (no new groups)
        inner_c, outer_c = (setup.comm, LocalCommunicator()) if n == w else (LocalCommunicator(), setup.comm)
    else:  # a DeviceMesh / pair, the default group's standard grid, or an mpi4py communicator split in two
        inner_pg, outer_pg = grid_groups(group, n)
        inner_c, outer_c = grid_communicator(inner_pg, setup.comm), grid_communicator(outer_pg, setup.comm)
    return mesh_setup(setup, inner_c, outer_c, row(ig), rows)
