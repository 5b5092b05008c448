"""Task vectors held for a whole study, and the policy of which pass a candidate takes.

A search builds hundreds of candidates from the same τ_i = x_i − b. What depends only on τ is
done once and cached here: ‖τ‖₁; the magnitude cut of each rank window (TIES, breadcrumbs;
`cuts.py`), after which a new density is a comparison, not a sort; DARE's kept norm for every
density on its grid; DELLA's per-row ranks (`cache_ranks`); and the draw keys (`draws.py`). On
the CPU a candidate tensor is one `numba_passes.merge` pass; otherwise (CUDA, DELLA without
cached ranks) it is built in chunks of `chunk` elements through a workspace allocated once
(`torch_passes.combine` is `task_arithmetic.combine` step for step), with the same bits:
temporaries stay in cache, and memory above the resident tensors is O(K·chunk), not K copies of
a tensor. How the results relate to mergekit's: the package's docstring.
"""

from __future__ import annotations

import functools
import math
import zlib

import numpy as np
import torch

from ..errors import MergeSearchError
from ..methods import sparsify
from . import numba_passes as fused_kernels
from .cuts import Cut
from .cuts import bounded as _bounded
from .cuts import counts_per_block as _counts_per_block
from .cuts import f32 as _f32
from .cuts import prefix_range as _prefix_range
from .cuts import select as _select
from .draws import BLOCK as _BLOCK
from .draws import LEVELS as _LEVELS
from .draws import block_keys
from .draws import uniforms as _uniforms
from .masks import CutMask as _CutMask
from .masks import DellaMask as _DellaMask
from .masks import DrawMask as _DrawMask
from .torch_passes import Workspace as _Workspace
from .torch_passes import combine as _combine

CHUNK = 1 << 18  # elements per chunk: few enough to stay in cache, many enough to amortize each op


