"""The keep masks of the search's sparsifiers, applied a chunk at a time: a magnitude `Cut`
(TIES, breadcrumbs), DARE's draws u < d, DELLA's u < p(rank). Each is given what it needs — the
cut, a function for the draws, a function for the ranks — not the bank that caches them."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..methods import sparsify
from .cuts import Cut
from .draws import LEVELS
from .torch_passes import Workspace, masked


class CutMask:
    """Keeps the cut's window of |τ|; tie positions carry over from chunk to chunk."""

    def __init__(self, cut: Cut) -> None:
        self.cut = self.key = cut  # a frozen dataclass: it names its own cached norm
        self.seen: dict[float, int] = {}

    def apply(self, t, start, ws: Workspace, out, magnitudes=None) -> None:
        """out = t ⊙ m for the chunk of τ at `start` (m from `magnitudes`, default t)."""
        c, n = self.cut, t.numel()
        if c.lo > c.hi:  # an empty window (density 0)
            out.zero_()
            return
        a = ws.g[:n].copy_(t if magnitudes is None else magnitudes).abs_()  # fp32, as mergekit ranks
        if not c.partial:
            m = torch.ge(a, c.lo, out=ws.acc[:n])
            if not c.top:
                m.mul_(torch.le(a, c.hi, out=ws.r[:n]))
        else:
            m = torch.gt(a, c.lo, out=ws.acc[:n]).mul_(torch.lt(a, c.hi, out=ws.r[:n]))
            if start == 0:
                self.seen = {}
            for v, first, end in c.tie_groups():  # tie positions count in flat index order
                eq = torch.eq(a, v, out=ws.r[:n])
                count = int(eq.sum())
                seen = self.seen.get(v, 0)
                self.seen[v] = seen + count
                if max(first, seen) >= min(end, seen + count):
                    continue  # none of this chunk's ties is kept
                if first <= seen and seen + count <= end:
                    m.add_(eq)  # all of them are
                else:
                    q = torch.cumsum(eq, 0).add_(seen - 1)
                    m.add_(eq.mul_((q >= first) & (q < end)))
        masked(t, m, ws, out)


class DrawMask:
    """DARE: keep where the task vector's uniform u < d, d rounded up to the grid of 1/4096."""

    def __init__(self, draws: Callable, density: float) -> None:
        self.draws = draws  # (start, n, out) → the task vector's uniforms at [start, start + n)
        self.d = max(0, math.ceil(density * LEVELS)) / LEVELS  # on the grid: see draws.LEVELS
        self.key = ("random", self.d)

    def apply(self, t, start, ws: Workspace, out, magnitudes=None) -> None:
        u = self.draws(start, t.numel(), ws.r)
        masked(t, torch.lt(u, self.d, out=ws.acc[: t.numel()]), ws, out)


class DellaMask:
    """DELLA: keep where the uniform u < p = d − ε + 2ε·rank, ranks per row as mergekit."""

    def __init__(
        self, draws: Callable, ranks: Callable, tau: torch.Tensor, density: float, eps: float
    ) -> None:
        if density > 0 and (density + eps >= 1 or density - eps <= 0):
            raise ValueError(
                f"della: density ± epsilon must lie in (0, 1); got density={density}, epsilon={eps}"
            )
        # draws: (start, n, out) → uniforms; ranks: (start, n, out=) → per-row ranks in [0, 1]
        self.draws, self.ranks, self.tau, self.d, self.eps = draws, ranks, tau, density, eps
        self.key = ("della", density, eps)
        self.whole = None if tau.dim() <= 2 else sparsify.della_ranks(tau).reshape(-1)  # dim 1 isn't rows

    def apply(self, t, start, ws: Workspace, out, magnitudes=None) -> None:
        n = t.numel()
        if self.d <= 0:
            out.zero_()
            return
        if self.whole is not None:
            ranks = self.whole[start : start + n].clone()
        else:
            ranks = self.ranks(start, n, out=ws.u if ws.u.dtype == t.dtype else None)
        # mergekit's (d − ε) + ranks·2·ε, in place: the same operations and roundings
        p = ranks.mul_(2).mul_(self.eps).add_(self.d - self.eps)
        u = self.draws(start, n, ws.r)
        masked(t, torch.lt(u, ws.g[:n].copy_(p), out=ws.acc[:n]), ws, out)
