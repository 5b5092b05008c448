"""A trial: propose a point, record its recipe, write the candidate into the live model, and score
it rung by rung (stopping early where it cannot matter) or on the study's anchors."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
import optuna

from ..errors import MergeSearchError
from ..evaluation import task_weight
from ..recipe import dump_recipes
from . import interrupts, screening
from .bench import Bench
from .samplers import worker_id
from .trials import (
    ANCHOR_FITNESS,
    CONFIRMED_FITNESS,
    ELITE,
    ELITE_KIND,
    GRADIENT,
    GRADIENT_KIND,
    REFERENCE_FITNESS,
    SCREENED_FITNESS,
    SEARCHED,
    StudyAttr,
    known_kind,
    records,
    stored,
    write,
)
from .verdicts import loglikelihoods, verdict_strings

State = optuna.trial.TrialState


class Objective:
    def __init__(self, bench: Bench, study: optuna.Study, multi: bool, artifacts, seed: int) -> None:
        self.b, self.study, self.multi, self.artifacts = bench, study, multi, artifacts
        self.seed = seed
        self._anchor_cache: dict | None = None
        self._shared: list | None = None

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
        if b.screening:
            return self._screen_then_confirm(trial)
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
        elif stored(trial, "warm_start") == ELITE:
            kind = ELITE_KIND
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
                loglikelihoods=loglikelihoods(results),
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

    def _screen_then_confirm(self, trial: optuna.Trial):
        """Screen the candidate on a few examples per task, paired with the incumbent; confirm it
        on the whole search split, chunk by chunk, while its estimate beats the incumbent
        (screening.py). Told to the sampler: the confirmed scores, or the estimate. The first
        trial and warm starts are scored on the whole split."""
        b, m = self.b, int(self.b.screening["examples"])
        sizes = b.search_sizes()
        done = records(self.study, (State.COMPLETE, State.PRUNED))
        rows = [t.verdicts for t in done if t.verdicts] + [v for _, v in self._shared_rows(sizes)]
        refs = [
            screening.reference_of(f"trial {t.number}", t.verdicts, sizes)
            for t in done
            if t.complete and t.fitness == CONFIRMED_FITNESS and screening.whole(t.verdicts, sizes)
        ] or [
            screening.reference_of(label, v, sizes)
            for label, v in self._shared_rows(sizes)
            if screening.whole(v, sizes)
        ]
        scored: dict[str, dict[int, float]] = {t: {} for t in sizes}
        lls: dict[str, dict[int, float]] = {t: {} for t in sizes}
        eval_s = 0.0

        def score(indices: dict[str, list[int]]) -> None:
            nonlocal eval_s
            results, seconds = b.evaluate("search", indices=indices)
            eval_s += seconds
            for t, r in results.items():
                scored[t].update(zip(indices[t], r.scores.tolist()))
                if "loglikelihood" in r.extra:
                    lls[t].update(zip(indices[t], r.extra["loglikelihood"]))

        screen_info = None
        # nothing to pair with yet, or a warm start (the gradient's point, a round's best elite):
        # the whole split. A warm start is one trial the report and `centre: best` judge by its
        # score; screened, it would tie the incumbent and be told the incumbent's value
        if not refs or stored(trial, "warm_start") in (GRADIENT, ELITE):
            score({t: list(range(n)) for t, n in sizes.items()})
        else:
            per_task = self._reference_per_task(refs)
            epoch = screening.seed_of(
                b.space.seed, per_task[b.tasks[0].name].label, len(done) // screening.REFRESH
            )
            rates = screening.population(rows, sizes)
            pis, screens = {}, {}
            for t in sizes:
                ref = per_task[t]
                pis[t] = screening.inclusion_probabilities(
                    screening.example_rates(rates[t]), ref.verdicts[t], m
                )
                screens[t] = screening.draw(pis[t], screening.seed_of(epoch, t))
            score(screens)
            est = self._estimates(scored, per_task, screens, pis)
            screen_info = {
                "reference": {t: r.label for t, r in per_task.items()},
                "examples": {t: len(s) for t, s in screens.items()},
                "scores": {t: e.value for t, e in est.items()},
                "se": {t: e.se for t, e in est.items()},
                # the candidate's own Horvitz–Thompson mean on the same examples, not paired: what
                # benchmarks/screening_curve.py --audit compares the paired estimate with
                "unpaired": {
                    t: float(sum(scored[t][j] / pis[t][j] for j in screens[t]) / n) for t, n in sizes.items()
                },
                "value": self._scalar({t: e.value for t, e in est.items()}),
            }
            if self._beats(est, refs, float(b.screening.get("confirm_sigmas", 0.0))):
                # confirmation: the rest in random chunks, stopped once the estimate stops beating
                rng = np.random.default_rng(screening.seed_of(b.space.seed, "confirm", trial.number))
                rest = {
                    t: [j for j in rng.permutation(n).tolist() if j not in screens[t]]
                    for t, n in sizes.items()
                }
                parts = {t: screening.chunks(r, m) for t, r in rest.items()}
                steps = max(len(p) for p in parts.values())
                chunks: dict[str, list[int]] = {t: [] for t in sizes}
                for k in range(steps):
                    part = {t: parts[t][k] if k < len(parts[t]) else [] for t in sizes}
                    score(part)
                    for t in sizes:
                        chunks[t] += part[t]
                    if k == steps - 1:
                        break
                    est = self._estimates(scored, per_task, screens, pis, chunks)
                    if not self._beats(est, refs):
                        break
        complete = all(len(scored[t]) == n for t, n in sizes.items())
        if complete:
            scores = {t: float(np.mean([scored[t][j] for j in range(n)])) for t, n in sizes.items()}
        else:
            scores = {t: e.value for t, e in est.items()}
        write(
            trial,
            eval_seconds=eval_s,
            scores=scores,
            examples={t: len(v) for t, v in scored.items()},
            fidelity=max(len(v) for v in scored.values()),
            verdicts={t: screening.verdict_string(n, scored[t]) for t, n in sizes.items()},
            fitness=CONFIRMED_FITNESS if complete else SCREENED_FITNESS,
        )
        if any(lls.values()):
            write(
                trial,
                loglikelihoods={t: [lls[t].get(j) for j in range(n)] for t, n in sizes.items() if lls[t]},
            )
        if screen_info is not None:
            write(trial, screen=screen_info)
        return self._result(scores)

    def _scalar(self, scores: dict[str, float]) -> float:
        """The objective's value of per-task scores (the mean over tasks on a Pareto study)."""
        v = self.b.objective_value(scores)
        return float(np.mean(v)) if isinstance(v, list) else float(v)

    def _reference_per_task(self, refs: list[screening.Reference]) -> dict[str, screening.Reference]:
        """What each task's screen pairs with: the incumbent (the best confirmed objective), or on
        a Pareto study each task's best confirmed candidate."""
        if not self.multi:
            best = max(refs, key=lambda r: self._scalar(r.scores))
            return {t.name: best for t in self.b.tasks}
        return {t.name: max(refs, key=lambda r: r.scores[t.name]) for t in self.b.tasks}

    def _estimates(self, scored, per_task, screens, pis, chunks=None) -> dict[str, screening.TaskEstimate]:
        return {
            t: screening.estimate(
                scored[t], ref.verdicts[t], ref.scores[t], screens[t], pis[t], chunks[t] if chunks else None
            )
            for t, ref in per_task.items()
        }

    def _beats(
        self, est: dict[str, screening.TaskEstimate], refs: list[screening.Reference], z: float = 0.0
    ) -> bool:
        """Whether the estimate, less z standard errors, would make a new incumbent (one
        objective: the weighted mean's standard error) or a new Pareto point (not dominated by any
        confirmed candidate; each task's own)."""
        if not self.multi:
            w = {t: task_weight(self.b.space.task_weights, t) for t in est}
            se = np.sqrt(sum((w[t] * e.se) ** 2 for t, e in est.items())) / sum(w.values())
            value = self._scalar({t: e.value for t, e in est.items()}) - z * se
            return value > max(self._scalar(r.scores) for r in refs)
        names = [t.name for t in self.b.tasks]
        mine = [est[n].value - z * est[n].se for n in names]
        return not any(dominates([r.scores[n] for n in names], mine, ["maximize"] * len(names)) for r in refs)

    def _shared_rows(self, sizes: dict[str, int]) -> list[tuple[str, dict[str, str]]]:
        """Verdict rows of the other studies on this storage with the same search examples and
        models (read once): where a new study's first screens start from."""
        if self._shared is None:
            from .verdicts import comparable_rows

            self._shared = comparable_rows(
                self.study, self.b.split_fingerprints(), set(self.b.folders.values())
            )
        return self._shared

    def _anchor_fitness(self, trial: optuna.Trial):
        """Reference trials (the first `reference` of the study) on the whole search split, with
        their verdicts recorded; every later one on the anchors chosen from those verdicts."""
        b = self.b
        anchors = self._anchors()
        if anchors is None:
            results, seconds = b.evaluate("search", b.space.whole)
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
