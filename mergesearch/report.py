"""Report and export: what the study learned, measured honestly on data the search never saw.

`report()` writes results/<study>/: trials.csv, pareto.csv, test_scores.json, report.md and
plots (PNG + HTML). The best trial and the Pareto-front trials are re-scored on the `test`
split beside every known recipe, with 95 % bootstrap intervals; the gain over the best known
recipe comes with a paired bootstrap interval (same resampled examples for both).
`export()` writes a trial's recipe as mergekit YAML with a header saying what it scored.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd

from .errors import MergeSearchError
from .evaluation.native import TaskResult, bootstrap_ci
from .recipe import Recipe, Source, dump_recipes, parse_recipes
from .space import BASELINES, baseline_recipe
from .study import MERGE_SEED, Searcher, open_storage, space_of, study_dir


def load(study: str, storage: str | None = None) -> optuna.Study:
    try:
        return optuna.load_study(study_name=study, storage=open_storage(storage, study, create=False))
    except KeyError as e:
        raise MergeSearchError(f"study {study!r} is not in that storage") from e


def trials_frame(s: optuna.Study) -> pd.DataFrame:
    names = s.user_attrs.get("objective_names", [f"objective {i}" for i in range(len(s.directions))])
    rows = []
    for t in s.trials:
        row: dict[str, Any] = {
            "trial": t.number,
            "state": t.state.name,
            "baseline": t.user_attrs.get("baseline", ""),
        }
        for i, n in enumerate(names):
            row[n] = t.values[i] if t.values else np.nan
        for task, v in (t.user_attrs.get("scores") or {}).items():
            row[f"search:{task}"] = v
        row["examples_per_task"] = t.user_attrs.get("fidelity", np.nan)
        row["examples"] = sum((t.user_attrs.get("examples") or {}).values()) or np.nan
        if "fitness" in t.user_attrs:  # anchor studies: "reference" (whole split) or "anchors"
            row["fitness"] = t.user_attrs["fitness"]
        row["stopped_at"] = t.user_attrs.get("stopped_at", np.nan)
        row["merge_s"] = t.user_attrs.get("merge_seconds", np.nan)
        row["eval_s"] = t.user_attrs.get("eval_seconds", np.nan)
        if "feasible" in t.user_attrs:
            row["feasible"] = t.user_attrs["feasible"]
        row.update({f"param:{k}": v for k, v in t.params.items()})
        rows.append(row)
    return pd.DataFrame(rows)


def front(s: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    trials = (
        [t for t in s.best_trials if t.user_attrs.get("feasible", True)]
        if len(s.directions) > 1
        else ([s.best_trial] if any(t.state == optuna.trial.TrialState.COMPLETE for t in s.trials) else [])
    )
    return sorted(trials, key=lambda t: t.number)


def best_trial(s: optuna.Study) -> optuna.trial.FrozenTrial:
    f = front(s)
    if not f:
        raise MergeSearchError(f"study {s.study_name!r} has no completed trial yet; run more trials")
    return max(f, key=lambda t: float(np.mean(t.values)))


@dataclass
class Scored:
    label: str
    recipe_yaml: str
    search: dict[str, float]
    test: dict[str, TaskResult]
    during_study: dict[str, float] | None = None  # search scores the study recorded (its engine)
    task_weights: dict[str, float] | None = None  # the space's: means are the search's objective

    def _w(self, task: str) -> float:
        return float((self.task_weights or {}).get(task, 1.0))

    def _mean(self, values: dict[str, float]) -> float:
        """Σ wₜ·vₜ / Σ wₜ (weights 1 where the space sets none): the objective the search used."""
        total = sum(self._w(t) for t in values)
        return sum(self._w(t) * v for t, v in values.items()) / total if values else float("nan")

    @property
    def test_mean(self) -> float:
        return self._mean({t: r.value for t, r in self.test.items()})

    @property
    def search_mean(self) -> float:
        return self._mean(self.search) if self.search else float("nan")


def paired_gain(a: Scored, b: Scored, n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Test score of a minus b, as the weighted mean over tasks the search optimized, and its
    paired 95 % bootstrap interval (the same resampled examples for both)."""
    rng = np.random.default_rng(seed)
    diffs = np.zeros(n_boot)
    for task, ra in a.test.items():
        rb = b.test[task]
        idx = rng.integers(0, ra.n, size=(n_boot, ra.n))
        diffs += a._w(task) * (ra.scores[idx].mean(1) - rb.scores[idx].mean(1))
    diffs /= sum(a._w(t) for t in a.test)
    gain = a.test_mean - b.test_mean
    lo, hi = np.quantile(diffs, [0.025, 0.975])
    return gain, float(lo), float(hi)


