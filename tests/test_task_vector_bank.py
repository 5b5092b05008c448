"""The search's chunked candidate path (TaskVectorBank) against the exact definitions.

Chunks are made tiny (`chunk=256`) so every tensor spans many of them, with ties and rows
crossing chunk boundaries."""

from __future__ import annotations

import math
import random

import pytest
import torch

from mergesearch.candidates import TaskVectorBank
from mergesearch.candidates.cuts import Cuts
from mergesearch.candidates.ranks import DellaRanks
from mergesearch.methods import sparsify
from mergesearch.methods.task_arithmetic import combine, generalized_task_arithmetic
from tests.conftest import index_order_mask

SHAPES = [(70, 130), (300,), (40, 33)]
DETERMINISTIC = {  # method: (sparsification, consensus, default normalize)
    "task_arithmetic": (None, False, False),
    "ties": ("magnitude", True, True),
    "breadcrumbs": ("magnitude_outliers", False, False),
    "breadcrumbs_ties": ("magnitude_outliers", True, False),
}


def _inputs(shape, k=3, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g).to(dtype)
    taus = [(0.01 * torch.randn(shape, generator=g)).to(dtype) for _ in range(k)]
    return base, taus


def _params(rng: random.Random, k: int) -> dict:
    return {
        "weight": [round(rng.uniform(-0.2, 1.2), 3) for _ in range(k)],
        "density": [rng.choice([1.0, round(rng.uniform(0.05, 0.95), 3)]) for _ in range(k)],
        "gamma": [round(rng.uniform(0.0, 0.05), 3) for _ in range(k)],
        "lambda_": rng.choice([1.0, 0.7]),
    }


