"""A study as tables: every trial as a row (keyed by trial number), the front, the best trial,
and what the search cost."""

from __future__ import annotations

from typing import Any

import numpy as np
import optuna
import pandas as pd

from ..errors import MergeSearchError
from ..search import open_storage
from ..search.objective import dominates
from ..search.screening import spearman
from ..search.trials import (
    ANCHOR_FITNESS,
    CONFIRMED_FITNESS,
    REFERENCE_FITNESS,
    SCREENED_FITNESS,
    StudyAttr,
    TrialRecord,
    records,
)

State = optuna.trial.TrialState


def load(study: str, storage: str | None = None) -> optuna.Study:
    try:
        return optuna.load_study(study_name=study, storage=open_storage(storage, study, create=False))
    except KeyError as e:
        raise MergeSearchError(f"study {study!r} is not in that storage") from e


def objective_names(s: optuna.Study) -> list[str]:
    return s.user_attrs.get(StudyAttr.OBJECTIVE_NAMES, [f"objective {i}" for i in range(len(s.directions))])


def trials_frame(s: optuna.Study) -> pd.DataFrame:
    names = objective_names(s)
    rows = []
    for t in records(s):
        row: dict[str, Any] = {"trial": t.number, "state": t.state.name, "baseline": t.baseline or ""}
        for i, n in enumerate(names):
            row[n] = t.values[i] if t.values else np.nan
        for task, v in t.scores.items():
            row[f"search:{task}"] = v
        row["examples_per_task"] = t.fidelity if t.fidelity is not None else np.nan
        row["examples"] = sum(t.examples.values()) or np.nan
        if t.fitness is not None:  # anchor studies: "reference" (whole split) or "anchors"
            row["fitness"] = t.fitness
        row["stopped_at"] = t.stopped_at if t.stopped_at is not None else np.nan
        row["merge_s"] = t.merge_seconds if t.merge_seconds is not None else np.nan
        row["eval_s"] = t.eval_seconds if t.eval_seconds is not None else np.nan
        if t.feasible is not None:
            row["feasible"] = t.feasible
        row.update({f"param:{k}": v for k, v in t.params.items()})
        rows.append(row)
    return pd.DataFrame(rows)


def front(s: optuna.Study) -> list[TrialRecord]:
    """The Pareto front's feasible trials (several objectives), or the best trial, by number.
    In a screen-then-confirm study only confirmed trials count: a screened value is an estimate."""
    done = records(s, (State.COMPLETE,))
    if any(t.fitness == SCREENED_FITNESS for t in done):
        pool = [t for t in done if t.fitness != SCREENED_FITNESS and t.feasible is not False]
        if len(s.directions) == 1:
            sign = 1 if s.direction == optuna.study.StudyDirection.MAXIMIZE else -1
            trials = [max(pool, key=lambda t: (sign * t.values[0], -t.number))] if pool else []
        else:
            dirs = [
                "maximize" if d == optuna.study.StudyDirection.MAXIMIZE else "minimize" for d in s.directions
            ]
            trials = [
                t for t in pool if not any(dominates(list(o.values), list(t.values), dirs) for o in pool)
            ]
    elif len(s.directions) > 1:
        trials = [r for r in map(TrialRecord.of, s.best_trials) if r.feasible is not False]
    elif done:
        trials = [TrialRecord.of(s.best_trial)]
    else:
        trials = []
    return sorted(trials, key=lambda t: t.number)


def best_trial(s: optuna.Study) -> TrialRecord:
    f = front(s)
    if not f:
        raise MergeSearchError(no_best(s))
    return max(f, key=lambda t: t.mean)


def no_best(s: optuna.Study) -> str:
    """Why a study has no best trial: nothing finished, or (screening) nothing confirmed."""
    refs = sorted(
        {r for t in records(s, (State.COMPLETE,)) if t.screen for r in t.screen["reference"].values()}
    )
    if refs:
        return (
            f"study {s.study_name!r} has no confirmed trial: its candidates were screened against "
            f"{', '.join(refs)} (confirmed in another study on this storage) and none beat it; that "
            "trial stays the best: report its study, or run more trials here"
        )
    return f"study {s.study_name!r} has no completed trial yet; run more trials"


def cost(s: optuna.Study, df: pd.DataFrame) -> dict[str, Any]:
    """What the search spent: per-trial merge and eval seconds, examples scored, trials per hour
    (from the trials' own start and end times, so several workers count together)."""
    done = df[df["state"].isin(["COMPLETE", "PRUNED"])]
    finished = [t for t in records(s) if t.datetime_start and t.datetime_complete]
    hours = (
        (max(t.datetime_complete for t in finished) - min(t.datetime_start for t in finished)).total_seconds()
        / 3600
        if finished
        else float("nan")
    )
    out = {
        "trials": len(done),
        "merge_s_median": float(done["merge_s"].median()),
        "eval_s_median": float(done["eval_s"].median()),
        "examples_total": int(done["examples"].fillna(0).sum()),
        "examples_per_trial_mean": float(done["examples"].mean()),
        "wall_hours": hours,
        "trials_per_hour": len(finished) / hours if hours > 0 else float("nan"),
    }
    if "fitness" in done and (done["fitness"] == SCREENED_FITNESS).any():
        out["screening"] = screening_summary(records(s, (State.COMPLETE, State.PRUNED)))
    elif "fitness" in done:
        ref = done[done["fitness"] == REFERENCE_FITNESS]
        anchors = s.user_attrs.get(StudyAttr.ANCHORS)
        out["anchors"] = {
            "reference_trials": len(ref),
            "reference_examples": int(ref["examples"].sum()),
            "anchor_trials": int((done["fitness"] == ANCHOR_FITNESS).sum()),
            "per_task": anchors and {k: len(v["indices"]) for k, v in anchors.items()},
        }
    return out


def screening_summary(trials: list[TrialRecord]) -> dict[str, Any]:
    """What screening spent and how well it ranked: candidates screened and confirmed, examples at
    each, and Spearman's rank correlation between the screen's estimate and the confirmed score
    of the candidates that have both (those the screen sent to confirmation)."""
    confirmed = [t for t in trials if t.fitness == CONFIRMED_FITNESS]
    screened = [t for t in trials if t.screen]
    pairs = [(t.screen["value"], t.mean) for t in confirmed if t.screen]
    # sent on by the screen, confirmed or stopped on the way: the screen's estimate against the
    # value on more examples (the whole split, or the race's refined estimate)
    raced = [
        (t.screen["value"], t.mean)
        for t in screened
        if sum(t.examples.values()) > sum(t.screen["examples"].values())
    ]
    return {
        "screened": len(screened),
        "confirmed": len(confirmed),
        "confirmed_after_screen": len(pairs),
        "screen_examples_per_trial": float(np.mean([sum(t.screen["examples"].values()) for t in screened]))
        if screened
        else float("nan"),
        "examples_screened_only": int(
            sum(sum(t.examples.values()) for t in trials if t.fitness == SCREENED_FITNESS)
        ),
        "examples_confirmed": int(sum(sum(t.examples.values()) for t in confirmed)),
        "rank_correlation": spearman([p[0] for p in pairs], [p[1] for p in pairs]),
        "raced": len(raced),
        "rank_correlation_raced": spearman([p[0] for p in raced], [p[1] for p in raced]),
    }
