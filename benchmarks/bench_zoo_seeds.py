"""The demo's claim across zoo realizations (issue 14): the demo's search on zoos trained with
other seeds, each reported on its test split.

    .venv/bin/python benchmarks/bench_zoo_seeds.py                       # seeds 2 (shipped) 3 4 5
    .venv/bin/python benchmarks/bench_zoo_seeds.py --seeds 2 3 4 --gradient-steps 0 --jobs 2

Per seed: the zoo (`ZooConfig(seed=S)`, trained once and cached under $MERGESEARCH_HOME/zoo; seed 2
is the shipped one), the demo's space (search_spaces/demo.yaml) over that zoo's folders, `mergesearch
search` and `mergesearch report` (`--gradient-steps N` replaces the space's `gradient_steps`), as subprocesses of the CLI, `--jobs`
at a time. The table: the best known recipe, the tuned scalar (task arithmetic, λ swept on the
search split), the learned recipe, and its gains over both with paired 95 % intervals; then the
gain over the tuned scalar pooled over seeds (the mean of the seeds' gains, its interval from
resampling every seed's test examples).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[2, 3, 4, 5])
    ap.add_argument(
        "--gradient-steps",
        type=int,
        default=None,
        help="the space's gradient_steps (0: none; default: the demo's)",
    )
    ap.add_argument("--trials", type=int, default=None, help="default: the demo space's budget")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", default=None, help="results folder (default: a temporary one)")
    args = ap.parse_args()

    from mergesearch.zoo import ZooConfig, build_zoo

    out = Path(args.out or tempfile.mkdtemp(prefix="zoo_seeds_"))
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, MERGESEARCH_RESULTS=str(out))
    demo = yaml.safe_load((ROOT / "search_spaces" / "demo.yaml").read_text())

    def zoo_of(seed: int):
        t0 = time.perf_counter()
        zoo = build_zoo(cfg=ZooConfig(seed=seed), progress=False, log=lambda m: None)
        failed = [k for k, c in zoo.checks.items() if not c["ok"]]
        print(
            f"seed {seed}: zoo {zoo.root} ({time.perf_counter() - t0:.0f}s)"
            + (f"; checks failed: {failed}" if failed else ""),
            flush=True,
        )
        return zoo

    def run(seed: int) -> dict:
        zoo = zoo_of(seed)
        space = dict(
            demo,
            base=str(zoo.models["base"]),
            models=[str(zoo.models["add"]), str(zoo.models["reverse"])],
            tasks=["add", "reverse"],  # the demo of sessions 9–13: two specialists, run to its budget
        )
        space.pop("patience", None)
        if args.gradient_steps is not None:
            space["gradient_steps"] = args.gradient_steps
        name = space["name"] = f"demo_seed{seed}_g{space.get('gradient_steps', 0)}"
        (out / f"{name}.yaml").write_text(yaml.safe_dump(space, sort_keys=False))
        cmd = [sys.executable, "-m", "mergesearch", "search", str(out / f"{name}.yaml"), "-q"]
        cmd += ["--trials", str(args.trials), "--set-budget"] if args.trials else []
        t0 = time.perf_counter()
        subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
        search_s = time.perf_counter() - t0
        subprocess.run(
            [sys.executable, "-m", "mergesearch", "report", name, "-q"],
            env=env,
            check=True,
            capture_output=True,
        )
        summary = json.loads((out / name / "test_scores.json").read_text())
        print(f"seed {seed}: search {search_s:.0f}s, best trial {summary['best_trial']}", flush=True)
        return {"seed": seed, "search_s": search_s, "summary": summary}

    with ThreadPoolExecutor(args.jobs) as pool:
        runs = list(pool.map(run, args.seeds))

    def cand(summary, prefix):
        return next(c for c in summary["candidates"] if c["label"].startswith(prefix))

    def verdicts(c):
        return {t: np.array([v == "1" for v in r["verdicts"]], dtype=float) for t, r in c["test"].items()}

    print(
        "\n| zoo seed | best known recipe | tuned scalar | learned (trial) | gain over known [95 % CI] | gain over tuned [95 % CI] | search s |"
    )
    print("|---|---|---|---|---|---|---|")
    pooled = []
    for r in runs:
        s = r["summary"]
        best = next(c for c in s["candidates"] if c["label"].endswith("(best)"))
        tuned = cand(s, "tuned:")
        g, t = s["gain"], s["gain_over_tuned_scalar"]
        print(
            f"| {r['seed']} | {g['over'].replace('baseline: ', '')} {g['baseline_test_mean']:.3f} | "
            f"{tuned['label'].split(' (')[0].replace('tuned: ', '')} {tuned['test_mean']:.3f} | "
            f"{best['test_mean']:.3f} ({s['best_trial']}) | {g['gain']:+.3f} [{g['ci95'][0]:+.3f}, {g['ci95'][1]:+.3f}] | "
            f"{t['gain']:+.3f} [{t['ci95'][0]:+.3f}, {t['ci95'][1]:+.3f}] | {r['search_s']:.0f} |"
        )
        pooled.append((verdicts(best), verdicts(tuned)))
    # pooled over seeds: the mean of the seeds' gains (tasks weigh equally, as in the demo's report)
    rng = np.random.default_rng(0)
    boots = np.zeros(2000)
    point = 0.0
    for a, b in pooled:
        for task in a:
            n = len(a[task])
            idx = rng.integers(0, n, size=(2000, n))
            boots += (a[task][idx].mean(1) - b[task][idx].mean(1)) / (len(a) * len(pooled))
            point += (a[task].mean() - b[task].mean()) / (len(a) * len(pooled))
    lo, hi = np.quantile(boots, [0.025, 0.975])
    print(f"\npooled over {len(pooled)} seeds, learned − tuned scalar: {point:+.3f} [{lo:+.3f}, {hi:+.3f}]")
    print(f"results: {out}")


if __name__ == "__main__":
    main()
