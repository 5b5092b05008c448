"""The L1 rescale of DARE and DELLA (and of any `rescale: true`): ‖τ‖₁ / ‖τ⊙m‖₁ per task vector
and mask, cached, each norm taken the same way on every backend a candidate may run on."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..methods import sparsify
from .cuts import TABLES_FROM, bounded
from .draws import Draws
from .masks import DrawMask
from .passes import Passes


class Norms:
    """‖τ‖₁ always from the torch pass (fp32 per chunk, fp64 across); ‖τ⊙m‖₁ from DARE's level
    sums on large tensors, else from the fastest backend that takes the mask — whatever backend
    then merges, so a candidate rescales alike on either."""

    def __init__(self, torch_passes: Passes, passes_for: Callable[..., Passes], draws: Draws) -> None:
        self.torch, self.passes_for, self.draws = torch_passes, passes_for, draws
        self._l1: dict[str, torch.Tensor] = {}
        self._rescales: dict[tuple, torch.Tensor | None] = {}

    def l1(self, key: str, tau: torch.Tensor) -> torch.Tensor:
        """‖τ‖₁ in τ's work dtype (cached)."""
        if key not in self._l1:
            self._l1[key] = _work(self.torch.masked_l1(tau, None), tau)
        return self._l1[key]

    def masked_l1(self, key: str, tau: torch.Tensor, mask) -> torch.Tensor:
        """‖τ⊙m‖₁ in τ's work dtype."""
        if isinstance(mask, DrawMask) and tau.numel() >= TABLES_FROM:
            return _work(self.draws.kept_l1(key, tau, mask.d), tau)
        passes = self.passes_for(tau)
        if not passes.takes_mask(mask):
            passes = self.torch
        return _work(passes.masked_l1(tau, mask), tau)

    def rescale(self, key: str, tau: torch.Tensor, mask) -> torch.Tensor | None:
        """‖τ‖₁ / ‖τ⊙m‖₁ in the work dtype (None when either is below 1e-7, as in mergekit)."""
        kk = (key, mask.key)
        if kk not in self._rescales:
            before, after = self.l1(key, tau), self.masked_l1(key, tau, mask)
            bounded(self._rescales)[kk] = None if before < 1e-7 or after < 1e-7 else before / after
        return self._rescales[kk]


def _work(total: float, tau: torch.Tensor) -> torch.Tensor:
    return torch.tensor(total, dtype=torch.float64).to(sparsify.work_dtype(tau))
