"""Screen, then confirm (search/screening.py): the screen's draw and estimator, and studies that
spend examples that way: confirmed incumbents, screened estimates told to the sampler, the verdict
matrix read again by a resume, a second worker and a new study, and an lm-eval task's documents."""

from __future__ import annotations

import numpy as np
import optuna
import pytest
import yaml

from mergesearch.search import load_space
from mergesearch.search import screening as sc
from mergesearch.search.trials import CONFIRMED_FITNESS, SCREENED_FITNESS, records
from tests.conftest import bench, report, search, write_space

State = optuna.trial.TrialState


def _population(seed: int, rows: int = 12, n: int = 80):
    rng = np.random.default_rng(seed)
    p = rng.uniform(0.02, 0.98, n) ** 0.5  # mostly easy examples, some hard
    values = (rng.uniform(size=(rows, n)) < p).astype(float)
    return values, rng


def test_inclusion_probabilities_sum_to_the_screen_and_follow_disagreement():
    values, rng = _population(0)
    rates = sc.example_rates(values)
    ref = values[0]
    for m in (1, 8, 30, 80, 200):
        pi = sc.inclusion_probabilities(rates, ref, m)
        assert pi.sum() == pytest.approx(min(m, len(rates))) and (pi <= 1 + 1e-12).all() and (pi > 0).all()
    pi = sc.inclusion_probabilities(rates, ref, 8)
    q = np.sqrt(np.where(ref > 0.5, 1 - rates, rates))
    # below the cap, π follows sqrt(P(differ)) half and half with uniform: most where candidates
    # disagree, and never under half the uniform rate
    free = pi < 1
    ratio = pi[free] / (sc.DEFENSIVE + (1 - sc.DEFENSIVE) * q[free] / q.mean())
    assert ratio.max() == pytest.approx(ratio.min())
    assert pi.min() >= sc.DEFENSIVE * 8 / len(pi) - 1e-12


def test_systematic_draw_has_the_inclusion_probabilities():
    values, _ = _population(1)
    pi = sc.inclusion_probabilities(sc.example_rates(values), values[3], 10)
    hits = np.zeros(len(pi))
    draws = 20000
    for s in range(draws):
        picked = sc.draw(pi, s)
        assert len(picked) == 10 and len(set(picked)) == 10 and picked == sorted(picked)
        hits[picked] += 1
    se = np.sqrt(pi * (1 - pi) / draws) + 1e-9
    assert (np.abs(hits / draws - pi) < 5 * se + 1e-3).all()


def test_the_paired_estimate_is_unbiased_and_exact_once_everything_is_scored():
    values, rng = _population(2)
    ref, cand = values[0], values[5]
    truth, ref_score = cand.mean(), ref.mean()
    pi = sc.inclusion_probabilities(sc.example_rates(values), ref, 8)
    ests = []
    for s in range(4000):
        screen = sc.draw(pi, s)
        ests.append(sc.estimate({j: cand[j] for j in screen}, ref, ref_score, screen, pi).value)
    # unbiased up to the clip at [0, 1] (the scores here are far from both ends)
    assert np.mean(ests) == pytest.approx(truth, abs=4 * np.std(ests) / np.sqrt(len(ests)))
    # chunks drawn from the rest: unbiased too, and exact with standard error 0 when they cover it
    screen = sc.draw(pi, 7)
    rest = [j for j in range(len(ref)) if j not in screen]
    whole = sc.estimate({j: cand[j] for j in range(len(ref))}, ref, ref_score, screen, pi, rest)
    assert whole.value == pytest.approx(truth, abs=1e-12) and whole.se == 0
    part = []
    for s in range(2000):
        chunk = np.random.default_rng(s).permutation(rest)[:20].tolist()
        part.append(
            sc.estimate({j: cand[j] for j in screen + chunk}, ref, ref_score, screen, pi, chunk).value
        )
    assert np.mean(part) == pytest.approx(truth, abs=4 * np.std(part) / np.sqrt(len(part)))


