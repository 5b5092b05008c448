"""One pass per candidate tensor on the CPU: sparsify, weight, elect, sum and add in one loop.

`torch_passes` makes every operation a pass over a chunk (a dozen and more per model and
element), so a candidate runs at a fraction of memory bandwidth. These numba
kernels do the same arithmetic, in the same order and with the same roundings, block by block:
each 16K-element block is read once, its temporaries stay in L1, and blocks run in parallel.
Same inputs, same bits as `torch_passes` (tests/test_passes.py):
fp32 ops are IEEE ops (numba does not contract a·b + c into an FMA without fastmath; `linear`
asks for the FMA that torch's addcmul_ does), and bf16 steps are computed in fp32 and rounded to
nearest even after each torch op, as torch's CPU kernels do.

- `merge`: a task-vector candidate (`numba_passes.NumbaPasses.pack` turns masks into arrays).
- `masked_l1`: ‖τ⊙m‖₁ for DELLA/TIES rescaling; `level_l1`: DARE's for every density at once.
- `uniforms`: the draws themselves, for the torch passes on the CPU (DELLA without cached ranks).
- A new cut: `magnitude_bins` (counts of |τ| per 16-bit prefix, once per study), then `gather`
  (one pass, counts known) or `bracket` (count and gather, from a sample's bracket), and `select`;
  `count_equal` and `occurrence`: where a split tie group's kept run starts and ends.
- `linear`: the resident engine's linear merge (`resident._fused_linear`).

A bf16 tensor arrives as its int16 bit pattern (numpy has no bf16), an fp32 one as float32: numba
compiles one specialization per dtype, and `_load`/`_round`/`_store` dispatch on it. Compiled
code is cached next to this file (numba's `cache=True`): the first use costs seconds, not later.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic, overload

# Float division without Python's zero check: the check is a branch that keeps loops scalar.
jit = functools.partial(njit, error_model="numpy")

BLOCK = 1 << 14  # elements per parallel block: small, so that small tensors use every thread
DRAW_BLOCK = 1 << 16  # elements per block of draws; must equal draws.BLOCK
SUB = 1 << 11  # elements per inner step: its 2K+2 buffers of 8 KiB stay in L1

NONE, ZERO, CUT, TIES, DRAW, DELLA = range(6)  # mask kinds (TIES: a cut that splits tie groups)
# The columns of a model's row of `merge`'s parameter table (float32): its weight, its rescale
# (1: none), a cut's bounds and whether it reaches the top, a density, DELLA's ε, its row
# length and d − ε.
W, SCALE, LO, HI, TOP, D, EPS, COLS, SHIFT = range(9)
N_COLS = 9


def fusable(*tensors: torch.Tensor) -> bool:
    """Whether the kernels take these tensors: CPU, fp32 or bf16 (the first's dtype), contiguous."""
    t = tensors[0]
    return (
        t.device.type == "cpu"
        and t.dtype in (torch.float32, torch.bfloat16)
        and all(x.is_contiguous() for x in tensors)
    )


def as_numpy(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor's memory as a flat numpy array (bf16 as its int16 bit pattern), shared."""
    t = t.detach().reshape(-1)
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()


@intrinsic
def _fma(typingctx, a, b, c):
    """a·b + c rounded once, as torch's CPU addcmul computes it."""

    def codegen(context, builder, signature, args):
        return builder.fma(*args)

    return types.float32(types.float32, types.float32, types.float32), codegen


@intrinsic
def _f32_from_bits(typingctx, bits):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.uint32), codegen


@intrinsic
def _bits_from_f32(typingctx, x):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


def _load(x):  # the element as fp32 (a stub: the overloads below are the implementation)
    raise NotImplementedError


def _round(x, like):  # x rounded to the dtype of the scalar `like` (int16: bf16 bits), as fp32
    raise NotImplementedError


def _store(x, like):  # x as a value of `like`'s dtype
    raise NotImplementedError


def _store_in(x, like, olike):  # x rounded as `like`'s dtype, as a value of the output's (`olike`)
    raise NotImplementedError


def _bf16_bits(x):
    """torch's fp32 → bf16 rounding (c10 round_to_nearest_even), as the 16 high bits."""
    if x != x:
        return np.uint32(0x7FC0)
    u = _bits_from_f32(x)
    return (u + (((u >> np.uint32(16)) & np.uint32(1)) + np.uint32(0x7FFF))) >> np.uint32(16)


_bf16_bits = jit(inline="always")(_bf16_bits)


@overload(_load)
def _ov_load(x):
    if x == types.int16:

        def widen(x):
            return _f32_from_bits((np.uint32(x) & np.uint32(0xFFFF)) << np.uint32(16))

        return widen

    def same(x):
        return np.float32(x)

    return same


@overload(_round)
def _ov_round(x, like):
    if like == types.int16:

        def to_bf16(x, like):
            return _f32_from_bits(_bf16_bits(x) << np.uint32(16))

        return to_bf16

    def same(x, like):
        return x

    return same


@overload(_store_in)
def _ov_store_in(x, like, olike):
    if like == types.int16 and olike == types.float32:  # bf16 inputs into an fp32 live model

        def widened(x, like, olike):
            return _round(x, like)

        return widened

    def same(x, like, olike):
        return _store(x, like)

    return same


@overload(_store)
def _ov_store(x, like):
    if like == types.int16:

        def to_bf16(x, like):
            return np.int16(np.uint16(_bf16_bits(x)))

        return to_bf16

    def same(x, like):
        return x

    return same


@jit(parallel=True, cache=True)
def count_equal(mags: np.ndarray, v0: float, v1: float) -> np.ndarray:
    """Occurrences of v0 and of v1 in |τ| (fp32 compare) per block: counts[g, block]."""
    n = mags.size
    nblk = (n + BLOCK - 1) // BLOCK
    counts = np.zeros((2, nblk), np.int64)
    for blk in prange(nblk):
        counts[0, blk], counts[1, blk] = _count_two(mags[blk * BLOCK : min(n, (blk + 1) * BLOCK)], v0, v1)
    return counts


@jit
def _count_two(block, v0, v1):
    """A loop over a 1-D slice, which numba vectorizes (indexing mags from the block's start
    inline stayed scalar)."""
    c0 = c1 = 0
    for i in range(block.size):
        a = abs(_load(block[i]))
        c0 += a == v0
        c1 += a == v1
    return c0, c1


@jit(cache=True)
def occurrence(mags, v: float, counts: np.ndarray, j: int) -> int:
    """Flat index of the j-th (0-based) |τ| equal to v, given its counts per block (`count_equal`)."""
    before = 0
    for blk in range(counts.size):
        if before + counts[blk] > j:
            for i in range(blk * BLOCK, min(mags.size, (blk + 1) * BLOCK)):
                if abs(_load(mags[i])) == v:
                    if before == j:
                        return i
                    before += 1
        before += counts[blk]
    return mags.size


@jit(parallel=True, cache=True)
def magnitude_bins(mags) -> np.ndarray:
    """How many |τ| (as fp32) have each 16-bit prefix of their bit pattern: counts[b] for the
    fp32 values b·2^16 … b·2^16 + 2^16 − 1 (bf16: b is the value). Integer counts, so exact."""
    n = mags.size
    runs = min(16, (n + BLOCK - 1) // BLOCK)
    counts = np.zeros((runs, 1 << 15), np.int64)  # |τ| has no sign bit
    for r in prange(runs):
        row = counts[r]
        for i in range(r * n // runs, (r + 1) * n // runs):
            row[_bits_from_f32(abs(_load(mags[i]))) >> np.uint32(16)] += 1
    return counts.sum(axis=0)


@jit(parallel=True, cache=True)
def bracket(mags, lo: np.ndarray, hi: np.ndarray):
    """For brackets [lo[r], hi[r]] of |τ| (fp32 compare): #{|τ| < lo[r]} and the |τ| inside, in
    flat order, concatenated (`starts[r]` to `starts[r + 1]`). Two passes: count, then gather."""
    n, nr = mags.size, lo.size
    nblk = (n + BLOCK - 1) // BLOCK
    below = np.zeros((nr, nblk), np.int64)
    inside = np.zeros((nr, nblk), np.int64)
    for blk in prange(nblk):
        block = mags[blk * BLOCK : min(n, (blk + 1) * BLOCK)]
        for r in range(nr):  # scalars and a 1-D loop per bracket: vectorized counts
            below[r, blk], inside[r, blk] = _count_bracket(block, lo[r], hi[r])
    # gather without a branch (write every |τ|, advance when inside): each (rank, block) region
    # has one spare slot at its end for the last write, then the regions are packed
    room = inside.reshape(-1) + 1
    at = np.cumsum(room) - room
    spread = np.empty(room.sum(), np.float32)
    for blk in prange(nblk):
        block = mags[blk * BLOCK : min(n, (blk + 1) * BLOCK)]
        for r in range(nr):
            _gather_bracket(block, lo[r], hi[r], spread, at[r * nblk + blk])
    values = np.empty(inside.sum(), np.float32)
    j = 0
    for g in range(nr * nblk):
        values[j : j + room[g] - 1] = spread[at[g] : at[g] + room[g] - 1]
        j += room[g] - 1
    starts = np.zeros(nr + 1, np.int64)
    starts[1:] = np.cumsum(inside.sum(axis=1))
    return below.sum(axis=1), values, starts


@jit(parallel=True, cache=True)
def gather(mags, lo, hi, total: np.ndarray):
    """`bracket`'s values when the count inside each bracket (`total`) is known, and where each
    (bracket, block)'s values start: values[at[r·nblk + blk] : at[r·nblk + blk + 1]]. One pass. Each
    block gathers into its own slots, twice its share; a block with more (a tensor whose values
    cluster) is gathered again, alone, while packing. Scalar loops, no array expressions: with
    `parallel=True` each of those is a parallel region of its own."""
    n, nr = mags.size, lo.size
    nblk = (n + BLOCK - 1) // BLOCK
    room = np.empty(nr, np.int64)
    at = np.zeros(nr + 1, np.int64)
    for r in range(nr):
        room[r] = 2 * (total[r] // nblk) + 64 + 1  # + 1: the capped gather's spare slot
        at[r + 1] = at[r] + room[r] * nblk
    got = np.empty(nr * nblk, np.int64)
    spread = np.empty(at[-1], np.float32)
    for blk in prange(nblk):
        block = mags[blk * BLOCK : min(n, (blk + 1) * BLOCK)]
        for r in range(nr):
            slots = spread[at[r] + blk * room[r] : at[r] + (blk + 1) * room[r]]
            got[r * nblk + blk] = _gather_capped(block, lo[r], hi[r], slots)
    dest = np.zeros(nr * nblk + 1, np.int64)  # where each (rank, block)'s values go, packed
    for g in range(nr * nblk):
        dest[g + 1] = dest[g] + got[g]
    values = np.empty(dest[-1], np.float32)
    for blk in prange(nblk):
        for r in range(nr):
            g = r * nblk + blk
            src, c = spread[at[r] + blk * room[r] :], got[g]
            if c >= room[r]:
                src = np.empty(c + 1, np.float32)
                _gather_bracket(mags[blk * BLOCK : min(n, (blk + 1) * BLOCK)], lo[r], hi[r], src, 0)
            for q in range(c):  # a loop: numba's slice assignment has a fixed cost per call
                values[dest[g] + q] = src[q]
    return values, dest


@jit
def _gather_capped(block, lo, hi, out):
    """The |τ| in [lo, hi] into out in order while they fit, and how many there are. Per group of
    64, then of 16 where the group has any: a vectorized count, and only in a 16 that has one the
    scalar gather, branch-free: every |τ| written at the cursor, the last slot taking the rest.
    (Group sizes and the branch-free write were measured against the alternatives:
    benchmarks/RESULTS.md, "Design choices measured".)"""
    at, cap = 0, out.size - 1
    for g in range(0, block.size, 64):
        group = block[g : g + 64]
        if _count_inside(group, lo, hi):
            for h in range(0, group.size, 16):
                sub = group[h : h + 16]
                if _count_inside(sub, lo, hi):
                    for i in range(sub.size):
                        a = abs(_load(sub[i]))
                        out[min(at, cap)] = a
                        at += (a >= lo) & (a <= hi)
    return at


@jit
def _count_inside(block, lo, hi):
    c = 0
    for i in range(block.size):
        a = abs(_load(block[i]))
        c += (a >= lo) & (a <= hi)
    return c


@jit(cache=True)
def select(values: np.ndarray, k: int):
    """The k-th smallest (0-based) of `values`, and how many are below it and equal to it."""
    v = np.partition(values.copy(), k)[k]
    below = equal = 0
    for x in values:
        below += x < v
        equal += x == v
    return v, below, equal


@jit
def _count_bracket(block, lo, hi):
    c_below = c_inside = 0
    for i in range(block.size):
        a = abs(_load(block[i]))
        c_below += a < lo
        c_inside += (a >= lo) & (a <= hi)
    return c_below, c_inside


@jit
def _gather_bracket(block, lo, hi, values, at):
    for i in range(block.size):
        a = abs(_load(block[i]))
        values[at] = a
        at += (a >= lo) & (a <= hi)


@jit(parallel=True, cache=True)
def masked_l1(tau, rank, kind, fp, ties, keys) -> float:
    """‖τ⊙m‖₁ for one task vector and mask (as `merge` applies it, rescale and weight 1):
    fp64 per sub-block (`_abs_sum`), then in order: the same value whatever the thread count."""
    n = tau.size
    nblk = (n + BLOCK - 1) // BLOCK
    sums = np.zeros(nblk)
    for blk in prange(nblk):
        dk = np.empty(SUB, np.float32)
        b0 = blk * BLOCK
        b1 = min(n, b0 + BLOCK)
        total = 0.0
        for s in range(b0, b1, SUB):
            m = min(SUB, b1 - s)
            dk[:m] = -0.0
            _sparsify(tau[s : s + m], rank[s : s + m], kind, fp, ties, keys[s // DRAW_BLOCK], s, s % DRAW_BLOCK,
                      dk[:m], np.float32(1), tau[0])  # fmt: skip
            total += _abs_sum(dk[:m])
        sums[blk] = total
    total = 0.0
    for blk in range(nblk):
        total += sums[blk]
    return total


@jit(parallel=True, cache=True)
def level_l1(tau, keys, levels: int) -> np.ndarray:
    """Σ|τ| over the elements whose draw u lies in [l/levels, (l+1)/levels), per level l: DARE's
    ‖τ⊙m‖₁ for every density on that grid, in one pass. fp64, summed in a fixed order (64 runs
    of draw blocks, each in flat order, then the runs in order): the same whatever the threads."""
    n = tau.size
    nd = (n + DRAW_BLOCK - 1) // DRAW_BLOCK
    runs = min(64, nd)
    sums = np.zeros((runs, levels))
    scale = np.float32(levels)
    for r in prange(runs):
        row = sums[r]
        for c in range(r * nd // runs, (r + 1) * nd // runs):
            key = keys[c]
            for j in range(min(DRAW_BLOCK, n - c * DRAW_BLOCK)):
                level = np.int64(_uniform(key, j) * scale)  # exact: levels is 2^k
                row[level] += abs(_load(tau[c * DRAW_BLOCK + j]))
    total = np.zeros(levels)
    for r in range(runs):
        total += sums[r]
    return total


@jit(parallel=True, cache=True)
def uniforms(keys: np.ndarray, start: int, out: np.ndarray) -> None:
    """out[j] = the draw at flat index start + j of a task vector whose blocks have these keys."""
    n = out.size
    for blk in prange((n + BLOCK - 1) // BLOCK):
        for j in range(blk * BLOCK, min(n, (blk + 1) * BLOCK)):
            c, i = divmod(start + j, DRAW_BLOCK)
            out[j] = _uniform(keys[c], i)


@jit
def _abs_sum(x) -> float:
    """Σ|x| in fp64 over 8 interleaved lanes, then the lanes in order: a fixed order (so a fixed
    value), and 8 independent add chains instead of one (one chain waits ~4 cycles per add)."""
    lanes = np.zeros(8)
    full = x.size - x.size % 8
    for j in range(0, full, 8):
        for q in range(8):
            lanes[q] += abs(x[j + q])
    for j in range(full, x.size):
        lanes[0] += abs(x[j])
    total = 0.0
    for q in range(8):
        total += lanes[q]
    return total


@jit(parallel=True, cache=True)
def merge(
    out,
    base,
    taus,
    ranks,
    kind,
    fparams,
    ties,
    keys,
    consensus,
    normalize,
    divisor,
    lam,
    scale_lambda,
    from_models=False,
):
    """out = b + λ·combine(sparsify(τ_k)·s_k·w_k) for one tensor, as `torch_passes.combine`.
    With `from_models`, `taus` are the models x_k themselves and each sub-block's τ_k = R(x_k − b)
    is made here, as torch's subtraction rounds it (inputs streamed from their files then never
    hold τ in memory).

    Per model k: kind[k]; fparams[k] = its row of columns W … SHIFT (named above);
    ties[k, g] = (value, flat index of the first kept, of the first not kept after it) of ≤ 2 tie
    groups (TIES); keys[k, draw block] = the key of that block's draws (DRAW, DELLA, `_uniform`);
    ranks[k] = per-row int16 magnitude ranks (DELLA). `divisor` is Σw when not electing.
    The mask loops take 1-D slices and scalars, which numba vectorizes (2-D or tuple indexing by a
    loop variable there did not); the election reads d[k, j] element by element (faster than a
    pass per step: benchmarks/RESULTS.md, "Design choices measured")."""
    n = base.size
    nk = len(taus)
    nblk = (n + BLOCK - 1) // BLOCK
    for blk in prange(nblk):
        d = np.empty((nk, SUB), np.float32)
        acc = np.empty(SUB, np.float32)
        tb = np.empty_like(base[:SUB])  # one sub-block of τ_k, from_models
        like = base[0]  # its type says how to round (a scalar: arrays passed per element cost refcounts)
        w = fparams[:, W].copy()
        b0 = blk * BLOCK
        b1 = min(n, b0 + BLOCK)
        for s in range(b0, b1, SUB):
            m = min(SUB, b1 - s)
            # δ_k are added onto -0 (x + -0 = x for every x, ±0 included): into one accumulator
            # when nothing needs them apart, into a row each for the sign election
            if consensus:
                d[:, :m] = -0.0
            else:
                acc[:m] = -0.0
            for k in range(nk):
                fp = fparams[k]
                if from_models:
                    _difference(taus[k][s : s + m], base[s : s + m], tb[:m], like)
                    tk = tb[:m]
                else:
                    tk = taus[k][s : s + m]
                _sparsify(tk, ranks[k][s : s + m], kind[k], fp, ties[k], keys[k, s // DRAW_BLOCK], s,
                          s % DRAW_BLOCK, d[k, :m] if consensus else acc[:m], fp[W], like)  # fmt: skip
            if consensus:
                _elect(d, out[s : s + m], base[s : s + m], w, nk, normalize, lam, like)
            else:
                _round_all(acc[:m], like)
                _finish(out[s : s + m], base[s : s + m], acc[:m], divisor, normalize, lam, scale_lambda, like)


@jit
def _difference(x, b, out, like):
    """out = x − b in the inputs' dtype, as torch computes it (fp32, then rounded to bf16)."""
    for j in range(out.size):
        out[j] = _store(_load(x[j]) - _load(b[j]), like)


@jit
def _sparsify(tau, rank, kind, fp, ties, key, s, i, dk, w, like):
    """dk += R(R(τ⊙mask · s) · w) for τ's elements [s, s + dk.size), given as `tau` (and their
    DELLA ranks as `rank`), at position i of its block of draws (whose key is `key`). fp: the
    model's row of columns W … SHIFT.
    Without a rescale (s = 1) R(τ⊙mask · 1) is τ⊙mask (a product of a stored value and 0 or 1):
    a specialization for `scale` None skips that step (in bf16 one rounding of five per model)."""
    if fp[SCALE] == 1:
        _masked_into(tau, rank, kind, fp, ties, key, s, i, dk, None, w, like)
    else:
        _masked_into(tau, rank, kind, fp, ties, key, s, i, dk, fp[SCALE], w, like)


@jit
def _masked_into(tau, rank, kind, fp, ties, key, s, i, dk, scale, w, like):
    if kind == NONE:
        _copy(tau, dk, scale, w, like)
    elif kind == ZERO:
        _copy(tau[:0], dk, scale, w, like)
    elif kind == CUT:
        _cut(tau, dk, fp[LO], fp[HI], fp[TOP] != 0, scale, w, like)
    elif kind == TIES:
        _cut_ties(tau, dk, fp[LO], fp[HI], ties, s, scale, w, like)
    elif kind == DRAW:
        _draw(tau, dk, key, i, fp[D], scale, w, like)
    else:
        _della(tau, dk, key, i, rank, fp[EPS], fp[COLS], fp[SHIFT], scale, w, like)


def _weigh(x, scale, w, like):  # R(R(x·scale)·w), or R(x·w) for scale None (an overload below)
    raise NotImplementedError


@overload(_weigh)
def _ov_weigh(x, scale, w, like):
    if isinstance(scale, types.NoneType):
        return lambda x, scale, w, like: _round(x * w, like)
    return lambda x, scale, w, like: _round(_round(x * scale, like) * w, like)


@jit
def _copy(tau, dk, scale, w, like):
    """No mask (an empty `tau`: a zero mask, +0 as eager's zero_())."""
    if tau.size == 0:
        for j in range(dk.size):
            dk[j] += _weigh(np.float32(0), scale, w, like)
        return
    for j in range(dk.size):
        dk[j] += _weigh(_load(tau[j]), scale, w, like)


@jit
def _cut(tau, dk, lo, hi, top, scale, w, like):
    """Keep lo ≤ |τ| (≤ hi unless the window reaches the top), on fp32 magnitudes as mergekit ranks.
    Masks combine with `&`: `and` and chained comparisons branch, and at a cut they mispredict."""
    for j in range(dk.size):
        t = _load(tau[j])
        a = abs(t)
        dk[j] += _weigh(t * np.float32((a >= lo) & (top | (a <= hi))), scale, w, like)


@jit
def _cut_ties(tau, dk, lo, hi, ties, s, scale, w, like):
    """Keep lo < |τ| < hi, and |τ| = ties[g, 0] at flat indices [ties[g, 1], ties[g, 2]): the
    positions make the tie groups a comparison too (no running count), so the loop vectorizes."""
    v0, p0, q0 = ties[0, 0], _within(ties[0, 1] - s), _within(ties[0, 2] - s)  # relative to this sub-block
    v1, p1, q1 = ties[1, 0], _within(ties[1, 1] - s), _within(ties[1, 2] - s)
    for j in range(dk.size):
        t = _load(tau[j])
        a = abs(t)
        i = np.int32(j)
        keep = ((a > lo) & (a < hi)) | ((a == v0) & (i >= p0) & (i < q0)) | ((a == v1) & (i >= p1) & (i < q1))
        dk[j] += _weigh(t * np.float32(keep), scale, w, like)


@intrinsic
def _lowbias32_u24(typingctx, x):
    """The top 24 bits of lowbias32(x) (C. Wellons' hash prospector) over 2²⁴, as fp32, in 32-bit
    integer ops: numba would widen them to 64 bits, halving the vector width."""

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        x = builder.trunc(args[0], i32)
        for shift, mul in ((16, 0x7FEB352D), (15, 0x846CA68B)):
            x = builder.xor(x, builder.lshr(x, ir.Constant(i32, shift)))
            x = builder.mul(x, ir.Constant(i32, mul))
        x = builder.xor(x, builder.lshr(x, ir.Constant(i32, 16)))
        u = builder.sitofp(builder.lshr(x, ir.Constant(i32, 8)), ir.FloatType())  # < 2²⁴: exact
        return builder.fmul(u, ir.Constant(ir.FloatType(), 1.0 / (1 << 24)))

    return types.float32(types.int64), codegen


@jit(inline="always")
def _within(x):
    """A position relative to a sub-block, clamped to [-1, SUB] as int32: 32-bit lanes (twice
    as many per vector as int64 positions, or float64 ones). NaN (an unused tie group) gives -1."""
    return np.int32(min(max(x, np.float64(-1)), np.float64(SUB))) if x == x else np.int32(-1)


@jit(inline="always")
def _uniform(key, j):
    """The draw at index j of a block of draws with this key: lowbias32(key ^ j)'s top 24 bits as
    a uniform in [0, 1). Computed, not loaded: integer ops that vectorize, where windows of two
    tables per model cost L3 reads."""
    return _lowbias32_u24(np.int64(key) ^ np.int64(j))


@jit
def _draw(tau, dk, key, i, dens, scale, w, like):
    for j in range(dk.size):
        keep = np.float32(1 if _uniform(key, i + j) < dens else 0)
        dk[j] += _weigh(_load(tau[j]) * keep, scale, w, like)


@jit
def _della(tau, dk, key, i, rank, eps, cols, shift, scale, w, like):
    """Keep where u < p = (d − ε) + 2ε·rank, rank normalized per row as TaskVectorBank.della_ranks:
    every step rounded to the work dtype; torch's add_ rounds its Python scalar too, mul_ doesn't."""
    span = _round(_round(_round(cols - np.float32(1), like) + np.float32(1), like) - np.float32(1), like)
    shift = _round(shift, like)
    for j in range(dk.size):
        r = _round(_round(_round(np.float32(rank[j]), like) + np.float32(1), like) - np.float32(1), like)
        r = min(max(_round(r / span, like), np.float32(0)), np.float32(1))
        p = _round(_round(_round(r * np.float32(2), like) * eps, like) + shift, like)
        keep = np.float32(1 if _uniform(key, i + j) < p else 0)
        dk[j] += _weigh(_load(tau[j]) * keep, scale, w, like)


@jit
def _round_all(x, like):
    for j in range(x.size):
        x[j] = _round(x[j], like)


@jit
def _elect(d, out, base, w, nk, normalize, lam, like):
    """TIES, then `_finish`: majority = sign(R(Σδ)) (0 counts +); m_k = [δ_k·majority > 0];
    x = R(Σ m_k δ_k), q = R(Σ m_k w_k) (1 where 0); out = R(b + R(R(x / q)·λ)); sums in order from
    k = 0, in fp32, as `torch_passes.combine`. Element by element, the models inside (faster
    than a pass per step); without normalize q is 1 and λ may be 1: x / 1 and x·1 are x, bit for bit."""
    olike = out[0]
    for j in range(out.size):
        total = d[0, j]
        for k in range(1, nk):
            total += d[k, j]
        majority = np.float32(1) if _round(total, like) >= 0 else np.float32(-1)
        keep = np.float32(1 if d[0, j] * majority > 0 else 0)
        x, weights = keep * d[0, j], keep * w[0]
        for k in range(1, nk):
            keep = np.float32(1 if d[k, j] * majority > 0 else 0)
            x += keep * d[k, j]
            weights += keep * w[k]
        q = _round(weights, like)
        q = (q + np.float32(1) if q == 0 else q) if normalize else np.float32(1)
        x = _round(_round(_round(x, like) / q, like) * lam, like)
        out[j] = _store_in(_load(base[j]) + x, like, olike)


@jit
def _finish(out, base, acc, divisor, normalize, lam, scale_lambda, like):
    """out = R(b + x), x = R(R(acc / divisor) · λ) (each step only when asked); R rounds to the
    inputs' dtype, whatever the output's (bf16 inputs may merge into an fp32 live model)."""
    if normalize:  # branches outside the loops: a branch inside keeps LLVM from vectorizing
        for j in range(out.size):
            acc[j] = _round(acc[j] / divisor, like)
    if scale_lambda:
        for j in range(out.size):
            acc[j] = _round(acc[j] * lam, like)
    olike = out[0]
    for j in range(out.size):
        out[j] = _store_in(_load(base[j]) + acc[j], like, olike)


@functools.cache
def addcmul_is_fma() -> bool:
    """Whether this torch's CPU addcmul_ rounds once (an FMA): `linear` reproduces only that."""
    g = torch.Generator().manual_seed(0)
    o, x, w = torch.randn(4099, generator=g), torch.randn(4099, generator=g), torch.tensor(0.37)
    return torch.equal(o.clone().addcmul_(x, w), (o.double() + x.double() * w.double()).float())


def linear(out, xs, w, wsum, normalize) -> None:
    """out = R(Σ_k w_k x_k / Σw) as `interpolation.linear`: an fp32 accumulator from 0, one
    fused multiply-add per model in order (torch's addcmul_), then the division, then rounding.

    Two loop orders, the same bits, each the faster for its dtype (benchmarks/RESULTS.md, "Design
    choices measured"): fp32 element by element with the models inside (the sum stays in a
    register), bf16 per model over 2K-element sub-blocks (element by element its widening and
    rounding vectorize badly)."""
    kernel = _linear_per_model if out.dtype == np.int16 else _linear_per_element
    kernel(out, xs, w, wsum, normalize)


@jit(parallel=True, cache=True)
def _linear_per_element(out, xs, w, wsum, normalize):
    n = out.size
    nblk = (n + BLOCK - 1) // BLOCK
    for blk in prange(nblk):
        b0 = blk * BLOCK
        b1 = min(n, b0 + BLOCK)
        o = out[b0:b1]
        like = out[0]  # read once: read in the loop, LLVM must assume `o`'s stores change it
        if normalize:  # a branch outside the loop: inside, it keeps LLVM from vectorizing
            for j in range(o.size):
                o[j] = _store(_weighted_sum(xs, w, b0 + j) / wsum, like)
        else:
            for j in range(o.size):
                o[j] = _store(_weighted_sum(xs, w, b0 + j), like)


@jit(inline="always")
def _weighted_sum(xs, w, i):
    acc = np.float32(0)
    for k in range(len(xs)):
        acc = _fma(_load(xs[k][i]), w[k], acc)
    return acc


@jit(parallel=True, cache=True)
def _linear_per_model(out, xs, w, wsum, normalize):
    n = out.size
    nk = len(xs)
    nblk = (n + BLOCK - 1) // BLOCK
    for blk in prange(nblk):
        acc = np.empty(SUB, np.float32)
        like = out[0]
        b0 = blk * BLOCK
        b1 = min(n, b0 + BLOCK)
        for s in range(b0, b1, SUB):
            m = min(SUB, b1 - s)
            acc[:m] = 0
            for k in range(nk):
                _fma_into(acc[:m], xs[k][s : s + m], w[k])
            _store_all(out[s : s + m], acc[:m], wsum if normalize else np.float32(1), like)


@jit
def _store_all(out, acc, wsum, like):
    """out = acc / wsum in out's dtype (x / 1 is x); a function of 1-D slices, which numba
    vectorizes (the same loop inline, indexing `out` from s, stayed scalar)."""
    for j in range(out.size):
        out[j] = _store(acc[j] / wsum, like)


@jit
def _fma_into(acc, x, w):
    for j in range(acc.size):
        acc[j] = _fma(_load(x[j]), w, acc[j])
