"""The seam between policy and passes: what a backend must do, with one signature.

`bank.py` and the caches beside it (`cuts.py`, `draws.py`, `ranks.py`, `norms.py`) decide which
pass runs and what is kept; a `Passes` runs it. Two backends, the same bits for the same inputs
(tests/test_passes.py runs every pass on both):
- `torch_passes.TorchPasses`: torch on any device, a chunk at a time through a workspace;
- `numba_passes.NumbaPasses`: numba kernels on the CPU, one pass per tensor (`numba_kernels.py`).

A new backend subclasses `Passes` and is added to that test's list.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Mix:
    """How a candidate tensor combines its sparsified task vectors (`task_arithmetic.combine`):
    the weights as a (K, 1) column of the work dtype and as fp32 numbers, the divisor without
    election (Σw, 1 where |Σw| < 1e-8) as a tensor and an fp32 number, and the family's switches."""

    w: torch.Tensor
    divisor: torch.Tensor
    w32: np.ndarray
    divisor32: np.float32
    consensus: bool
    normalize: bool
    lambda_: float

    @classmethod
    def of(cls, weight, dtype, device, consensus: bool, normalize: bool, lambda_: float) -> Mix:
        w = torch.tensor(list(weight), dtype=dtype, device=device).reshape(-1, 1)
        divisor = w.sum(0)
        divisor[divisor.abs() < 1e-8] = 1
        w32 = w.float().reshape(-1).cpu().numpy()
        return cls(w, divisor, w32, np.float32(divisor.item()), consensus, normalize, lambda_)


class Passes(ABC):
    """One backend's passes over task vectors (flat, contiguous, fp32 or bf16 unless `takes` says
    more). Masks are `masks.CutMask`, `masks.DrawMask`, `masks.DellaMask` or None (keep all)."""

    name: str

    @abstractmethod
    def takes(self, *tensors: torch.Tensor) -> bool:
        """Whether this backend runs passes over these tensors (device, dtype, layout)."""

    @abstractmethod
    def takes_mask(self, mask) -> bool:
        """Whether this backend applies this mask (`merge`, `masked_l1`)."""

    @abstractmethod
    def merge(self, out, base, taus, masks, scales, mix: Mix) -> None:
        """out = b + λ·combine(τ_k ⊙ m_k · s_k · w_k), `scales` s_k a 0-dim tensor or None (1)."""

    @abstractmethod
    def masked_l1(self, tau: torch.Tensor, mask) -> float:
        """‖τ⊙m‖₁ (‖τ‖₁ for mask None) as an fp64 number; the order of the sum is the backend's."""

    @abstractmethod
    def magnitude_bins(self, tau: torch.Tensor) -> np.ndarray:
        """How many |τ| have each 16-bit prefix of their fp32 bit pattern (2¹⁵ int64 counts)."""

    @abstractmethod
    def bracket(self, tau, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, torch.Tensor, np.ndarray]:
        """Per bracket i: #{|τ| < lo_i}, and the |τ| in [lo_i, hi_i] (fp32, flat order), all
        brackets' values in one tensor, bracket i's at [starts_i, starts_{i+1})."""

    @abstractmethod
    def gather(self, tau, lo, hi, total: np.ndarray) -> tuple[torch.Tensor, np.ndarray, np.ndarray | None]:
        """`bracket`'s values and starts when how many lie in each bracket (`total`) is known,
        and, where the backend has them, each bracket's offsets per kernel block (else None)."""

    @abstractmethod
    def select(self, values: torch.Tensor, k: int) -> tuple[float, int, int]:
        """(v, #{x < v}, #{x = v}) for v the k-th smallest (0-based) of a 1-D fp32 tensor."""

    @abstractmethod
    def level_l1(self, tau: torch.Tensor, keys: np.ndarray, levels: int) -> np.ndarray:
        """Σ|τ| (fp64) over the elements whose draw lies in [l/levels, (l+1)/levels), per level l."""

    @abstractmethod
    def uniforms(self, keys: np.ndarray, start: int, out: torch.Tensor) -> torch.Tensor:
        """The draws (`draws.py`) at flat indices [start, start + out.numel()), into fp32 `out`."""


class Backends:
    """Which backend runs a pass over given tensors: the fast one where it takes them, else the
    general one. The bank's caches share this object rather than the bank, so that nothing
    points back at the bank: freed with its engine at once, not at the next garbage collection
    (a cycle kept every task vector of a dropped engine alive until then)."""

    def __init__(self, general: Passes, fast: Passes | None) -> None:
        self.general, self.fast = general, fast

    def __call__(self, *tensors: torch.Tensor) -> Passes:
        return self.fast if self.fast is not None and self.fast.takes(*tensors) else self.general
