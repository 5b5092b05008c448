"""The per-example verdict matrix: for every scored candidate of a study, right or wrong on each
search example (and the gold answer's log-likelihood where the task has one), keyed by the
example's position in the search split's fixed shuffle.

It is stored in the study itself (each trial's `verdicts`, `trials.py`), so it survives resumes
and every worker on the storage adds its rows. A study records a fingerprint of each task's search
examples (`StudyAttr.SEARCH_SPLITS`), so a later study on the same tasks and models finds every
row it can compare with (`shared_matrix`), in any study of the same storage. What estimates a
candidate's score from few examples (screening.py, anchors) fits on this.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np
import optuna

from ..evaluation.results import TaskResult
from ..evaluation.tasks import Task
from .screening import as_array
from .trials import StudyAttr, records

VERDICT_METRICS = ("exact_match", "acc")  # 0/1 per example; perplexity has no verdict


def verdict_strings(results: dict[str, TaskResult]) -> dict[str, str]:
    """Per task with a 0/1 verdict per example: "0101…" in the order the examples were scored."""
    return {
        name: "".join("1" if x else "0" for x in r.scores)
        for name, r in results.items()
        if r.metric in VERDICT_METRICS
    }


def loglikelihoods(results: dict[str, TaskResult]) -> dict[str, list[float]]:
    """Per task scored by log-likelihood, the gold answer's log-likelihood on each example."""
    return {
        n: [round(x, 4) for x in r.extra["loglikelihood"]]
        for n, r in results.items()
        if "loglikelihood" in r.extra
    }


def split_fingerprint(task: Task, lm_eval_split: dict | None = None) -> str:
    """A hash of a task's search examples in order: a native task's as the model sees them, an
    lm-eval task's by its recorded document split (`LMEvalTask.record`)."""
    if task.lm_eval is not None:
        rows = [lm_eval_split[k] for k in ("lm_eval_task", "documents", "split_seed", "search")]
    else:
        rows = [[ex.prompt, ex.messages, ex.target, ex.choices, ex.label] for ex in task.examples("search")]
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class VerdictMatrix:
    """One task's verdicts: rows are candidates ((study, trial number)), columns the search
    examples by position; 1, 0, or NaN where the candidate was not scored on that example."""

    task: str
    rows: list[tuple[str, int]]
    values: np.ndarray  # float64 [rows, examples]

    @property
    def scored(self) -> np.ndarray:
        """How many candidates were scored on each example."""
        return (~np.isnan(self.values)).sum(0)

    def complete_rows(self) -> np.ndarray:
        """The rows scored on every example (whole-split candidates)."""
        return ~np.isnan(self.values).any(1)


def matrix(studies: list[optuna.Study], task: str) -> VerdictMatrix:
    """The verdicts of every finished trial (complete or stopped early) of these studies on `task`."""
    rows, strings = [], []
    for s in studies:
        states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        for t in records(s, states):
            v = t.verdicts.get(task)
            if v:
                rows.append((s.study_name, t.number))
                strings.append(v)
    width = max((len(v) for v in strings), default=0)
    values = np.full((len(strings), width), np.nan)
    for i, v in enumerate(strings):
        values[i, : len(v)] = as_array(v)
    return VerdictMatrix(task, rows, values)


def comparable_rows(
    study: optuna.Study, fingerprints: dict[str, str], folders: set[str]
) -> list[tuple[str, dict[str, str]]]:
    """("STUDY:N", verdicts) of every finished trial of the other studies in this study's storage
    whose search examples (every task's) and model folders are this one's."""
    storage = study._storage
    out = []
    for summary in optuna.get_all_study_summaries(storage, include_best_trial=False):
        if summary.study_name == study.study_name:
            continue
        other = optuna.load_study(study_name=summary.study_name, storage=storage)
        if all(comparable(other, t, f, folders) for t, f in fingerprints.items()):
            states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
            out += [
                (f"{other.study_name}:{t.number}", t.verdicts) for t in records(other, states) if t.verdicts
            ]
    return out


def comparable(study: optuna.Study, task: str, fingerprint: str, folders: set[str]) -> bool:
    """Whether a study's verdicts on `task` were taken on the same search examples and merged
    from the same model folders."""
    attrs = study.user_attrs
    return (
        attrs.get(StudyAttr.SEARCH_SPLITS, {}).get(task) == fingerprint
        and set(attrs.get(StudyAttr.MODEL_FOLDERS, {}).values()) == folders
    )


def shared_matrix(storage, task: str, fingerprint: str, folders: set[str]) -> VerdictMatrix:
    """Every comparable study's verdicts on `task` in this storage (an Optuna storage object or
    URL): what a new study on the same tasks and models starts from."""
    names = [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]
    studies = [optuna.load_study(study_name=n, storage=storage) for n in names]
    return matrix([s for s in studies if comparable(s, task, fingerprint, folders)], task)
