"""The optimizer behind a study: the space's sampler, and a wrapper that keeps processes sharing
a study from running one another's candidates again."""

from __future__ import annotations

import hashlib
import math
import os
import socket
import warnings
from typing import Any

import optuna

from ..errors import MergeSearchError
from .known_recipes import BASELINES
from .space import SearchSpace
from .trials import SCREENED_FITNESS, TrialRecord, stored

SAMPLERS = ("auto", "cmaes", "nsga2", "tpe", "gp", "random")
CENTRES = ("middle", "best")


def cmaes_cannot_search(space: SearchSpace) -> str | None:
    """Why CMA-ES cannot search this space, or None: it samples real vectors, not a choice among
    methods or merge orders (a categorical)."""
    if not space.categorical:
        return None
    return f"sampler cmaes cannot choose among {'methods' if len(space.methods) > 1 else 'merge orders'} (a categorical)"


def resolved(space: SearchSpace, name: str, multi: bool) -> str:
    """The sampler `auto` stands for: CMA-ES for one objective over numbers, TPE with a
    categorical, NSGA-II for several objectives."""
    if name == "auto":
        return "nsga2" if multi else ("tpe" if space.categorical else "cmaes")
    return name


def generation_size(space: SearchSpace, name: str, multi: bool, dims: int, trials: int) -> int | None:
    """Trials per generation of a population sampler (CMA-ES's popsize, 4 + ⌊3 ln d⌋ for d
    coefficients unless the space sets `population`; NSGA-II's population), None for the others."""
    name = resolved(space, name, multi)
    if name == "cmaes":
        return space.population or 4 + math.floor(3 * math.log(max(dims, 1)))
    if name == "nsga2":
        return space.population or max(8, min(50, trials // 8))
    return None


def make_sampler(
    space: SearchSpace, name: str, seed: int, multi: bool, trials: int
) -> optuna.samplers.BaseSampler:
    name = resolved(space, name, multi)
    if name != "cmaes" and (space.centre != "middle" or space.trust is not None):
        raise MergeSearchError(
            f"the space's centre/trust set where CMA-ES starts, and sampler {name} would ignore them; "
            "use --sampler cmaes, or drop centre and trust from the space"
        )
    if name == "cmaes":
        if multi:
            raise MergeSearchError(
                "sampler cmaes optimizes one objective; use objective: mean, or --sampler nsga2"
            )
        why = cmaes_cannot_search(space)
        if why:
            raise MergeSearchError(f"{why}; use --sampler tpe")
        return CentredCmaEs(
            centre=space.centre,
            trust=space.trust,
            seed=seed,
            # centred: no random start-up trials, the enqueued ones (known recipes, warm starts) run
            # first and the centre is the best of them
            n_startup_trials=1 if space.centre == "best" else len(BASELINES) + 1,
            popsize=space.population,
        )
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(
            seed=seed, population_size=generation_size(space, name, multi, 0, trials)
        )
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=10)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=10)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise MergeSearchError(f"--sampler {name!r}: use cmaes, nsga2, tpe, gp or random")


class CentredCmaEs(optuna.samplers.CmaEsSampler):
    """Optuna's CMA-ES, started where the space says (`centre`, `trust`).

    `centre: best` puts the initial mean at the best trial scored before CMA-ES samples (the
    known recipes and the gradient's warm start are enqueued first): refinement around the best
    point known, and never around a gradient point worse than a known recipe. `trust` is the
    initial step σ0 as a fraction of each range (Optuna searches the unit cube). Both only set
    how the optimizer starts: a resumed study or another worker restores it from the storage."""

    def __init__(self, *, centre: str = "middle", trust: float | None = None, **kw) -> None:
        with warnings.catch_warnings():  # sigma0/x0: deprecated since Optuna 4.9, removed in 6
            warnings.simplefilter("ignore", FutureWarning)
            super().__init__(sigma0=trust, **kw)
        self.centre = centre

    def sample_relative(self, study, trial, search_space):
        if self.centre == "best" and self._x0 is None and search_space:
            self._x0 = centre_point(study, search_space)
        return super().sample_relative(study, trial, search_space)


def centre_point(study: optuna.Study, search_space: dict) -> dict[str, Any] | None:
    """The parameters of the study's best trial scored on the whole split so far (an estimate from
    a screen is not a point to centre on), or None when none is; a parameter the trial lacks
    takes its range's middle."""
    best, point = -math.inf, None
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        r = TrialRecord.of(t)
        if r.fitness != SCREENED_FITNESS and r.values and r.mean > best:
            best, point = r.mean, t.params
    if point is None:
        return None
    # CMA-ES searches numbers only (Float/IntDistribution): clamp onto each range
    return {k: min(max(point.get(k, (d.low + d.high) / 2), d.low), d.high) for k, d in search_space.items()}


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def process_seed(seed: int, s: optuna.Study) -> int:
    """A sampler seed for a process joining an existing study: derived from the study (its name
    and size), the host and the process, so that no two processes draw the same proposals."""
    key = f"{seed}:{s.study_name}:{len(s.get_trials(deepcopy=False))}:{socket.gethostname()}:{os.getpid()}"
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little")


class NoRepeats(optuna.samplers.BaseSampler):
    """The space's sampler, except that it never proposes a candidate another process already ran.

    Population samplers (NSGA-II) can return a parent unchanged, and processes on one study share
    the population, so one process may run another's candidate again: the same score for one
    trial's cost. When a whole proposal equals a trial run by another process, the sampler is asked
    again (its generator has moved on), and after 10 tries the trial is sampled at random. A single
    process's own repeats are left as they are, so a study run by one process stays the study the
    space's seed gives."""

    def __init__(self, inner: optuna.samplers.BaseSampler, me: str) -> None:
        self.inner, self.me = inner, me

    def infer_relative_search_space(self, study, trial):
        return self.inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        params = self.inner.sample_relative(study, trial, search_space)
        if not params or set(params) != set(search_space):
            return params  # some parameters are drawn independently: no exact repeat to fear
        others = {
            params_key(t.params)
            for t in study.get_trials(deepcopy=False)
            if t.params and stored(t, "worker", self.me) != self.me
        }
        for _ in range(10):
            if params_key(params) not in others:
                return params
            params = self.inner.sample_relative(study, trial, search_space)
        return {}

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self.inner.sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study, trial):
        self.inner.before_trial(study, trial)

    def after_trial(self, study, trial, state, values):
        self.inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.inner.reseed_rng()


def params_key(params: dict[str, Any]) -> tuple:
    return tuple(sorted((k, v) for k, v in params.items()))
