"""The report and export read the typed trial record, keyed by trial number."""

from __future__ import annotations

import json

import optuna
import pytest
import torch
import yaml

from mergesearch.recipe import dump_recipes
from mergesearch.search import load_space
from mergesearch.search.studies import create_or_load
from mergesearch.search.trials import enqueued
from tests.conftest import bench, cli, report, write_space

pytestmark = pytest.mark.e2e  # real CLI subprocesses, searches and reports


def test_export_of_a_front_trial_takes_its_own_test_scores(zoo, tmp_path, results):
    """Trials 1 and 12 on one Pareto front (12 the best): `export --trial 1` writes trial 1's test
    scores, not those of trial 12, whose number starts with "1" (rows were once found by label)."""
    space = load_space(
        write_space(
            tmp_path,
            name="front",
            method="task_arithmetic",
            granularity="model",
            components=["all"],
            parameters={"weight": [0.0, 1.0]},
            fidelity=[20],
        )
    )
    b = bench(space)
    names = ["add", "reverse"]
    s, _ = create_or_load(space, "front", None, directions=["maximize"] * 2, objective_names=names)
    dist = optuna.distributions.FloatDistribution(0.0, 1.0)
    for n in range(13):
        # trial 1 keeps the add specialist, trial 12 the reverse one; the rest are dominated
        w = {1: (1.0, 0.0), 12: (0.0, 1.0)}.get(n, (0.1, 0.1))
        values = {"weight[add]": w[0], "weight[reverse]": w[1]}
        scores = {1: [0.9, 0.1], 12: [0.2, 0.9]}.get(n, [0.05, 0.05])
        s.add_trial(
            optuna.trial.create_trial(
                values=scores,
                params=values,
                distributions=dict.fromkeys(values, dist),
                user_attrs=enqueued(
                    recipe=dump_recipes(b.recipes(values | {"method": "task_arithmetic"})),
                    scores=dict(zip(names, scores)),
                    kind="searched",
                ),
            )
        )
    summary = report("front", bench=b)
    rows = {c["trial"]: c for c in summary["candidates"] if c["trial"] is not None}
    assert summary["best_trial"] == 12 and set(rows) == {1, 12}
    want = {k: round(v["value"], 4) for k, v in rows[1]["test"].items()}
    assert want != {k: round(v["value"], 4) for k, v in rows[12]["test"].items()}

    cli(tmp_path, "export", "front", "--trial", "1", "-o", "t1.yaml")
    header = (tmp_path / "t1.yaml").read_text().splitlines()
    line = next(x for x in header if x.startswith("# test scores: "))
    assert json.loads(line.removeprefix("# test scores: ")) == want
    assert "# state: COMPLETE" in header
    recipe = yaml.safe_load((tmp_path / "t1.yaml").read_text())
    assert [m["parameters"]["weight"] for m in recipe["models"]] == [1.0, 0.0]


def test_exported_zoo_references_merge_as_the_folders_do(zoo, tmp_path, results):
    """`export --references space` writes `zoo:add` (no machine path); `mergesearch merge`
    resolves it and builds the same model as from the folders version."""
    from tests.tiny_models import load_weights

    cli(tmp_path, "search", str(write_space(tmp_path, name="refs", trials=3, fidelity=[20])), "-q")
    cli(tmp_path, "export", "refs", "-o", "folders.yaml")
    cli(tmp_path, "export", "refs", "--references", "space", "-o", "space.yaml")
    shared = yaml.safe_load((tmp_path / "space.yaml").read_text())
    assert shared["base_model"] == "zoo:base"
    assert [m["model"] for m in shared["models"]] == ["zoo:add", "zoo:reverse"]
    assert "# models: zoo references" in (tmp_path / "space.yaml").read_text()
    assert str(zoo.root) in (tmp_path / "folders.yaml").read_text()
    cli(tmp_path, "merge", "folders.yaml", "a", "--seed", "0", "-q")
    cli(tmp_path, "merge", "space.yaml", "b", "--seed", "0", "-q")
    a, b = load_weights(tmp_path / "a"), load_weights(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
