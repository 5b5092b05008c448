"""Convergence (search/convergence.py): no gain of the best whole-split score beyond its noise in
`patience` finished trials; a study with a patience stops there, and goes on with patience 0."""

from __future__ import annotations

import math

import optuna
import pytest

from mergesearch.errors import MergeSearchError
from mergesearch.search import load_space
from mergesearch.search.convergence import convergence, noise
from mergesearch.search.trials import CONFIRMED_FITNESS, SCREENED_FITNESS, TrialRecord, records
from tests.conftest import search, write_space

State = optuna.trial.TrialState


def _t(number: int, value: float, fitness=None, state=State.COMPLETE, n: int = 100) -> TrialRecord:
    return TrialRecord(
        number, state, (value,), {}, None, None, scores={"a": value, "b": value}, examples={"a": n, "b": n},
        fitness=fitness,
    )  # fmt: skip


def test_noise_is_the_standard_error_of_the_whole_split_mean():
    t = _t(0, 0.9, n=100)
    assert noise(t) == pytest.approx(math.sqrt(2 * 0.09 / 100) / 2)
    assert noise(t, {"a": 3, "b": 1}) == pytest.approx(math.sqrt(10 * 0.09 / 100) / 4)


def test_only_gains_beyond_the_noise_reset_the_count():
    d = noise(_t(0, 0.8))  # ≈ 0.028
    trials = [_t(0, 0.80), _t(1, 0.7), _t(2, 0.80 + d / 2), _t(3, 0.6), _t(4, 0.99, SCREENED_FITNESS)]
    c = convergence(trials, patience=4)
    assert c.best_trial == 0 and c.since == 4 and c.converged  # a gain within the noise, an estimate
    assert c.best == pytest.approx(0.80 + d / 2)
    trials.append(_t(5, 0.9, CONFIRMED_FITNESS))
    c = convergence(trials, patience=4)
    assert c.best_trial == 5 and c.since == 0 and not c.converged
    assert c.gain_recent == pytest.approx(0.9 - 0.80) and "not converged" in c.line()  # trials 2-5
    trials += [_t(6 + i, 0.5, state=State.PRUNED) for i in range(4)]  # stopped early: trials all the same
    c = convergence(trials, patience=4)
    assert c.converged and c.since == 4 and c.gain_recent == 0 and c.line().startswith("converged")
    assert not convergence(trials, patience=0).converged  # no patience: never "converged"
    assert convergence([], patience=4).best_trial is None


@pytest.mark.e2e
def test_a_study_stops_when_converged_and_goes_on_with_patience_0(zoo, tmp_path, results, capsys):
    db = f"sqlite:///{tmp_path / 'c.db'}"
    space = load_space(write_space(tmp_path, name="conv", method="task_arithmetic", parameters={"weight": [0, 1.5]},
                                   objective="mean", fidelity=[40], screening=False, trials=200, patience=6))  # fmt: skip
    s = search(space, study="conv", storage=db, progress=False)
    done = [t for t in records(s) if t.state.is_finished()]
    c = convergence(done, 6, None)
    assert c.converged and len(done) < 200 and len(done) == c.best_trial + 1 + 6
    # a resume of a converged study runs nothing; patience 0 runs it on
    search(space, study="conv", storage=db, progress=False)
    assert len(records(s)) == len(done)
    search(space, study="conv", storage=db, progress=False, patience=0, trials=len(done) + 3, set_budget=True)
    assert len([t for t in records(s) if t.state.is_finished()]) == len(done) + 3


def test_patience_is_read_in_trials_or_generations():
    from mergesearch.errors import MergeSearchError
    from mergesearch.search.convergence import Patience

    assert Patience.parse(30, "s") == Patience(30, "trials")
    assert Patience.parse("5 generations", "s") == Patience.parse("5g", "s") == Patience(5, "generations")
    assert Patience(5, "generations").trials(13) == 65 and Patience(30).trials(None) == 30
    for bad in ("-1", "five", "5 days", True):
        with pytest.raises(MergeSearchError, match="patience"):
            Patience.parse(bad, "s")
    with pytest.raises(MergeSearchError, match="works in no generations"):
        Patience(5, "generations").trials(None, "tpe")


@pytest.mark.e2e
def test_a_patience_in_generations_counts_the_samplers_population(zoo, tmp_path, results):
    """8 coefficients: CMA-ES's population is 4 + ⌊3 ln 8⌋ = 10, so 2 generations are 20 trials."""
    db = f"sqlite:///{tmp_path / 'g.db'}"
    space = load_space(write_space(tmp_path, name="gen", method="task_arithmetic", parameters={"weight": [0, 1.5]},
                                   objective="mean", fidelity=[40], screening=False, trials=300,
                                   patience="2 generations"))  # fmt: skip
    s = search(space, study="gen", storage=db, progress=False)
    assert s.user_attrs["patience"] == {"trials": 20, "rule": "2 generations of 10 trials"}
    done = [t for t in records(s) if t.state.is_finished()]
    c = convergence(done, 20, None)
    assert c.converged and len(done) < 300 and len(done) == c.best_trial + 1 + 20
    # a sampler without generations refuses the rule before a study exists
    with pytest.raises(MergeSearchError, match="works in no generations"):
        search(space, study="gen_tpe", storage=db, progress=False, sampler="tpe")
    assert "gen_tpe" not in optuna.get_all_study_names(db)
