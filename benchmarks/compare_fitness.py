"""Few-example fitness vs full fidelity: the learned recipes of two studies of one space, scored
on the test split with a paired bootstrap interval of their difference; and what re-ranking the
anchor study's top trials on the whole search split would have chosen.

    .venv/bin/python benchmarks/compare_fitness.py smollm2_ta_blocks smollm2_ta_blocks_anchors [--top 5]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    from mergesearch.recipe import parse_recipes
    from mergesearch.report import best_trial, load
    from mergesearch.search import Bench, space_of
    from mergesearch.search.trials import TrialRecord, records
    from mergesearch.sources import resolve_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("full")
    ap.add_argument("few")
    ap.add_argument("--top", type=int, default=5, help="anchor trials to re-rank on the whole search split")
    args = ap.parse_args()
    full, few = load(args.full), load(args.few)
    bench = Bench(space_of(few), resolve=resolve_model)
    bench.use_exact_engine()  # what the reports score

    def scores(trial: TrialRecord, split):
        res, _ = bench.score(parse_recipes(trial.recipe), split)
        return res

    def paired(a, b, n_boot=2000, seed=0):
        rng = np.random.default_rng(seed)
        diffs = np.zeros(n_boot)
        for k in a:
            idx = rng.integers(0, a[k].n, size=(n_boot, a[k].n))
            diffs += a[k].scores[idx].mean(1) - b[k].scores[idx].mean(1)
        diffs /= len(a)
        gain = np.mean([a[k].value for k in a]) - np.mean([b[k].value for k in b])
        return gain, *np.quantile(diffs, [0.025, 0.975])

    bf, ba = best_trial(full), best_trial(few)
    tf, ta = scores(bf, "test"), scores(ba, "test")
    g, lo, hi = paired(tf, ta)
    print(f"full-fidelity best trial {bf.number}: test mean {np.mean([r.value for r in tf.values()]):.3f}")
    print(f"few-example best trial {ba.number}: test mean {np.mean([r.value for r in ta.values()]):.3f}")
    print(f"full minus few: {g:+.3f} (paired 95% CI [{lo:+.3f}, {hi:+.3f}])")

    ranked = sorted(
        [t for t in records(few) if t.anchor_estimate and t.values is not None],
        key=lambda t: -t.mean,
    )[: args.top]
    rows = []
    for t in ranked:
        s = scores(t, "search")
        rows.append((float(np.mean([r.value for r in s.values()])), t, sum(r.n for r in s.values())))
        print(f"  anchor trial {t.number}: estimate {t.value:.3f}, whole search split {rows[-1][0]:.3f}")
    best = max(rows, key=lambda r: r[0])[1]
    tr = scores(best, "test")
    g, lo, hi = paired(tf, tr)
    n = sum(r[2] for r in rows)
    print(
        f"re-ranked pick: trial {best.number}, test mean {np.mean([r.value for r in tr.values()]):.3f}; "
        f"full minus it: {g:+.3f} [{lo:+.3f}, {hi:+.3f}] (re-ranking costs {n} examples)"
    )


if __name__ == "__main__":
    main()
