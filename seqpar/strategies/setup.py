"""What every strategy needs to know about one call, gathered once by :func:`seqpar.attention`."""

from __future__ import annotations

from dataclasses import dataclass

from seqpar.comm import Communicator
from seqpar.ops.masks import MaskSpec, Tokens


@dataclass
class Setup:
    comm: Communicator
    scale: float
    spec: MaskSpec
    sizes: list[int]  # tokens held by each rank
    tokens: list[Tokens]  # each rank's tokens: global positions (+ document ids, key padding)

    @property
    def rank(self) -> int:
        return self.comm.rank

    @property
    def world_size(self) -> int:
        return self.comm.world_size
