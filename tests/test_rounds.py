"""Rounds of elites (search/rounds.py): each round's best recipes are merged and join the next
round's inputs; the final recipe exports as a chain of YAML files that mergekit rebuilds."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import cli, write_space
from tests.tiny_models import load_weights

pytestmark = pytest.mark.e2e


def test_rounds_export_a_chain_mergekit_rebuilds_bit_for_bit(zoo, tmp_path):
    space = write_space(
        tmp_path,
        name="rnd",
        method="task_arithmetic",
        parameters={"weight": [0.0, 1.5]},
        objective="mean",
        fidelity=[40],
        trials=10,
        screening="off",
    )
    out = cli(tmp_path, "rounds", str(space), "--rounds", "2", "--elites", "2").stdout
    assert "round 2 of 2: study rnd-round2, 4 models (2 elites)" in out, out
    assert "next: mergesearch report rnd-round2" in out
    elites = tmp_path / "results" / "rnd-round1" / "elites"
    assert sorted(p.name for p in elites.iterdir()) == ["r1e0", "r1e1"]
    info = json.loads((elites / "r1e0" / "mergesearch_elite.json").read_text())
    assert info["study"] == "rnd-round1" and info["recipe"].startswith("merge_method: task_arithmetic")

    # Round 2 starts from the best elite alone, so it is never below round 1's best.
    import optuna

    db = f"sqlite:///{tmp_path / 'results'}/rnd-round{{}}/study.db"
    r1 = optuna.load_study(study_name="rnd-round1", storage=db.format(1))
    r2 = optuna.load_study(study_name="rnd-round2", storage=db.format(2))
    start = next(t for t in r2.trials if t.user_attrs.get("warm_start") == "elite")
    assert start.value == pytest.approx(info["mean"], abs=0.01)
    assert r2.best_value >= r1.best_value - 0.01
    # the same command again resumes: nothing to run, no elite made twice, no warm start again
    n1, n2 = len(r1.trials), len(r2.trials)
    cli(tmp_path, "rounds", str(space), "--rounds", "2", "--elites", "2", "-q")
    assert (len(r1.trials), len(r2.trials)) == (n1, n2)
    assert sorted(p.name for p in elites.iterdir()) == ["r1e0", "r1e1"]

    cli(tmp_path, "report", "rnd-round2")
    chain = tmp_path / "chain"
    out = cli(tmp_path, "export", "rnd-round2", "--chain", str(chain)).stdout
    assert "build.sh" in out
    files = sorted(p.name for p in chain.glob("*.yaml"))
    assert files[-1].endswith("_merged.yaml") and len(files) >= 2, files
    # The chain refers to the elites it builds, never to the study's folders.
    assert str(elites) not in "".join(p.read_text() for p in chain.glob("*.yaml"))

    # mergekit itself builds the chain ...
    env = dict(os.environ, PATH=f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}")
    mk = subprocess.run(["bash", str(chain / "build.sh")], env=env, capture_output=True, text=True)
    assert mk.returncode == 0, mk.stderr[-3000:]
    # ... each elite equal, bit for bit, to the one the rounds searched over ...
    for f in files[:-1]:
        name = f.split("_", 1)[1].removesuffix(".yaml")
        a, b = load_weights(chain / name), load_weights(elites / name)
        assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a), name
    # ... and the final model scores on the test split what the report says of the best trial.
    summary = json.loads((tmp_path / "results" / "rnd-round2" / "test_scores.json").read_text())
    best = next(c for c in summary["candidates"] if c["label"].endswith("(best)"))
    got = json.loads(
        cli(
            tmp_path, "eval", str(chain / "merged"), "--tasks", "add,reverse", "--split", "test", "--json"
        ).stdout
    )
    for row in got:
        assert row["value"] == pytest.approx(best["test"][row["task"]]["value"], abs=0), row


def test_export_chain_refuses_a_recipe_without_elites(zoo, tmp_path):
    space = write_space(
        tmp_path, name="plain", method="task_arithmetic", parameters={"weight": [0.0, 1.5]}, trials=3
    )
    cli(tmp_path, "search", str(space), "-q")
    p = cli(tmp_path, "export", "plain", "--chain", str(tmp_path / "c"), check=False)
    assert p.returncode == 2 and "merges no round elites" in p.stderr, p.stderr
    assert not (tmp_path / "c").exists()
