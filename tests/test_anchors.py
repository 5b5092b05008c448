"""Few-example fitness: anchor choice, and a real study whose later trials are scored on anchors."""

from __future__ import annotations

import numpy as np
import optuna
import pytest
import yaml

from mergesearch.errors import MergeSearchError
from mergesearch.evaluation.anchors import choose_anchors, estimate
from mergesearch.search import space_from_dict
from tests.conftest import SPACE, bench, cli, write_space


def test_anchors_reproduce_every_reference_model_when_clusters_are_pure():
    """With at most k distinct example patterns, each cluster holds identical examples, so the
    weighted anchor verdicts equal each reference model's accuracy on the whole split."""
    rng = np.random.default_rng(0)
    patterns = rng.integers(0, 2, size=(6, 4))  # 6 models × 4 distinct example patterns
    columns = rng.integers(0, 4, size=50)
    correct = patterns[:, columns]
    idx, w = choose_anchors(correct, k=4, seed=3)
    assert len(idx) == len(set(idx)) <= 4 and sum(w) == pytest.approx(1.0) and min(w) > 0
    for row in correct:
        assert estimate(row[idx], w) == pytest.approx(row.mean())


def test_anchors_are_deterministic_and_never_more_than_asked():
    rng = np.random.default_rng(1)
    correct = rng.integers(0, 2, size=(5, 80))
    a = choose_anchors(correct, k=7, seed=0)
    assert a == choose_anchors(correct, k=7, seed=0)
    assert len(a[0]) <= 7 and sum(a[1]) == pytest.approx(1.0)
    # all examples alike: one anchor carries the whole weight
    idx, w = choose_anchors(np.ones((4, 30)), k=5)
    assert len(idx) == 1 and w == [1.0]


def test_anchor_space_keys_are_checked():
    base = dict(SPACE, objective="mean")
    with pytest.raises(MergeSearchError, match="anchors and several fidelity rungs"):
        space_from_dict(dict(base, anchors={"per_task": 5, "reference": 3}))
    with pytest.raises(MergeSearchError, match="anchors.per_task: a whole number"):
        space_from_dict(dict(base, fidelity=[40], anchors={"per_task": "5", "reference": 3}))
    with pytest.raises(MergeSearchError, match="a mapping"):
        space_from_dict(dict(base, fidelity=[40], anchors=[5, 3]))


@pytest.mark.e2e
def test_a_study_scores_later_trials_on_anchors(zoo, tmp_path):
    """The first `reference` trials see the whole search split and record their verdicts; the rest
    see only the anchors, and their value is the weighted anchor estimate of the candidate's own
    verdicts (checked by scoring the recorded recipe again on the whole split)."""
    from mergesearch.recipe import parse_recipes

    space = write_space(
        tmp_path,
        name="anc",
        method="task_arithmetic",
        parameters={"weight": [0.2, 1.2]},
        objective="mean",
        fidelity=[40],
        anchors={"per_task": 5, "reference": 3},
        trials=8,
    )
    cli(tmp_path, "search", str(space), "-q", "--device", "cpu")
    s = optuna.load_study(study_name="anc", storage=f"sqlite:///{tmp_path / 'results' / 'anc' / 'study.db'}")
    done = sorted(s.trials, key=lambda t: t.number)
    assert [t.user_attrs["fitness"] for t in done] == ["reference"] * 3 + ["anchors"] * 5
    assert all(t.user_attrs["examples"] == {"add": 40, "reverse": 40} for t in done[:3])
    anchors = s.user_attrs["anchors"]
    assert s.user_attrs["anchor_reference_trials"] == [0, 1, 2]
    for t in done[3:]:
        assert t.user_attrs["examples"] == {k: len(v["indices"]) for k, v in anchors.items()}
        assert all(1 <= len(v["indices"]) <= 5 for v in anchors.values())

    sp = space_from_dict(yaml.safe_load(space.read_text()), space)
    searcher = bench(sp)
    searcher.use_exact_engine()  # the exact engine: task arithmetic's candidates are the same
    t = done[-1]
    res, _ = searcher.score(parse_recipes(t.user_attrs["recipe"]), "search", 40)
    want = np.mean([estimate(res[k].scores[v["indices"]], v["weights"]) for k, v in anchors.items()])
    assert t.value == pytest.approx(want)
    # and the report counts what the search spent
    cli(tmp_path, "report", "anc", "--device", "cpu")
    import json

    cost = json.loads((tmp_path / "results" / "anc" / "test_scores.json").read_text())["cost"]
    assert cost["anchors"]["reference_trials"] == 3 and cost["anchors"]["anchor_trials"] == 5
    assert cost["examples_total"] == 3 * 80 + 5 * sum(len(v["indices"]) for v in anchors.values())
    assert (
        "Few-example fitness: 3 reference trials" in (tmp_path / "results" / "anc" / "report.md").read_text()
    )


def test_uniform_known_recipes_extend_to_three_models():
    """A three-specialist space starts from task arithmetic λ=1 (every weight 1.0), as the report
    compares with it; uneven recipes (linear 70/30) and slerp stay two-model only."""
    from pathlib import Path

    from mergesearch.search import load_space
    from mergesearch.search.known_recipes import baseline_values

    space = load_space(Path(__file__).parents[1] / "search_spaces" / "smollm2_ta_blocks.yaml")
    values = baseline_values(space, "task_arithmetic λ=1", 30)
    assert len(values) == 3 * 2 * 6 and set(values.values()) == {1.0}
    linear = space_from_dict(dict(space.raw, method="linear", parameters={"weight": [0.0, 1.0]}))
    assert set(baseline_values(linear, "linear 50/50", 30).values()) == {0.5}
    assert baseline_values(linear, "linear 70/30", 30) is None
