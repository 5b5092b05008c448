"""Gradient-learned coefficients (gradient.py): the merge it differentiates is the engine's merge,
learning lowers the loss, and the result warm-starts a real study and is reported."""

from __future__ import annotations

import json

import optuna
import pytest
import torch

from mergesearch.errors import MergeSearchError
from mergesearch.search import load_space
from mergesearch.search.gradient import LOSSES, constants, learn_coefficients, linear_map, merged_weights
from tests.conftest import bench, cli, write_space
from tests.conftest import search as run_search


def _space(tmp_path, **over):
    d = dict(
        name="grad",
        method="task_arithmetic",
        granularity="layer",
        components=["attention", "mlp", "other"],
        parameters={"weight": [0.0, 1.5], "lambda": [0.5, 1.5]},
        fidelity=[100],
    )
    return load_space(write_space(tmp_path, **(d | over)))


def test_the_differentiated_merge_is_the_engines_merge(zoo, tmp_path):
    """At any point of the space (weights and λ per layer and component), W(v) equals the tensor
    the exact engine writes for that point's recipe, within fp32 rounding."""
    searcher = bench(_space(tmp_path))
    coefs = searcher.space.coefficients("task_arithmetic", searcher.num_layers)
    g = torch.Generator().manual_seed(0)
    v = torch.tensor(
        [searcher.space.parameters[c.param].low + torch.rand((), generator=g).item() for c in coefs]
    )
    linear = linear_map(searcher, [c.key for c in coefs])
    base, taus = constants(searcher, linear)
    ours = merged_weights(linear, base, taus, v)
    searcher.use_exact_engine()
    exact = searcher.engine.state_dict(searcher.recipes({c.key: float(x) for c, x in zip(coefs, v)}))
    assert sorted(ours) == sorted(n for n, t in exact.items() if t.is_floating_point())
    for n, t in ours.items():
        torch.testing.assert_close(t, exact[n].float(), rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("loss", LOSSES)
def test_learning_lowers_the_loss_and_stays_in_range(zoo, tmp_path, loss):
    searcher = bench(_space(tmp_path))
    r = learn_coefficients(searcher, seconds=None, steps=60, seed=0, loss=loss)
    assert r.steps == 60 and len(r.losses) == 60
    if loss == "normalized":  # every task's loss divided by its first value: the mean starts at 1
        assert r.losses[0] == pytest.approx(1.0, rel=1e-4)
    assert sum(r.losses[-10:]) / 10 < 0.8 * sum(r.losses[:10]) / 10, r.losses
    for c in searcher.space.coefficients("task_arithmetic", searcher.num_layers):
        rng = searcher.space.parameters[c.param]
        assert rng.low <= r.values[c.key] <= rng.high


def test_the_streamed_gradient_is_the_references(zoo, tmp_path):
    """The default (W written into the live model from the files, ⟨G, τ⟩ contracted as each
    gradient arrives) learns the coefficients autograd learns through the merge held in fp32."""
    searcher = bench(_space(tmp_path))
    ref = learn_coefficients(searcher, seconds=None, steps=30, seed=0, streamed=False)
    got = learn_coefficients(searcher, seconds=None, steps=30, seed=0)
    assert got.values.keys() == ref.values.keys()
    assert max(abs(got.values[k] - ref.values[k]) for k in ref.values) < 1e-5, (got.values, ref.values)
    torch.testing.assert_close(torch.tensor(got.losses), torch.tensor(ref.losses), rtol=1e-5, atol=0)
    assert all(not p.requires_grad or p.grad is None for p in searcher.model.parameters())


def test_a_gradient_that_cannot_fit_is_refused_before_it_starts(zoo, tmp_path, monkeypatch):
    import mergesearch.memory

    searcher = bench(_space(tmp_path))
    before = {n: p.detach().clone() for n, p in searcher.model.named_parameters()}
    monkeypatch.setattr(mergesearch.memory, "available_memory", lambda device: 1 << 20)
    with pytest.raises(MergeSearchError, match=r"gradient: needs .* GiB on cpu .* drop gradient_steps"):
        learn_coefficients(searcher, seconds=None, steps=5)
    assert all(torch.equal(p, before[n]) for n, p in searcher.model.named_parameters())


@pytest.mark.e2e
def test_gradient_needs_task_arithmetic(zoo, tmp_path):
    searcher = bench(_space(tmp_path, method="ties", parameters={"weight": [0, 1], "density": [0.2, 1]}))
    with pytest.raises(MergeSearchError, match="add task_arithmetic to the space's methods"):
        learn_coefficients(searcher, steps=1)
    # from the CLI: one line, exit 2, and no study left behind
    space = write_space(
        tmp_path, name="tiesg", method="ties", parameters={"weight": [0, 1], "density": [0.2, 1]}
    )
    p = cli(tmp_path, "search", str(space), "--gradient", "5", check=False)
    assert p.returncode == 2 and "add task_arithmetic" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "results" / "tiesg" / "study.db").exists()