def report(
    study: str,
    storage: str | None = None,
    *,
    device: str = "cpu",
    out: Path | None = None,
    searcher: Searcher | None = None,
    log=lambda msg: None,
) -> dict[str, Any]:
    """Write the study's report; returns the summary (also in test_scores.json). `log` receives
    a line per candidate scored (each costs both splits: minutes on a real model)."""
    s = load(study, storage)
    space = space_of(s)
    best = best_trial(s)  # refuses a study with no completed trial before anything is written
    out = Path(out) if out else study_dir(study)
    out.mkdir(parents=True, exist_ok=True)
    if searcher is None:
        log(f"loading the base and {len(space.models)} models of study {study!r}")
        searcher = Searcher(space, device=device)
    searcher.hold_models()  # baselines include methods that need the models, not task vectors

    df = trials_frame(s)
    _atomic_csv(df, out / "trials.csv")
    fr = front(s)
    _atomic_csv(df[df["trial"].isin([t.number for t in fr])], out / "pareto.csv")

    # Means and gains are of the objective the search optimized: weighted when it was (mean).
    weights = dict(space.task_weights) if space.objective == "mean" and space.task_weights else None

    def score(label: str, recipes: list[Recipe], recorded: dict[str, float] | None) -> Scored:
        # Both splits again with the exact engine: the model mergekit builds from the exported
        # YAML, not the search engine's (other DARE/DELLA draws; ties broken by index).
        t0 = time.perf_counter()
        test, _ = searcher.score(recipes, "test")
        res, _ = searcher.score(recipes, "search")
        search = {k: v.value for k, v in res.items()}
        log(
            f"scored {label}: test mean {np.mean([r.value for r in test.values()]):.3f} ({time.perf_counter() - t0:.0f}s)"
        )
        return Scored(label, dump_recipes(recipes), search, test, recorded, weights)

    scored: list[Scored] = []
    for t in fr:
        scored.append(
            score(
                f"trial {t.number}" + (" (best)" if t.number == best.number else ""),
                parse_recipes(t.user_attrs["recipe"]),
                t.user_attrs.get("scores"),
            )
        )
    baselines: list[Scored] = []
    for name in BASELINES:
        r = baseline_recipe(name, searcher.base_path, searcher.model_paths, space.dtype)
        if r is not None:
            baselines.append(score(f"baseline: {name}", [r], None))
    best_s = next(x for x in scored if x.label.endswith("(best)"))
    front_scored = {t.number: x for t, x in zip(fr, scored)}

    def trial_score(t: optuna.trial.FrozenTrial, label: str) -> Scored:  # the front's are scored already
        return front_scored.get(t.number) or score(label, parse_recipes(t.user_attrs["recipe"]), None)

    orders = _merge_orders(s, space, trial_score)
    top_base = max(baselines, key=lambda b: b.test_mean) if baselines else None
    log("sweeping task arithmetic's λ on the search split (the hand-tuned scalar)")
    tuned = _tuned_scalar(searcher, space.dtype, score)
    ceiling = _ceiling(searcher)

    summary: dict[str, Any] = {
        "study": study,
        "trials": len(s.trials),
        "complete": int((df["state"] == "COMPLETE").sum()),
        "pruned": int((df["state"] == "PRUNED").sum()),
        "failed": int((df["state"] == "FAIL").sum()),
        "best_trial": best.number,
        "merge_seed": MERGE_SEED,
        "specialist_ceiling": ceiling,
        "cost": _cost(s, df),
        **({"task_weights": weights} if weights else {}),
        **({"merge_orders": orders} if orders else {}),
        "candidates": [],
    }
    for x in scored + baselines:
        summary["candidates"].append(_row(x))
    if top_base is not None:
        gain, lo, hi = paired_gain(best_s, top_base)
        headroom = float(np.mean(list(ceiling.values()))) - top_base.test_mean
        summary["gain"] = {
            "over": top_base.label,
            "gain": gain,
            "ci95": [lo, hi],
            "best_test_mean": best_s.test_mean,
            "baseline_test_mean": top_base.test_mean,
            "headroom": headroom,
            "goal": min(0.10, headroom / 2),
        }
    if tuned is not None:
        summary["candidates"].append(_row(tuned))
        gain, lo, hi = paired_gain(best_s, tuned)
        summary["gain_over_tuned_scalar"] = {"over": tuned.label, "gain": gain, "ci95": [lo, hi]}
    _atomic_text(out / "test_scores.json", json.dumps(summary, indent=2, default=float))
    plots = _plots(s, searcher, best, fr, baselines, out)
    _atomic_text(out / "report.md", _markdown(summary, plots, best, searcher))
    return summary


