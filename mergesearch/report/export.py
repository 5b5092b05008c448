"""A trial's recipe as mergekit YAML, with a header saying what it scored and how it ended."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import optuna

from ..errors import MergeSearchError
from ..recipe import ZOO_REFERENCE, Recipe, dump_recipes, parse_recipes, renamed, rounded
from ..search import MERGE_SEED, study_dir
from ..search.rounds import elite_info, is_elite
from ..search.trials import StudyAttr, TrialRecord, record
from .files import atomic_text
from .tables import best_trial, load

State = optuna.trial.TrialState


def trial_recipes(t: TrialRecord) -> list[Recipe]:
    """What the report scores and export writes for a trial: its recorded recipe with values
    rounded to 4 significant digits (`recipe.rounded`), so the reported test score is the score
    of the exported file, not of the unrounded one the study merged."""
    return rounded(parse_recipes(t.recipe))


def recipe_text(t: TrialRecord, names: dict[str, str] | None = None) -> str:
    """The trial's recipe as export writes it, models renamed by `names` (`zoo_names`)."""
    return dump_recipes(renamed(trial_recipes(t), names or {}))


def zoo_names(folders: dict[str, str]) -> dict[str, str]:
    """{folder: reference} for the models a space names by a zoo reference (`smollm2:largest`):
    what a report shows and `export --references space` writes instead of this machine's folders."""
    return {folder: ref for ref, folder in folders.items() if ZOO_REFERENCE.match(ref)}


def test_scores_of(study: str, trial: int) -> dict[str, float]:
    """The trial's test scores from the report's test_scores.json (rounded), {} when the report
    did not score it. Rows are matched by trial number (a label match once gave trial 1 the
    scores of trial 12)."""
    scores_file = study_dir(study) / "test_scores.json"
    if not scores_file.is_file():
        return {}
    for c in json.loads(scores_file.read_text())["candidates"]:
        # test_scores.json before the trial field: the label is "trial N" or "trial N (best)"
        number = c["trial"] if "trial" in c else _label_trial(c["label"])
        if number == trial:
            return {k: round(v["value"], 4) for k, v in c["test"].items()}
    return {}


def _label_trial(label: str) -> int | None:
    head = label.removesuffix(" (best)")
    word, _, n = head.partition(" ")
    return int(n) if word == "trial" and n.isdigit() else None


def _ending(t: TrialRecord) -> str | None:
    """What a user must know about a trial that did not complete, or None."""
    if t.state == State.PRUNED:
        at = f" after {t.stopped_at} examples per task" if t.stopped_at else ""
        return f"trial {t.number} was stopped early{at}: its search scores are of those examples only"
    if t.state == State.RUNNING:
        return f"trial {t.number} is still running (or its process died): it has no scores yet"
    return None


def export(
    study: str,
    storage: str | None = None,
    *,
    trial: int | None = None,
    out: str | Path | None = None,
    references: str = "folders",
) -> Path:
    """A trial's recipe (default: the best) as mergekit YAML with a provenance header. A failed
    trial is refused; a stopped-early or running one is exported with a warning and its state in
    the header. `references`: "folders" (what mergekit-yaml runs here) or "space" (zoo models by
    their reference, as the space names them: a file to share; `mergesearch merge` resolves them)."""
    if references not in ("folders", "space"):
        raise MergeSearchError(f"--references {references!r}: use folders or space")
    s = load(study, storage)
    if trial is None:
        t = best_trial(s)
    else:
        t = record(s, trial)
        if t is None or t.recipe is None:
            raise MergeSearchError(f"study {study!r} has no trial {trial} with a recipe")
    if t.state == State.FAIL:
        raise MergeSearchError(
            f"trial {t.number} of study {study!r} failed ({t.error or 'no message recorded'}); its recipe "
            "was never scored: export a complete trial (mergesearch report lists them in trials.csv)"
        )
    ending = _ending(t)
    if ending:
        warnings.warn(f"{ending}; exported as asked", stacklevel=2)
    test = test_scores_of(study, t.number)
    estimate = " (anchor estimates)" if t.anchor_estimate else ""
    header = [
        f"# mergesearch export: study {study}, trial {t.number}",
        f"# state: {t.state.name}" + (f" ({ending})" if ending else ""),
        f"# search scores{estimate}: {json.dumps({k: round(v, 4) for k, v in t.scores.items()})}",
        f"# test scores: {json.dumps(test) if test else 'not measured yet (run mergesearch report)'}",
        f"# seed: {MERGE_SEED} (mergesearch merge --seed {MERGE_SEED} / mergekit-yaml --random-seed {MERGE_SEED})",
        "",
    ]
    names = {}
    if references == "space":
        if StudyAttr.MODEL_FOLDERS not in s.user_attrs:
            raise MergeSearchError(
                f"study {study!r} did not record its models' folders (made before mergesearch recorded "
                "them): export without --references space"
            )
        names = zoo_names(s.user_attrs[StudyAttr.MODEL_FOLDERS])
        if names:
            header.insert(
                -1, "# models: zoo references as the space names them (mergesearch merge resolves them)"
            )
    text = "\n".join(header) + recipe_text(t, names)
    path = Path(out) if out else study_dir(study) / f"trial_{t.number}.yaml"
    atomic_text(path, text)
    return path


