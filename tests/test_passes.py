"""The backend contract: every pass of every backend (`candidates.passes.Passes`) against a plain
reference, bit for bit where the arithmetic is the same (norms: to their sum's rounding).

A new backend is added to BACKENDS and inherits these tests. The masks come from a bank, so the
cases are the search's own: every sparsifier, with and without sign election, rescale,
normalize and λ, in fp32 and bf16. The large shape (155,100 elements) spans ten 16K kernel
blocks and three 64K draw blocks; its rounded task vectors make tie groups straddle the cuts."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
import torch

from mergesearch.candidates import TaskVectorBank, numba_kernels
from mergesearch.candidates.draws import BLOCK, LEVELS
from mergesearch.candidates.numba_passes import NumbaPasses
from mergesearch.candidates.passes import Mix
from mergesearch.candidates.torch_passes import TorchPasses
from mergesearch.methods import interpolation, sparsify
from mergesearch.methods.task_arithmetic import combine
from tests.conftest import index_order_mask

BACKENDS = [TorchPasses(chunk=4096), NumbaPasses()]
SPARSIFIERS = TaskVectorBank.SPARSIFICATIONS


@pytest.fixture(params=BACKENDS, ids=lambda p: p.name)
def passes(request):
    return request.param


def _inputs(shape, dtype, k=3, seed=0, ties=False):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g).to(dtype)
    taus = [0.01 * torch.randn(shape, generator=g) for _ in range(k)]
    if ties:  # few distinct magnitudes: tie groups at every cut
        taus = [(t * 300).round() / 300 for t in taus]
    return base, [t.to(dtype) for t in taus]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16 if t.dtype == torch.bfloat16 else torch.int32)


def _plain_keep(tau, mask, sparsification, density, gamma, epsilon):
    """The 0/1 keep mask by the definitions, with no backend: a magnitude sparsifier keeps its
    rank window of |τ| (`conftest.index_order_mask`: equal magnitudes ranked in flat index order);
    DARE keeps u < d and DELLA u < (d − ε) + 2ε·rank (`sparsify.della_ranks`), u
    being the task vector's fixed draws (tested apart, in test_uniforms_and_level_sums)."""
    n = tau.numel()
    if sparsification in ("magnitude", "magnitude_outliers"):
        if density >= 1:
            return torch.ones_like(tau)
        return index_order_mask(tau, sparsification, density, gamma) if density > 0 else torch.zeros_like(tau)
    u = mask.draws(0, n, torch.empty(n, dtype=torch.float32))
    if sparsification == "random":
        return (u < mask.d).reshape(tau.shape).to(tau.dtype)
    if mask.d <= 0:
        return torch.zeros_like(tau)
    p = sparsify.della_ranks(tau).reshape(-1).mul(2).mul(epsilon).add(mask.d - epsilon).float()
    return (u < p).reshape(tau.shape).to(tau.dtype)


def _reference_merge(base, taus, masks, keeps, scales, mix):
    """`task_arithmetic.combine` of whole-tensor masked task vectors: the reference definition,
    with the plain keep masks (`keeps`, as `_plain_keep` gives them)."""
    deltas = []
    for t, m, keep, s in zip(taus, masks, keeps, scales):
        d = t * keep if m is not None else t.clone()
        deltas.append(d * s if s is not None else d)
    w = mix.w.reshape(-1, *[1] * base.dim())
    return combine(base, torch.stack(deltas), w, consensus=mix.consensus, normalize=mix.normalize,
                   lambda_=mix.lambda_)  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,ties", [((300, 517), True), ((300, 517), False), ((3, 5), False)])
