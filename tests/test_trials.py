"""The typed trial record: what the objective writes is what every reader gets, through real storage."""

from __future__ import annotations

import optuna
import pytest

from mergesearch.search.trials import FIELDS, TrialRecord, enqueued, record, records, stored, write


def test_written_fields_read_back_typed_from_sqlite(tmp_path):
    s = optuna.create_study(storage=f"sqlite:///{tmp_path / 'study.db'}", directions=["maximize"] * 2)
    s.enqueue_trial({}, user_attrs=enqueued(baseline="ties d=0.5 w=0.5"))
    t = s.ask()
    write(t, recipe="merge_method: ties\n", scores={"add": 0.5, "reverse": 0.25}, examples={"add": 20})
    write(t, merge_seconds=0.1, fidelity=20, kind="known recipe: ties d=0.5 w=0.5")
    s.tell(t, [0.5, 0.25])
    s.tell(s.ask(), state=optuna.trial.TrialState.PRUNED)
    (first, second) = records(s)
    assert first.number == 0 and first.complete and first.values == (0.5, 0.25) and first.mean == 0.375
    assert first.baseline == "ties d=0.5 w=0.5" and first.scores == {"add": 0.5, "reverse": 0.25}
    assert first.merge_seconds == 0.1 and first.fidelity == 20 and not first.is_gradient
    assert second.state == optuna.trial.TrialState.PRUNED and second.scores == {} and second.recipe is None
    assert record(s, 1) == second and record(s, 7) is None
    frozen = s.trials[0]
    assert stored(frozen, "baseline") == "ties d=0.5 w=0.5" and TrialRecord.of(frozen) == first
    # the storage keys are the field names: a study written before the record reads the same
    assert set(frozen.user_attrs) <= FIELDS


def test_a_field_that_is_not_in_the_record_is_refused(tmp_path):
    s = optuna.create_study(storage=f"sqlite:///{tmp_path / 'study.db'}")
    t = s.ask()
    with pytest.raises(KeyError, match="'score' is not a field"):
        write(t, score=1.0)  # a typo would otherwise be a new, unread key
    with pytest.raises(KeyError, match="'warmstart' is not a field"):
        enqueued(warmstart="gradient")
    with pytest.raises(KeyError):
        stored(s.trials[0], "merge_s")
