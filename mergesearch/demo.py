"""`mergesearch demo`: the whole pipeline on the embedded zoo, offline, in minutes on a CPU."""

from __future__ import annotations

import time

from .report import export, report
from .resources import data_dir
from .search import Bench, load_space, run_search, study_dir
from .sources import resolve_model
from .zoo import build_zoo

DEMO_SPACE = data_dir("search_spaces") / "demo.yaml"


def run_demo(*, trials: int | None = None, study: str = "demo", progress: bool = True) -> dict:
    t0 = time.perf_counter()
    print("1/4 model zoo (shipped with mergesearch; `mergesearch zoo build --rebuild` trains it again)")
    zoo = build_zoo(progress=progress)
    print(f"    {zoo.root}")
    for name, scores in zoo.scores.items():
        print(f"    {name:8s} " + "  ".join(f"{k} {v:.2f}" for k, v in scores.items()))
    space = load_space(DEMO_SPACE)
    print(f"2/4 search: {space.description}")
    log = (lambda m: print(f"    {m}", flush=True)) if progress else (lambda m: None)
    bench = Bench(space, resolve=resolve_model, log=log)
    run_search(
        space,
        study=study,
        trials=trials,
        progress=progress,
        bench=bench,
        set_budget=True,
        log=log,
    )
    print("3/4 report: re-scoring the best and Pareto-front recipes and the known recipes on the test split")
    summary = report(study, bench=bench)
    path = export(study, out=study_dir(study) / "best_recipe.yaml")
    out = study_dir(study)
    print(f"4/4 done in {time.perf_counter() - t0:.0f}s")
    if "gain" in summary:
        g = summary["gain"]
        print(
            f"    learned recipe (trial {summary['best_trial']}): test mean {g['best_test_mean']:.3f}; "
            f"best known recipe ({g['known_recipe']}): {g['baseline_test_mean']:.3f}; "
            f"gain {g['gain']:+.3f} (paired 95% CI [{g['ci95'][0]:+.3f}, {g['ci95'][1]:+.3f}])"
        )
    if "gradient" in summary:
        gr = summary["gradient"]
        print(
            f"    gradient warm start (trial {gr['trial']}, {gr['steps']} steps): test mean {gr['test_mean']:.3f}"
            + (" — the learned recipe" if gr["trial"] == summary["best_trial"] else "")
        )
        lo, hi = gr["ci95"]
        print(
            f"    the search beyond the gradient: {gr['best_minus_gradient']:+.3f} (paired 95% CI [{lo:+.3f}, {hi:+.3f}])"
            + (": nothing beyond it" if gr["trial"] == summary["best_trial"] else "")
        )
    front = front_extremes(summary)
    if front:
        print(
            "    the Pareto front: per skill, the recipe that scores it best on the test split (the gradient"
        )
        print("    learns one mean; the front lets you trade skills):")
        for task, c in front.items():
            scores = ", ".join(f"{k} {v['value']:.3f}" for k, v in c["test"].items())
            print(f"      {task:8s} trial {c['trial']}: {scores}")
    print(f"    {summary['convergence']['line']}")
    print(f"    report:    {out / 'report.md'}")
    print(f"    plots:     {out / 'pareto.png'}, {out / 'history.png'}, {out / 'coefficients.png'}")
    print(
        f"    recipe:    {path}  (mergekit-yaml {path} OUT --random-seed 0, or mergesearch merge {path} OUT --seed 0)"
    )
    print(f"    dashboard: mergesearch dashboard {study}   (then open http://127.0.0.1:8080/dashboard)")
    return summary


def front_extremes(summary: dict) -> dict[str, dict]:
    """Per task, the searched front recipe with the best test score on it (ties: the higher test
    mean), where that is not the learned recipe itself: what the front offers beyond one mean."""
    rows = [c for c in summary["candidates"] if c.get("trial") is not None and not c.get("known_recipe")]
    out = {}
    for task in rows[0]["test"] if rows else []:
        top = max(rows, key=lambda c: (c["test"][task]["value"], c["test_mean"]))
        if top["trial"] != summary["best_trial"]:
            out[task] = top
    return out