def export_chain(
    study: str, out: str | Path, storage: str | None = None, *, trial: int | None = None
) -> list[Path]:
    """A trial's recipe (default: the best) whose models include round elites (`search/rounds.py`)
    as the chain of mergekit YAML files that rebuilds it: one file per elite it needs, earlier
    rounds first, each naming the elites it merges by the folder the chain builds them in, then the
    final recipe, and `build.sh`, which runs mergekit-yaml on each in order from `out`. Returns
    the YAML files in build order."""
    s = load(study, storage)
    t = best_trial(s) if trial is None else record(s, trial)
    if t is None or t.recipe is None:
        raise MergeSearchError(
            f"study {study!r} has no {'best ' if trial is None else ''}trial with a recipe"
        )
    steps: list[tuple[str, list[Recipe], str]] = []  # (name, recipes, what made it)
    names: dict[str, str] = {}  # an elite's folder, as recipes refer to it → its name in the chain

    def visit(recipes: list[Recipe]) -> None:
        for ref in dict.fromkeys(m for r in recipes for m in r.referenced_models()):
            if ref in names or not is_elite(ref):
                continue
            info = elite_info(ref)
            visit(parse_recipes(info["recipe"]))
            name = info["name"]
            if f"./{name}" in names.values():  # elites of two rounds studies with one name
                name = f"{info['study']}-{name}"
            names[ref] = f"./{name}"  # a path: mergekit reads a bare name as a Hub repository
            steps.append(
                (name, parse_recipes(info["recipe"]), f"study {info['study']}, trial {info['trial']}")
            )

    final = trial_recipes(t)
    visit(final)
    if not steps:
        raise MergeSearchError(
            f"study {study!r} trial {t.number} merges no round elites: mergesearch export writes its one file"
        )
    steps.append(("merged", final, f"study {study}, trial {t.number}"))
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise MergeSearchError(f"{out}: exists and is not empty; give a new folder for the chain")
    out.mkdir(parents=True, exist_ok=True)
    files, lines = [], []
    for i, (name, recipes, made) in enumerate(steps, 1):
        path = out / f"{i:02d}_{name}.yaml"
        header = f"# mergesearch chain step {i} of {len(steps)}: {made}; builds ./{name}\n"
        atomic_text(path, header + dump_recipes(renamed(recipes, names)))
        files.append(path)
        lines.append(f"mergekit-yaml {path.name} {name} --random-seed {MERGE_SEED}")
    atomic_text(
        out / "build.sh",
        "#!/usr/bin/env bash\n"
        f"# Rebuilds study {study} trial {t.number}: each step's folder is a model of the later steps.\n"
        "set -euo pipefail\n"
        'cd "$(dirname "$0")"\n' + "\n".join(lines) + "\n",
    )
    (out / "build.sh").chmod(0o755)
    return files
