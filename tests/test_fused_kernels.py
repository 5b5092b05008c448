"""The numba kernels (mergesearch/fused_kernels.py) against the bank's eager torch path.

Same bank parameters, same inputs: the fused candidate must be the eager one bit for bit, for
every sparsifier, with and without sign election, rescale, normalize and λ, in fp32 and bf16.
The large shape (155,100 elements) spans ten 16K parallel blocks and three 64K draw blocks, so
tie counts and draws cross them; its rounded task vectors make tie groups straddle the cuts."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
import torch

from mergesearch.candidates import TaskVectorBank
from mergesearch.candidates import bank as task_vector_bank
from mergesearch.candidates import numba_passes as fused_kernels
from mergesearch.methods import interpolation, sparsify

SPARSIFIERS = [None, "magnitude", "magnitude_outliers", "random", "della"]


def _inputs(shape, dtype, k=3, seed=0, ties=False):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g).to(dtype)
    taus = [0.01 * torch.randn(shape, generator=g) for _ in range(k)]
    if ties:  # few distinct magnitudes: tie groups at every cut
        taus = [(t * 300).round() / 300 for t in taus]
    return base, [t.to(dtype) for t in taus]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16 if t.dtype == torch.bfloat16 else torch.int32)


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts `fused_kernels.merge` calls: the equality tests must exercise the kernel."""
    calls = []
    real = fused_kernels.merge

    def spy(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(fused_kernels, "merge", spy)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,ties", [((300, 517), True), ((300, 517), False), ((3, 5), False)])
def test_fused_equals_eager_bit_for_bit(dtype, shape, ties, fused_calls):
    base, taus = _inputs(shape, dtype, ties=ties)
    keys = [f"{i}:w" for i in range(len(taus))]
    rng = random.Random(f"{dtype}{shape}{ties}")
    cases = list(itertools.product(SPARSIFIERS, [False, True], [False, True]))
    for sparsification, consensus, rescale in cases:
        k = len(taus)
        density = [rng.choice([0.0, 1.0, round(rng.uniform(0.3, 0.8), 3)]) for _ in range(k)]
        density[rng.randrange(k)] = round(rng.uniform(0.3, 0.8), 3)  # at least one real mask
        kw = dict(
            weight=[round(rng.uniform(-0.3, 1.2), 3) for _ in range(k)],
            density=density,
            sparsification=sparsification,
            consensus=consensus,
            normalize=rng.random() < 0.5,
            rescale=rescale,
            lambda_=rng.choice([1.0, 0.7]),
            gamma=[0.01] * k,
            epsilon=[0.1] * k,
        )
        outs = [
            TaskVectorBank(seed=5, chunk=4096, cache_ranks=True, fused=fused).merge(keys, base, taus, **kw)
            for fused in (False, True)
        ]
        assert torch.equal(_bits(outs[0]), _bits(outs[1])), (sparsification, consensus, rescale, kw)
    assert len(fused_calls) == len(cases)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_window_inside_one_tie_group(dtype, fused_calls):
    """Magnitudes of two values only: breadcrumbs' kept window [r0, r1) lies inside one tie group,
    so one run of its flat positions is kept, cut at both ends."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(300, 517, generator=g).to(dtype)
    taus = [(0.01 * torch.randn(300, 517, generator=g).sign() * (1 + (torch.rand(300, 517, generator=g) < 0.05))).to(dtype)
            for _ in range(2)]  # fmt: skip
    kw = dict(weight=[0.6, 0.5], density=[0.3, 0.45], gamma=[0.2, 0.1], sparsification="magnitude_outliers",
              consensus=False, normalize=False, rescale=False)  # fmt: skip
    bank = TaskVectorBank(chunk=4096)
    cut = bank.cut("0:w", taus[0], *sparsify.rank_window("magnitude_outliers", taus[0].numel(), 0.3, 0.2))
    assert cut.lo == cut.hi and cut.partial  # one group, split at both ends
    outs = [
        TaskVectorBank(chunk=4096, fused=fused).merge(["0:w", "1:w"], base, taus, **kw)
        for fused in (False, True)
    ]
    assert torch.equal(_bits(outs[0]), _bits(outs[1]))
    assert len(fused_calls) == 1


def test_della_without_cached_ranks_takes_the_eager_path(fused_calls):
    base, taus = _inputs((40, 70), torch.float32, k=2)
    bank = TaskVectorBank(cache_ranks=False)
    kw = dict(weight=[0.5, 0.5], density=[0.5, 0.5], consensus=False, normalize=True, rescale=True)
    out = bank.merge(["0:w", "1:w"], base, taus, sparsification="della", epsilon=[0.1, 0.1], **kw)
    assert not fused_calls and torch.isfinite(out).all()
    bank.merge(["0:w", "1:w"], base, taus, sparsification="random", **kw)
    assert len(fused_calls) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bracket_and_masked_l1_equal_the_torch_passes(dtype, monkeypatch):
    """The cut's bracket pass finds what torch's finds; ‖τ⊙m‖₁ agrees to the sum's rounding."""
    _, (tau,) = _inputs((300, 517), dtype, k=1, ties=True)
    bank = TaskVectorBank(chunk=4096, cache_ranks=True)
    mags = tau.float().abs().reshape(-1).sort().values
    brackets = {
        10: (-np.inf, mags[5000].item()),
        9000: (mags[8000].item(), mags[12000].item()),
        155099: (mags[-10].item(), np.inf),
    }
    fused = bank._bracket(tau, brackets)
    l1 = {
        s: bank._masked_l1("0:w", tau, bank._masks(["0:w"], [tau], s, [0.4], [0.01], [0.1])[0])
        for s in ("magnitude", "magnitude_outliers", "random", "della")
    }
    monkeypatch.setattr(task_vector_bank, "fused_kernels", None)
    eager = bank._bracket(tau, brackets)
    assert fused[0] == eager[0]
    for r in brackets:
        assert torch.equal(fused[1][r], eager[1][r])  # both in flat order
    for s, value in l1.items():
        mask = bank._masks(["0:w"], [tau], s, [0.4], [0.01], [0.1])[0]
        expected = bank._masked_l1("0:w", tau, mask)
        assert value.dtype == expected.dtype == (torch.float32 if dtype == torch.float32 else torch.bfloat16)
        torch.testing.assert_close(value, expected, rtol=2e-6 if dtype == torch.float32 else 8e-3, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_with_known_counts_equals_the_bracket_pass(dtype):
    """The one-pass gather (counts known from the magnitude bins) returns the bracket pass's
    values in flat order, also where they cluster in one block (more than its slots: gathered
    again alone) and where a bracket is empty."""
    tau = 0.01 * torch.randn(300, 517, generator=torch.Generator().manual_seed(4))
    tau[:20] *= 1000  # the largest magnitudes all in the first 16K block
    mags = fused_kernels.as_numpy(tau.to(dtype))
    ordered = np.sort(np.abs(tau.to(dtype).float().numpy().reshape(-1)))
    lo = np.array([ordered[-8000], ordered[1000], 1e6], np.float32)  # clustered, spread, empty
    hi = np.array([ordered[-1], ordered[90000], 2e6], np.float32)
    _, values, starts = fused_kernels.bracket(mags, lo, hi)
    got, at = fused_kernels.gather(mags, lo, hi, np.diff(starts))
    nblk = -(-mags.size // fused_kernels.BLOCK)
    assert np.array_equal(at[::nblk], starts) and starts[-1] - starts[-2] == 0
    assert np.array_equal(got, values)
    a = np.abs(tau.to(dtype).float().numpy().reshape(-1))
    for r in range(lo.size):  # and each block's values start where that block's count says
        inside = (a >= lo[r]) & (a <= hi[r])
        per_block = np.add.reduceat(inside, np.arange(0, a.size, fused_kernels.BLOCK))
        assert np.array_equal(np.diff(at[r * nblk : (r + 1) * nblk + 1]), per_block)


def test_without_numba_the_bank_gives_the_same_candidate(monkeypatch):
    base, taus = _inputs((300, 517), torch.float32, k=2, ties=True)
    kw = dict(
        weight=[0.7, 0.4], density=[0.35, 0.6], sparsification="magnitude", consensus=True,
        normalize=True, rescale=False,
    )  # fmt: skip
    fused = TaskVectorBank(chunk=4096).merge(["0:w", "1:w"], base, taus, **kw)
    monkeypatch.setattr(task_vector_bank, "fused_kernels", None)
    eager = TaskVectorBank(chunk=4096).merge(["0:w", "1:w"], base, taus, **kw)
    assert torch.equal(fused, eager)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("normalize", [True, False])
def test_fused_linear_equals_interpolation_linear(dtype, normalize):
    """The engine's linear kernel against `interpolation.linear` (torch's addcmul_ chain)."""
    assert fused_kernels.addcmul_is_fma()  # torch 2.13 on x86-64: otherwise the engine stays eager
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(131_077, generator=g).to(dtype) for _ in range(3)]  # a ragged last block
    w = [0.31, -0.2, 0.77]
    out = torch.empty_like(xs[0])
    wt = torch.tensor(w)
    fused_kernels.linear(
        fused_kernels.as_numpy(out), tuple(fused_kernels.as_numpy(x) for x in xs), wt.numpy(),
        np.float32(wt.sum().item()), normalize,
    )  # fmt: skip
    assert torch.equal(_bits(out), _bits(interpolation.linear(xs, w, normalize)))


def test_select_equals_kthvalue(monkeypatch):
    """The cut's selection: the k-th value and the counts below and equal, with many ties."""
    g = torch.Generator().manual_seed(4)
    values = (torch.randn(20_011, generator=g) * 30).round().abs()  # ~100 distinct values
    ks = [0, 7, 10_000, 20_010]
    fused = [task_vector_bank._select(values, k) for k in ks]
    monkeypatch.setattr(task_vector_bank, "fused_kernels", None)
    assert fused == [task_vector_bank._select(values, k) for k in ks]
    assert fused[-1][0] == values.max().item() and fused[0][1] == 0


def test_tie_counts_from_the_gather_equal_a_counting_pass(fused_calls):
    """fp32 with small tie groups (magnitudes on a grid of 1e-6): the tie values a cut splits are
    found by the one-pass gather, which also gives their counts per block; those equal
    `count_equal`'s pass, and the candidates equal the eager path's."""
    g = torch.Generator().manual_seed(8)
    base = torch.randn(300, 517, generator=g)
    taus = [(0.01 * torch.randn(300, 517, generator=g) * 1e6).round() / 1e6 for _ in range(2)]
    keys = ["0:w", "1:w"]
    bank = TaskVectorBank(chunk=4096)
    for density in (0.3, 0.55, 0.8):
        kw = dict(
            weight=[0.6, 0.5], density=[density, density + 0.05], sparsification="magnitude",
            consensus=True, normalize=True, rescale=False,
        )  # fmt: skip
        fused = bank.merge(keys, base, taus, **kw)
        eager = TaskVectorBank(chunk=4096, fused=False).merge(keys, base, taus, **kw)
        assert torch.equal(fused, eager), density
    assert len(fused_calls) == 3  # the kernel made the fused candidates
    assert any(c.partial for c in bank._cuts.values())  # a cut split a tie group
    assert bank._gathered
    for (key, v), (values, starts) in bank._gathered.items():
        mags = fused_kernels.as_numpy(taus[int(key[0])])
        expected = fused_kernels.count_equal(mags, np.float32(v), np.float32(np.nan))[0]
        assert np.array_equal(task_vector_bank._counts_per_block(values, starts, v), expected)