@pytest.mark.e2e
def test_a_search_warm_started_by_gradient(zoo, tmp_path):
    """`search --gradient S`: the learned point is enqueued after the known recipes, runs as a
    tagged trial, and the report scores it on the test split and compares the best with it."""
    space = write_space(
        tmp_path, name="warm", method="task_arithmetic", parameters={"weight": [0.0, 1.5]}, trials=8
    )
    out = cli(tmp_path, "search", str(space), "--gradient", "10").stdout
    assert "learning task-arithmetic coefficients by gradient" in out and "enqueued" in out
    db = f"sqlite:///{tmp_path / 'results' / 'warm' / 'study.db'}"
    trials = optuna.load_study(study_name="warm", storage=db).trials
    (g,) = [t for t in trials if t.user_attrs.get("warm_start") == "gradient"]
    assert (
        g.state == optuna.trial.TrialState.COMPLETE
        and g.user_attrs["kind"] == "gradient-learned (warm start)"
    )
    assert g.number == 1  # right after the one known recipe this space expresses (task arithmetic λ=1)
    cli(tmp_path, "report", "warm")
    summary = json.loads((tmp_path / "results" / "warm" / "test_scores.json").read_text())
    assert summary["gradient"]["trial"] == g.number and 0 <= summary["gradient"]["test_mean"] <= 1
    md = (tmp_path / "results" / "warm" / "report.md").read_text()
    assert f"Gradient reference: trial {g.number}" in md


@pytest.mark.e2e
def test_a_spaces_gradient_steps_give_the_same_warm_start_every_time(zoo, tmp_path, results):
    """`gradient_steps` (not seconds) in a space: two studies of it enqueue the same point."""

    points = []
    for name in ("a", "b"):
        space = _space(tmp_path, name=name, gradient_steps=30, trials=3)
        s = run_search(space, progress=False)
        (g,) = [t for t in s.trials if t.user_attrs.get("warm_start") == "gradient"]
        assert g.user_attrs["gradient_steps"] == 30
        points.append(g.params)
    assert points[0] == points[1]


@pytest.mark.e2e
def test_a_gradient_point_below_the_known_recipes_is_named_in_a_warning(zoo, tmp_path, results, monkeypatch):
    """The gradient's point scored below task arithmetic λ=1 (here: every weight 0, the base
    model): the search says so once, in one warning; a point above it raises none."""
    from mergesearch.search import gradient

    def learned(zero: bool):
        def fake(bench, **kw):
            coefs = bench.space.coefficients(gradient.FAMILY, bench.num_layers)
            values = {c.key: 0.0 if zero and c.param == "weight" else 1.0 for c in coefs}
            return gradient.GradientResult(values, 1, 0.0, [1.0])

        return fake

    space = _space(tmp_path, name="bad", gradient_steps=1, trials=3, objective="mean", screening="off")
    monkeypatch.setattr(gradient, "learn_coefficients", learned(True))
    with pytest.warns(
        UserWarning, match=r"gradient: its point \(trial \d+, search mean 0\.\d{3}\) did not beat"
    ):
        run_search(space, progress=False)

    space = _space(tmp_path, name="same", gradient_steps=1, trials=3, objective="mean", screening="off")
    monkeypatch.setattr(gradient, "learn_coefficients", learned(False))  # λ=1 itself: not above it
    with pytest.warns(UserWarning, match="did not beat the known recipe task_arithmetic λ=1"):
        run_search(space, progress=False)


@pytest.mark.e2e
def test_a_screened_study_scores_the_gradients_point_on_the_whole_split(zoo, tmp_path, results):
    """A warm start is judged by its score (the report, `centre: best`): never a screen's estimate,
    which ties the incumbent on a few examples and is told the incumbent's value."""
    space = _space(
        tmp_path, name="scr", gradient_steps=5, trials=4, objective="mean", screening={"examples": 3}
    )
    s = run_search(space, progress=False)
    (g,) = [t for t in s.trials if t.user_attrs.get("warm_start") == "gradient"]
    assert g.user_attrs["fitness"] == "confirmed" and g.user_attrs["examples"] == {"add": 100, "reverse": 100}
