"""The random draws of DARE and DELLA: uniforms in [0, 1) that are a fixed function of (seed,
task vector, flat index), in blocks of BLOCK indices with a key each, so every candidate and every
worker sees the same draws; DARE's densities on a grid of 1/LEVELS."""

from __future__ import annotations

import zlib

import numpy as np
import torch

from . import numba_passes

# DARE's densities lie on a grid of 1/4096 (rounded up; mergekit's model of the exported recipe is
# another draw anyway): then ‖τ⊙m‖₁ for any density is a prefix of per-study sums over levels of u
# (`TaskVectorBank._draw_l1`), not a pass per candidate.
LEVELS = 1 << 12
BLOCK = 1 << 16  # indices per block of draws (each block has its own key)
assert numba_passes.DRAW_BLOCK == BLOCK


def block_keys(seed: int, key: str, nblk: int) -> np.ndarray:
    """The draw keys of blocks 0 … nblk − 1 of one task vector: crc32 of (seed, key, block)."""
    return np.array([zlib.crc32(f"{seed}:{key}:{c}".encode()) for c in range(nblk)], np.uint32)


def uniforms(keys: np.ndarray, start: int, n: int, out: torch.Tensor) -> torch.Tensor:
    """Uniform draws for flat indices [start, start + n) into `out` (fp32): at index j of block c,
    the top 24 bits of lowbias32(keys[c] ^ j) (numba's pass on the CPU, torch's elsewhere)."""
    if out.device.type == "cpu":
        numba_passes.uniforms(keys, start, out[:n].numpy())
        return out[:n]
    keys = torch.from_numpy(keys.astype(np.int64))
    j = torch.arange(start, start + n, device=out.device)
    x = keys.to(out.device)[j // BLOCK] ^ (j % BLOCK)
    # lowbias32 on int64: 32-bit products in two halves, so no product overflows
    x ^= x >> 16
    x = mul32(x, 0x7FEB352D)
    x ^= x >> 15
    x = mul32(x, 0x846CA68B)
    x ^= x >> 16
    return torch.mul((x >> 8).float(), 1.0 / (1 << 24), out=out[:n])


def mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x · c) mod 2³² for int64 x < 2³² and c < 2³², with every product below 2⁴⁹."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & 0xFFFFFFFF
