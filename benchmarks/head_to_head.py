"""Gradient, search, both, and rounds at equal wall time (issue 28), scored on the test split.

    .venv/bin/python benchmarks/head_to_head.py --space search_spaces/smollm2_ta_blocks_screened.yaml \\
        --seconds 480 --gradient-seconds 240 --out results/head_to_head_smollm2
    .venv/bin/python benchmarks/head_to_head.py --demo-seed 3 --seconds 120 --gradient-seconds 30 \\
        --out results/head_to_head_demo3

The arms, each a real CLI run (`mergesearch search` / `mergesearch rounds`) in its own results
folder, each given `--seconds` of wall time in all:

- gradient: the gradient alone, for the whole time (`search --gradient S`, known recipes enqueued
  beside it); its recipe is the gradient's point, whatever the study's best;
- search: the black-box search alone (the space's sampler, `--timeout`), no gradient;
- centred: the gradient for `--gradient-seconds`, then CMA-ES centred on the best point scored
  (`centre: best`, `trust`) for the rest;
- rounds: `mergesearch rounds --rounds 2 --elites 2`, the time shared by the rounds.

An arm finished in an earlier run into the same `--out` is kept (`<arm>/arm.json`); an arm cut
short runs again. Each arm's recipe (its study's best by the report's rule, the gradient's for the gradient arm) is
exported, merged by `mergesearch merge` (mergekit's merge; a rounds recipe by its chain's elite
folders) and scored on the test split example by example; the table gives every arm's test mean,
its paired 95 % interval against task arithmetic λ = 1 (the known recipe every study runs) and
against the search arm. `--demo-seed S`: the demo zoo of seed S (trained and cached on first use)
with the demo's space over the add and reverse specialists, single-objective (objective: mean,
CMA-ES).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ARMS = ("gradient", "search", "centred", "rounds")


def cli(env: dict, *args: str) -> float:
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "mergesearch", *args], env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"mergesearch {' '.join(args)} failed:\n{p.stderr[-3000:]}")
    return time.perf_counter() - t0


def demo_space(seed: int) -> dict:
    from mergesearch.zoo import ZooConfig, build_zoo

    zoo = build_zoo(cfg=None if seed == 2 else ZooConfig(seed=seed), progress=False, log=lambda m: None)
    d = yaml.safe_load((ROOT / "search_spaces" / "demo.yaml").read_text())
    d.update(
        name=f"demo_seed{seed}",
        base=str(zoo.models["base"]),
        models=[str(zoo.models["add"]), str(zoo.models["reverse"])],
        tasks=["add", "reverse"],
        objective="mean",
        fidelity=[200],
    )
    for k in ("gradient_steps", "patience"):  # every arm runs its whole time
        d.pop(k, None)
    return d


def space_of(args) -> dict:
    """The space a benchmark runs (`--space FILE` or `--demo-seed S`), as a mapping whose model
    folders stay valid from any folder."""
    if args.demo_seed is not None:
        return demo_space(args.demo_seed)
    space = yaml.safe_load(Path(args.space).read_text())
    here = Path(args.space).resolve().parent
    fix = lambda m: m if ":" in m or Path(m).is_absolute() else str(here / m)  # noqa: E731
    return space | {"base": fix(space["base"]), "models": [fix(m) for m in space["models"]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--space", help="a single-objective space over task arithmetic (objective: mean)")
    g.add_argument(
        "--demo-seed", type=int, help="the demo zoo of this seed, the demo's space made single-objective"
    )
    ap.add_argument("--seconds", type=float, required=True, help="wall time of every arm")
    ap.add_argument("--gradient-seconds", type=float, required=True, help="the centred arm's gradient")
    ap.add_argument("--trust", type=float, default=0.05, help="the centred arm's CMA-ES step (default 0.05)")
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    from mergesearch.evaluation import evaluate_model  # noqa: F401  (fails early outside the venv)

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    space = space_of(args)
    space.pop("gradient_steps", None)
    space["trials"] = 100000  # the clock stops every arm
    name = space["name"]
    rows, timing = {}, {}
    for arm in args.arms:
        env = dict(os.environ, MERGESEARCH_RESULTS=str(out / arm))
        done = out / arm / "arm.json"  # an arm that finished in an earlier run is kept
        if done.is_file():
            kept = json.loads(done.read_text())
            timing[arm], rows[arm] = kept["seconds"], kept["row"]
            print(f"{arm}: kept from an earlier run ({timing[arm]:.0f}s)", flush=True)
            continue
        shutil.rmtree(out / arm, ignore_errors=True)  # an arm cut short starts again
        d = dict(space)
        if arm == "centred":
            d.update(centre="best", trust=args.trust)
        path = out / f"{arm}.yaml"
        path.write_text(yaml.safe_dump(d, sort_keys=False))
        t0 = time.perf_counter()
        if arm == "gradient":  # the known recipes the space can express run first, then the gradient's point
            trials = known_recipes(path) + 1
            cli(env, "search", str(path), "--gradient", str(args.seconds), "--trials", str(trials), "-q")
            study = name
        elif arm == "search":
            cli(env, "search", str(path), "--timeout", str(args.seconds), "-q")
            study = name
        elif arm == "centred":
            left = args.seconds - args.gradient_seconds
            cli(
                env,
                "search",
                str(path),
                "--gradient",
                str(args.gradient_seconds),
                "--timeout",
                str(left),
                "-q",
            )
            study = name
        else:
            cli(
                env,
                "rounds",
                str(path),
                "--rounds",
                "2",
                "--elites",
                "2",
                "--timeout",
                str(args.seconds),
                "-q",
            )
            study = f"{name}-round2"
        timing[arm] = time.perf_counter() - t0
        rows[arm] = chosen(env, out / arm, study, arm == "gradient")
        done.write_text(json.dumps({"seconds": timing[arm], "row": rows[arm]}))
        print(
            f"{arm}: {timing[arm]:.0f}s, trial {rows[arm]['trial']}, {rows[arm]['trials']} trials", flush=True
        )
    # task arithmetic λ=1: every study ran it; the search arm's (or the first arm's) trial
    ref_arm = "search" if "search" in rows else args.arms[0]
    env = dict(os.environ, MERGESEARCH_RESULTS=str(out / ref_arm))
    rows["task_arithmetic λ=1"] = chosen(
        env, out / ref_arm, rows[ref_arm]["study"], False, known="task_arithmetic λ=1"
    )
    scored = {label: score(r, space["tasks"], out / "merged" / label.split()[0]) for label, r in rows.items()}
    table = summarize(
        scored, timing, ref="task_arithmetic λ=1", versus="search" if "search" in scored else None
    )
    (out / "summary.json").write_text(json.dumps(table, indent=2) + "\n")
    print(markdown(table, name, args))


def known_recipes(path: Path) -> int:
    """How many known recipes a new study of this space enqueues."""
    from mergesearch.search import load_space
    from mergesearch.search.known_recipes import BASELINES, baseline_values
    from mergesearch.sources import resolve_model

    space = load_space(path)
    config = json.loads((resolve_model(space.base, path) / "config.json").read_text())
    n = config["num_hidden_layers"]
    return sum(baseline_values(space, name, n) is not None for name in BASELINES)


def chosen(env: dict, results: Path, study: str, gradient: bool, known: str | None = None) -> dict:
    """The arm's recipe: its study's best (the report's rule), the gradient's trial, or a known recipe's."""
    import optuna

    from mergesearch.report.tables import best_trial
    from mergesearch.search.trials import records

    s = optuna.load_study(study_name=study, storage=f"sqlite:///{results / study / 'study.db'}")
    if gradient or known:
        t = next(
            r
            for r in records(s)
            if r.complete and ((gradient and r.is_gradient) or (known and r.baseline == known))
        )
    else:
        t = best_trial(s)
    yaml_path = results / f"{study}_trial{t.number}.yaml"
    cli(env, "export", study, "--trial", str(t.number), "-o", str(yaml_path))
    return {
        "study": study,
        "trial": t.number,
        "yaml": str(yaml_path),
        "trials": len(s.trials),
        "search_mean": t.mean,
    }


def score(row: dict, tasks: list[str], folder: Path) -> dict:
    from mergesearch.engine import merge
    from mergesearch.evaluation import find_task
    from mergesearch.evaluation.scorer import Scorer
    from mergesearch.modeling import load_model

    if not folder.exists():
        merge(row["yaml"], folder, seed=0)
    model, tok = load_model(folder)
    scorer = Scorer(model, tok)
    res = {t: scorer.evaluate(find_task(t), "test", None) for t in tasks}
    return row | {
        "verdicts": {t: r.scores for t, r in res.items()},
        "test": {t: r.value for t, r in res.items()},
    }


def paired(a: dict, b: dict, n_boot: int = 2000) -> tuple[float, float, float]:
    rng = np.random.default_rng(0)
    diffs, gain = np.zeros(n_boot), 0.0
    for t, va in a["verdicts"].items():
        vb = b["verdicts"][t]
        idx = rng.integers(0, len(va), size=(n_boot, len(va)))
        diffs += va[idx].mean(1) - vb[idx].mean(1)
        gain += va.mean() - vb.mean()
    k = len(a["verdicts"])
    lo, hi = np.quantile(diffs / k, [0.025, 0.975])
    return gain / k, float(lo), float(hi)


def summarize(scored: dict, timing: dict, ref: str, versus: str | None) -> dict:
    out = {}
    for label, r in scored.items():
        row = {
            "study": r["study"],
            "trial": r["trial"],
            "trials": r["trials"],
            "seconds": timing.get(label),
            "search_mean": r["search_mean"],
            "test": r["test"],
            "test_mean": float(np.mean(list(r["test"].values()))),
        }
        if label != ref:
            row["vs_ta_lambda1"] = paired(r, scored[ref])
        if versus and label not in (versus, ref):
            row["vs_search"] = paired(r, scored[versus])
        out[label] = row
    return out


def markdown(table: dict, name: str, args) -> str:
    lines = [
        f"{name}: {args.seconds:.0f} s per arm (centred: gradient {args.gradient_seconds:.0f} s, trust {args.trust})",
        "",
        "| arm | wall s | trials | trial | search | test | vs TA λ=1 [95 % CI] | vs search [95 % CI] |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def ci(r: dict, k: str) -> str:
        return f"{r[k][0]:+.3f} [{r[k][1]:+.3f}, {r[k][2]:+.3f}]" if k in r else "—"

    for label, r in table.items():
        lines.append(
            f"| {label} | {r['seconds'] or 0:.0f} | {r['trials']} | {r['trial']} | {r['search_mean']:.3f} | "
            f"{r['test_mean']:.3f} | {ci(r, 'vs_ta_lambda1')} | {ci(r, 'vs_search')} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
