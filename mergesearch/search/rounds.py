"""Rounds of elites: a search in rounds, each round's best recipes merged and added to the inputs
of the next (CycleQD's and EvoGM's idea, for mergekit recipes).

Round 1 is the space as written, study `<name>-round1`. After round r its `elites` best recipes
(the best confirmed trials by mean score; on a Pareto study, the front's, by mean) are merged by
the exact engine — mergekit's merge — into `<study dir of round r>/elites/r<r>e<i>/`, a model
folder with `mergesearch_elite.json` saying which study and trial made it and the recipe as
exported (rounded, what the report scores). Round r + 1 is the same space over the original models
and every elite so far, and starts from the best elite alone (weight 1 on it, 0 on the rest: the
merge base + (elite − base)), so a round never starts below the previous round's best.

The elites are folders in the study's results; while a round runs, its inputs live where they fit
like any model's (`placement`: on the device, in host memory, or memory-mapped from the files).
`report.export_chain` writes the final recipe as the chain of YAML files mergekit builds in order.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import shutil
from pathlib import Path
from typing import Any

import optuna

from ..errors import MergeSearchError
from ..recipe import dump_recipes, parse_recipes, rounded
from .bench import MERGE_SEED, Bench, Resolver, resolve_folder
from .space import SearchSpace
from .storage import study_dir
from .trials import SCREENED_FITNESS, TrialRecord, records

State = optuna.trial.TrialState
ELITE_FILE = "mergesearch_elite.json"


def round_study(name: str, r: int) -> str:
    return f"{name}-round{r}"


def elites_of(study: optuna.Study, k: int) -> list[TrialRecord]:
    """The study's `k` best recipes scored on the whole search split, best mean first; a Pareto
    study's are taken from its front (the elites should differ in what they are good at)."""
    done = [t for t in records(study, (State.COMPLETE,)) if t.fitness != SCREENED_FITNESS and t.recipe]
    if len(study.directions) > 1:
        front = {t.number for t in study.best_trials}
        done = [t for t in done if t.number in front] or done
    return sorted(done, key=lambda t: (-t.mean, t.number))[:k]


def is_elite(folder: str | Path) -> bool:
    return (Path(folder) / ELITE_FILE).is_file()


def elite_info(folder: str | Path) -> dict[str, Any]:
    """What made an elite folder: {study, trial, name, scores, mean, recipe (YAML text)}."""
    return json.loads((Path(folder) / ELITE_FILE).read_text())


def materialize(study: str, t: TrialRecord, out: Path, *, device: str = "cpu") -> Path:
    """Merge trial `t`'s recipe, as exported (rounded), with the exact engine into `out`."""
    from ..engine import merge

    recipes = rounded(parse_recipes(t.recipe))
    if out.exists():  # a resumed run: the elite of this trial is already there
        if is_elite(out) and elite_info(out)["trial"] == t.number and elite_info(out)["study"] == study:
            return out
        raise MergeSearchError(f"{out}: exists and is not the elite of {study} trial {t.number}; remove it")
    # merged beside `out` and renamed with its marker inside: a killed run leaves no half-elite
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merge(recipes, tmp, seed=MERGE_SEED, device=device)
    info = {
        "study": study,
        "trial": t.number,
        "name": out.name,
        "scores": t.scores,
        "mean": t.mean,
        "recipe": dump_recipes(recipes),
    }
    (tmp / ELITE_FILE).write_text(json.dumps(info, indent=2) + "\n")
    tmp.rename(out)
    return out


def round_space(space: SearchSpace, elites: list[Path], r: int) -> SearchSpace:
    """Round r's space: the space as written over its models and the elites so far."""
    from .space_file import space_from_dict

    raw = dict(space.raw)
    raw["models"] = [*space.models, *(str(e) for e in elites)]
    raw["name"] = round_study(space.name, r)
    out = space_from_dict(raw, space.path)
    return dataclasses.replace(out, description=f"{space.description} (round {r})".strip())


def elite_start(space: SearchSpace, num_layers: int, elite: Path) -> dict[str, Any] | None:
    """Round r + 1's first trial: the best elite alone (task arithmetic: weight 1 on it, 0 on every
    other model, λ = 1), or None where the space cannot express it."""
    if space.methods != ["task_arithmetic"] or space.order == "sequential":
        return None
    labels = space.input_labels()
    mine = labels[[str(m) for m in space.models].index(str(elite))]
    values: dict[str, Any] = {}
    for c in space.coefficients("task_arithmetic", num_layers):
        r = space.parameters[c.param]
        want = (1.0 if labels[c.model] == mine else 0.0) if c.model is not None else 1.0
        if not r.contains(want):
            return None
        values[c.key] = want
    return values


def run_rounds(
    space: SearchSpace,
    *,
    rounds: int,
    elites: int,
    trials: int | None = None,
    study: str | None = None,
    device: str = "cpu",
    placement: str | None = None,
    cache_ranks: bool = False,
    resolve: Resolver = resolve_folder,
    progress: bool = True,
    timeout: float | None = None,
    log=lambda msg: None,
) -> list[str]:
    """Run `rounds` studies (`trials` each, default the space's budget; `timeout` seconds in all,
    shared equally by the rounds left), merging each round's `elites` best recipes into the
    next round's inputs. Returns the rounds' study names; resuming runs what is left."""
    import time

    from .run import run_search

    if rounds < 1 or elites < 1:
        raise MergeSearchError(f"--rounds {rounds} --elites {elites}: both must be at least 1")
    name = study or space.name
    made: list[Path] = []
    names = []
    t0 = time.perf_counter()
    for r in range(1, rounds + 1):
        sp = space if r == 1 else round_space(space, made, r)
        sp = dataclasses.replace(sp, name=round_study(name, r))
        names.append(sp.name)
        left = (
            None if timeout is None else max(1.0, (timeout - (time.perf_counter() - t0)) / (rounds - r + 1))
        )
        log(f"round {r} of {rounds}: study {sp.name}, {len(sp.models)} models ({len(made)} elites)")
        bench = Bench(
            sp, device=device, cache_ranks=cache_ranks, resolve=resolve, placement=placement, log=log
        )
        starts = []
        if made:
            start = elite_start(sp, bench.num_layers, made[0])
            if start is not None:
                starts.append(start)
        s = run_search(
            sp,
            study=sp.name,
            trials=trials,
            timeout=left,
            bench=bench,
            progress=progress,
            warm_starts=starts,
            log=log,
        )
        del bench
        gc.collect()
        if r == rounds:
            break
        best = elites_of(s, elites)
        if not best:
            raise MergeSearchError(f"round {r} ({sp.name}) has no trial scored on the whole search split")
        folder = study_dir(sp.name).resolve() / "elites"
        new = []
        for i, t in enumerate(best):
            out = materialize(sp.name, t, folder / f"r{r}e{i}", device=device)
            log(f"elite r{r}e{i}: trial {t.number}, search mean {t.mean:.3f} → {out}")
            new.append(out)
        # the best of all rounds first: round r + 1 starts from it
        made = sorted(made + new, key=lambda p: -elite_info(p)["mean"])
    return names
