"""Gradient-learned coefficients vs the black-box search vs a search warm-started by gradient, at
equal wall time, scored on the test split (issue 14).

    .venv/bin/python benchmarks/bench_gradient.py                         # demo space, 60 s per arm
    .venv/bin/python benchmarks/bench_gradient.py --seconds 120 --space search_spaces/demo.yaml

Each arm gets the same wall time after the models are loaded (loading is not counted):
- search: the space's study (its sampler, fidelity, known recipes first) with `--timeout T`;
- gradient: `learn_coefficients` for T seconds, one recipe;
- warm start: gradient for T/2, then the study with its result enqueued, for T/2.
The best trial of each study (as the report picks it) and the gradient recipe are merged by the
exact engine (mergekit's model) and scored on the test split, with paired 95 % intervals against
the search arm and against the best known recipe the space expresses.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--space", default=str(ROOT / "search_spaces" / "demo.yaml"))
    ap.add_argument("--seconds", type=float, default=60.0, help="wall time per arm (default 60)")
    ap.add_argument(
        "--seed", type=int, default=0, help="the space's sampler seed and the gradient's batch seed"
    )
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args()
    os.environ["MERGESEARCH_RESULTS"] = tempfile.mkdtemp(prefix="bench_gradient_")

    from mergesearch.report import best_trial, trial_recipes
    from mergesearch.report.scoring import Scored, paired_gain
    from mergesearch.search import Bench, load_space, run_search, storage
    from mergesearch.search.gradient import learn_coefficients
    from mergesearch.search.known_recipes import BASELINES, baseline_recipe
    from mergesearch.sources import resolve_model

    storage.RESULTS = Path(os.environ["MERGESEARCH_RESULTS"])
    space = load_space(args.space)
    space.seed = args.seed
    T = args.seconds

    def search(name: str, timeout: float, gradient: float | None) -> list:
        bench = Bench(space, resolve=resolve_model)
        t0 = time.perf_counter()
        s = run_search(
            space,
            study=name,
            trials=100_000,
            timeout=timeout,
            gradient_seconds=gradient,
            progress=False,
            bench=bench,
        )
        wall = time.perf_counter() - t0
        best = best_trial(s)
        done = sum(t.state.is_finished() for t in s.trials)
        print(
            f"{name}: {done} trials in {wall:.0f}s, best trial {best.number} ({best.kind})",
            flush=True,
        )
        return [trial_recipes(best), wall, done]

    arms = {}
    arms["search"] = search("search", T, None)
    bench = Bench(space, resolve=resolve_model)
    t0 = time.perf_counter()
    g = learn_coefficients(bench, seconds=T, seed=args.seed)
    print(
        f"gradient: {g.steps} steps in {g.seconds:.0f}s, loss {g.losses[0]:.4f} → {g.losses[-1]:.4f}",
        flush=True,
    )
    arms["gradient"] = [bench.recipes(g.values), time.perf_counter() - t0, g.steps]
    # warm start: the gradient's T/2 happens inside run_search before its timeout of T/2 starts
    arms["warm start"] = search("warm", T / 2, T / 2)

    scorer = Bench(space, resolve=resolve_model)
    scorer.use_exact_engine()  # mergekit's model

    def scored(label: str, recipes) -> Scored:
        test, _ = scorer.score(recipes, "test")
        return Scored(label, "", {}, test)

    known = [
        scored(name, [r])
        for name in BASELINES
        if (r := baseline_recipe(name, scorer.base_path, scorer.model_paths, space.dtype)) is not None
    ]
    top = max(known, key=lambda k: k.test_mean)
    rows = []
    ref = None
    for name, (recipes, wall, n) in arms.items():
        x = scored(name, recipes)
        ref = ref or x
        gk = paired_gain(x, top)
        gs = paired_gain(x, ref)
        rows.append(
            {
                "arm": name,
                "wall_s": wall,
                "trials_or_steps": n,
                "test_mean": x.test_mean,
                "vs_known": gk,
                "vs_search": gs,
                "test": {k: v.value for k, v in x.test.items()},
            }
        )
    print(
        f"\nbest known recipe: {top.label}, test mean {top.test_mean:.3f}; {T:g} s per arm; space {Path(args.space).name}"
    )
    print(f"| arm | wall s | trials / steps | test mean | vs {top.label} | vs search alone |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        k, s = r["vs_known"], r["vs_search"]
        print(
            f"| {r['arm']} | {r['wall_s']:.0f} | {r['trials_or_steps']} | {r['test_mean']:.3f} | "
            f"{k[0]:+.3f} [{k[1]:+.3f}, {k[2]:+.3f}] | "
            + ("—" if r["arm"] == "search" else f"{s[0]:+.3f} [{s[1]:+.3f}, {s[2]:+.3f}]")
            + " |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