def _merge_orders(s: optuna.Study, space, trial_score) -> list[dict[str, Any]] | None:
    """Sequential spaces that search the merge order: per order, its trials and its best trial
    (by search mean) scored on the test split, so the orders compare on data the search never saw."""
    done = [t for t in s.trials if t.state == optuna.trial.TrialState.COMPLETE and "merge_order" in t.params]
    if not done:
        return None
    rows = []
    for order in sorted({t.params["merge_order"] for t in done}):
        ts = [t for t in done if t.params["merge_order"] == order]
        top = max(ts, key=lambda t: float(np.mean(t.values)))
        names = " > ".join(space.models[int(i)] for i in order.split(">"))
        x = trial_score(top, f"order {names}: trial {top.number}")
        row = {"order": order, "models": names, "trials": len(ts), "best_trial": top.number}
        rows.append(
            row
            | {"search_mean": float(np.mean(top.values)), "test": _row(x)["test"], "test_mean": x.test_mean}
        )
    return rows


def _cost(s: optuna.Study, df: pd.DataFrame) -> dict[str, Any]:
    """What the search spent: per-trial merge and eval seconds, examples scored, trials per hour
    (from the trials' own start and end times, so several workers count together)."""
    done = df[df["state"].isin(["COMPLETE", "PRUNED"])]
    finished = [t for t in s.trials if t.datetime_start and t.datetime_complete]
    hours = (
        (max(t.datetime_complete for t in finished) - min(t.datetime_start for t in finished)).total_seconds()
        / 3600
        if finished
        else float("nan")
    )
    out = {
        "trials": len(done),
        "merge_s_median": float(done["merge_s"].median()),
        "eval_s_median": float(done["eval_s"].median()),
        "examples_total": int(done["examples"].fillna(0).sum()),
        "examples_per_trial_mean": float(done["examples"].mean()),
        "wall_hours": hours,
        "trials_per_hour": len(finished) / hours if hours > 0 else float("nan"),
    }
    if "fitness" in done:
        ref = done[done["fitness"] == "reference"]
        out["anchors"] = {
            "reference_trials": len(ref),
            "reference_examples": int(ref["examples"].sum()),
            "anchor_trials": int((done["fitness"] == "anchors").sum()),
            "per_task": s.user_attrs.get("anchors")
            and {k: len(v["indices"]) for k, v in s.user_attrs["anchors"].items()},
        }
    return out


def _row(x: Scored) -> dict[str, Any]:
    return {
        "label": x.label,
        "search": x.search,
        "search_mean": x.search_mean,
        "search_during_study": x.during_study,
        "test": {k: {"value": v.value, "ci95": bootstrap_ci(v), "n": v.n} for k, v in x.test.items()},
        "test_mean": x.test_mean,
        "gap_search_minus_test": x.search_mean - x.test_mean,
        "recipe": x.recipe_yaml,
    }


def _tuned_scalar(searcher: Searcher, dtype: str | None, score) -> Scored | None:
    """Task arithmetic with unit weights and the λ that a 1-D sweep on the search split picks:
    what a careful person would do by hand, so the report says what learning adds beyond it."""
    if not all(t.higher_is_better for t in searcher.tasks):
        return None
    best: tuple[float, float, Recipe] | None = None
    for lam in [round(0.2 + 0.1 * i, 1) for i in range(14)]:
        r = Recipe(
            "task_arithmetic",
            base_model=searcher.base_path,
            parameters={"lambda": lam},
            dtype=dtype,
            models=[Source(m, {"weight": 1.0}) for m in searcher.model_paths],
        )
        res, _ = searcher.score([r], "search")
        mean = float(np.mean([v.value for v in res.values()]))
        if best is None or mean > best[0]:
            best = (mean, lam, r)
    return score(f"tuned: task_arithmetic λ={best[1]} (sweep on search split)", [best[2]], None)


