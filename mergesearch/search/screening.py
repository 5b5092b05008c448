"""Screen, then confirm: how a search spends examples by default.

A candidate is first *screened* on a few examples per task, drawn from the search split with
probabilities fitted to the study's verdict matrix (`verdicts.py`), and its score is estimated
*paired* against a reference candidate already scored on the whole split (the incumbent):

    ŝ_t = s_t(ref) + (1/N_t) · Σ_{j∈S_t} (c_j − r_j) / π_j          (Horvitz–Thompson)

c_j and r_j are the candidate's and the reference's verdicts on example j, π_j the example's
probability of being drawn, N_t the task's whole search split. It is unbiased for the candidate's
whole-split score whatever the π_j; its noise is small when π_j follows how often a candidate
differs from the reference on j. That is fitted on the population, every trial:

    p_j = (right_j + 1) / (scored_j + 2)          (the population's rate on j, Laplace-smoothed)
    q_j = sqrt(1 − p_j) where r_j = 1,  sqrt(p_j) where r_j = 0      (Neyman allocation)
    π_j ∝ ½ + ½ q_j / mean(q),  Σ π_j = m                           (half uniform: bounded weights)

so examples that every candidate gets right cost little, and the screen is spent where candidates
disagree. As the study moves, p_j and the reference move with it: a candidate better than the
earlier trials is still scored against the best one, on the examples where it can differ.

A candidate whose estimate beats the incumbent is *confirmed*: the rest of the whole split is
scored in random chunks of m, 2m, 4m, ... examples per task, and confirmation stops early when
the estimate (exact on every example scored, extrapolated on the rest) no longer beats the
incumbent. Only a candidate scored on every example can become the incumbent, so the study's best
is always a confirmed score. The sampler is told the estimate (refined by any confirmation
chunks): paired, it has about a third of the error of the candidate's own mean on the same
examples. Its known weakness: a screen that sees no difference is told the incumbent's value,
though such candidates are usually worse (benchmarks/RESULTS.md, "Screen, then confirm").
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

# per task, the default screen (3 against 2 and 8: benchmarks/RESULTS.md, "Screen, then confirm")
SCREEN_EXAMPLES = 3
CONFIRM_SIGMAS = 0.0  # confirm when the estimate beats the incumbent by this many standard errors
REFRESH = 10  # the screen's examples are drawn again every this many finished trials
DEFENSIVE = 0.5  # the uniform share of the screen's inclusion probabilities


def example_rates(values: np.ndarray) -> np.ndarray:
    """p_j: per example (columns of a rows × examples matrix of 1/0/NaN), the population's
    Laplace-smoothed rate of right answers."""
    right = np.nansum(values, 0)
    scored = (~np.isnan(values)).sum(0)
    return (right + 1) / (scored + 2)


def inclusion_probabilities(rates: np.ndarray, reference: np.ndarray, m: int) -> np.ndarray:
    """π_j for a screen of m examples: ∝ sqrt(P(a candidate differs from the reference on j))
    mixed half and half with uniform (defensive sampling: an example the population never got
    wrong is still drawn at half the uniform rate, so its weight 1/π_j stays bounded when a new
    candidate does get it wrong), capped at 1 with the excess spread over the rest; Σ π_j = min(m, N)."""
    n = len(rates)
    m = min(m, n)
    differ = np.where(reference > 0.5, 1 - rates, rates)
    q = np.sqrt(np.clip(differ, 1e-6, 1.0))
    q = DEFENSIVE + (1 - DEFENSIVE) * q / q.mean()  # no π_j below DEFENSIVE·m/N: bounded weights
    pi = np.zeros(n)
    free = np.ones(n, dtype=bool)
    left = float(m)
    while left > 1e-12 and free.any():
        share = left * q[free] / q[free].sum()
        over = share >= 1
        if not over.any():
            pi[free] = share
            break
        idx = np.flatnonzero(free)[over]
        pi[idx] = 1.0
        free[idx] = False
        left = m - pi.sum()
    return pi


def draw(pi: np.ndarray, seed: int) -> list[int]:
    """Systematic sampling in a random order: exactly round(Σπ) distinct examples, each drawn with
    probability π_j (Madow, 1949). Sorted."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(pi))
    cum = np.cumsum(pi[order])
    marks = rng.uniform() + np.arange(int(round(cum[-1]))) if len(cum) else np.array([])
    picked = np.searchsorted(cum, marks, side="right")
    return sorted(int(order[i]) for i in np.unique(picked[picked < len(order)]))


