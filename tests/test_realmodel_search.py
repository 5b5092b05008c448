"""A search on a real pretrained model with a generative task, end to end: search → report →
export → mergekit-yaml rebuild → `mergesearch eval` of the rebuilt model equals the report."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
import yaml

from tests.conftest import cli, mergekit_yaml

EVALS = Path(__file__).resolve().parents[1] / "evals"


@pytest.fixture(scope="module")
def smol_models():
    from mergesearch.smollm2 import derived_models, smollm2_folder

    base = smollm2_folder(log=lambda s: None)
    return base, derived_models(base, log=lambda s: None)


def small_word_problems(tmp_path: Path, n_search: int, n_test: int) -> Path:
    """The shipped word-problem task on fewer examples (same prompts, shots and extraction)."""
    (tmp_path / "data").mkdir(exist_ok=True)
    for split, n in (("search", n_search), ("test", n_test)):
        rows = (EVALS / "data" / f"word_problems.{split}.jsonl").read_text().splitlines()[:n]
        (tmp_path / "data" / f"wp.{split}.jsonl").write_text("\n".join(rows) + "\n")
    spec = yaml.safe_load((EVALS / "word_problems.yaml").read_text())
    spec |= {"name": "wp", "data_files": {"search": "data/wp.search.jsonl", "test": "data/wp.test.jsonl"}}
    p = tmp_path / "wp.yaml"
    p.write_text(yaml.safe_dump(spec))
    return p


@pytest.mark.slow  # about 6 minutes on 2 cores: .venv/bin/python -m pytest -m slow
def test_smollm2_search_report_export_mergekit_eval(smol_models, tmp_path):
    base, (m0, m1) = smol_models
    task = small_word_problems(tmp_path, 11, 10)  # 3 shots + 8 scored on search; 10 on test
    space = {
        "name": "smol",
        "base": str(base),
        "models": [str(m0), str(m1)],
        "method": "task_arithmetic",
        "granularity": "block:10",
        "components": ["all"],
        "parameters": {"weight": [0.0, 1.0], "lambda": 1.0},
        "tasks": [str(task)],
        "objective": "mean",
        "fidelity": [8],
        "trials": 3,
        "sampler": "random",
        "seed": 0,
    }
    sp = tmp_path / "smol.yaml"
    sp.write_text(yaml.safe_dump(space))
    cli(tmp_path, "search", str(sp), "-q")
    study = optuna.load_study(
        study_name="smol", storage=f"sqlite:///{tmp_path / 'results' / 'smol' / 'study.db'}"
    )
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert done and all(t.user_attrs["examples"] == {"wp": 8} for t in done)
    assert all(t.user_attrs["eval_seconds"] > 0 and t.user_attrs["merge_seconds"] > 0 for t in done)
    cli(tmp_path, "report", "smol")
    cli(tmp_path, "export", "smol", "--best", "-o", "best.yaml")
    mergekit_yaml(tmp_path, "best.yaml", "mk_out")
    summary = json.loads((tmp_path / "results" / "smol" / "test_scores.json").read_text())
    best = next(c for c in summary["candidates"] if c["label"].endswith("(best)"))
    for split in ("test", "search"):
        got = json.loads(
            cli(tmp_path, "eval", "mk_out", "--tasks", str(task), "--split", split, "--json").stdout
        )
        reported = best[split]["wp"]["value"] if split == "test" else best[split]["wp"]
        assert got[0]["value"] == reported, (split, got, reported)
    # Not vacuous: the scores are not all 0 (the base solves most of these) ...
    values = [c["test"]["wp"]["value"] for c in summary["candidates"]]
    assert max(values) > 0.3 and len(set(values)) > 1


@pytest.mark.slow  # builds the SmolLM2 zoo once (~20 min on 2 cores, then cached): pytest -m slow
def test_smollm2_zoo_specialists_lead_on_their_skill_and_its_spaces_search():
    """`zoo build --base smollm2`: every specialist leads the base and the other specialists on its
    own skill by the zoo's margin, as recorded in zoo.json and its model card; the shipped SmolLM2
    spaces then search it for real (the anchors space past its reference trials)."""
    from mergesearch.search import load_space
    from mergesearch.smollm2_zoo import MARGIN, SKILLS, build_smollm2_zoo
    from tests.conftest import search as run_search

    zoo = build_smollm2_zoo(progress=False, log=lambda s: None)
    for skill in SKILLS:
        own = zoo.scores[skill][skill]
        rivals = [zoo.scores[m][skill] for m in zoo.models if m != skill]
        assert own - max(rivals) >= MARGIN, (skill, zoo.scores)
        assert zoo.checks[f"{skill} specialist leads on {skill}"]["ok"]
        card = (zoo.models[skill] / "README.md").read_text()
        assert f"| {skill} | " in card and f"{own:.3f}" in card
    space = load_space(
        Path(__file__).resolve().parents[1] / "search_spaces" / "smollm2_ta_blocks_anchors.yaml"
    )
    import tempfile

    import mergesearch.search.storage as study_mod

    old = study_mod.RESULTS
    study_mod.RESULTS = Path(tempfile.mkdtemp(prefix="smolzoo-"))
    try:
        s = run_search(space, trials=6, progress=False)
    finally:
        study_mod.RESULTS = old
    fit = [t.user_attrs.get("fitness") for t in sorted(s.trials, key=lambda t: t.number)]
    assert fit == ["reference"] * 4 + ["anchors"] * 2, fit
    assert all(sum(t.user_attrs["examples"].values()) <= 21 for t in s.trials[4:])