def test_merge_equals_the_reference_bit_for_bit(passes, dtype, shape, ties):
    base, taus = _inputs(shape, dtype, ties=ties)
    keys = [f"{i}:w" for i in range(len(taus))]
    rng = random.Random(f"{dtype}{shape}{ties}")
    bank = TaskVectorBank(seed=5, chunk=4096, cache_ranks=True)
    for sparsification, consensus, rescale in itertools.product(SPARSIFIERS, [False, True], [False, True]):
        k = len(taus)
        density = [rng.choice([0.0, 1.0, round(rng.uniform(0.3, 0.8), 3)]) for _ in range(k)]
        density[rng.randrange(k)] = round(rng.uniform(0.3, 0.8), 3)  # at least one real mask
        weight = [round(rng.uniform(-0.3, 1.2), 3) for _ in range(k)]
        mix = Mix.of(weight, dtype, base.device, consensus, rng.random() < 0.5, rng.choice([1.0, 0.7]))
        masks = bank.masks(keys, taus, sparsification, density, [0.01] * k, [0.1] * k)
        assert all(passes.takes_mask(m) for m in masks)
        scales = [bank.norms.rescale(key, t, m) if rescale and m is not None else None
                  for key, t, m in zip(keys, taus, masks)]  # fmt: skip
        out = torch.empty_like(base)
        passes.merge(out, base, taus, masks, scales, mix)
        keeps = [_plain_keep(t, m, sparsification, d, 0.01, 0.1) if m is not None else None
                 for t, m, d in zip(taus, masks, density)]  # fmt: skip
        expected = _reference_merge(base, taus, masks, keeps, scales, mix)
        assert torch.equal(_bits(out), _bits(expected)), (sparsification, consensus, rescale, density, mix)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_with_a_window_inside_one_tie_group(passes, dtype):
    """Magnitudes of two values only: breadcrumbs' kept window [r0, r1) lies inside one tie group,
    so one run of its flat positions is kept, cut at both ends."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(300, 517, generator=g).to(dtype)
    taus = [(0.01 * torch.randn(300, 517, generator=g).sign() * (1 + (torch.rand(300, 517, generator=g) < 0.05))).to(dtype)
            for _ in range(2)]  # fmt: skip
    bank = TaskVectorBank(chunk=4096)
    masks = bank.masks(["0:w", "1:w"], taus, "magnitude_outliers", [0.3, 0.45], [0.2, 0.1])
    assert masks[0].cut.lo == masks[0].cut.hi and masks[0].cut.partial  # one group, split at both ends
    mix = Mix.of([0.6, 0.5], dtype, base.device, False, False, 1.0)
    out = torch.empty_like(base)
    passes.merge(out, base, taus, masks, [None, None], mix)
    keeps = [
        _plain_keep(t, m, "magnitude_outliers", d, g, 0)
        for t, m, d, g in zip(taus, masks, [0.3, 0.45], [0.2, 0.1])
    ]
    assert torch.equal(_bits(out), _bits(_reference_merge(base, taus, masks, keeps, [None, None], mix)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_l1_equals_the_sum_over_the_mask(passes, dtype):
    """‖τ⊙m‖₁ agrees with an fp64 sum over the keep mask to the backend's summation rounding
    (torch sums each chunk in the work dtype, numba in fp64)."""
    _, (tau,) = _inputs((300, 517), dtype, k=1, ties=True)
    bank = TaskVectorBank(chunk=4096, cache_ranks=True)
    for s in ("magnitude", "magnitude_outliers", "random", "della"):
        (mask,) = bank.masks(["0:w"], [tau], s, [0.4], [0.01], [0.1])
        keep = _plain_keep(tau, mask, s, 0.4, 0.01, 0.1)
        expected = (tau.double().abs() * keep.double()).sum().item()
        rtol = 2e-6 if dtype == torch.float32 or passes.name == "numba" else 8e-3
        assert passes.masked_l1(tau, mask) == pytest.approx(expected, rel=rtol), s
    assert passes.masked_l1(tau, None) == pytest.approx(tau.double().abs().sum().item(), rel=rtol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_magnitude_bins_bracket_gather_and_select(passes, dtype):
    """Counts per 16-bit prefix of |τ|; per bracket the count below and the values inside in flat
    order; the gather with known counts gives the same; a selection gives the k-th value."""
    tau = 0.01 * torch.randn(300, 517, generator=torch.Generator().manual_seed(4))
    tau[:20] *= 1000  # the largest magnitudes all in the first 16K block
    tau = tau.to(dtype)
    a = tau.float().abs().reshape(-1).numpy()
    assert np.array_equal(passes.magnitude_bins(tau), np.bincount(a.view(np.int32) >> 16, minlength=1 << 15))
    ordered = np.sort(a)
    lo = np.array([ordered[-8000], ordered[1000], 1e6], np.float32)  # clustered, spread, empty
    hi = np.array([ordered[-1], ordered[90000], 2e6], np.float32)
    below, values, starts = passes.bracket(tau, lo, hi)
    assert np.array_equal(below, [(a < x).sum() for x in lo])
    for i in range(lo.size):
        assert np.array_equal(values[starts[i] : starts[i + 1]].numpy(), a[(a >= lo[i]) & (a <= hi[i])])
    got, got_starts, at = passes.gather(tau, lo, hi, np.diff(starts))
    assert torch.equal(got, values) and np.array_equal(got_starts, starts)
    if at is not None:  # each block's values start where that block's count says
        nblk = -(-a.size // numba_kernels.BLOCK)
        for r in range(lo.size):
            per_block = np.add.reduceat(
                (a >= lo[r]) & (a <= hi[r]), np.arange(0, a.size, numba_kernels.BLOCK)
            )
            assert np.array_equal(np.diff(at[r * nblk : (r + 1) * nblk + 1]), per_block)
    many_ties = (torch.randn(20_011, generator=torch.Generator().manual_seed(4)) * 30).round().abs()
    for k in (0, 7, 10_000, 20_010):
        v = many_ties.sort().values[k].item()
        assert passes.select(many_ties, k) == (v, int((many_ties < v).sum()), int((many_ties == v).sum()))


def _lowbias32_u24(keys: np.ndarray, start: int, n: int) -> np.ndarray:
    """The draws' definition in numpy's wrapping uint32 arithmetic."""
    j = np.arange(start, start + n, dtype=np.int64)
    x = (keys[j // BLOCK].astype(np.uint32) ^ (j % BLOCK).astype(np.uint32)).astype(np.uint32)
    x ^= x >> np.uint32(16)
    x *= np.uint32(0x7FEB352D)
    x ^= x >> np.uint32(15)
    x *= np.uint32(0x846CA68B)
    x ^= x >> np.uint32(16)
    return (x >> np.uint32(8)).astype(np.float32) * np.float32(1.0 / (1 << 24))


def test_uniforms_and_level_sums(passes):
    """The draws, from any start and across draw blocks, bit for bit; DARE's level sums to the
    rounding of an fp64 sum in another order."""
    keys = np.array([3, 0xFFFFFFFF, 12345, 987654321], np.uint32)
    n = 3 * BLOCK + 11
    with np.errstate(over="ignore"):
        expected = _lowbias32_u24(keys, 0, n)
    assert np.array_equal(passes.uniforms(keys, 0, torch.empty(n)).numpy(), expected)
    assert np.array_equal(passes.uniforms(keys, 70000, torch.empty(9000)).numpy(), expected[70000:79000])
    tau = 0.01 * torch.randn(n, generator=torch.Generator().manual_seed(2))
    levels = (expected * LEVELS).astype(np.int64)
    sums = np.bincount(levels, weights=tau.abs().double().numpy(), minlength=LEVELS)
    np.testing.assert_allclose(passes.level_l1(tau, keys, LEVELS), sums, rtol=1e-12, atol=1e-300)


def test_della_without_cached_ranks_takes_the_torch_passes(monkeypatch):
    """The bank's policy: numba's kernel merges every mask but DELLA's without cached ranks."""
    calls = []
    real = numba_kernels.merge
    monkeypatch.setattr(numba_kernels, "merge", lambda *a: calls.append(1) or real(*a))
    base, taus = _inputs((40, 70), torch.float32, k=2)
    bank = TaskVectorBank(cache_ranks=False)
    kw = dict(weight=[0.5, 0.5], density=[0.5, 0.5], consensus=False, normalize=True, rescale=True)
    out = bank.merge(["0:w", "1:w"], base, taus, sparsification="della", epsilon=[0.1, 0.1], **kw)
    assert not calls and torch.isfinite(out).all()
    bank.merge(["0:w", "1:w"], base, taus, sparsification="random", **kw)
    assert len(calls) == 1


