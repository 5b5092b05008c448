"""The passes as numba kernels on the CPU (`numba_kernels.py`): one pass per tensor where torch
makes one per operation and chunk; the same bits as `torch_passes` (tests/test_passes.py).
Masks cross into the kernels as arrays: a kind per model and a row of named columns
(`numba_kernels.W` … `SHIFT`), tie positions, draw keys and cached ranks."""

from __future__ import annotations

import numpy as np
import torch

from . import numba_kernels as nk
from .masks import CutMask, DellaMask, DrawMask
from .passes import Mix, Passes


class NumbaPasses(Passes):
    name = "numba"

    def __init__(self) -> None:
        self._arrays: dict[tuple, np.ndarray] = {}

    def takes(self, *tensors: torch.Tensor) -> bool:
        """CPU, fp32 or bf16 (the first's dtype), contiguous."""
        return nk.fusable(*tensors)

    def takes_mask(self, mask) -> bool:
        """Every mask but DELLA's without cached ranks (or on more than 2 dimensions)."""
        return (
            not isinstance(mask, DellaMask) or mask.d <= 0 or (mask.whole is None and mask.cached is not None)
        )

    def merge(self, out, base, taus, masks, scales, mix: Mix, from_models: bool = False) -> None:
        """`Passes.merge`; with `from_models`, `taus` are the models x_k and the kernel makes
        τ_k = x_k − b as it goes (no masks then: they are made from τ)."""
        kind, fp, ties, keys, ranks = self.pack(taus, masks)
        fp[:, nk.W] = mix.w32
        fp[:, nk.SCALE] = [1.0 if s is None else float(s) for s in scales]
        nk.merge(
            nk.as_numpy(out), nk.as_numpy(base), tuple(self._array(t) for t in taus), ranks, kind, fp, ties,
            keys, mix.consensus, mix.normalize, mix.divisor32, np.float32(mix.lambda_), mix.lambda_ != 1,
            from_models,
        )  # fmt: skip

    def masked_l1(self, tau: torch.Tensor, mask) -> float:
        kind, fp, ties, keys, ranks = self.pack([tau], [mask])
        return nk.masked_l1(nk.as_numpy(tau), ranks[0], kind[0], fp[0], ties[0], keys[0])

    def magnitude_bins(self, tau: torch.Tensor) -> np.ndarray:
        return nk.magnitude_bins(nk.as_numpy(tau))

    def bracket(self, tau, lo, hi):
        below, values, starts = nk.bracket(nk.as_numpy(tau), lo, hi)
        return below, torch.from_numpy(values), starts

    def gather(self, tau, lo, hi, total):
        """One pass with the counts known; `gather`'s slots take twice what they hold, so where
        that would be a large part of τ (as when a cut falls among many zeros), `bracket`'s
        exact-size count and gather instead (no block offsets then)."""
        if total.sum() > tau.numel() // 16:
            _, values, starts = self.bracket(tau, lo, hi)
            return values, starts, None
        values, at = nk.gather(nk.as_numpy(tau), lo, hi, total)
        starts = at[:: (at.size - 1) // len(lo)]
        assert np.array_equal(np.diff(starts), total)  # the bins count what the pass finds
        return torch.from_numpy(values), starts, at

    def select(self, values: torch.Tensor, k: int) -> tuple[float, int, int]:
        v, less, equal = nk.select(values.numpy(), k)
        return float(v), int(less), int(equal)

    def level_l1(self, tau: torch.Tensor, keys: np.ndarray, levels: int) -> np.ndarray:
        return nk.level_l1(nk.as_numpy(tau), keys, levels)

    def uniforms(self, keys: np.ndarray, start: int, out: torch.Tensor) -> torch.Tensor:
        nk.uniforms(keys, start, out.numpy())
        return out

    @staticmethod
    def pack(taus, masks) -> tuple:
        """The masks as `numba_kernels.merge` takes them (weights and rescales left at 1)."""
        k, n = len(taus), taus[0].numel()
        kind = np.zeros(k, np.int64)
        fp = np.ones((k, nk.N_COLS), np.float32)
        ties = np.full((k, 2, 3), np.nan)
        keys = np.zeros((k, -(-n // nk.DRAW_BLOCK)), np.uint32)
        ranks = [np.zeros(0, np.int16)] * k
        for i, m in enumerate(masks):
            if m is None:
                kind[i] = nk.NONE
            elif isinstance(m, CutMask):
                c = m.cut
                fp[i, [nk.LO, nk.HI, nk.TOP]] = c.lo, c.hi, c.top
                if c.lo > c.hi:
                    kind[i] = nk.ZERO
                elif not c.partial:
                    kind[i] = nk.CUT
                else:
                    kind[i], ties[i] = nk.TIES, m.positions()
            elif isinstance(m, DrawMask):
                kind[i], fp[i, nk.D], keys[i] = nk.DRAW, m.d, m.keys
            elif m.d <= 0:
                kind[i] = nk.ZERO
            else:
                kind[i], keys[i], ranks[i] = nk.DELLA, m.keys, m.cached()
                fp[i, [nk.D, nk.EPS, nk.COLS, nk.SHIFT]] = m.d, m.eps, m.cols, m.d - m.eps
        return kind, fp, ties, keys, tuple(ranks)

    def _array(self, tau: torch.Tensor) -> np.ndarray:
        """`as_numpy` of a resident τ, kept by its memory (a candidate's K·tensors calls add up)."""
        ck = (tau.data_ptr(), tau.numel(), tau.dtype)
        a = self._arrays.get(ck)
        if a is None:
            if len(self._arrays) >= 1 << 16:
                self._arrays.clear()
            a = self._arrays[ck] = nk.as_numpy(tau)
        return a