def test_verdict_strings_round_trip_and_spearman():
    s = sc.verdict_string(5, {0: 1.0, 3: 0.0})
    assert s == "1..0."
    got = sc.as_array(s)
    assert got[0] == 1 and got[3] == 0 and np.isnan(got[[1, 2, 4]]).all()
    assert sc.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert sc.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert sc.spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert np.isnan(sc.spearman([1, 2], [1, 2]))


def test_screening_is_the_default_and_refuses_to_mix_with_other_ways(tmp_path):
    from mergesearch.errors import MergeSearchError

    base = {k: v for k, v in yaml.safe_load(write_space(tmp_path).read_text()).items() if k != "fidelity"}
    p = tmp_path / "d.yaml"
    p.write_text(yaml.safe_dump(base))
    assert load_space(p).screening == {"examples": sc.SCREEN_EXAMPLES, "confirm_sigmas": sc.CONFIRM_SIGMAS}
    assert load_space(p).whole is None
    p.write_text(yaml.safe_dump(dict(base, fidelity=[20, 60])))
    assert load_space(p).screening is None  # rungs, as written
    p.write_text(yaml.safe_dump(dict(base, screening=False)))
    assert load_space(p).screening is None and load_space(p).fidelity == [50, 200]
    p.write_text(yaml.safe_dump(dict(base, screening={"examples": 3}, fidelity=[40])))
    assert load_space(p).screening == {"examples": 3, "confirm_sigmas": 0.0} and load_space(p).whole == 40
    for bad in ({"examples": 0}, {"exampels": 3}, "sometimes"):
        p.write_text(yaml.safe_dump(dict(base, screening=bad)))
        with pytest.raises(MergeSearchError, match="screening"):
            load_space(p)
    p.write_text(yaml.safe_dump(dict(base, screening=True, fidelity=[20, 60])))
    with pytest.raises(MergeSearchError, match="one"):
        load_space(p)


MEAN_SPACE = {
    "name": "scr",
    "method": "task_arithmetic",
    "parameters": {"weight": [0.0, 1.5]},
    "components": ["attention", "mlp"],
    "objective": "mean",
    "fidelity": [60],
    "screening": {"examples": 6},
    "trials": 14,
}


@pytest.mark.e2e
def test_a_screened_study_reports_only_confirmed_scores(zoo, tmp_path, results):
    db = f"sqlite:///{tmp_path / 'scr.db'}"
    space = load_space(write_space(tmp_path, **MEAN_SPACE))
    s = search(space, study="scr", storage=db, progress=False)
    done = sorted(records(s, (State.COMPLETE,)), key=lambda t: t.number)
    assert len(done) == 14 and done[0].fitness == CONFIRMED_FITNESS  # nothing to pair with yet
    screened = [t for t in done if t.fitness == SCREENED_FITNESS]
    assert len(screened) >= 8
    incumbent = -np.inf
    for t in done:
        for task, v in t.verdicts.items():
            assert len(v) == 60 and (len(v) - v.count(".")) == t.examples[task]
            # the gold answer's log-likelihood beside each verdict (teacher-forced exact match)
            lls = t.loglikelihoods[task]
            assert [x is not None for x in lls] == [c != "." for c in v]
            assert all(x <= 0 for x in lls if x is not None)
        if t.fitness == CONFIRMED_FITNESS:  # every example scored: the value is exact
            assert all(t.examples[k] == 60 for k in t.examples)
            for task, v in t.verdicts.items():
                assert np.mean([c == "1" for c in v]) == pytest.approx(t.scores[task], abs=1e-12)
            if t.screen:  # sent to confirmation because its screen beat the incumbent
                assert t.screen["value"] > incumbent
            incumbent = max(incumbent, t.values[0])
        else:  # told the estimate, which never beats a confirmed incumbent
            assert t.screen["examples"] == {"add": 6, "reverse": 6}
            assert t.values[0] == pytest.approx(np.mean(list(t.scores.values())))
            assert t.values[0] <= incumbent + 1e-12
            assert set(t.screen["reference"].values()) <= {f"trial {c.number}" for c in done}
    best_confirmed = max((t for t in done if t.fitness == CONFIRMED_FITNESS), key=lambda t: t.values[0])
    assert s.best_trial.user_attrs["fitness"] == CONFIRMED_FITNESS
    spent = sum(sum(t.examples.values()) for t in done)
    assert spent < 0.5 * 14 * 120  # far fewer than scoring every candidate on the whole split

    summary = report("scr", storage=db, bench=bench(space))
    assert summary["best_trial"] == best_confirmed.number
    scr = summary["cost"]["screening"]
    assert scr["screened"] == len([t for t in done if t.screen]) and scr["confirmed"] >= 1
    assert scr["examples_screened_only"] + scr["examples_confirmed"] == spent
    text = (results / "scr" / "report.md").read_text()
    assert "rank correlation" in text and f"{scr['confirmed']} confirmed" in text

    # the verdict matrix survives: a resume and a second worker screen against the same incumbents
    search(space, study="scr", storage=db, progress=False, trials=16, set_budget=True)
    search(space, study="scr", storage=db, progress=False, trials=18, worker=True)
    later = [t for t in records(s, (State.COMPLETE,)) if t.number >= 14]
    assert len(later) == 4 and any(t.fitness == SCREENED_FITNESS for t in later)
    assert all(t.fitness == CONFIRMED_FITNESS or t.screen["reference"] for t in later)

    # a new study on the same storage, tasks and models starts from those rows: its very first
    # candidate is screened against the other study's best, not scored on the whole split
    other = search(load_space(write_space(tmp_path, **dict(MEAN_SPACE, name="scr2", trials=3))),
                   study="scr2", storage=db, progress=False)  # fmt: skip
    first = min(records(other, (State.COMPLETE,)), key=lambda t: t.number)
    assert first.screen["examples"] == {"add": 6, "reverse": 6} and sum(first.examples.values()) < 120
    assert all(r.startswith("scr:") for r in first.screen["reference"].values())


