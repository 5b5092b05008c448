"""`report()`: what the study learned, measured honestly on data the search never saw.

Writes results/<study>/: trials.csv, pareto.csv, test_scores.json, report.md and plots (PNG +
HTML). The best trial and the Pareto-front trials are re-scored on the `test` split beside every
known recipe, with 95 % bootstrap intervals; the gain over the best known recipe comes with a
paired bootstrap interval (same resampled examples for both).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import MergeSearchError
from ..evaluation import weighted_mean
from ..search import MERGE_SEED, Bench, resolve_folder, space_of, study_dir
from ..search.bench import Resolver
from ..search.convergence import REPORT_PATIENCE, REPORT_PATIENCE_TRIALS, convergence
from ..search.known_recipes import BASELINES, baseline_recipe
from ..search.run import patience_rule
from ..search.trials import StudyAttr, records
from .export import trial_recipes
from .files import atomic_csv, atomic_text
from .markdown import markdown
from .plots import plots
from .scoring import Rescorer, Scored, paired_gain
from .tables import best_trial, cost, front, load, trials_frame


def report(
    study: str,
    storage: str | None = None,
    *,
    device: str = "cpu",
    out: Path | None = None,
    bench: Bench | None = None,
    resolve: Resolver = resolve_folder,
    log=lambda msg: None,
) -> dict[str, Any]:
    """Write the study's report; returns the summary (also in test_scores.json). `log` receives
    a line per candidate scored (each costs both splits: minutes on a real model). `resolve`
    turns the space's model references into folders (the CLI's knows the zoos)."""
    s = load(study, storage)
    space = space_of(s)
    best = best_trial(s)  # refuses a study with no completed trial before anything is written
    out = Path(out) if out else study_dir(study)
    out.mkdir(parents=True, exist_ok=True)
    if bench is None:
        log(f"loading the base and {len(space.models)} models of study {study!r}")
        bench = Bench(space, device=device, resolve=resolve)
    bench.use_exact_engine()  # baselines include methods that need the models, not task vectors

    df = trials_frame(s)
    atomic_csv(df, out / "trials.csv")
    fr = front(s)
    atomic_csv(df[df["trial"].isin([t.number for t in fr])], out / "pareto.csv")

    # Means and gains are of the objective the search optimized: weighted when it was (mean).
    weights = dict(space.task_weights) if space.objective == "mean" and space.task_weights else None
    rescore = Rescorer(bench, weights, log)
    scored = [
        rescore.score(
            f"trial {t.number}" + (" (best)" if t.number == best.number else ""),
            trial_recipes(t),
            t.scores or None,
            trial=t.number,
        )
        for t in fr
    ]
    baselines: list[Scored] = []
    for name in BASELINES:
        r = baseline_recipe(name, bench.base_path, bench.model_paths, space.dtype)
        if r is not None:
            baselines.append(rescore.score(f"baseline: {name}", [r], known_recipe=name))
    best_s = rescore.by_trial[best.number]
    trials = records(s)
    orders = rescore.merge_orders(trials, space.models)
    grad = [t for t in trials if t.is_gradient and t.complete]
    gradient = rescore.trial(grad[0], f"gradient-learned: trial {grad[0].number}") if grad else None
    top_base = max(baselines, key=lambda b: b.test_mean) if baselines else None
    log("sweeping task arithmetic's λ on the search split (the hand-tuned scalar)")
    tuned = rescore.tuned_scalar(space.dtype)
    ceiling = rescore.ceiling()

    rule = report_patience(space, bench, s)
    conv = convergence(trials, rule["trials"], weights, rule["rule"])
    summary: dict[str, Any] = {
        "study": study,
        "trials": len(trials),
        "complete": int((df["state"] == "COMPLETE").sum()),
        "pruned": int((df["state"] == "PRUNED").sum()),
        "failed": int((df["state"] == "FAIL").sum()),
        "best_trial": best.number,
        "best_is_baseline": best.baseline,
        "methods": space.methods,
        "merge_seed": MERGE_SEED,
        "specialist_ceiling": ceiling,
        "cost": cost(s, df),
        "convergence": {
            "converged": conv.converged,
            "patience": conv.patience,
            "patience_rule": conv.rule or f"{conv.patience} trials",
            "patience_from": "space" if space.patience.count else "report default",
            "last_gain_trial": conv.best_trial,
            "trials_since": conv.since,
            "noise": conv.noise,
            "gain_recent": conv.gain_recent,
            "gain_second_half": conv.gain_second_half,
            "line": conv.line(),
        },
        **({"task_weights": weights} if weights else {}),
        **({"merge_orders": orders} if orders else {}),
        "candidates": [],
    }
    extra = [gradient] if gradient is not None and all(gradient is not x for x in scored) else []
    for x in scored + baselines + extra:
        summary["candidates"].append(x.row())
    if gradient is not None:
        gain, lo, hi = paired_gain(best_s, gradient)
        summary["gradient"] = {
            "trial": grad[0].number,
            "seconds": grad[0].gradient_seconds,
            "steps": grad[0].gradient_steps,
            "test_mean": gradient.test_mean,
            "best_minus_gradient": gain,
            "ci95": [lo, hi],
        }
    if top_base is not None:
        gain, lo, hi = paired_gain(best_s, top_base)
        summary["gain"] = {
            "over": top_base.label,
            "known_recipe": top_base.known_recipe,
            "gain": gain,
            "ci95": [lo, hi],
            "best_test_mean": best_s.test_mean,
            "baseline_test_mean": top_base.test_mean,
        }
        if ceiling:  # known only where the specialists are named after their tasks (the zoos)
            headroom = weighted_mean(ceiling, weights) - top_base.test_mean
            summary["gain"] |= {"headroom": headroom, "goal": min(0.10, headroom / 2)}
    if tuned is not None:
        summary["candidates"].append(tuned.row())
        gain, lo, hi = paired_gain(best_s, tuned)
        summary["gain_over_tuned_scalar"] = {"over": tuned.label, "gain": gain, "ci95": [lo, hi]}
    atomic_text(out / "test_scores.json", json.dumps(summary, indent=2, default=float))
    pictures = plots(s, bench, best, fr, rescore.by_trial, baselines, out)
    atomic_text(out / "report.md", markdown(summary, pictures, best, bench))
    return summary


def report_patience(space, bench: Bench, s) -> dict:
    """The rule a report judges convergence by: the space's patience, else 5 sampler generations
    (30 trials for a sampler without generations)."""
    multi = len(s.directions) > 1
    budget = s.user_attrs.get(StudyAttr.BUDGET) or space.trials
    if space.patience.count:
        return patience_rule(space, bench, space.sampler, multi, budget, space.patience)
    try:
        return patience_rule(space, bench, space.sampler, multi, budget, REPORT_PATIENCE)
    except MergeSearchError:
        return patience_rule(space, bench, space.sampler, multi, budget, REPORT_PATIENCE_TRIALS)
