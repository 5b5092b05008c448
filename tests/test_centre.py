"""CMA-ES centred on the best trial known (`centre: best`, `trust`: samplers.CentredCmaEs)."""

from __future__ import annotations

import pytest

from mergesearch.errors import MergeSearchError
from mergesearch.search import load_space
from tests.conftest import search, write_space

TA = dict(
    method="task_arithmetic",
    parameters={"weight": [0.0, 1.5]},
    objective="mean",
    fidelity=[40],
    screening="off",
)


@pytest.mark.e2e
def test_a_centred_search_samples_around_the_best_known_point(zoo, tmp_path, results):
    """The known recipe (every weight 1) is the only trial before CMA-ES: a trust of 0.01 (σ₀ =
    0.015 on a range of 1.5) keeps the first generation within a few σ of it; the middle of the
    ranges (0.75) is far from it."""
    space = load_space(write_space(tmp_path, name="cen", trials=12, centre="best", trust=0.01, **TA))
    s = search(space, progress=False)
    sampled = [t for t in s.trials if "baseline" not in t.user_attrs]
    assert len(sampled) == 11
    assert all(abs(v - 1.0) < 0.1 for t in sampled for v in t.params.values()), [t.params for t in sampled]
    # uncentred, the same seed and step: around the middle
    space = load_space(write_space(tmp_path, name="mid", trials=12, trust=0.01, **TA))
    s = search(space, progress=False)
    sampled = [t for t in s.trials if "baseline" not in t.user_attrs][6:]  # after the random start-up
    assert sampled and all(abs(v - 0.75) < 0.1 for t in sampled for v in t.params.values())


@pytest.mark.parametrize(
    "over, match",
    [
        ({"centre": "gradient"}, "centre 'gradient'"),
        ({"trust": 2}, "trust 2"),
        ({"centre": "best", "objective": "pareto"}, "sampler is not CMA-ES"),
        ({"trust": 0.1, "sampler": "tpe"}, "sampler is not CMA-ES"),
    ],
)
def test_centre_and_trust_are_refused_where_they_cannot_work(tmp_path, over, match):
    with pytest.raises(MergeSearchError, match=match):
        load_space(write_space(tmp_path, name="bad", **(TA | over)))


@pytest.mark.e2e
def test_a_sampler_that_would_ignore_centre_is_refused_before_a_study_exists(zoo, tmp_path, results):
    space = load_space(write_space(tmp_path, name="cen", trials=3, centre="best", **TA))
    with pytest.raises(MergeSearchError, match="sampler tpe would ignore them"):
        search(space, progress=False, sampler="tpe")
    assert not (results / "cen").exists()
