"""Rank → value for magnitude cuts (TIES, breadcrumbs): the `Cut` a rank window of |τ| becomes,
found without sorting τ, and cached per study (`Cuts`). The window itself is the reference's
(`methods.sparsify.rank_window`)."""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from . import numba_kernels
from .passes import Passes

# From this size on a task vector gets its magnitude bins (`Cuts.magnitude_bins`); below, their
# ~30 KiB would outweigh the pass they save. (DARE's level sums use the same threshold.)
TABLES_FROM = 1 << 16
_SAMPLE = 4096  # sorted magnitudes kept per task vector to bracket a rank, at least


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


EMPTY = Cut(math.inf, -math.inf, 0, 0, False, False)  # keeps nothing


class Cuts:
    """Per task vector (named by its bank key): its cuts, the values at ranks found so far, its
    magnitude bins or random sample, and the tie counts a split tie group needs. `bins_from`:
    the size from which a task vector's ranks come from its magnitude bins (None: never, always
    the sample's path, as for a τ with a NaN); `samples`: the sorted sample of |τ| per key."""

    def __init__(self, passes_for: Callable[..., Passes], bins_from: int | None = TABLES_FROM) -> None:
        self.passes_for = passes_for  # the backend that runs a pass over these tensors
        self.bins_from = bins_from
        self.samples: dict[str, torch.Tensor] = {}
        self._cuts: dict[tuple[str, int, int], Cut] = {}
        self._values: dict[tuple[str, int], tuple[float, int, int]] = {}
        self._bins: dict[str, tuple[np.ndarray, np.ndarray] | None] = {}
        self._gathered: dict[tuple[str, float], tuple[torch.Tensor, np.ndarray]] = {}
        self._tie_counts: dict[tuple[str, float], np.ndarray] = {}

    def cut(self, key: str, tau: torch.Tensor, r0: int, r1: int) -> Cut:
        """The cut keeping ascending |τ| ranks [r0, r1), 0 ≤ r0 < r1 ≤ N."""
        ck = (key, r0, r1)
        if r0 >= r1:
            return EMPTY
        if ck not in self._cuts:
            (lo, less_lo, _), (hi, less_hi, eq_hi) = self.values_at(key, tau, [r0, r1 - 1])
            skip_lo, keep_hi = r0 - less_lo, r1 - less_hi
            bounded(self._cuts)[ck] = Cut(
                lo, hi, skip_lo, keep_hi, skip_lo > 0 or keep_hi < eq_hi, r1 == tau.numel()
            )
        return self._cuts[ck]

    def values_at(self, key: str, tau: torch.Tensor, ranks: list[int]) -> list[tuple[float, int, int]]:
        """(v, #{|τ| < v}, #{|τ| = v}) for the value v at each ascending rank r of |τ|.

        From 64K elements on, exact counts of |τ| per 16-bit prefix of its fp32 bit pattern (made
        once per task vector; the prefix orders magnitudes) name the prefix that holds rank r and
        how many lie below it: in bf16 that prefix is v itself; in fp32 one pass gathers its
        elements (~0.1–1 % of τ) and a selection among them gives v. Smaller tensors and any with
        a NaN use a random sample (`_sampled_values_at`). No sort of τ either way."""
        found = {r: self._values[(key, r)] for r in ranks if (key, r) in self._values}
        bins = (
            self.magnitude_bins(key, tau)
            if self.bins_from is not None and tau.numel() >= self.bins_from
            else None
        )
        if bins is not None and len(found) < len(ranks):
            prefixes, below = bins
            at = {r: int(np.searchsorted(below, r, side="right")) - 1 for r in ranks if r not in found}
            # per rank: its prefix, how many |τ| lie below the prefix and how many share it
            spans = {
                r: (int(prefixes[b]), int(below[b]), int(below[b + 1] - below[b])) for r, b in at.items()
            }
            if tau.dtype == torch.bfloat16:  # the prefix is the value
                for r, (prefix, less, count) in spans.items():
                    found[r] = bounded(self._values)[(key, r)] = (f32(prefix << 16), less, count)
            else:
                brackets = {r: prefix_range(prefix) for r, (prefix, _, _) in spans.items()}
                inside, blocks = self._gather(tau, brackets, {r: count for r, (_, _, count) in spans.items()})
                for r, (_, less, _) in spans.items():
                    v, less_in, equal = self.passes_for(inside[r]).select(inside[r], r - less)
                    found[r] = bounded(self._values)[(key, r)] = (v, less + less_in, equal)
                    if r in blocks:  # where v lies, should a cut split its ties (the last few cuts')
                        bounded(self._gathered, 64)[(key, v)] = (inside[r], blocks[r])
        missing = [r for r in ranks if r not in found]
        if missing:
            found.update(zip(missing, self._sampled_values_at(key, tau, missing)))
        return [found[r] for r in ranks]

    def magnitude_bins(self, key: str, tau: torch.Tensor) -> tuple[np.ndarray, np.ndarray] | None:
        """The 16-bit prefixes of |τ| present, ascending (a few thousand: ≤ 128 per octave), and how
        many |τ| lie below each (and in all: one more entry); None when τ has a NaN (no rank)."""
        if key not in self._bins:
            counts = self.passes_for(tau).magnitude_bins(tau)
            present = np.flatnonzero(counts)
            nan = present[-1] >= 0x7F80 and bool(tau.isnan().any())  # 0x7F80: inf, or a NaN
            below = np.concatenate([[0], np.cumsum(counts[present])])
            self._bins[key] = None if nan else (present.astype(np.int32), below)
        return self._bins[key]

    def _sampled_values_at(
        self, key: str, tau: torch.Tensor, ranks: list[int]
    ) -> list[tuple[float, int, int]]:
        """`values_at` from a sorted random sample of |τ| (kept per task vector, 1/256 of its
        size) that brackets v; one pass of comparisons counts what lies below the bracket and
        gathers what lies inside (a few percent of τ); a selection in that small set gives v."""
        n, flat = tau.numel(), tau.reshape(-1)
        if key not in self.samples:  # random positions: a stride could alias with rows and heads
            g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
            idx = torch.randint(0, n, (min(n, max(_SAMPLE, n // 256)),), generator=g).to(tau.device)
            self.samples[key] = flat[idx].abs().float().sort().values
        sample = self.samples[key]
        s = sample.numel()
        found: dict[int, tuple[float, int, int]] = {}
        todo = {r: 1.25 * math.sqrt(s) + 2 for r in ranks}  # ≥ 2.5σ
        while todo:  # one pass for every rank still open
            brackets = {}
            for r, margin in todo.items():
                i, j = (
                    (-1, s)
                    if margin == math.inf
                    else (math.floor(r / n * s - margin), math.ceil(r / n * s + margin))
                )
                brackets[r] = (
                    sample[i].item() if i >= 0 else -math.inf,
                    sample[j].item() if j < s else math.inf,
                )
            below, inside = self._bracket(tau, brackets)
            for r in list(todo):
                cand = inside[r]
                if below[r] <= r < below[r] + cand.numel():
                    v, less, equal = self.passes_for(cand).select(cand, r - below[r])
                    found[r] = bounded(self._values)[(key, r)] = (v, below[r] + less, equal)
                    del todo[r]
                else:  # the sample misled: a wider bracket (at worst the whole tensor)
                    todo[r] = todo[r] * 4 if todo[r] < s else math.inf
        return [found[r] for r in ranks]

    def _gather(self, tau: torch.Tensor, brackets: dict, counts: dict) -> tuple[dict, dict]:
        """The |τ| in each bracket (lo, hi) when how many lie there is known, and where the
        backend gives them, each bracket's offsets per kernel block."""
        lo, hi = (np.array(v, np.float32) for v in zip(*brackets.values()))
        total = np.array([counts[r] for r in brackets], np.int64)
        values, starts, at = self.passes_for(tau).gather(tau, lo, hi, total)
        inside = {r: values[starts[i] : starts[i + 1]] for i, r in enumerate(brackets)}
        if at is None:
            return inside, {}
        nblk = (at.size - 1) // len(brackets)
        return inside, {r: at[i * nblk : (i + 1) * nblk + 1] - starts[i] for i, r in enumerate(brackets)}

    def _bracket(self, tau: torch.Tensor, brackets: dict) -> tuple[dict, dict]:
        """For each rank's bracket (lo, hi) of |τ|: #{|τ| < lo} and the |τ| in [lo, hi] (fp32)."""
        lo, hi = (np.array(v, np.float32) for v in zip(*brackets.values()))
        below, values, starts = self.passes_for(tau).bracket(tau, lo, hi)
        return (
            {r: int(c) for r, c in zip(brackets, below)},
            {r: values[starts[i] : starts[i + 1]] for i, r in enumerate(brackets)},
        )

    def tie_positions(self, key: str, tau: torch.Tensor, cut: Cut) -> np.ndarray:
        """The cut's kept tie groups as rows (value, flat index of the first kept, of the first
        not kept after it), NaN rows unused: split tie groups as comparisons of positions."""
        n, ties = tau.numel(), np.full((2, 3), np.nan)
        groups = cut.tie_groups()
        # kept occurrences → flat indices; from the first or to the last need no count
        need = [v for v, first, end in groups if first > 0 or end != math.inf]
        counts = dict(zip(need, self._block_tie_counts(key, tau, need))) if need else {}
        mags = numba_kernels.as_numpy(tau)
        for g, (v, first, end) in enumerate(groups):
            p = 0 if first == 0 else _occurrence(mags, v, counts[v], first)
            q = n if end == math.inf else _occurrence(mags, v, counts[v], end)
            ties[g] = v, p, q
        return ties

    def _block_tie_counts(self, key: str, tau: torch.Tensor, values: list[float]) -> list[np.ndarray]:
        """Occurrences of each tie value in |τ| per 16K block, so `_occurrence` scans one block:
        from the fp32 gather that found the value (`values_at`), else a counting pass; cached
        per value (a cut's other bound often stays, as breadcrumbs' top with a fixed γ)."""
        missing = [v for v in values if (key, v) not in self._tie_counts]
        gathered = {v: self._gathered.get((key, v)) for v in missing}
        passes = [v for v in missing if gathered[v] is None]
        if passes:
            v0, v1 = (np.float32(v) for v in (*passes, math.nan)[:2])
            counted = numba_kernels.count_equal(numba_kernels.as_numpy(tau), v0, v1)
        for v in missing:
            counts = counted[passes.index(v)] if gathered[v] is None else counts_per_block(*gathered[v], v)
            bounded(self._tie_counts)[(key, v)] = counts
        return [self._tie_counts[(key, v)] for v in values]


def _occurrence(mags: np.ndarray, v: float, counts: np.ndarray, j: float) -> int:
    """Flat index of the j-th |τ| equal to v (the size of τ when there are at most j)."""
    return mags.size if j >= counts.sum() else numba_kernels.occurrence(mags, np.float32(v), counts, int(j))


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
