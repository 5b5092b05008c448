"""Anchor points: score a candidate on a few examples chosen from a reference population.

tinyBenchmarks (Polo et al., 2024) estimates a model's accuracy on a benchmark from a few
"anchor" examples: represent every example by the correctness of a reference population of
models on it, cluster those vectors, keep each cluster's medoid, and weight it by the cluster's
share of the examples. A candidate's estimate is the weighted mean of its verdicts on the anchors:

    score ≈ Σ_a w_a · c_a,    w_a = |cluster a| / N,   Σ_a w_a = 1

Examples that every reference model gets right (or wrong) fall into one big cluster and cost one
anchor; the anchors are spent where models disagree, which is what ranks candidates. In a study,
the reference population is the study's first trials (the known recipes, then the sampler's
picks), scored on the whole search split; anchors come from the search split only, so the test
split stays untouched for reports.
"""

from __future__ import annotations

import numpy as np


def choose_anchors(
    correct: np.ndarray, k: int, seed: int = 0, iters: int = 50
) -> tuple[list[int], list[float]]:
    """k medoids of the examples (columns of `correct`, reference models × examples, 0/1) under
    the Hamming distance, and each one's weight (its cluster's share of the examples).

    Deterministic for a seed: k-means++ seeding, then alternate assignment and medoid update
    (ties to the lowest index) until nothing changes. Fewer than k distinct columns give fewer
    anchors; every anchor's weight is positive and the weights sum to 1."""
    x = np.asarray(correct, dtype=np.float64).T  # examples × models
    n = len(x)
    if n == 0:
        raise ValueError("no examples to choose anchors from")
    k = min(k, n)
    d = np.abs(x[:, None, :] - x[None, :, :]).sum(-1)  # Hamming distances, n × n
    rng = np.random.default_rng(seed)
    medoids = [int(rng.integers(n))]
    while len(medoids) < k:
        dist = d[:, medoids].min(1)
        if dist.sum() == 0:  # every example equals some medoid: no more distinct columns
            break
        medoids.append(int(rng.choice(n, p=dist / dist.sum())))
    for _ in range(iters):
        assign = np.argmin(d[:, medoids], axis=1)
        new = []
        for j in range(len(medoids)):
            members = np.flatnonzero(assign == j)
            new.append(
                int(members[np.argmin(d[np.ix_(members, members)].sum(1))]) if len(members) else medoids[j]
            )
        if new == medoids:
            break
        medoids = new
    assign = np.argmin(d[:, medoids], axis=1)
    counts = np.bincount(assign, minlength=len(medoids))
    keep = [j for j in range(len(medoids)) if counts[j] > 0]
    return [medoids[j] for j in keep], [float(counts[j] / n) for j in keep]


def estimate(verdicts: np.ndarray, weights: list[float]) -> float:
    """The weighted mean of a candidate's verdicts on the anchors."""
    return float(np.dot(np.asarray(verdicts, dtype=np.float64), np.asarray(weights, dtype=np.float64)))
