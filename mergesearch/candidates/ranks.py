"""DELLA's per-row magnitude ranks for a chunk of a task vector, optionally sorted once per study."""

from __future__ import annotations

import torch

from ..methods import sparsify
from .masks import row_length


class DellaRanks:
    """`sparsify.della_ranks(τ)` a chunk at a time. With `cache`, each task vector's integer ranks
    are sorted once and kept (int16: 2 bytes per element, rows up to 32K); otherwise the rows
    around a chunk are sorted for each candidate."""

    def __init__(self, chunk: int, cache: bool) -> None:
        self.chunk, self.cache = chunk, cache
        self._ranks: dict[str, torch.Tensor] = {}

    def caches(self, tau: torch.Tensor) -> bool:
        return self.cache and tau.dim() <= 2 and row_length(tau) <= 1 << 15  # int16 ranks

    def ranks(
        self, key: str, tau: torch.Tensor, start: int, n: int, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Per-row magnitude rank in [0, 1] (work dtype) for flat indices [start, start + n) of a
        1-D or 2-D τ, into `out` when given."""
        cols = row_length(tau)
        if not self.caches(tau):
            rows = tau.reshape(-1, cols)
            r0, r1 = start // cols, (start + n - 1) // cols + 1
            off = start - r0 * cols
            return sparsify.della_ranks(rows[r0:r1]).reshape(-1)[off : off + n]
        # as sparsify.della_ranks: ranks cast, then + 1; every row's min is 1 and max is cols
        # (in place, into `out` when given: the same roundings, no allocation per chunk)
        work = sparsify.work_dtype(tau)
        ranks = self.cached(key, tau)[start : start + n]
        r = ranks.to(work) if out is None else out[:n].copy_(ranks)
        lo = torch.zeros((), dtype=work, device=tau.device) + 1
        hi = torch.full((), cols - 1, dtype=work, device=tau.device) + 1
        return r.add_(1).sub_(lo).div_(hi - lo).clamp_(0, 1)

    def cached(self, key: str, tau: torch.Tensor) -> torch.Tensor:
        """Per-row 0-based magnitude ranks of τ, flat int16, sorted once per study."""
        if key not in self._ranks:
            cols = row_length(tau)
            rows = tau.reshape(-1, cols)
            ranks = torch.empty(tau.numel(), dtype=torch.int16, device=tau.device).view(-1, cols)
            step = max(1, self.chunk // cols)
            for r0 in range(0, rows.shape[0], step):  # a row block at a time: bounded temporaries
                ranks[r0 : r0 + step] = sparsify.magnitude_ranks(rows[r0 : r0 + step])
            self._ranks[key] = ranks.view(-1)
        return self._ranks[key]