def _reference(base, taus, p, sparsification, consensus, normalize):
    """combine() of index-order masks: mergekit's definition with that tie rule."""
    deltas = torch.stack(
        [
            t if sparsification is None or d >= 1 else t * index_order_mask(t, sparsification, d, g)
            for t, d, g in zip(taus, p["density"], p["gamma"])
        ]
    )
    w = torch.tensor(p["weight"], dtype=base.dtype).reshape(-1, *[1] * base.dim())
    return combine(base, deltas, w, consensus=consensus, normalize=normalize, lambda_=p["lambda_"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", list(DETERMINISTIC))
def test_deterministic_methods_equal_their_definition_bit_for_bit(method, dtype):
    """Against mergekit's definition (the exact path) wherever no tie group straddles a cut;
    against the same definition with ties ranked by index everywhere (bf16 ties constantly)."""
    sparsification, consensus, normalize = DETERMINISTIC[method]
    rng = random.Random(method)
    bank = TaskVectorBank(chunk=256)
    exact_seen = 0
    for trial in range(6):
        shape = SHAPES[trial % len(SHAPES)]
        base, taus = _inputs(shape, dtype=dtype, seed=trial)
        keys = [f"{i}:{shape}:{trial}" for i in range(3)]
        p = _params(rng, 3)
        norm = normalize or trial % 2 == 0
        kw = dict(sparsification=sparsification, consensus=consensus, normalize=norm, rescale=False)
        got = bank.merge(keys, base, taus, **p, **kw)
        assert torch.equal(got, _reference(base, taus, p, sparsification, consensus, norm)), (trial, p)
        if bank.exact_for(keys, taus, density=p["density"], gamma=p["gamma"], **kw):
            exact_seen += 1
            expected = generalized_task_arithmetic(base, [], task_vectors=taus, epsilon=None, **p, **kw)
            assert torch.equal(got, expected), (method, trial, (got - expected).abs().max())
    if dtype == torch.float32 or sparsification is None:
        assert exact_seen == 6


def test_ties_between_equal_magnitudes_go_to_the_lower_index():
    """bf16 task vectors tie constantly; mergekit's choice among ties follows its unstable argsort,
    the bank's follows flat index order (and `exact_for` says so)."""
    bank = TaskVectorBank(chunk=256)
    base, taus = _inputs((70, 130), k=2, dtype=torch.bfloat16)
    d, keys = [0.3, 0.55], ["0:t", "1:t"]
    kw = dict(sparsification="magnitude", consensus=True, normalize=True, rescale=False)
    assert not bank.exact_for(keys, taus, density=d, gamma=None, **kw)  # a tie group is split
    for t, di, key in zip(taus, d, keys):
        assert torch.equal(bank.mask(key, t, "magnitude", di), index_order_mask(t, "magnitude", di, 0.0))


def test_cuts_are_exact_on_structured_tensors_and_when_the_sample_misleads():
    """Columns of very different scales (as attention heads can be), and a sample that brackets
    the wrong values (the pass notices and brackets with the whole tensor): cuts stay exact.
    (76,800 elements: the magnitude bins' path, and the sample's when the bins are set aside.)"""
    scale = torch.tensor([1.0, 10.0, 100.0, 1000.0]).repeat(64)
    tau = 0.01 * torch.randn(300, 256, generator=torch.Generator().manual_seed(7)) * scale
    for bins, trust_sample in ((True, True), (False, True), (False, False)):
        for d in (0.2, 0.5, 0.9):
            bank = TaskVectorBank(chunk=1000)
            if not bins:  # as for a τ with a NaN: the sample's path
                bank.cuts = Cuts(bank.passes_for, bins_from=None)
            if not trust_sample:
                bank.cuts.samples["0:w"] = torch.linspace(5.0, 6.0, 4096)  # nothing there
            assert torch.equal(
                bank.mask("0:w", tau, "magnitude", d), index_order_mask(tau, "magnitude", d, 0.0)
            )
            got = bank.mask("0:w", tau, "magnitude_outliers", d, gamma=0.03)
            assert torch.equal(got, index_order_mask(tau, "magnitude_outliers", d, 0.03))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("numba", [True, False])
def test_values_at_ranks_from_magnitude_bins_equal_a_sort(dtype, numba):
    """From 64K elements on, rank values come from counts per 16-bit prefix of |τ| (+ a pass over
    one prefix in fp32): (v, #{|τ| < v}, #{|τ| = v}) equal a full sort's, with tie groups
    (rounded τ), zeros and an infinity; with numba's counting and with torch's (no numba)."""
    backend = "auto" if numba else "torch"
    tau = 0.01 * torch.randn(300, 517, generator=torch.Generator().manual_seed(5))
    tau[:40] = (tau[:40] * 300).round() / 300  # tie groups, zeros among them
    tau[7, 7] = -math.inf
    tau = tau.to(dtype)
    zeros = tau.clone()
    zeros.view(-1)[::3] = 0  # a third of τ in one prefix: fp32 takes the exact-size pass there
    n, rng = tau.numel(), random.Random(0)
    ranks = [0, 1, n // 4, n // 2, n - 2, n - 1, *(rng.randrange(n) for _ in range(30))]
    for t in (tau, zeros):
        mags = t.abs().float().reshape(-1)
        ordered = mags.sort().values
        cuts = TaskVectorBank(chunk=4096, backend=backend).cuts
        for r in ranks:
            ((v, less, equal),) = cuts.values_at("0:w", t, [r])
            expected = ordered[r]
            assert (v, less, equal) == (
                expected.item(),
                int((mags < expected).sum()),
                int((mags == expected).sum()),
            ), r
        assert cuts.magnitude_bins("0:w", t) is not None  # the bins' path ran
    tau.view(-1)[3] = math.nan  # a NaN has no rank: the sample's path
    assert TaskVectorBank(chunk=4096).cuts.magnitude_bins("0:w", tau) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dare_norms_from_level_sums_equal_the_masked_sum(dtype):
    """DARE's density rounds up to the 1/4096 grid; ‖τ⊙m‖₁ from the per-study level sums equals
    the sum over the mask the candidate applies, with numba's sums and with torch's."""
    tau = (0.01 * torch.randn(300, 517, generator=torch.Generator().manual_seed(6))).to(dtype)
    for backend in ("auto", "torch"):
        bank = TaskVectorBank(chunk=4096, backend=backend)
        for d in (0.3, 0.5, 0.71, 0.999):
            (mask,) = bank.masks(["0:w"], [tau], "random", [d], [0.01], [0.15])
            assert mask.d == math.ceil(d * 4096) / 4096
            kept = bank.mask("0:w", tau, "random", d)
            u = bank.draws.uniforms("0:w", 0, tau.numel(), torch.empty(tau.numel()))
            assert torch.equal(kept.reshape(-1), u < mask.d)
            expected = (tau.float().abs().double().reshape(-1) * kept.reshape(-1)).sum()
            # the level sums: fp64, summed in another order
            assert bank.draws.kept_l1("0:w", tau, mask.d) == pytest.approx(expected.item(), rel=1e-12)
            got = bank.norms.masked_l1("0:w", tau, mask)
            assert got.dtype == sparsify.work_dtype(tau)
            assert got == expected.to(got.dtype)


@pytest.mark.parametrize("sparsification,consensus", [("random", True), ("random", False), ("della", True)])
def test_dare_and_della_follow_their_definition_with_the_banks_draws(sparsification, consensus):
    """Same formula as mergekit (mask, L1 rescale, weights, election), with the bank's masks:
    equal up to the order of the L1 sum."""
    bank = TaskVectorBank(chunk=256)
    for shape in SHAPES[:2]:
        base, taus = _inputs(shape, k=2)
        keys = [f"0:{shape}", f"1:{shape}"]
        w, d, eps = [0.7, 0.4], [0.4, 0.65], [0.1, 0.2]
        got = bank.merge(
            keys,
            base,
            taus,
            weight=w,
            density=d,
            epsilon=eps,
            sparsification=sparsification,
            consensus=consensus,
            normalize=False,
            rescale=True,
        )
        masks = [bank.mask(k, t, sparsification, di, epsilon=e) for k, t, di, e in zip(keys, taus, d, eps)]
        deltas = torch.stack([sparsify.rescale_l1(t, m, True) for t, m in zip(taus, masks)])
        wt = torch.tensor(w).reshape(-1, *[1] * len(shape))
        expected = combine(base, deltas, wt, consensus=consensus, normalize=False, lambda_=1.0)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)


def test_draws_are_the_same_from_any_start_and_on_either_backend():
    """A task vector's draws are a function of its index: the same from any start, across
    block boundaries, from numba's pass (CPU) and from torch's (every pass in torch)."""
    n = 3 * 65536 + 11
    fast = TaskVectorBank(seed=3).draws.uniforms("1:w", 0, n, torch.empty(n))
    window = TaskVectorBank(seed=3).draws.uniforms("1:w", 70000, 9000, torch.empty(9000))
    assert torch.equal(
        TaskVectorBank(seed=3, backend="torch").draws.uniforms("1:w", 0, n, torch.empty(n)), fast
    )
    assert torch.equal(window, fast[70000:79000])
    assert 0 <= float(fast.min()) and float(fast.max()) < 1 and abs(float(fast.mean()) - 0.5) < 0.01


def test_draws_are_common_random_numbers_with_the_right_rates():
    tau = 0.01 * torch.randn(200, 150, generator=torch.Generator().manual_seed(3))
    bank, again = TaskVectorBank(seed=0, chunk=256), TaskVectorBank(seed=0, chunk=4096)
    n = tau.numel()
    for kind, extra in (("random", {}), ("della", {"epsilon": 0.15})):
        low, high = bank.mask("0:w", tau, kind, 0.3, **extra), bank.mask("0:w", tau, kind, 0.6, **extra)
        for m, d in ((low, 0.3), (high, 0.6)):  # P(keep) = d, within 5 standard deviations
            assert abs(float(m.mean()) - d) < 5 * (d * (1 - d) / n) ** 0.5, (kind, d)
        assert not bool((low > high).any()), kind  # nested: a lower density keeps a subset
        assert not torch.equal(low, bank.mask("1:w", tau, kind, 0.3, **extra))  # other models, other draws
    # a fresh bank with the same seed draws the same (another worker process, say), whatever
    # its chunk size; another seed draws otherwise
    for kind, extra in (("random", {}), ("della", {"epsilon": 0.15})):
        assert torch.equal(
            again.mask("0:w", tau, kind, 0.5, **extra), bank.mask("0:w", tau, kind, 0.5, **extra)
        )
    other_seed = TaskVectorBank(seed=1).mask("0:w", tau, "random", 0.5)
    assert not torch.equal(other_seed, bank.mask("0:w", tau, "random", 0.5))
    # DELLA keeps large magnitudes more often: p runs from d − ε (smallest) to d + ε (largest)
    m = bank.mask("0:w", tau, "della", 0.5, epsilon=0.2)
    ranks = sparsify.della_ranks(tau)
    assert float(m[ranks > 0.5].mean()) - float(m[ranks < 0.5].mean()) > 0.15


def test_engine_in_search_mode_is_reproducible_and_exact_where_it_can_be(tiny, tmp_path):
    """`exact=False` (the search's engine): deterministic methods equal `mergesearch merge`'s
    disk output (these fp32 task vectors split no tie group at a cut); DARE and DELLA come from the
    bank's draws, the same in every engine (every worker), not torch's."""
    import yaml

    from mergesearch.candidates import ResidentEngine
    from mergesearch.engine import merge
    from mergesearch.recipe import parse_recipes
    from tests.tiny_models import load_weights

    base, ft = str(tiny["llama/base"]), [str(tiny[f"llama/ft{i}"]) for i in range(2)]

    def recipe(method: str):
        models = [
            {"model": m, "parameters": {"weight": 0.6 - 0.2 * i, "density": 0.5 + 0.1 * i}}
            for i, m in enumerate(ft)
        ]
        return parse_recipes(yaml.safe_dump({"merge_method": method, "base_model": base, "models": models}))[
            0
        ]

    search, other = (ResidentEngine([base, *ft], base=base, exact=False) for _ in range(2))
    for method in DETERMINISTIC:
        merge(recipe(method), tmp_path / method, seed=0)
        disk, mem = load_weights(tmp_path / method), search.state_dict(recipe(method), seed=0)
        assert sorted(disk) == sorted(mem) and all(torch.equal(disk[k], mem[k]) for k in disk), method
    for method in ("dare_ties", "della"):
        a, b = search.state_dict(recipe(method), seed=0), other.state_dict(recipe(method), seed=0)
        assert all(torch.equal(a[k], b[k]) for k in a), method
        merge(recipe(method), tmp_path / method, seed=0)
        disk = load_weights(tmp_path / method)
        assert any(not torch.equal(a[k], disk[k]) for k in a), method  # other draws than torch's RNG


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cached_della_ranks_equal_mergekits(dtype):
    """With `cache_ranks`, integer ranks are sorted once and normalized per candidate with
    mergekit's casts and roundings (bf16 rounds ranks above 256): the same values, with or without
    the cache, returned or written in place into a buffer as candidates do."""
    g = torch.Generator().manual_seed(5)
    for shape in [(40, 700), (900,)]:
        tau = (0.01 * torch.randn(shape, generator=g)).to(dtype)
        expected = sparsify.della_ranks(tau).reshape(-1)
        n = tau.numel()
        for cache in (True, False):
            ranks = DellaRanks(chunk=256, cache=cache)
            got = torch.cat([ranks.ranks("0:w", tau, s, min(256, n - s)) for s in range(0, n, 256)])
            assert torch.equal(got, expected), (shape, cache)
            buf = torch.empty(256, dtype=dtype)
            parts = [ranks.ranks("0:w", tau, s, min(256, n - s), out=buf).clone() for s in range(0, n, 256)]
            assert torch.equal(torch.cat(parts), expected), (shape, cache, "out=")


def test_an_unknown_sparsification_is_refused_not_merged_without_a_mask():
    """A sparsifier the bank does not know must never be searched as plain task arithmetic."""
    from mergesearch.errors import MergeSearchError

    base, taus = _inputs(SHAPES[0], k=2)
    with pytest.raises(MergeSearchError, match="no 'mystery' sparsification"):
        TaskVectorBank(chunk=256).merge(
            ["0:w", "1:w"],
            base,
            taus,
            weight=[0.5, 0.5],
            density=[0.5, 0.5],
            sparsification="mystery",
            consensus=False,
            normalize=False,
            rescale=False,
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_bank_on_torch_alone_makes_the_same_candidates(dtype):
    """Every pass in torch (as on a GPU: cuts from torch's bins and brackets, torch's draws and
    merge) against the CPU's mix of numba and torch: the same candidates bit for bit (without a
    rescale, whose norm each backend sums in its own order)."""
    g = torch.Generator().manual_seed(9)
    base = torch.randn(300, 517, generator=g).to(dtype)
    taus = [((0.01 * torch.randn(300, 517, generator=g) * 300).round() / 300).to(dtype) for _ in range(2)]
    keys = ["0:w", "1:w"]
    auto, alone = TaskVectorBank(chunk=4096, cache_ranks=True), TaskVectorBank(chunk=4096, backend="torch")
    for sparsification, consensus in (
        ("magnitude", True),
        ("magnitude_outliers", False),
        ("random", True),
        ("della", False),
    ):
        kw = dict(weight=[0.7, 0.4], density=[0.35, 0.6], gamma=[0.02, 0.01], epsilon=[0.1, 0.2],
                  sparsification=sparsification, consensus=consensus, normalize=True, rescale=False)  # fmt: skip
        assert torch.equal(auto.merge(keys, base, taus, **kw), alone.merge(keys, base, taus, **kw)), (
            sparsification
        )
