"""When a study has converged: no improvement of its best whole-split score beyond the noise in
`patience` finished trials, or in `patience` generations of the sampler (CMA-ES's population,
NSGA-II's), each that many trials.

The criterion, stated once for the search loop, the progress bar and the report:

- only scores on the whole search split count (a screened estimate is not an improvement);
- the noise is the standard error of the best trial's score on those examples,
      δ = sqrt(Σₜ wₜ² pₜ(1 − pₜ)/nₜ) / Σₜ wₜ      (pₜ its score on task t, nₜ the examples)
  so a gain smaller than what resampling the search split would move it by does not count;
- a study has converged when `patience` trials have finished (complete or stopped early) since
  the last trial that beat the best before it by more than δ. Counted in generations, the
  patience grows with the population the sampler needs to move (CMA-ES: 4 + 3 ln d for d
  coefficients): a patience of a fixed number of trials is a different rule at each size (on
  the SmolLM2 space, 30 trials were two CMA-ES generations, and the study was not converged).

What more trials would buy is read from the study's own history: the best's gain over the last
`patience` finished trials (0 once converged) and over the study's second half.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import optuna

from ..evaluation import task_weight
from .trials import SCREENED_FITNESS, TrialRecord

State = optuna.trial.TrialState
GENERATIONS = "generations"
TRIALS = "trials"


@dataclass(frozen=True)
class Patience:
    """`count` trials, or `count` generations of the sampler; 0: none (run to the budget)."""

    count: int = 0
    unit: str = TRIALS

    @classmethod
    def parse(cls, value, where: str) -> Patience:
        """`30` (trials), `5 generations` (or `5g`), as a space file or --patience writes it."""
        from ..errors import MergeSearchError

        text = str(value).strip().lower()
        m = re.fullmatch(r"(\d+)\s*(g|gen|generations?|trials?)?", text)
        if isinstance(value, bool) or m is None:
            raise MergeSearchError(
                f"{where}: patience {value!r}: a whole number of trials (30) or of sampler generations "
                "(5 generations, or 5g); 0 runs to the budget"
            )
        unit = GENERATIONS if m.group(2) and m.group(2).startswith("g") else TRIALS
        return cls(int(m.group(1)), unit)

    def __str__(self) -> str:
        return f"{self.count} {self.unit if self.count != 1 else self.unit[:-1]}"

    def trials(self, generation: int | None, sampler: str = "") -> int:
        """The patience in finished trials, given the sampler's generation size (None: it has none)."""
        from ..errors import MergeSearchError

        if self.unit == TRIALS:
            return self.count
        if generation is None:
            raise MergeSearchError(
                f"patience {self}: sampler {sampler or 'this'} works in no generations (CMA-ES and "
                "NSGA-II do); give the patience in trials"
            )
        return self.count * generation


# what a report judges a study by when its space sets no patience: generations where the sampler
# has them (5 CMA-ES generations of 14 trials at 36 coefficients), else trials
REPORT_PATIENCE = Patience(5, GENERATIONS)
REPORT_PATIENCE_TRIALS = Patience(30, TRIALS)


def noise(t: TrialRecord, weights: dict[str, float] | None = None) -> float:
    """δ of a trial's whole-split mean score (0/1 verdicts per example)."""
    if not t.scores or not t.examples:
        return 0.0
    var = sum(
        task_weight(weights, k) ** 2 * p * (1 - p) / t.examples[k]
        for k, p in t.scores.items()
        if t.examples.get(k) and 0 <= p <= 1
    )
    return math.sqrt(var) / sum(task_weight(weights, k) for k in t.scores)


@dataclass
class Convergence:
    patience: int  # in finished trials
    finished: int  # trials finished (complete or stopped early)
    best_trial: int | None  # the last trial that improved beyond the noise
    best: float
    noise: float  # δ of the best trial
    since: int  # finished trials after best_trial
    gain_recent: float  # the best's gain over the last `patience` finished trials
    gain_second_half: float  # over the study's second half of finished trials
    rule: str = ""  # the patience as stated (`5 generations of 13 trials`), when not in trials

    @property
    def converged(self) -> bool:
        return self.patience > 0 and self.best_trial is not None and self.since >= self.patience

    def line(self) -> str:
        """One sentence for the CLI and the report."""
        if self.best_trial is None:
            return "no trial scored on the whole search split yet"
        head = (
            f"converged: no gain beyond the noise (±{self.noise:.3f}) in the {self.since} trials since trial {self.best_trial}"
            if self.converged
            else f"not converged: the last gain beyond the noise (±{self.noise:.3f}) was at trial {self.best_trial}, "
            f"{self.since} trials ago" + (f" (patience {self.patience})" if self.patience else "")
        )
        return (
            f"{head}; the best rose {self.gain_recent:+.3f} over the last {min(self.patience or 25, self.finished)} "
            f"trials and {self.gain_second_half:+.3f} over the study's second half"
        )


def convergence(
    trials: list[TrialRecord], patience: int, weights: dict[str, float] | None = None, rule: str = ""
) -> Convergence:
    """The criterion above over a study's trials (any order; in trial-number order here)."""
    done = sorted((t for t in trials if t.state in (State.COMPLETE, State.PRUNED)), key=lambda t: t.number)
    best, best_t, best_at, last_gain_at = -math.inf, None, [], -1
    delta = 0.0
    for i, t in enumerate(done):
        whole = t.state == State.COMPLETE and t.fitness != SCREENED_FITNESS and t.values
        if whole and t.mean > best:
            if best_t is None or t.mean > best + delta:
                last_gain_at = i
                best_t = t
            best = t.mean
            delta = noise(t, weights)
        best_at.append(best)
    n = len(done)
    window = min(patience or 25, n)

    def gain(k: int) -> float:
        if not n or best_at[-1] == -math.inf:
            return 0.0
        before = best_at[n - k - 1] if n - k - 1 >= 0 else -math.inf
        return best_at[-1] - before if before > -math.inf else 0.0

    return Convergence(
        patience=patience,
        finished=n,
        best_trial=best_t.number if best_t is not None else None,
        best=best,
        noise=delta,
        since=n - 1 - last_gain_at if best_t is not None else n,
        gain_recent=gain(window),
        gain_second_half=gain(n // 2),
        rule=rule,
    )
