"""What a candidate keeps of each task vector, as data the passes apply: a magnitude `Cut` (TIES,
breadcrumbs), DARE's draws u < d, DELLA's u < p(rank). Each mask is given what it needs — the
cut and its tie positions, the draw keys and a draws function, a ranks function — by the bank,
which caches them; `torch_passes` applies masks a chunk at a time, `numba_passes` packs them
into kernel columns."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ..methods import sparsify
from .cuts import Cut
from .draws import LEVELS

DrawsFn = Callable[[int, int, torch.Tensor], torch.Tensor]  # (start, n, out) → uniforms at [start, start + n)


@dataclass(eq=False)
class CutMask:
    """Keeps the cut's window of |τ|. `positions()`: the kept tie groups as rows (value, flat
    index of the first kept, end of the kept run), for passes that compare positions instead of
    counting ties chunk by chunk (`cuts.Cuts.tie_positions`)."""

    cut: Cut
    positions: Callable[[], np.ndarray]

    @property
    def key(self):  # a frozen dataclass: the cut names its own cached norm
        return self.cut


@dataclass(eq=False)
class DrawMask:
    """DARE: keep where the task vector's uniform u < d, d rounded up to the grid of 1/LEVELS."""

    keys: np.ndarray  # the draw keys of the task vector's blocks (`draws.block_keys`)
    draws: DrawsFn
    density: float
    d: float = field(init=False)

    def __post_init__(self) -> None:
        self.d = max(0, math.ceil(self.density * LEVELS)) / LEVELS  # on the grid: see draws.LEVELS

    @property
    def key(self):
        return ("random", self.d)


@dataclass(eq=False)
class DellaMask:
    """DELLA: keep where the uniform u < p = d − ε + 2ε·rank, ranks per row as mergekit.
    `ranks(start, n, out=)`: normalized ranks in the work dtype; `cached()`: the per-row int16
    ranks (`ranks.DellaRanks`), or None where they are not kept."""

    keys: np.ndarray
    draws: DrawsFn
    ranks: Callable[..., torch.Tensor]
    cached: Callable[[], np.ndarray] | None
    tau: torch.Tensor
    d: float
    eps: float
    whole: torch.Tensor | None = field(init=False)

    def __post_init__(self) -> None:
        if self.d > 0:
            sparsify.check_della(self.d, self.eps)
        # more than 2 dimensions: dim 1 isn't a row of the flat tensor; ranked whole, once
        self.whole = None if self.tau.dim() <= 2 else sparsify.della_ranks(self.tau).reshape(-1)

    @property
    def key(self):
        return ("della", self.d, self.eps)

    @property
    def cols(self) -> int:
        return row_length(self.tau)


def row_length(tau: torch.Tensor) -> int:
    """DELLA's rows: along dim 1 of a 2-D τ; a 1-D τ is one row."""
    return tau.shape[1] if tau.dim() == 2 else tau.numel()
