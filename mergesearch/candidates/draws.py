"""The random draws of DARE and DELLA: uniforms in [0, 1) that are a fixed function of (seed,
task vector, flat index), in blocks of BLOCK indices with a key each, so every candidate and every
worker sees the same draws; DARE's densities on a grid of 1/LEVELS, and its kept norms per level."""

from __future__ import annotations

import zlib
from collections.abc import Callable

import numpy as np
import torch

from . import numba_kernels

# DARE's densities lie on a grid of 1/4096 (rounded up; mergekit's model of the exported recipe is
# another draw anyway): then ‖τ⊙m‖₁ for any density is a prefix of per-study sums over levels of u
# (`Draws.kept_l1`), not a pass per candidate.
LEVELS = 1 << 12
BLOCK = 1 << 16  # indices per block of draws (each block has its own key)
assert numba_kernels.DRAW_BLOCK == BLOCK


class Draws:
    """Per task vector (named by its bank key): its block keys, and DARE's level sums.
    At index j of block c the draw is the top 24 bits of lowbias32(keys[c] ^ j), over 2²⁴."""

    def __init__(self, seed: int, passes_for: Callable) -> None:
        self.seed, self.passes_for = seed, passes_for
        self._keys: dict[str, np.ndarray] = {}
        self._level_l1: dict[str, np.ndarray] = {}

    def keys(self, key: str, nblk: int) -> np.ndarray:
        """The draw keys of blocks 0 … nblk − 1 of one task vector (cached; `block_keys`)."""
        keys = self._keys.get(key)
        if keys is None or keys.size < nblk:
            keys = self._keys[key] = block_keys(self.seed, key, nblk)
        return keys[:nblk]

    def keys_for(self, key: str, tau: torch.Tensor) -> np.ndarray:
        """The keys of every block of τ."""
        return self.keys(key, -(-tau.numel() // BLOCK))

    def uniforms(self, key: str, start: int, n: int, out: torch.Tensor) -> torch.Tensor:
        """Uniform draws for flat indices [start, start + n) of one task vector, written into
        `out[:n]` (fp32). Same key, same draws, whatever the chunk size."""
        out = out[:n]
        return self.passes_for(out).uniforms(self.keys(key, (start + n - 1) // BLOCK + 1), start, out)

    def kept_l1(self, key: str, tau: torch.Tensor, d: float) -> float:
        """‖τ⊙m‖₁ (fp64) of the DARE mask u < d (d on the grid): Σ|τ| over the levels of u below
        d, from sums per level made once per task vector."""
        if key not in self._level_l1:
            sums = self.passes_for(tau).level_l1(tau, self.keys_for(key, tau), LEVELS)
            self._level_l1[key] = np.concatenate([[0.0], np.cumsum(sums)])
        return float(self._level_l1[key][round(d * LEVELS)])


def block_keys(seed: int, key: str, nblk: int) -> np.ndarray:
    """The draw keys of blocks 0 … nblk − 1 of one task vector: crc32 of (seed, key, block)."""
    return np.array([zlib.crc32(f"{seed}:{key}:{c}".encode()) for c in range(nblk)], np.uint32)


def mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x · c) mod 2³² for int64 x < 2³² and c < 2³², with every product below 2⁴⁹."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & 0xFFFFFFFF
