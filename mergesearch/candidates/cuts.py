"""Rank → value for magnitude cuts (TIES, breadcrumbs): the `Cut` a rank window becomes, and the
small selections and bit tricks that find it without sorting τ. The window itself is the
reference's (`methods.sparsify.rank_window`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from . import numba_passes


@dataclass(frozen=True)
class Cut:
    """Ranks [r0, r1) of |τ| in (value, flat index) order, as values and tie positions:
    keep a when lo < a < hi, a == lo from its `skip_lo`-th tie on, a == hi before its `keep_hi`-th."""

    lo: float
    hi: float
    skip_lo: int
    keep_hi: int
    partial: bool  # whether a tie group is split (then tie positions decide)
    top: bool  # whether the window reaches the largest |τ| (no upper comparison needed)

    def tie_groups(self) -> list[tuple[float, int, float]]:
        """(value, first kept tie position, end of kept positions) of the groups at the bounds;
        a window that reaches the top keeps all of its largest value's ties (end ∞)."""
        keep_hi = math.inf if self.top else self.keep_hi
        if self.lo == self.hi:
            return [(self.lo, self.skip_lo, keep_hi)]
        return [(self.lo, self.skip_lo, math.inf), (self.hi, 0, keep_hi)]


def select(values: torch.Tensor, k: int) -> tuple[float, int, int]:
    """(v, #{x < v}, #{x = v}) for v the k-th smallest (0-based) of a 1-D fp32 tensor."""
    if numba_passes is not None and values.device.type == "cpu":
        v, less, equal = numba_passes.select(values.numpy(), k)
        return float(v), int(less), int(equal)
    v = values.kthvalue(k + 1).values
    return v.item(), int((values < v).sum()), int((values == v).sum())


def f32(bits: int) -> float:
    """The fp32 value of a bit pattern."""
    return float(np.array(bits, np.uint32).view(np.float32))


def prefix_range(prefix: int) -> tuple[float, float]:
    """The smallest and largest fp32 magnitude with this 16-bit prefix (inf's prefix: inf)."""
    hi = f32((prefix << 16) | 0xFFFF) if prefix < 0x7F80 else math.inf
    return f32(prefix << 16), hi


def counts_per_block(values: torch.Tensor, starts: np.ndarray, v: float) -> np.ndarray:
    """How many of `values` equal v in each block, given where each block's values start."""
    seen = np.concatenate([[0], np.cumsum(values.numpy() == np.float32(v))])
    return np.diff(seen[starts])


def bounded(cache: dict, size: int = 1 << 16) -> dict:
    """The cache, emptied first when full: a search with continuous densities rarely repeats a
    cut, and unbounded caches would grow with the number of trials."""
    if len(cache) >= size:
        cache.clear()
    return cache
