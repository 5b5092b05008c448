"""Properties of the merge math, checked on random tensors with hypothesis."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergesearch.methods import get_method
from mergesearch.methods.interpolation import linear, slerp

shapes = st.sampled_from([(7,), (4, 5), (3, 2, 6), (33,)])
weights = st.floats(min_value=0.05, max_value=5.0, allow_nan=False)


def tensor(seed: int, shape, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(shape, generator=g, dtype=torch.float64)


def gta(name, base, models, **params):
    m = get_method(name)
    args = {k: v for k, v in m.shared_params.items()}
    args.update(params)
    args.setdefault("density", [1.0] * len(models))
    return m.merge(base, models, **args)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), shapes, st.lists(weights, min_size=1, max_size=4))
def test_linear_of_identical_models_is_that_model(seed, shape, ws):
    x = tensor(seed, shape)
    out = linear([x] * len(ws), ws, normalize=True)
    torch.testing.assert_close(out, x, rtol=1e-12, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), shapes, st.lists(weights, min_size=2, max_size=4), weights)
def test_scaling_weights_leaves_normalized_merges_unchanged(seed, shape, ws, c):
    xs = [tensor(seed + i, shape) for i in range(len(ws))]
    torch.testing.assert_close(linear(xs, ws), linear(xs, [c * w for w in ws]), rtol=1e-10, atol=1e-10)
    base = tensor(seed + 99, shape)
    for name in ("ties", "della"):  # normalized task-vector methods
        kw = {"density": [1.0] * len(ws)}
        a = gta(name, base, xs, weight=ws, **kw, epsilon=[0.1] * len(ws))
        b = gta(name, base, xs, weight=[c * w for w in ws], **kw, epsilon=[0.1] * len(ws))
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), shapes, weights)
def test_ties_density_one_single_model_is_task_arithmetic(seed, shape, w):
    base, x = tensor(seed, shape), tensor(seed + 1, shape)
    ties = gta("ties", base, [x], weight=[w], normalize=False)
    ta = gta("task_arithmetic", base, [x], weight=[w])
    torch.testing.assert_close(ties, ta, rtol=1e-12, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), shapes, st.lists(weights, min_size=1, max_size=3))
def test_dare_density_one_is_task_arithmetic(seed, shape, ws):
    base = tensor(seed, shape)
    xs = [tensor(seed + 1 + i, shape) for i in range(len(ws))]
    dare = gta("dare_linear", base, xs, weight=ws)
    ta = gta("task_arithmetic", base, xs, weight=ws)
    torch.testing.assert_close(dare, ta, rtol=1e-12, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), shapes, st.floats(0.01, 10))
def test_slerp_endpoints(seed, shape, scale):
    a, b = tensor(seed, shape), tensor(seed + 1, shape, scale)
    torch.testing.assert_close(slerp(0.0, a, b), a, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(slerp(1.0, a, b), b, rtol=1e-9, atol=1e-9)


def test_dare_rescale_preserves_l1_norm():
    base = torch.zeros(10_000, dtype=torch.float64)
    x = tensor(0, (10_000,))
    torch.manual_seed(0)
    out = gta("dare_linear", base, [x], weight=[1.0], density=[0.3])
    # mergekit masks in fp32 on CPU, so the norm matches to fp32 precision
    assert abs(float(out.abs().sum() / x.abs().sum()) - 1) < 1e-6
    assert 0.25 < float((out != 0).double().mean()) < 0.35


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10_000), shapes, st.floats(0.0, 1.0), st.floats(0.0, 0.2), st.booleans(), st.booleans())
def test_selection_sparsifiers_equal_mergekit(seed, shape, density, gamma, quantize, rescale):
    """The O(N) selection path and its sort fallback (ties) keep exactly mergekit's elements."""
    from mergekit import sparsify as mk

    from mergesearch.methods import sparsify

    tau = tensor(seed, shape).float()
    if quantize:  # many equal magnitudes: ties at the boundary force the sort fallback
        tau = (tau * 2).round() / 2
    norm = mk.RescaleNorm.l1 if rescale else None
    assert torch.equal(sparsify.magnitude(tau, density, rescale), mk.magnitude(tau, density, norm))
    if not quantize:  # mergekit's own sort breaks ties arbitrarily; compare where the set is defined
        assert torch.equal(
            sparsify.magnitude_outliers(tau, density, gamma, rescale),
            mk.magnitude_outliers(tau, density, norm, gamma),
        )