@pytest.mark.e2e
def test_an_lm_eval_task_is_screened_by_lm_evals_own_documents(zoo, tmp_path, results):
    """Screening with an lm-eval task as the fitness: the screened documents' verdicts are those
    lm-eval gives the same documents when it scores the whole search split."""
    from mergesearch.recipe import parse_recipes
    from tests.test_generation import _add_lm_eval_task, lm_eval_space

    task = _add_lm_eval_task(tmp_path, 24)
    space = lm_eval_space(zoo, task, name="lmscr", screening={"examples": 4})
    (tmp_path / "lmscr.yaml").write_text(yaml.safe_dump(space))
    sp = load_space(tmp_path / "lmscr.yaml")
    s = search(sp, study="lmscr", storage=f"sqlite:///{tmp_path / 'l.db'}", progress=False)
    done = records(s, (State.COMPLETE,))
    screened = [t for t in done if t.fitness == SCREENED_FITNESS]
    assert screened and all(t.examples["add_lm"] == 4 for t in screened)
    b = bench(sp)
    for t in screened[:2]:
        b.merge(parse_recipes(t.recipe))
        whole = b.evaluator.evaluate(b.tasks[0], "search")
        assert whole.n == 12
        v = t.verdicts["add_lm"]
        for j, c in enumerate(v):
            if c != ".":
                assert float(c == "1") == whole.scores[j]


def test_confirmation_chunks_double_and_cover_the_rest_once():
    rest = list(range(100, 212))
    parts = sc.chunks(rest, 8)
    assert [len(p) for p in parts] == [8, 16, 32, 56]
    assert sum(parts, []) == rest
    assert sc.chunks([], 8) == []


def test_population_sets_the_samplers_generation(tmp_path):
    from mergesearch.errors import MergeSearchError
    from mergesearch.search.samplers import make_sampler

    p = write_space(tmp_path, method="task_arithmetic", parameters={"weight": [0, 1]}, population=28)
    space = load_space(p)
    assert space.population == 28
    assert make_sampler(space, "cmaes", 0, False, 100)._popsize == 28
    assert make_sampler(space, "nsga2", 0, True, 100)._population_size == 28
    base = load_space(write_space(tmp_path, method="task_arithmetic", parameters={"weight": [0, 1]}))
    assert make_sampler(base, "cmaes", 0, False, 100)._popsize is None  # CMA-ES's own default
    assert base.fingerprint() != space.fingerprint()
    with pytest.raises(MergeSearchError, match="population"):
        load_space(write_space(tmp_path, population=1))
