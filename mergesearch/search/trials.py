"""The trial record: what a study stores for each trial and for itself, named once.

The objective writes a trial's fields with `write(trial, field=value, ...)`; the report, the CLI,
export and the dashboard read them as a typed `TrialRecord` (`records(study)`), never by string key.
A field's name is its key in the storage (Optuna user attributes), so a study written by an earlier
version reads the same. Rows of every table are keyed by `TrialRecord.number`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
import optuna

State = optuna.trial.TrialState

# What a trial is, in its `kind` field (and on its dashboard page).
SEARCHED = "searched"
GRADIENT_KIND = "gradient-learned (warm start)"
GRADIENT = "gradient"  # the warm_start field of a gradient-learned trial
ELITE_KIND = "previous round's best elite (warm start)"
ELITE = "elite"  # the warm_start field of a round's first trial (rounds.py)
REFERENCE_FITNESS, ANCHOR_FITNESS = "reference", "anchors"  # few-example fitness (anchors.py)
# screen-then-confirm (screening.py): scored on the whole search split, or estimated from a screen
CONFIRMED_FITNESS, SCREENED_FITNESS = "confirmed", "screened"


def known_kind(baseline: str) -> str:
    return f"known recipe: {baseline}"


@dataclass(frozen=True)
class TrialRecord:
    """One trial as the study stores it. Optuna's own fields first, then what mergesearch writes."""

    number: int
    state: State
    values: tuple[float, ...] | None
    params: dict[str, Any]
    datetime_start: datetime | None
    datetime_complete: datetime | None
    # -- written by mergesearch (storage key = field name) ------------------------------------
    recipe: str | None = None  # the recipe YAML the study merged (unrounded)
    kind: str = ""  # "searched", "known recipe: NAME" or "gradient-learned (warm start)"
    baseline: str | None = None  # the known recipe's name, for an enqueued known recipe
    warm_start: str | None = None  # "gradient" for the gradient-learned warm start
    gradient_steps: int | None = None
    gradient_seconds: float | None = None
    worker: str | None = None  # "host:pid" of the process that ran it
    placement: str | None = None  # where that process held the inputs (candidates/placement.py)
    sampler_seed: int | None = None
    weight_sum: float | None = None  # constraints.weight_sum_max: Σ of the mean weights
    feasible: bool | None = None
    merge_seconds: float | None = None
    eval_seconds: float | None = None
    scores: dict[str, float] = field(default_factory=dict)  # per task, on the search split
    examples: dict[str, int] = field(default_factory=dict)  # per task, examples scored
    fidelity: int | None = None  # examples per task at the last rung reached
    stopped_at: int | None = None  # the rung a stopped-early trial ended at
    # how the scores were obtained: "reference"/"anchors" (anchor studies), "confirmed"/"screened"
    # (screen-then-confirm studies); None for fidelity rungs
    fitness: str | None = None
    # per task, "01.1…": the verdict on each search example, by its position in the split's fixed
    # shuffle; '.' where not scored (a prefix at a lower rung). `search/verdicts.py`
    verdicts: dict[str, str] = field(default_factory=dict)
    # per task, the gold answer's log-likelihood on each example (None where not scored), for
    # tasks scored by log-likelihood (multiple choice, teacher-forced exact match)
    loglikelihoods: dict[str, list] = field(default_factory=dict)
    # screen-then-confirm: the screen's per-task estimates and standard errors, the objective's
    # estimate (`value`), examples per task, and the reference each task was paired with
    screen: dict[str, Any] = field(default_factory=dict)
    unextracted: dict[str, int] = field(default_factory=dict)  # outputs with no extracted answer
    error: str | None = None  # a failed trial's message

    @classmethod
    def of(cls, t: optuna.trial.FrozenTrial) -> TrialRecord:
        a = t.user_attrs
        stored = {f.name: a[f.name] for f in _STORED if f.name in a}
        return cls(
            number=t.number,
            state=t.state,
            values=tuple(t.values) if t.values else None,
            params=dict(t.params),
            datetime_start=t.datetime_start,
            datetime_complete=t.datetime_complete,
            **stored,
        )

    @property
    def complete(self) -> bool:
        return self.state == State.COMPLETE

    @property
    def mean(self) -> float:
        """The mean of the objective values (one per task on a Pareto study)."""
        return float(np.mean(self.values)) if self.values else float("nan")

    @property
    def is_gradient(self) -> bool:
        return self.warm_start == GRADIENT

    @property
    def anchor_estimate(self) -> bool:
        return self.fitness == ANCHOR_FITNESS

    @property
    def estimated(self) -> bool:
        """Whether its values are an estimate from a few examples, not whole-split scores."""
        return self.fitness in (ANCHOR_FITNESS, SCREENED_FITNESS)


_OPTUNA = {"number", "state", "values", "params", "datetime_start", "datetime_complete"}
_STORED = tuple(f for f in dataclasses.fields(TrialRecord) if f.name not in _OPTUNA)
FIELDS = frozenset(f.name for f in _STORED)


def write(trial: optuna.Trial | optuna.trial.FrozenTrial, **fields: Any) -> None:
    """Store fields of the trial's record (names as in TrialRecord; anything else is a bug)."""
    for name, value in fields.items():
        if name not in FIELDS:
            raise KeyError(f"{name!r} is not a field of the trial record")
        trial.set_user_attr(name, value)


def stored(t: optuna.Trial | optuna.trial.FrozenTrial, name: str, default: Any = None) -> Any:
    """One field of a trial, without building its whole record (a running trial, per-trial loops)."""
    if name not in FIELDS:
        raise KeyError(f"{name!r} is not a field of the trial record")
    return t.user_attrs.get(name, default)


def enqueued(**fields: Any) -> dict[str, Any]:
    """Fields given to a trial before it runs (`study.enqueue_trial(..., user_attrs=...)`)."""
    unknown = set(fields) - FIELDS
    if unknown:
        raise KeyError(f"{sorted(unknown)[0]!r} is not a field of the trial record")
    return fields


def records(study: optuna.Study, states: tuple[State, ...] | None = None) -> list[TrialRecord]:
    return [TrialRecord.of(t) for t in study.get_trials(deepcopy=False, states=states)]


def record(study: optuna.Study, number: int) -> TrialRecord | None:
    found = [t for t in study.get_trials(deepcopy=False) if t.number == number]
    return TrialRecord.of(found[0]) if found else None


class StudyAttr:
    """The study's own stored fields (Optuna study user attributes), named once."""

    SPACE = "space"  # {"raw": the space's YAML as a mapping, "path": where it was read}
    FINGERPRINT = "space_fingerprint"
    OBJECTIVE_NAMES = "objective_names"
    MERGE_SEED = "merge_seed"
    BUDGET = "trials"  # the study's budget of finished trials
    TASK_SPLITS = "task_splits"  # lm-eval tasks' document splits
    ANCHORS = "anchors"  # {task: {indices, weights}}
    ANCHOR_REFERENCE_TRIALS = "anchor_reference_trials"
    BASELINES_ENQUEUED = "baselines_enqueued"
    SEARCH_SPLITS = "search_splits"  # {task: fingerprint of its search examples}: whose verdicts compare
    PATIENCE = "patience"  # {"trials": the last run's patience in finished trials, "rule": as stated}
    MODEL_FOLDERS = "model_folders"  # {reference as the space names it: the folder it resolved to}