def chunk_for(n_params: int) -> int:
    """Chunk size for a model: CHUNK (256K elements) from 8M parameters on, where the workspace
    (~14 chunks, 14 MiB in fp32) is ~3 % of a 100M-parameter model; smaller below, where it would
    dominate. Smaller chunks cost speed: each torch op costs ~5 µs of dispatch per chunk."""
    return max(1 << 12, min(CHUNK, 1 << max(0, (n_params // 32).bit_length() - 1)))


# From this size on a task vector gets per-study tables (DARE's level sums, the magnitude bins of
# `_values_at`); below, their ~30 KiB each would outweigh the pass they save.
_TABLES_FROM = 1 << 16
_SAMPLE = 4096  # sorted magnitudes kept per (tensor, model) to bracket a rank


class TaskVectorBank:
    """Cached norms, cuts and draws per task vector, each named by a key such as
    "1:model.layers.0.mlp.up_proj.weight" (the model's position and the tensor's name)."""

    def __init__(
        self, seed: int = 0, chunk: int = CHUNK, cache_ranks: bool = False, fused: bool = True
    ) -> None:
        self.seed, self.chunk, self.cache_ranks = seed, chunk, cache_ranks
        self.fused = fused and fused_kernels is not None  # same bits either way (tested)
        self._ranks: dict[str, torch.Tensor] = {}
        self._l1: dict[str, torch.Tensor] = {}
        self._sample: dict[str, torch.Tensor] = {}
        self._cuts: dict[tuple[str, int, int], Cut] = {}
        self._values: dict[tuple[str, int], tuple[float, int, int]] = {}
        self._rescales: dict[tuple, torch.Tensor | None] = {}
        self._weight_cols: dict[tuple, tuple[torch.Tensor, torch.Tensor, np.ndarray, np.float32]] = {}
        self._arrays: dict[str, np.ndarray] = {}
        self._keys: dict[str, np.ndarray] = {}
        self._tie_counts: dict[tuple[str, float], np.ndarray] = {}
        self._gathered: dict[tuple[str, float], tuple[torch.Tensor, np.ndarray]] = {}
        self._level_l1: dict[str, np.ndarray] = {}
        self._bins: dict[str, tuple[np.ndarray, np.ndarray] | None] = {}
        self._scratch: dict[tuple[torch.dtype, torch.device], _Workspace] = {}

    # -- what candidates share ------------------------------------------------------------

    def l1(self, key: str, tau: torch.Tensor) -> torch.Tensor:
        """‖τ‖₁ in τ's work dtype (cached), summed as ‖τ⊙m‖₁ is (`_chunked_l1`)."""
        if key not in self._l1:
            self._l1[key] = self._chunked_l1(tau)
        return self._l1[key]

    def _chunked_l1(self, tau: torch.Tensor, mask=None) -> torch.Tensor:
        """‖τ⊙m‖₁ (‖τ‖₁ without a mask) in τ's work dtype, chunk by chunk through the workspace:
        fp32 sums per chunk, fp64 across (a whole-tensor `abs()` would copy the largest tensor)."""
        flat, total = tau.reshape(-1), torch.zeros((), dtype=torch.float64, device=tau.device)
        ws = self._workspace(1, tau.dtype, tau.device)
        for start in range(0, flat.numel(), self.chunk):
            t = flat[start : start + self.chunk]
            kept = ws.d[0, : t.numel()]
            if mask is None:
                kept.copy_(t)
            else:
                mask.apply(t, start, ws, out=kept)
            total += kept.abs_().sum()
        return total.to(sparsify.work_dtype(tau))

    def cut(self, key: str, tau: torch.Tensor, r0: int, r1: int) -> Cut:
        """The cut keeping ascending |τ| ranks [r0, r1), 0 ≤ r0 < r1 ≤ N."""
        ck = (key, r0, r1)
        if r0 >= r1:
            return Cut(math.inf, -math.inf, 0, 0, False, False)  # keeps nothing
        if ck not in self._cuts:
            (lo, less_lo, _), (hi, less_hi, eq_hi) = self._values_at(key, tau, [r0, r1 - 1])
            skip_lo, keep_hi = r0 - less_lo, r1 - less_hi
            _bounded(self._cuts)[ck] = Cut(
                lo, hi, skip_lo, keep_hi, skip_lo > 0 or keep_hi < eq_hi, r1 == tau.numel()
            )
        return self._cuts[ck]

    def _values_at(self, key: str, tau: torch.Tensor, ranks: list[int]) -> list[tuple[float, int, int]]:
        """(v, #{|τ| < v}, #{|τ| = v}) for the value v at each ascending rank r of |τ|.

        From 64K elements on, exact counts of |τ| per 16-bit prefix of its fp32 bit pattern (made
        once per task vector; the prefix orders magnitudes) name the prefix that holds rank r and
        how many lie below it: in bf16 that prefix is v itself; in fp32 one pass gathers its
        elements (~0.1–1 % of τ) and a selection among them gives v. Smaller tensors and any with
        a NaN use the sample path (`_sampled_values_at`). No sort of τ either way."""
        found = {r: self._values[(key, r)] for r in ranks if (key, r) in self._values}
        bins = self._magnitude_bins(key, tau) if tau.numel() >= _TABLES_FROM else None
        if bins is not None and len(found) < len(ranks):
            prefixes, below = bins
            at = {r: int(np.searchsorted(below, r, side="right")) - 1 for r in ranks if r not in found}
            # per rank: its prefix, how many |τ| lie below the prefix and how many share it
            spans = {
                r: (int(prefixes[b]), int(below[b]), int(below[b + 1] - below[b])) for r, b in at.items()
            }
            if tau.dtype == torch.bfloat16:  # the prefix is the value
                for r, (prefix, less, count) in spans.items():
                    found[r] = _bounded(self._values)[(key, r)] = (_f32(prefix << 16), less, count)
            else:
                brackets = {r: _prefix_range(prefix) for r, (prefix, _, _) in spans.items()}
                inside, blocks = self._gather(tau, brackets, {r: count for r, (_, _, count) in spans.items()})
                for r, (_, less, _) in spans.items():
                    v, less_in, equal = _select(inside[r], r - less)
                    found[r] = _bounded(self._values)[(key, r)] = (v, less + less_in, equal)
                    if r in blocks:  # where v lies, should a cut split its ties (the last few cuts')
                        _bounded(self._gathered, 64)[(key, v)] = (inside[r], blocks[r])
        missing = [r for r in ranks if r not in found]
        if missing:
            found.update(zip(missing, self._sampled_values_at(key, tau, missing)))
        return [found[r] for r in ranks]

    def _magnitude_bins(self, key: str, tau: torch.Tensor) -> tuple[np.ndarray, np.ndarray] | None:
        """The 16-bit prefixes of |τ| present, ascending (a few thousand: ≤ 128 per octave), and how
        many |τ| lie below each (and in all: one more entry); None when τ has a NaN (no rank)."""
        if key not in self._bins:
            if _kernels_take(tau):
                counts = fused_kernels.magnitude_bins(fused_kernels.as_numpy(tau))
            else:
                flat, counts = tau.reshape(-1), torch.zeros(1 << 15, dtype=torch.int64, device=tau.device)
                for start in range(0, flat.numel(), self.chunk):
                    a = flat[start : start + self.chunk].abs().float().view(torch.int32)
                    counts += torch.bincount(a >> 16, minlength=1 << 15)
                counts = counts.cpu().numpy()
            present = np.flatnonzero(counts)
            nan = present[-1] >= 0x7F80 and bool(tau.isnan().any())  # 0x7F80: inf, or a NaN
            below = np.concatenate([[0], np.cumsum(counts[present])])
            self._bins[key] = None if nan else (present.astype(np.int32), below)
        return self._bins[key]

    def _sampled_values_at(
        self, key: str, tau: torch.Tensor, ranks: list[int]
    ) -> list[tuple[float, int, int]]:
        """`_values_at` from a sorted random sample of |τ| (kept per task vector, 1/256 of its
        size) that brackets v; one pass of comparisons counts what lies below the bracket and
        gathers what lies inside (a few percent of τ); a selection in that small set gives v."""
        n, flat = tau.numel(), tau.reshape(-1)
        if key not in self._sample:  # random positions: a stride could alias with rows and heads
            g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
            idx = torch.randint(0, n, (min(n, max(_SAMPLE, n // 256)),), generator=g).to(tau.device)
            self._sample[key] = flat[idx].abs().float().sort().values
        sample = self._sample[key]
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
                    v, less, equal = _select(cand, r - below[r])
                    found[r] = _bounded(self._values)[(key, r)] = (v, below[r] + less, equal)
                    del todo[r]
                else:  # the sample misled: a wider bracket (at worst the whole tensor)
                    todo[r] = todo[r] * 4 if todo[r] < s else math.inf
        return [found[r] for r in ranks]

    def _gather(self, tau: torch.Tensor, brackets: dict, counts: dict) -> tuple[dict, dict]:
        """The |τ| in each bracket (lo, hi), fp32, when how many lie there is known: one pass;
        and, from the kernel, where each 16K block's values start (nblk + 1 offsets per bracket).
        (`gather`'s slots take twice what they hold; where that would be a large part of τ, as
        when a cut falls among many zeros, the exact-size count-and-gather of `_bracket`.)"""
        total = np.array([counts[r] for r in brackets], np.int64)
        if not _kernels_take(tau) or total.sum() > tau.numel() // 16:
            return self._bracket(tau, brackets)[1], {}
        lo, hi = (np.array(v, np.float32) for v in zip(*brackets.values()))
        values, at = fused_kernels.gather(fused_kernels.as_numpy(tau), lo, hi, total)
        nblk = (at.size - 1) // len(brackets)
        starts = at[::nblk]
        assert np.array_equal(np.diff(starts), total)  # the bins count what the pass finds
        values = torch.from_numpy(values)
        inside = {r: values[starts[i] : starts[i + 1]] for i, r in enumerate(brackets)}
        return inside, {r: at[i * nblk : (i + 1) * nblk + 1] - starts[i] for i, r in enumerate(brackets)}

    def _bracket(self, tau: torch.Tensor, brackets: dict) -> tuple[dict, dict]:
        """For each rank's bracket (lo, hi) of |τ|: #{|τ| < lo} and the |τ| in [lo, hi] (fp32)."""
        if _kernels_take(tau):
            lo, hi = (np.array(v, np.float32) for v in zip(*brackets.values()))
            counts, values, starts = fused_kernels.bracket(fused_kernels.as_numpy(tau), lo, hi)
            values = torch.from_numpy(values)
            return (
                {r: int(c) for r, c in zip(brackets, counts)},
                {r: values[starts[i] : starts[i + 1]] for i, r in enumerate(brackets)},
            )
        flat = tau.reshape(-1)
        below, inside = dict.fromkeys(brackets, 0), {r: [] for r in brackets}
        ws = self._workspace(1, tau.dtype, tau.device)  # its fp32 buffers only
        for start in range(0, flat.numel(), self.chunk):
            m = min(self.chunk, flat.numel() - start)
            a = ws.g[:m].copy_(flat[start : start + m]).abs_()
            for r, (blo, bhi) in brackets.items():
                below[r] += int(torch.lt(a, blo, out=ws.r[:m]).sum())
                band = torch.ge(a, blo, out=ws.r[:m]).mul_(torch.le(a, bhi, out=ws.acc[:m]))
                inside[r].append(a[band.bool()])
        return below, {r: torch.cat(v) for r, v in inside.items()}

    def della_ranks(
        self, key: str, tau: torch.Tensor, start: int, n: int, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`sparsify.della_ranks(τ)` (per-row magnitude rank in [0, 1], work dtype) for flat
        indices [start, start + n) of a 1-D or 2-D τ. With `cache_ranks`, the integer ranks are
        sorted once per study and kept (int16: 2 bytes per element); otherwise the rows around
        the range are sorted each time."""
        cols = _row_length(tau)
        if not self._caches_ranks(tau):
            rows = tau.reshape(-1, cols)
            r0, r1 = start // cols, (start + n - 1) // cols + 1
            off = start - r0 * cols
            return sparsify.della_ranks(rows[r0:r1]).reshape(-1)[off : off + n]
        # as sparsify.della_ranks: ranks cast, then + 1; every row's min is 1 and max is cols
        # (in place, into `out` when given: the same roundings, no allocation per chunk)
        work = sparsify.work_dtype(tau)
        ranks = self._cached_ranks(key, tau)[start : start + n]
        r = ranks.to(work) if out is None else out[:n].copy_(ranks)
        lo = torch.zeros((), dtype=work, device=tau.device) + 1
        hi = torch.full((), cols - 1, dtype=work, device=tau.device) + 1
        return r.add_(1).sub_(lo).div_(hi - lo).clamp_(0, 1)

    def _caches_ranks(self, tau: torch.Tensor) -> bool:
        return self.cache_ranks and tau.dim() <= 2 and _row_length(tau) <= 1 << 15  # int16 ranks

    def _cached_ranks(self, key: str, tau: torch.Tensor) -> torch.Tensor:
        """Per-row 0-based magnitude ranks of τ, flat int16, sorted once per study."""
        if key not in self._ranks:
            cols = _row_length(tau)
            rows = tau.reshape(-1, cols)
            ranks = torch.empty(tau.numel(), dtype=torch.int16, device=tau.device).view(-1, cols)
            step = max(1, self.chunk // cols)
            for r0 in range(0, rows.shape[0], step):  # a row block at a time: bounded temporaries
                ranks[r0 : r0 + step] = sparsify.magnitude_ranks(rows[r0 : r0 + step])
            self._ranks[key] = ranks.view(-1)
        return self._ranks[key]

    def uniforms(self, key: str, start: int, n: int, out: torch.Tensor) -> torch.Tensor:
        """Uniform draws in [0, 1) for flat indices [start, start + n) of one task vector, written
        into `out` (fp32): `draws.uniforms` with this task vector's block keys. Same key, same
        draws, whatever the chunk size."""
        return _uniforms(self._block_keys(key, (start + n - 1) // _BLOCK + 1), start, n, out)

    def _block_keys(self, key: str, nblk: int) -> np.ndarray:
        """The draw keys of blocks 0 … nblk − 1 of one task vector (cached; `draws.block_keys`)."""
        keys = self._keys.get(key)
        if keys is None or keys.size < nblk:
            keys = self._keys[key] = block_keys(self.seed, key, nblk)
        return keys[:nblk]

    # -- one output tensor --------------------------------------------------------------------

    def exact_for(
        self, keys: list[str], taus: list[torch.Tensor], sparsification: str | None, rescale: bool, **params
    ) -> bool:
        """Whether `merge` gives mergekit's result bit for bit for these arguments."""
        if sparsification is None:
            return True
        if sparsification not in ("magnitude", "magnitude_outliers") or rescale:
            return False
        if any(t.dtype not in (torch.float32, torch.float64) for t in taus):
            return False  # 16-bit magnitudes tie at nearly every cut: don't look
        return not any(
            c is not None and c.partial for c in self._cuts_for(keys, taus, sparsification, params)
        )

    def _cuts_for(
        self, keys: list[str], taus: list[torch.Tensor], sparsification: str, params: dict
    ) -> list[Cut | None]:
        gamma = params.get("gamma") or [0.0] * len(taus)
        windows = [
            sparsify.rank_window(sparsification, t.numel(), d, g)
            for t, d, g in zip(taus, params["density"], gamma)
        ]
        return [None if w is None else self.cut(k, t, *w) for k, t, w in zip(keys, taus, windows)]

    def merge(
        self,
        keys: list[str],
        base: torch.Tensor,
        taus: list[torch.Tensor],
        *,
        weight: list[float],
        density: list[float],
        sparsification: str | None,
        consensus: bool,
        normalize: bool,
        rescale: bool,
        lambda_: float = 1.0,
        gamma: list[float] | None = None,
        epsilon: list[float] | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """b + λ·combine(sparsify(τ_i, d_i)·w_i), chunk by chunk, into `out` (or a new tensor)."""
        k, n = len(taus), base.numel()
        out = torch.empty_like(base) if out is None else out
        o, b = out.view(-1), base.reshape(-1)
        flat = [t.reshape(-1) for t in taus]
        masks = self._masks(keys, taus, sparsification, density, gamma, epsilon)
        scale = [
            self._rescale(key, t, m) if rescale and m is not None else None
            for key, t, m in zip(keys, taus, masks)
        ]
        w, divisor, w32, divisor32 = self._weights(weight, base.dtype, base.device)
        if self._fused_merge(keys, b, flat, masks, scale, w32, divisor32, consensus, normalize, lambda_, o):
            return out
        ws = self._workspace(k, base.dtype, base.device)
        for start in range(0, n, self.chunk):
            stop = min(n, start + self.chunk)
            d = ws.d[:, : stop - start]
            for i in range(k):
                if masks[i] is None:
                    d[i].copy_(flat[i][start:stop])
                else:
                    masks[i].apply(flat[i][start:stop], start, ws, out=d[i])
                if scale[i] is not None:
                    d[i].mul_(scale[i])
            _combine(b[start:stop], d, w, divisor, ws, consensus, normalize, lambda_, o[start:stop])
        return out

    def _weights(self, weight: list[float], dtype: torch.dtype, device: torch.device):
        """The weights as a (K, 1) column in the work dtype, and their sum Σw (1 where |Σw| < 1e-8,
        the divisor of a merge without election), each also as fp32 numbers for the kernels;
        cached: a candidate's tensors share them."""
        ck = (tuple(weight), dtype, device)
        if ck not in self._weight_cols:
            w = torch.tensor(list(weight), dtype=dtype, device=device).reshape(-1, 1)
            divisor = w.sum(0)
            divisor[divisor.abs() < 1e-8] = 1
            w32 = w.float().reshape(-1).cpu().numpy()
            _bounded(self._weight_cols, 1024)[ck] = (w, divisor, w32, np.float32(divisor.item()))
        return self._weight_cols[ck]

    def _array(self, key: str, tau: torch.Tensor) -> np.ndarray:
        """`fused_kernels.as_numpy` of a resident τ, kept per key (checked against its memory)."""
        a = self._arrays.get(key)
        if a is None or a.size != tau.numel() or a.ctypes.data != tau.data_ptr():
            a = self._arrays[key] = fused_kernels.as_numpy(tau)
        return a

    def _fused_merge(
        self, keys, b, taus, masks, scale, w32, divisor, consensus, normalize, lambda_, o
    ) -> bool:
        """`merge`'s chunk loop as one `fused_kernels.merge` call (same bits), where it applies:
        numba present, CPU, fp32 or bf16, contiguous, DELLA only with cached ranks."""
        if not (self.fused and all(x.dtype == b.dtype for x in [o, *taus]) and _kernels_take(b, o, *taus)):
            return False
        spec = self._fused_spec(keys, taus, masks)
        if spec is None:
            return False
        kind, fp, ties, draw_keys, ranks = spec
        fp[:, 0] = w32
        fp[:, 1] = [1.0 if x is None else float(x) for x in scale]
        as_np = fused_kernels.as_numpy
        fused_kernels.merge(
            as_np(o), as_np(b), tuple(self._array(k, t) for k, t in zip(keys, taus)), ranks, kind, fp, ties,
            draw_keys, consensus, normalize, divisor, np.float32(lambda_), lambda_ != 1,
        )  # fmt: skip
        return True

    def _fused_spec(self, keys, taus, masks) -> tuple | None:
        """The masks as `fused_kernels.merge` takes them (weights and rescales left at 1), or None
        where a mask has no kernel (DELLA without cached ranks, or on more than 2 dimensions)."""
        k, n = len(taus), taus[0].numel()
        nblk = -(-n // _BLOCK)  # blocks of draws
        kind = np.zeros(k, np.int64)
        fp = np.ones((k, 9), np.float32)
        ties = np.full((k, 2, 3), np.nan)
        draw_keys = np.zeros((k, nblk), np.uint32)
        ranks = [np.zeros(0, np.int16)] * k
        for i, (key, tau, m) in enumerate(zip(keys, taus, masks)):
            if m is None:
                kind[i] = fused_kernels.NONE
            elif isinstance(m, _CutMask):
                c = m.cut
                fp[i, 2:5] = c.lo, c.hi, c.top
                if c.lo > c.hi:
                    kind[i] = fused_kernels.ZERO
                elif not c.partial:
                    kind[i] = fused_kernels.CUT
                else:
                    kind[i] = fused_kernels.TIES
                    groups = c.tie_groups()
                    # kept occurrences → flat indices; from the first or to the last need no count
                    need = [v for v, first, end in groups if first > 0 or end != math.inf]
                    counts = dict(zip(need, self._block_tie_counts(key, tau, need))) if need else {}
                    mags = fused_kernels.as_numpy(tau)
                    for g, (v, first, end) in enumerate(groups):
                        p = 0 if first == 0 else self._occurrence(mags, v, counts[v], first)
                        q = n if end == math.inf else self._occurrence(mags, v, counts[v], end)
                        ties[i, g] = v, p, q
            elif isinstance(m, _DrawMask):
                kind[i], fp[i, 5] = fused_kernels.DRAW, m.d
                draw_keys[i] = self._block_keys(key, nblk)
            elif m.d <= 0:
                kind[i] = fused_kernels.ZERO
            elif m.whole is None and self._caches_ranks(m.tau):
                kind[i] = fused_kernels.DELLA
                fp[i, 5:9] = m.d, m.eps, _row_length(m.tau), m.d - m.eps
                draw_keys[i] = self._block_keys(key, nblk)
                ranks[i] = self._cached_ranks(key, m.tau).numpy()
            else:
                return None
        return kind, fp, ties, draw_keys, tuple(ranks)

    def _masked_l1(self, key: str, tau: torch.Tensor, mask) -> torch.Tensor:
        """‖τ⊙m‖₁ in τ's work dtype: for DARE on large tensors from the level sums (`_draw_l1`),
        else one `fused_kernels.masked_l1` pass where numba is present (whatever `fused` says, so
        both paths rescale alike), else `_chunked_l1`."""
        if isinstance(mask, _DrawMask) and tau.numel() >= _TABLES_FROM:
            return self._draw_l1(key, tau, mask.d)
        spec = self._fused_spec([key], [tau], [mask]) if _kernels_take(tau) else None
        if spec is None:
            return self._chunked_l1(tau, mask)
        kind, fp, ties, keys, ranks = spec
        total = fused_kernels.masked_l1(
            fused_kernels.as_numpy(tau), ranks[0], kind[0], fp[0], ties[0], keys[0]
        )
        return torch.tensor(total, dtype=torch.float64).to(sparsify.work_dtype(tau))

    def _draw_l1(self, key: str, tau: torch.Tensor, d: float) -> torch.Tensor:
        """‖τ⊙m‖₁ of the DARE mask u < d (d on the grid): Σ|τ| over the levels of u below d, from
        sums per level made once per task vector (fp64; numba's pass, else torch's index_add_)."""
        if key not in self._level_l1:
            n = tau.numel()
            if _kernels_take(tau):
                keys = self._block_keys(key, -(-n // _BLOCK))
                sums = fused_kernels.level_l1(fused_kernels.as_numpy(tau), keys, _LEVELS)
            else:
                flat, ws = tau.reshape(-1), self._workspace(1, tau.dtype, tau.device)
                total = torch.zeros(_LEVELS, dtype=torch.float64, device=tau.device)
                for start in range(0, n, self.chunk):
                    t = flat[start : start + self.chunk]
                    u = self.uniforms(key, start, t.numel(), ws.r)
                    total.index_add_(0, u.mul_(_LEVELS).long(), t.abs().double())
                sums = total.cpu().numpy()
            self._level_l1[key] = np.concatenate([[0.0], np.cumsum(sums)])
        kept = self._level_l1[key][round(d * _LEVELS)]
        return torch.tensor(kept, dtype=torch.float64).to(sparsify.work_dtype(tau))

    @staticmethod
    def _occurrence(mags: np.ndarray, v: float, counts: np.ndarray, j: float) -> int:
        """Flat index of the j-th |τ| equal to v (the size of τ when there are at most j)."""
        return (
            mags.size if j >= counts.sum() else fused_kernels.occurrence(mags, np.float32(v), counts, int(j))
        )

    def _block_tie_counts(self, key: str, tau: torch.Tensor, values: list[float]) -> list[np.ndarray]:
        """Occurrences of each tie value in |τ| per 16K block, so `_occurrence` scans one block:
        from the fp32 gather that found the value (`_values_at`), else a counting pass; cached
        per value (a cut's other bound often stays, as breadcrumbs' top with a fixed γ)."""
        missing = [v for v in values if (key, v) not in self._tie_counts]
        gathered = {v: self._gathered.get((key, v)) for v in missing}
        passes = [v for v in missing if gathered[v] is None]
        if passes:
            v0, v1 = (np.float32(v) for v in (*passes, math.nan)[:2])
            counted = fused_kernels.count_equal(fused_kernels.as_numpy(tau), v0, v1)
        for v in missing:
            counts = counted[passes.index(v)] if gathered[v] is None else _counts_per_block(*gathered[v], v)
            _bounded(self._tie_counts)[(key, v)] = counts
        return [self._tie_counts[(key, v)] for v in values]

    def mask(
        self,
        key: str,
        tau: torch.Tensor,
        sparsification: str,
        density: float,
        gamma: float = 0.01,
        epsilon: float = 0.15,
    ) -> torch.Tensor:
        """The 0/1 keep mask `merge` applies to τ (same shape, τ's work dtype); for tests and
        for anyone who wants to see what a candidate keeps."""
        (m,) = self._masks([key], [tau], sparsification, [density], [gamma], [epsilon])
        flat = tau.reshape(-1)
        if m is None:
            return torch.ones_like(tau)
        ws = self._workspace(1, tau.dtype, tau.device)
        kept = torch.empty_like(flat)
        for start in range(0, flat.numel(), self.chunk):
            ones = torch.ones_like(flat[start : start + self.chunk])
            m.apply(
                ones,
                start,
                ws,
                out=kept[start : start + ones.numel()],
                magnitudes=flat[start : start + ones.numel()],
            )
        return kept.reshape(tau.shape)

    # The sparsifications the bank implements; any other takes the reference (engine.py checks).
    SPARSIFICATIONS = (None, "magnitude", "magnitude_outliers", "random", "della")

    @classmethod
    def supports(cls, sparsification: str | None) -> bool:
        return sparsification in cls.SPARSIFICATIONS

    def _masks(self, keys, taus, sparsification, density, gamma, epsilon) -> list:
        if sparsification in ("magnitude", "magnitude_outliers"):
            params = {"density": density, "gamma": gamma}
            return [
                None if c is None else _CutMask(c) for c in self._cuts_for(keys, taus, sparsification, params)
            ]
        if sparsification == "random":
            return [
                None if d >= 1 else _DrawMask(functools.partial(self.uniforms, key), d)
                for key, d in zip(keys, density)
            ]
        if sparsification == "della":
            return [
                None
                if d >= 1
                else _DellaMask(
                    functools.partial(self.uniforms, key),
                    functools.partial(self.della_ranks, key, t),
                    t,
                    d,
                    e,
                )
                for key, t, d, e in zip(keys, taus, density, epsilon)
            ]
        if sparsification is None:  # task arithmetic: every element kept
            return [None] * len(taus)
        # Never search a sparsifier the bank does not know as "no mask" (plain task arithmetic).
        raise MergeSearchError(
            f"the search engine has no {sparsification!r} sparsification; score this method with the "
            "exact engine (ResidentEngine(exact=True)) or add it to candidates/bank.py"
        )

    def _rescale(self, key: str, tau: torch.Tensor, mask) -> torch.Tensor | None:
        """‖τ‖₁ / ‖τ⊙m‖₁ in the work dtype (None when either is below 1e-7, as in mergekit)."""
        kk = (key, mask.key)
        if kk not in self._rescales:
            before, after = self.l1(key, tau), self._masked_l1(key, tau, mask)
            _bounded(self._rescales)[kk] = None if before < 1e-7 or after < 1e-7 else before / after
        return self._rescales[kk]

    def _workspace(self, k: int, dtype: torch.dtype, device: torch.device) -> _Workspace:
        ws = self._scratch.get((dtype, device))
        if ws is None or ws.d.shape[0] < k:
            ws = self._scratch[(dtype, device)] = _Workspace(k, self.chunk, dtype, device)
        return ws


def _kernels_take(*tensors: torch.Tensor) -> bool:
    """Whether numba is present and its kernels take these tensors (`fused_kernels.fusable`)."""
    return fused_kernels is not None and fused_kernels.fusable(*tensors)


def _row_length(tau: torch.Tensor) -> int:
    """DELLA's rows: along dim 1 of a 2-D τ; a 1-D τ is one row."""
    return tau.shape[1] if tau.dim() == 2 else tau.numel()
