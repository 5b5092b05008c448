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
from .recipe import Recipe, Source, dump_recipes, parse_recipes, rounded
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
    method: str = ""  # the last stage's merge method

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
        return Scored(label, dump_recipes(recipes), search, test, recorded, weights, recipes[-1].merge_method)

    scored: list[Scored] = []
    for t in fr:
        scored.append(
            score(
                f"trial {t.number}" + (" (best)" if t.number == best.number else ""),
                trial_recipes(t),
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
        return front_scored.get(t.number) or score(label, trial_recipes(t), None)

    orders = _merge_orders(s, space, trial_score)
    grad = [
        t
        for t in s.trials
        if t.user_attrs.get("warm_start") == "gradient" and t.state == optuna.trial.TrialState.COMPLETE
    ]
    gradient = trial_score(grad[0], f"gradient-learned: trial {grad[0].number}") if grad else None
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
        "best_is_baseline": best.user_attrs.get("baseline"),
        "methods": space.methods,
        "merge_seed": MERGE_SEED,
        "specialist_ceiling": ceiling,
        "cost": _cost(s, df),
        **({"task_weights": weights} if weights else {}),
        **({"merge_orders": orders} if orders else {}),
        "candidates": [],
    }
    extra = [gradient] if gradient is not None and all(gradient is not x for x in scored) else []
    for x in scored + baselines + extra:
        summary["candidates"].append(_row(x))
    if gradient is not None:
        gain, lo, hi = paired_gain(best_s, gradient)
        summary["gradient"] = {
            "trial": grad[0].number,
            "seconds": grad[0].user_attrs.get("gradient_seconds"),
            "steps": grad[0].user_attrs.get("gradient_steps"),
            "test_mean": gradient.test_mean,
            "best_minus_gradient": gain,
            "ci95": [lo, hi],
        }
    if top_base is not None:
        gain, lo, hi = paired_gain(best_s, top_base)
        summary["gain"] = {
            "over": top_base.label,
            "gain": gain,
            "ci95": [lo, hi],
            "best_test_mean": best_s.test_mean,
            "baseline_test_mean": top_base.test_mean,
        }
        if ceiling:  # known only where the specialists are named after their tasks (the zoos)
            headroom = best_s._mean(ceiling) - top_base.test_mean
            summary["gain"] |= {"headroom": headroom, "goal": min(0.10, headroom / 2)}
    if tuned is not None:
        summary["candidates"].append(_row(tuned))
        gain, lo, hi = paired_gain(best_s, tuned)
        summary["gain_over_tuned_scalar"] = {"over": tuned.label, "gain": gain, "ci95": [lo, hi]}
    _atomic_text(out / "test_scores.json", json.dumps(summary, indent=2, default=float))
    plots = _plots(s, searcher, best, fr, front_scored, baselines, out)
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
        "test": {
            k: {"value": v.value, "ci95": bootstrap_ci(v), "n": v.n}
            | ({"verdicts": "".join("1" if y else "0" for y in v.scores)} if v.metric != "perplexity" else {})
            for k, v in x.test.items()
        },
        "test_mean": x.test_mean,
        "gap_search_minus_test": x.search_mean - x.test_mean,
        "method": x.method,
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


def _plots(
    s, searcher: Searcher, best, fr, front_scored: dict[int, Scored], baselines: list[Scored], out: Path
) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = s.user_attrs.get("objective_names", [])
    done = [t for t in s.trials if t.state == optuna.trial.TrialState.COMPLETE]
    pruned = [t for t in s.trials if t.state == optuna.trial.TrialState.PRUNED and t.user_attrs.get("scores")]
    files = {}

    def save(fig, name: str) -> None:
        fig.tight_layout()
        _atomic(out / name, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
        plt.close(fig)
        files[name.split(".")[0]] = name

    if len(names) >= 2:
        fig, ax = plt.subplots(figsize=(7, 5.5))
        ax.scatter(
            [t.values[0] for t in done], [t.values[1] for t in done], s=10, c="#bbb", label="trials (search)"
        )
        fx = sorted((t.values[0], t.values[1]) for t in fr)
        ax.plot(
            [p[0] for p in fx], [p[1] for p in fx], "o-", c="C0", ms=5, label="Pareto front (search split)"
        )
        # The same recipes on the test split: how far each front point moves on unseen examples.
        for i, t in enumerate(fr):
            x = front_scored[t.number].test
            tx, ty = x[names[0]].value, x[names[1]].value
            ax.annotate(
                "",
                (tx, ty),
                (t.values[0], t.values[1]),
                arrowprops={"arrowstyle": "->", "color": "C2", "lw": 0.8},
            )
            ax.scatter(
                [tx],
                [ty],
                marker="D",
                s=36,
                c="C2",
                zorder=4,
                label="front re-scored (test split)" if i == 0 else None,
            )
        bt = front_scored[best.number].test
        ax.scatter(
            [bt[names[0]].value],
            [bt[names[1]].value],
            s=160,
            marker="*",
            c="C3",
            zorder=5,
            label=f"best (trial {best.number}), test",
        )
        for i, b in enumerate(baselines):
            ax.scatter(
                [b.test[names[0]].value],
                [b.test[names[1]].value],
                marker="x",
                s=50,
                c=f"C{(i % 7) + 4}",
                label=b.label.replace("baseline: ", "") + " (test)",
            )
        ax.set_xlabel(f"{names[0]} (exact match)")
        ax.set_ylabel(f"{names[1]} (exact match)")
        ax.set_title(f"{s.study_name}: Pareto front, search → test, and known recipes")
        ax.legend(fontsize=7, loc="best")
        save(fig, "pareto.png")

    fig, ax = plt.subplots(figsize=(8, 4))
    means = [float(np.mean(t.values)) for t in done]
    ax.scatter([t.number for t in done], means, s=10, c="#777", label="complete (mean of objectives)")
    known = [(t.number, m) for t, m in zip(done, means) if "baseline" in t.user_attrs]
    if known:
        ax.scatter(
            *zip(*known),
            s=28,
            marker="s",
            facecolors="none",
            edgecolors="C0",
            label="known recipe (not searched)",
        )
    # stopped at a low fidelity rung: their score there, on fewer examples
    pm = [float(np.mean(searcher.objective_value(t.user_attrs["scores"]))) for t in pruned]
    if pruned:
        ax.scatter(
            [t.number for t in pruned],
            pm,
            s=12,
            marker="x",
            c="C1",
            alpha=0.7,
            label="stopped early (score at its last rung)",
        )
    failed = [t.number for t in s.trials if t.state == optuna.trial.TrialState.FAIL]
    if failed:
        ax.scatter(failed, [0.0] * len(failed), s=14, marker="v", c="C3", label="failed")
    ax.plot(
        [t.number for t in done], np.maximum.accumulate(means) if means else [], c="C3", label="best so far"
    )
    ax.set_xlabel("trial")
    ax.set_ylabel("mean search score")
    ax.legend(fontsize=7)
    save(fig, "history.png")

    prof = coefficient_profile(best, searcher)
    if not prof.empty:
        fig = _heatmap(prof, f"coefficients of trial {best.number}")
        save(fig, "coefficients.png")
    try:
        files |= _html_plots(s, names, done, list(zip(pruned, pm)), fr, front_scored, out)
    except ImportError:  # plotly is optional for the report
        pass
    return files


def _heatmap(prof: pd.DataFrame, title: str):
    """One row of cells per (parameter, model, component), one column per layer: readable at 30+
    layers, where a line per coefficient is not. Values are written in the cells up to 16 layers."""
    import matplotlib.pyplot as plt

    rows = list(dict.fromkeys(zip(prof["param"], prof["model"], prof["component"])))
    layers = sorted(prof["layer"].unique())
    grid = np.full((len(rows), len(layers)), np.nan)
    for r in prof.itertuples():
        grid[rows.index((r.param, r.model, r.component)), layers.index(r.layer)] = r.value
    params = list(dict.fromkeys(prof["param"]))
    fig, axes = plt.subplots(
        len(params),
        1,
        figsize=(max(6.0, 2.5 + 0.32 * len(layers)), 1.2 + 0.42 * len(rows) + 0.4 * len(params)),
        squeeze=False,
    )
    for ax, param in zip(axes[:, 0], params):  # one color scale per parameter (weights ≠ densities)
        idx = [i for i, r in enumerate(rows) if r[0] == param]
        g = grid[idx]
        im = ax.imshow(g, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_yticks(range(len(idx)), [f"{rows[i][1]} · {rows[i][2]}" for i in idx], fontsize=8)
        step = max(1, len(layers) // 30)
        ax.set_xticks(
            range(0, len(layers), step), [str(layers[i]) for i in range(0, len(layers), step)], fontsize=7
        )
        ax.set_xlabel("layer")
        ax.set_title(f"{param}", fontsize=9, loc="left")
        if len(layers) <= 16:
            lo, hi = np.nanmin(g), np.nanmax(g)
            for (y, x), v in np.ndenumerate(g):
                if not np.isnan(v):
                    dark = hi > lo and (v - lo) / (hi - lo) < 0.6
                    ax.text(
                        x,
                        y,
                        f"{v:.2f}",
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if dark else "black",
                    )
        fig.colorbar(im, ax=ax, fraction=0.03, pad=0.01)
    fig.suptitle(title, fontsize=10)
    return fig


def _html_plots(s, names, done, pruned, fr, front_scored, out: Path) -> dict[str, str]:
    """Interactive plots that work offline: plotly.js is written once beside them
    (plotly.min.js), never fetched from a CDN."""
    import plotly.graph_objects as go
    from optuna.visualization import plot_pareto_front

    files = {}
    if len(names) >= 2:
        fig = plot_pareto_front(s, target_names=names)
        fig.add_trace(
            go.Scatter(
                x=[front_scored[t.number].test[names[0]].value for t in fr],
                y=[front_scored[t.number].test[names[1]].value for t in fr],
                text=[f"trial {t.number} (test split)" for t in fr],
                mode="markers",
                marker={"symbol": "diamond", "size": 9, "color": "#2ca02c"},
                name="front re-scored on the test split",
            )
        )
        _atomic(out / "pareto.html", lambda tmp: fig.write_html(tmp, include_plotlyjs="directory"))
        files["pareto_html"] = "pareto.html"
    fig = go.Figure()
    means = [float(np.mean(t.values)) for t in done]
    fig.add_trace(
        go.Scatter(
            x=[t.number for t in done],
            y=means,
            mode="markers",
            name="complete",
            marker={"color": "#777", "size": 5},
        )
    )
    if pruned:
        fig.add_trace(
            go.Scatter(
                x=[t.number for t, _ in pruned],
                y=[m for _, m in pruned],
                mode="markers",
                name="stopped early (score at its last rung)",
                marker={"symbol": "x", "color": "#ff7f0e", "size": 6},
            )
        )
    fig.add_trace(
        go.Scatter(
            x=[t.number for t in done],
            y=list(np.maximum.accumulate(means)) if means else [],
            name="best so far",
            line={"color": "#d62728"},
        )
    )
    fig.update_layout(
        title=f"{s.study_name}: optimization history", xaxis_title="trial", yaxis_title="mean search score"
    )
    _atomic(out / "history.html", lambda tmp: fig.write_html(tmp, include_plotlyjs="directory"))
    files["history_html"] = "history.html"
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


ADVICE = (
    "What to try: more trials (`mergesearch search SPACE --trials N --set-budget` resumes with a larger "
    "budget); fewer coefficients (`granularity: block:4` or `model`, fewer `components`), which a "
    "budget can search; a larger last `fidelity` rung, so that search scores are less noisy; "
    "another method or wider parameter ranges."
)


def _verdict(summary: dict) -> list[str]:
    """The headline: the learned recipe against the best known recipe, and what to do when it lost."""
    g = summary["gain"]
    ci = f"paired 95 % CI [{g['ci95'][0]:+.3f}, {g['ci95'][1]:+.3f}]"
    base = summary.get("best_is_baseline")
    if base:
        head = (
            f"**No learned recipe beat the known recipes on the search split:** the best trial "
            f"({summary['best_trial']}) is the known recipe {base}, test mean {g['best_test_mean']:.3f}; "
            f"the best known recipe on the test split is {g['over'].replace('baseline: ', '')} "
            f"({g['baseline_test_mean']:.3f}), gain "
            f"{g['gain']:+.3f} ({ci})."
        )
    else:
        how = (
            ", learned by gradient, the search's warm start"
            if summary.get("gradient", {}).get("trial") == summary["best_trial"]
            else ""
        )
        head = (
            f"**Learned recipe (trial {summary['best_trial']}{how}) vs best known recipe ({g['over']}):** "
            f"test mean {g['best_test_mean']:.3f} vs {g['baseline_test_mean']:.3f}, gain "
            f"**{g['gain']:+.3f}** ({ci})."
        )
        if g["ci95"][1] < 0:
            head += " **The known recipe is better on the test split: no learned recipe beat it.**"
        elif g["ci95"][0] <= 0:
            head += " The interval includes 0: the test split cannot tell them apart."
    if "headroom" in g:
        head += (
            f" Headroom to the specialists' ceiling was {g['headroom']:.3f}; the goal, "
            f"min(+0.10, headroom/2), was {g['goal']:+.3f}."
        )
    lines = [head, ""]
    if base or g["ci95"][1] < 0:
        lines += [ADVICE, ""]
    return lines


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
        lines += _verdict(summary)
    if "gain_over_tuned_scalar" in summary:
        t = summary["gain_over_tuned_scalar"]
        lines += [
            f"Against a hand-tuned scalar ({t['over']}), the learned recipe gains {t['gain']:+.3f} "
            f"(paired 95 % CI [{t['ci95'][0]:+.3f}, {t['ci95'][1]:+.3f}]): what per-layer learning adds "
            "beyond sweeping one knob.",
            "",
        ]
    if "gradient" in summary:
        g = summary["gradient"]
        lines += [
            f"Gradient reference: trial {g['trial']} holds task-arithmetic coefficients learned by gradient "
            f"descent on the search split ({g['steps']} steps, {g['seconds']:.0f}s), test mean {g['test_mean']:.3f}. "
            + (
                "It is the best trial."
                if g["trial"] == summary["best_trial"]
                else f"The best trial minus it: {g['best_minus_gradient']:+.3f} "
                f"(paired 95 % CI [{g['ci95'][0]:+.3f}, {g['ci95'][1]:+.3f}])."
            ),
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
    methods = len(summary.get("methods", [])) > 1  # a method-choice study: say which each used
    head = (
        "| candidate | "
        + ("method | " if methods else "")
        + "search mean | "
        + " | ".join(f"test {t}" for t in tasks)
        + " | test mean | gap |"
    )
    lines += [head, "|" + "---|" * (4 + len(tasks) + methods)]
    for c in summary["candidates"]:
        lines.append(
            f"| {c['label']} | "
            + (f"{c['method']} | " if methods else "")
            + f"{c['search_mean']:.3f} | "
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


def trial_recipes(t: optuna.trial.FrozenTrial) -> list[Recipe]:
    """What the report scores and export writes for a trial: its recorded recipe with values
    rounded to 4 significant digits (`recipe.rounded`), so the reported test score is the score
    of the exported file, not of the unrounded one the study merged."""
    return rounded(parse_recipes(t.user_attrs["recipe"]))


def _recipe_text(t: optuna.trial.FrozenTrial) -> str:
    return dump_recipes(trial_recipes(t))


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
