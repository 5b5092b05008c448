"""A trial: propose a point, record its recipe, write the candidate into the live model, and score
it rung by rung (stopping early where it cannot matter) or on the study's anchors."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
import optuna

from ..errors import MergeSearchError
from ..recipe import dump_recipes
from . import interrupts
from .bench import Bench
from .samplers import worker_id
from .trials import (
    ANCHOR_FITNESS,
    GRADIENT,
    GRADIENT_KIND,
    REFERENCE_FITNESS,
    SEARCHED,
    StudyAttr,
    known_kind,
    records,
    stored,
    write,
)
from .verdicts import verdict_strings

State = optuna.trial.TrialState


class Objective:
    def __init__(self, bench: Bench, study: optuna.Study, multi: bool, artifacts, seed: int) -> None:
        self.b, self.study, self.multi, self.artifacts = bench, study, multi, artifacts
        self.seed = seed
        self._anchor_cache: dict | None = None

    def __call__(self, trial: optuna.Trial):
        try:
            with interrupts.objective():
                return self._run(trial)
        except MergeSearchError as e:
            write(trial, error=str(e))  # what run.Failures reports
            raise

    def _run(self, trial: optuna.Trial):
        b = self.b
        write(trial, worker=worker_id(), sampler_seed=self.seed, placement=b.engine.placement)
        values = b.space.suggest(trial, b.num_layers)
        recipes = b.recipes(values)
        yaml_text = dump_recipes(recipes)
        write(trial, recipe=yaml_text)
        if "weight_sum_max" in b.space.constraints:
            self._weight_sum(trial, values)
        self._upload_recipe(trial, yaml_text)
        self._describe(trial)
        write(trial, merge_seconds=b.merge(recipes))
        if b.space.anchors:
            return self._anchor_fitness(trial)
        return self._rungs(trial)

    def _weight_sum(self, trial: optuna.Trial, values: dict) -> None:
        """constraints.weight_sum_max: the models' mean weights summed, recorded as Optuna's
        constraint (NSGA-II then prefers feasible trials) and as the trial's `feasible`."""
        b, limit = self.b, self.b.space.constraints["weight_sum_max"]
        ws = [
            values[c.key]
            for c in b.space.coefficients(values["method"], b.num_layers)
            if c.param == "weight" and c.stage == 0
        ]
        total = float(np.mean(ws)) * len(b.model_paths) if ws else 0.0
        write(trial, weight_sum=total, feasible=total <= limit)
        if hasattr(trial, "set_constraint"):
            trial.set_constraint("weight_sum", total - limit)

    def _upload_recipe(self, trial: optuna.Trial, yaml_text: str) -> None:
        # The dashboard names an artifact by its file's name: the trial's, not a temporary one.
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"trial_{trial.number}_recipe.yaml"
            path.write_text(yaml_text)
            optuna.artifacts.upload_artifact(
                artifact_store=self.artifacts,
                file_path=str(path),
                study_or_trial=trial,
                mimetype="application/yaml",
            )

    def _describe(self, trial: optuna.Trial) -> None:
        """The trial's kind, and for a known recipe a note on its dashboard page."""
        baseline = stored(trial, "baseline")
        kind = known_kind(baseline) if baseline else SEARCHED
        if stored(trial, "warm_start") == GRADIENT:
            kind = GRADIENT_KIND
        write(trial, kind=kind)
        if baseline:
            from optuna_dashboard import save_note

            save_note(
                trial,
                f"**Known recipe: {baseline}**\n\nNot searched: enqueued before the search as a "
                "reference.\nThe report re-scores it on the test split beside the learned recipes.",
            )

    def _rungs(self, trial: optuna.Trial):
        b = self.b
        eval_s, scores = 0.0, {}
        rungs = b.space.fidelity
        for r, limit in enumerate(rungs):
            results, seconds = b.evaluate("search", limit)
            eval_s += seconds
            scores = {k: v.value for k, v in results.items()}
            n = {k: v.n for k, v in results.items()}
            # the scores, and the verdicts behind them: the study's verdict matrix (verdicts.py)
            write(
                trial,
                eval_seconds=eval_s,
                scores=scores,
                examples=n,
                fidelity=limit,
                verdicts=verdict_strings(results),
            )
            unextracted = {
                k: v.extra["unextracted"] for k, v in results.items() if v.extra.get("unextracted")
            }
            if unextracted:  # outputs where the answer extraction found nothing (scored wrong)
                write(trial, unextracted=unextracted)
            if r == len(rungs) - 1:
                break
            if self._stop_early(trial, scores, min(n.values())):
                write(trial, stopped_at=limit)
                raise optuna.TrialPruned(f"cannot matter after {limit} examples per task")
        return self._result(scores)

    def _result(self, scores: dict[str, float]):
        return [scores[t.name] for t in self.b.tasks] if self.multi else self.b.objective_value(scores)

    def _anchor_fitness(self, trial: optuna.Trial):
        """Reference trials (the first `reference` of the study) on the whole search split, with
        their verdicts recorded; every later one on the anchors chosen from those verdicts."""
        b = self.b
        anchors = self._anchors()
        if anchors is None:
            results, seconds = b.evaluate("search", b.space.fidelity[-1])
            scores = {k: v.value for k, v in results.items()}
            write(trial, verdicts=verdict_strings(results), fitness=REFERENCE_FITNESS)
        else:
            from ..evaluation.anchors import estimate

            results, seconds = b.evaluate("search", indices={k: a["indices"] for k, a in anchors.items()})
            scores = {k: estimate(v.scores, anchors[k]["weights"]) for k, v in results.items()}
            write(trial, fitness=ANCHOR_FITNESS)
        write(
            trial,
            eval_seconds=seconds,
            scores=scores,
            examples={k: v.n for k, v in results.items()},
            fidelity=max(v.n for v in results.values()),
        )
        return self._result(scores)

    def _anchors(self) -> dict | None:
        """The study's anchors, chosen and recorded once `reference` trials scored on the whole
        search split have completed (the first ones by number, so racing workers agree); None
        until then."""
        from ..evaluation.anchors import choose_anchors

        if self._anchor_cache is not None:  # fixed once chosen: no storage read per trial
            return self._anchor_cache
        attrs = self.study.user_attrs
        if StudyAttr.ANCHORS in attrs:
            self._anchor_cache = attrs[StudyAttr.ANCHORS]
            return self._anchor_cache
        want = self.b.space.anchors["reference"]
        ref = [t for t in records(self.study, (State.COMPLETE,)) if t.fitness == REFERENCE_FITNESS]
        if len(ref) < want:
            return None
        ref = sorted(ref, key=lambda t: t.number)[:want]
        out = {}
        for task in self.b.tasks:
            correct = np.array([[c == "1" for c in t.verdicts[task.name]] for t in ref])
            idx, w = choose_anchors(correct, self.b.space.anchors["per_task"], seed=self.b.space.seed)
            out[task.name] = {"indices": idx, "weights": w}
        self.study.set_user_attr(StudyAttr.ANCHORS, out)
        self.study.set_user_attr(StudyAttr.ANCHOR_REFERENCE_TRIALS, [t.number for t in ref])
        self._anchor_cache = out
        return out

    def _stop_early(self, trial: optuna.Trial, scores: dict[str, float], n: int) -> bool:
        if not self.multi:  # Optuna's pruner on the mean score at this fidelity
            value = self.b.objective_value(scores)
            trial.report(value, step=n)
            return trial.should_prune()
        # Several objectives (Optuna cannot prune these): stop when a finished trial beats this
        # candidate's optimistic bound (score + 2·sqrt(1/4n), Hoeffding-style) on every task.
        margin = 2 * math.sqrt(0.25 / n)
        dirs = self.study.directions
        bound = [
            scores[t.name] + (margin if d == optuna.study.StudyDirection.MAXIMIZE else -margin)
            for t, d in zip(self.b.tasks, dirs)
        ]
        dnames = ["maximize" if d == optuna.study.StudyDirection.MAXIMIZE else "minimize" for d in dirs]
        for t in self.study.get_trials(deepcopy=False, states=(State.COMPLETE,)):
            if dominates(list(t.values), bound, dnames):
                return True
        return False


def dominates(a: list[float], b: list[float], directions: list[str]) -> bool:
    better = [(x >= y) if d == "maximize" else (x <= y) for x, y, d in zip(a, b, directions)]
    strictly = [(x > y) if d == "maximize" else (x < y) for x, y, d in zip(a, b, directions)]
    return all(better) and any(strictly)