def chunks(rest: list[int], m: int) -> list[list[int]]:
    """Confirmation's steps: the rest of the split in chunks of m, 2m, 4m, ... examples (the last
    takes what is left), so a candidate the screen overrated is stopped after few examples and
    one that keeps beating the incumbent reaches the whole split in a few steps."""
    out, i, size = [], 0, m
    while i < len(rest):
        out.append([int(j) for j in rest[i : i + size]])
        i += size
        size *= 2
    return out


def seed_of(*parts) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:4], "little")


@dataclass
class TaskEstimate:
    """A task's paired estimate of a candidate's whole-split score, from the examples scored so far."""

    value: float  # the estimated whole-split score
    se: float  # its standard error (0 once every example is scored)


def estimate(
    candidate: dict[int, float],
    reference: np.ndarray,
    reference_score: float,
    screen: list[int],
    pi: np.ndarray,
    chunks: list[int] | None = None,
) -> TaskEstimate:
    """The whole-split score of a candidate scored on `screen` (drawn with probabilities `pi`)
    and on `chunks` (a simple random sample of the other examples), paired with the reference.

    The screen's part is Horvitz–Thompson over the examples it covers in expectation; the chunks'
    part is the mean difference times the examples outside the screen:

        D = Σ_{j∈S} d_j/π_j                                  (no chunks)
        D = Σ_{j∈S} d_j + (N − |S|)/|C| · Σ_{j∈C} d_j        (chunks C drawn from the rest)

    With chunks the screen's examples count once, as themselves: the rest is estimated by C alone."""
    n = len(reference)
    d = {j: candidate[j] - reference[j] for j in candidate}
    if chunks:
        rest = n - len(screen)
        dc = np.array([d[j] for j in chunks])
        total = sum(d[j] for j in screen) + rest * dc.mean()
        f = len(chunks) / rest
        se = rest * dc.std(ddof=1) / np.sqrt(len(chunks)) * np.sqrt(1 - f) if len(chunks) > 1 else 0.0
    else:
        w = np.array([d[j] / pi[j] for j in screen])
        total = float(w.sum())
        # with-replacement approximation of the design's variance (conservative)
        m = len(screen)
        se = float(np.sqrt(m / (m - 1) * ((w - total / m) ** 2).sum())) if m > 1 else 0.0
    value = float(np.clip(reference_score + total / n, 0.0, 1.0))
    return TaskEstimate(value, float(se) / n)


def spearman(a, b) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN under 3 pairs or no spread."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 3:
        return float("nan")

    def ranks(x):
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x))
        for v in np.unique(x):  # ties share their mean rank
            r[x == v] = r[x == v].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


@dataclass
class Reference:
    """A candidate scored on the whole search split: what screening pairs with."""

    label: str  # "trial N", or "STUDY:N" for a row of another study on the same storage
    verdicts: dict[str, np.ndarray]  # per task, 0/1 on every example
    scores: dict[str, float]


def as_array(verdict_string: str) -> np.ndarray:
    """A stored verdict string ("01.1", '.' where not scored) as 1/0/NaN."""
    return np.array([np.nan if c == "." else float(c == "1") for c in verdict_string])


def whole(verdicts: dict[str, str], sizes: dict[str, int]) -> bool:
    """Whether a row has a verdict on every example of every task's whole split."""
    return all(len(verdicts.get(t, "")) >= n and "." not in verdicts[t][:n] for t, n in sizes.items())


def reference_of(label: str, verdicts: dict[str, str], sizes: dict[str, int]) -> Reference:
    arrays = {t: as_array(verdicts[t][:n]) for t, n in sizes.items()}
    return Reference(label, arrays, {t: float(a.mean()) for t, a in arrays.items()})


def population(rows: list[dict[str, str]], sizes: dict[str, int]) -> dict[str, np.ndarray]:
    """Per task, the rows' verdicts as a rows × N matrix of 1/0/NaN (what `example_rates` fits)."""
    out = {}
    for t, n in sizes.items():
        m = np.full((len(rows), n), np.nan)
        for i, r in enumerate(rows):
            v = r.get(t, "")[:n]
            if v:
                m[i, : len(v)] = as_array(v)
        out[t] = m
    return out


def verdict_string(n: int, scored: dict[int, float]) -> str:
    """n characters: '1'/'0' at the scored positions, '.' elsewhere."""
    return "".join("." if j not in scored else ("1" if scored[j] else "0") for j in range(n))