def _ceiling(searcher: Searcher) -> dict[str, float]:
    """Each specialist on its own skill, when a model is named after the task (the zoo)."""
    out = {}
    for task in searcher.tasks:
        for path in searcher.model_paths:
            if Path(path).name == task.name:
                # its own task only: the others are not the ceiling (3× fewer examples to score)
                searcher.engine.write_into(searcher.model, [Recipe("passthrough", models=[Source(path)])])
                out[task.name] = searcher.evaluator.evaluate(task, "test").value
    return out


def _plots(s, searcher: Searcher, best, fr, baselines: list[Scored], out: Path) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = s.user_attrs.get("objective_names", [])
    done = [t for t in s.trials if t.state == optuna.trial.TrialState.COMPLETE]
    files = {}
    if len(names) >= 2:
        fig, ax = plt.subplots(figsize=(6, 5))
        xs = [t.values[0] for t in done]
        ys = [t.values[1] for t in done]
        ax.scatter(xs, ys, s=12, c="#999", label="trials")
        fx = sorted((t.values[0], t.values[1]) for t in fr)
        ax.plot([p[0] for p in fx], [p[1] for p in fx], "o-", c="C0", label="Pareto front")
        ax.scatter(
            [best.values[0]],
            [best.values[1]],
            s=120,
            marker="*",
            c="C3",
            zorder=5,
            label=f"best (trial {best.number})",
        )
        for i, b in enumerate(baselines):
            ax.scatter(
                [b.search[names[0]]],
                [b.search[names[1]]],
                marker="x",
                s=60,
                c=f"C{(i % 8) + 1}",
                label=b.label.replace("baseline: ", ""),
            )
        ax.set_xlabel(f"{names[0]} (search split)")
        ax.set_ylabel(f"{names[1]} (search split)")
        ax.set_title(f"{s.study_name}: Pareto front and known recipes")
        ax.legend(fontsize=7, loc="best")
        fig.tight_layout()
        _atomic(out / "pareto.png", lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
        plt.close(fig)
        files["pareto"] = "pareto.png"
    fig, ax = plt.subplots(figsize=(7, 4))
    nums = [t.number for t in done]
    means = [float(np.mean(t.values)) for t in done]
    ax.scatter(nums, means, s=10, c="#888", label="trial (mean of objectives)")
    ax.plot(nums, np.maximum.accumulate(means) if means else [], c="C3", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel("mean search score")
    ax.legend()
    fig.tight_layout()
    _atomic(out / "history.png", lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    files["history"] = "history.png"
    prof = coefficient_profile(best, searcher)
    if not prof.empty:
        fig, ax = plt.subplots(figsize=(7, 4))
        for (param, model, comp), g in prof.groupby(["param", "model", "component"]):
            ax.plot(g["layer"], g["value"], marker="o", label=f"{param} · {model} · {comp}")
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))  # layers are whole numbers
        ax.set_ylabel("value")
        ax.set_title(f"per-layer coefficients of trial {best.number}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        _atomic(out / "coefficients.png", lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
        plt.close(fig)
        files["coefficients"] = "coefficients.png"
    try:
        from optuna.visualization import plot_optimization_history, plot_pareto_front

        if len(names) >= 2:
            fig_p = plot_pareto_front(s, target_names=names)
            _atomic(out / "pareto.html", lambda tmp: fig_p.write_html(tmp, include_plotlyjs="cdn"))
            files["pareto_html"] = "pareto.html"
        fig_h = plot_optimization_history(
            s, target=lambda t: float(np.mean(t.values)), target_name="mean score"
        )
        _atomic(out / "history.html", lambda tmp: fig_h.write_html(tmp, include_plotlyjs="cdn"))
        files["history_html"] = "history.html"
    except ImportError:  # plotly is optional for the report
        pass
    return files


def coefficient_profile(trial, searcher: Searcher) -> pd.DataFrame:
    """Per-layer values of a trial's searched parameters (one row per param/model/component/layer).
    Models are named as the recipe uses them: in a sequential space, per stage and in the trial's
    merge order, the first input of a later stage being the previous stage's merge."""
    space = searcher.space
    groups = space.groups(searcher.num_layers)
    order = (
        [int(i) for i in trial.params["merge_order"].split(">")] if "merge_order" in trial.params else None
    )
    names = [Path(searcher.model_paths[i]).name for i in (order or range(len(searcher.model_paths)))]
    method = trial.params.get("method", space.methods[0])

    def input_name(c) -> str:
        if c.model is None:
            return "shared" if space.stages == 1 else f"shared (stage {c.stage + 1})"
        if space.stages == 1:
            return names[c.model]
        if c.model == 1:
            return f"{names[c.stage + 1]} (stage {c.stage + 1})"
        return f"{names[0]} (stage 1)" if c.stage == 0 else f"stage {c.stage} merge (stage {c.stage + 1})"

    rows = []
    for c in space.coefficients(method, searcher.num_layers):
        if c.key not in trial.params:  # a study recorded under another naming: nothing to draw
            continue
        for layer in groups[c.group]:
            rows.append(
                {
                    "param": c.param,
                    "model": input_name(c),
                    "component": c.component,
                    "layer": layer,
                    "value": trial.params[c.key],
                }
            )
    return pd.DataFrame(rows)


def _fmt_ci(r: dict) -> str:
    return f"{r['value']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]"


def _markdown(summary: dict, plots: dict[str, str], best, searcher: Searcher) -> str:
    tasks = [t.name for t in searcher.tasks]
    lines = [
        f"# Study `{summary['study']}`",
        "",
        f"{summary['trials']} trials: {summary['complete']} complete, {summary['pruned']} stopped early "
        f"(multi-fidelity), {summary['failed']} failed. Scores are exact match; the search saw only the "
        "`search` split, every number below in the test columns is on the `test` split it never saw, "
        "with 95 % bootstrap intervals. Every number here is of the model mergekit builds from the "
        "recipe (scored again with the exact engine); the study's own search scores, from the search "
        "engine's draws, are in trials.csv and test_scores.json (`search_during_study`).",
        "",
    ]
    if summary.get("task_weights"):
        lines += [
            "Means and gains below are weighted by the space's task_weights, as the search's objective was: "
            + ", ".join(f"{k} {v:g}" for k, v in summary["task_weights"].items())
            + " (tasks not named weigh 1).",
            "",
        ]
    if "gain" in summary:
        g = summary["gain"]
        lines += [
            f"**Learned recipe (trial {summary['best_trial']}) vs best known recipe ({g['over']}):** "
            f"test mean {g['best_test_mean']:.3f} vs {g['baseline_test_mean']:.3f}, gain "
            f"**{g['gain']:+.3f}** (paired 95 % CI [{g['ci95'][0]:+.3f}, {g['ci95'][1]:+.3f}]). "
            f"Headroom to the specialists' ceiling was {g['headroom']:.3f}; the goal, min(+0.10, headroom/2), "
            f"was {g['goal']:+.3f}.",
            "",
        ]
    if "gain_over_tuned_scalar" in summary:
        t = summary["gain_over_tuned_scalar"]
        lines += [
            f"Against a hand-tuned scalar ({t['over']}), the learned recipe gains {t['gain']:+.3f} "
            f"(paired 95 % CI [{t['ci95'][0]:+.3f}, {t['ci95'][1]:+.3f}]): what per-layer learning adds "
            "beyond sweeping one knob.",
            "",
        ]
    c = summary["cost"]
    lines += [
        f"Search cost: {c['trials']} trials in {c['wall_hours'] * 60:.1f} min ({c['trials_per_hour']:.0f} trials/hour); "
        f"per trial, median merge {c['merge_s_median']:.2f}s and eval {c['eval_s_median']:.2f}s; "
        f"{c['examples_total']} examples scored in all ({c['examples_per_trial_mean']:.0f} per trial)."
        + (
            f" Few-example fitness: {c['anchors']['reference_trials']} reference trials on the whole search "
            f"split ({c['anchors']['reference_examples']} examples), then {c['anchors']['anchor_trials']} trials "
            f"on anchors ({', '.join(f'{k} {v}' for k, v in (c['anchors']['per_task'] or {}).items())} per task)."
            if "anchors" in c
            else ""
        ),
        "",
        "The gap column is search mean minus test mean: how much a candidate's search score overstates "
        "what it does on examples the search never saw.",
        "",
    ]
    head = "| candidate | search mean | " + " | ".join(f"test {t}" for t in tasks) + " | test mean | gap |"
    lines += [head, "|" + "---|" * (4 + len(tasks))]
    for c in summary["candidates"]:
        lines.append(
            f"| {c['label']} | {c['search_mean']:.3f} | "
            + " | ".join(_fmt_ci(c["test"][t]) for t in tasks)
            + f" | {c['test_mean']:.3f} | {c['gap_search_minus_test']:+.3f} |"
        )
    if summary.get("specialist_ceiling"):
        lines += [
            "",
            "Specialists on their own skill (ceiling): "
            + ", ".join(f"{k} {v:.3f}" for k, v in summary["specialist_ceiling"].items()),
        ]
    if summary.get("merge_orders"):
        won = best.params.get("merge_order")
        lines += [
            "",
            "## Merge order",
            "",
            "Each order's best trial (by search mean) re-scored on the test split; the best trial's order "
            "is marked. Overlapping intervals mean the order did not matter measurably here.",
            "",
            "| merge order (first merged first) | trials | best trial | search mean | "
            + " | ".join(f"test {t}" for t in tasks)
            + " | test mean |",
            "|" + "---|" * (5 + len(tasks)),
        ]
        for o in summary["merge_orders"]:
            lines.append(
                f"| {o['models']}{' **(best)**' if o['order'] == won else ''} | {o['trials']} | {o['best_trial']} | "
                f"{o['search_mean']:.3f} | "
                + " | ".join(_fmt_ci(o["test"][t]) for t in tasks)
                + f" | {o['test_mean']:.3f} |"
            )
    lines += ["", "## Plots", ""]
    for k, f in plots.items():
        lines.append(f"![{k}]({f})" if f.endswith(".png") else f"- [{k}]({f})")
    lines += [
        "",
        f"## Best recipe (trial {best.number}; merge with `--seed {MERGE_SEED}` / mergekit "
        f"`--random-seed {MERGE_SEED}`)",
        "",
        "```yaml",
        _recipe_text(best).rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def export(
    study: str, storage: str | None = None, *, trial: int | None = None, out: str | Path | None = None
) -> Path:
    """A trial's recipe (default: the best) as mergekit YAML with a provenance header."""
    s = load(study, storage)
    if trial is None:
        t = best_trial(s)
    else:
        matches = [x for x in s.trials if x.number == trial]
        if not matches or "recipe" not in matches[0].user_attrs:
            raise MergeSearchError(f"study {study!r} has no trial {trial} with a recipe")
        t = matches[0]
    test = {}
    scores_file = study_dir(study) / "test_scores.json"
    if scores_file.is_file():
        for c in json.loads(scores_file.read_text())["candidates"]:
            if c["label"].startswith(f"trial {t.number}"):
                test = {k: round(v["value"], 4) for k, v in c["test"].items()}
    header = [
        f"# mergesearch export: study {study}, trial {t.number}",
        f"# search scores{' (anchor estimates)' if t.user_attrs.get('fitness') == 'anchors' else ''}: "
        f"{json.dumps({k: round(v, 4) for k, v in (t.user_attrs.get('scores') or {}).items()})}",
        f"# test scores: {json.dumps(test) if test else 'not measured yet (run mergesearch report)'}",
        f"# seed: {MERGE_SEED} (mergesearch merge --seed {MERGE_SEED} / mergekit-yaml --random-seed {MERGE_SEED})",
        "",
    ]
    text = "\n".join(header) + _recipe_text(t)
    path = Path(out) if out else study_dir(study) / f"trial_{t.number}.yaml"
    _atomic_text(path, text)
    return path


def _recipe_text(t: optuna.trial.FrozenTrial) -> str:
    """A trial's recipe written again by today's writer (studies recorded before it may hold YAML
    anchors); the values are the recorded ones."""
    return dump_recipes(parse_recipes(t.user_attrs["recipe"]))


def _atomic(path: Path, write) -> None:
    """write(tmp) then rename over `path`: readers see the old file or the new one, and a failed
    write (a full disk) leaves neither a partial file nor the temporary one."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _atomic_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic(path, lambda tmp: tmp.write_text(text))


def _atomic_csv(df: pd.DataFrame, path: Path) -> None:
    _atomic(path, lambda tmp: df.to_csv(tmp, index=False))