def test_tie_positions_equal_a_scan_of_the_tensor():
    """Where a split tie group's kept run starts and ends, as flat indices: from the fp32 gather's
    counts per block (small tie groups on a grid of 1e-6) and from a counting pass (bf16, whose
    prefixes are values: nothing gathered)."""
    g = torch.Generator().manual_seed(8)
    for dtype in (torch.float32, torch.bfloat16):
        tau = ((0.01 * torch.randn(300, 517, generator=g) * 1e6).round() / 1e6).to(dtype)
        a = tau.float().abs().reshape(-1).numpy()
        cuts, split = TaskVectorBank(chunk=4096).cuts, 0
        for density in (0.3, 0.55, 0.8):
            cut = cuts.cut("0:w", tau, *sparsify.rank_window("magnitude", tau.numel(), density))
            if not cut.partial:
                continue
            split += 1
            for (v, first, end), row in zip(cut.tie_groups(), cuts.tie_positions("0:w", tau, cut)):
                at = np.flatnonzero(a == np.float32(v))
                assert row[0] == v and row[1] == (at[first] if first > 0 else 0)
                assert row[2] == (at[int(end)] if end < at.size else a.size)
        assert split, dtype  # a cut split a tie group


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("normalize", [True, False])
def test_linear_kernel_equals_interpolation_linear(dtype, normalize):
    """The engine's linear kernel against `interpolation.linear` (torch's addcmul_ chain)."""
    assert numba_kernels.addcmul_is_fma()  # torch 2.13 on x86-64: otherwise the engine stays eager
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(131_077, generator=g).to(dtype) for _ in range(3)]  # a ragged last block
    w = [0.31, -0.2, 0.77]
    out = torch.empty_like(xs[0])
    wt = torch.tensor(w)
    numba_kernels.linear(
        numba_kernels.as_numpy(out), tuple(numba_kernels.as_numpy(x) for x in xs), wt.numpy(),
        np.float32(wt.sum().item()), normalize,
    )  # fmt: skip
    assert torch.equal(_bits(out), _bits(interpolation.linear(xs, w, normalize)))
