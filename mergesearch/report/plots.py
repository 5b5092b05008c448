"""The report's pictures: the Pareto front (search split → test split, with the known recipes),
the history of the search, and the best trial's coefficients as a heatmap; PNG, and HTML that
works offline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import optuna
import pandas as pd

from ..search import Bench
from ..search.trials import SCREENED_FITNESS, TrialRecord, records
from .files import atomic
from .scoring import Scored
from .tables import objective_names

State = optuna.trial.TrialState


def plots(
    s: optuna.Study,
    bench: Bench,
    best: TrialRecord,
    fr: list[TrialRecord],
    front_scored: dict[int, Scored],
    baselines: list[Scored],
    out: Path,
) -> dict[str, str]:
    """Writes the plots into `out`; returns {name: file} for the report's links."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = objective_names(s)
    trials = records(s)
    done = [t for t in trials if t.complete]
    pruned = [t for t in trials if t.state == State.PRUNED and t.scores]
    files = {}

    def save(fig, name: str) -> None:
        fig.tight_layout()
        atomic(out / name, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
        plt.close(fig)
        files[name.split(".")[0]] = name

    if len(names) >= 2:
        fig, ax = plt.subplots(figsize=(7, 5.5))
        ax.scatter(
            [t.values[0] for t in done], [t.values[1] for t in done], s=10, c="#bbb", label="trials (search)"
        )
        fx = sorted((t.values[0], t.values[1]) for t in fr)
        # two objectives: the front is a line; more: its projection on the first two is a cloud
        ax.plot(
            [p[0] for p in fx],
            [p[1] for p in fx],
            "o-" if len(names) == 2 else "o",
            c="C0",
            ms=5,
            label="Pareto front (search split)"
            + ("" if len(names) == 2 else f", on {len(names)} objectives"),
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
                label=f"{b.known_recipe} (test)",
            )
        ax.set_xlabel(f"{names[0]} (exact match)")
        ax.set_ylabel(f"{names[1]} (exact match)")
        ax.set_title(
            f"{s.study_name}: Pareto front, search → test, and known recipes"
            + ("" if len(names) == 2 else f"\n(the first two of {len(names)} objectives: {', '.join(names)})")
        )
        ax.legend(fontsize=7, loc="best")
        save(fig, "pareto.png")

    fig, ax = plt.subplots(figsize=(8, 4))
    means = [t.mean for t in done]
    screened = [t.fitness == SCREENED_FITNESS for t in done]
    if any(screened):  # screen-then-confirm: estimates apart from whole-split scores
        est = [(t.number, m) for t, m, e in zip(done, means, screened) if e]
        ax.scatter(*zip(*est), s=8, c="#bbb", label="screened (estimate from a few examples)")
    whole = [(t.number, m) for t, m, e in zip(done, means, screened) if not e]
    if whole:
        ax.scatter(
            *zip(*whole),
            s=12,
            c="#444" if any(screened) else "#777",
            label="confirmed (whole search split)" if any(screened) else "complete (mean of objectives)",
        )
    known = [(t.number, m) for t, m in zip(done, means) if t.baseline]
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
    pm = [float(np.mean(bench.objective_value(t.scores))) for t in pruned]
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
    failed = [t.number for t in trials if t.state == State.FAIL]
    if failed:
        ax.scatter(failed, [0.0] * len(failed), s=14, marker="v", c="C3", label="failed")
    if whole:  # an estimate is never the best: the running best is over whole-split scores
        xs, ys = zip(*whole)
        ax.step(list(xs) + [done[-1].number], list(np.maximum.accumulate(ys)) + [max(ys)], where="post",
                c="C3", label="best so far")  # fmt: skip
    ax.set_xlabel("trial")
    ax.set_ylabel("mean search score")
    ax.legend(fontsize=7)
    save(fig, "history.png")

    prof = coefficient_profile(best, bench)
    if not prof.empty:
        fig = heatmap(prof, f"coefficients of trial {best.number}")
        save(fig, "coefficients.png")
    try:
        files |= _html_plots(s, names, done, list(zip(pruned, pm)), fr, front_scored, out)
    except ImportError:  # plotly is optional for the report
        pass
    return files


def heatmap(prof: pd.DataFrame, title: str):
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
        atomic(out / "pareto.html", lambda tmp: fig.write_html(tmp, include_plotlyjs="directory"))
        files["pareto_html"] = "pareto.html"
    fig = go.Figure()
    means = [t.mean for t in done]
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
    atomic(out / "history.html", lambda tmp: fig.write_html(tmp, include_plotlyjs="directory"))
    files["history_html"] = "history.html"
    return files


def coefficient_profile(trial: TrialRecord, bench: Bench) -> pd.DataFrame:
    """Per-layer values of a trial's searched parameters (one row per param/model/component/layer).
    Models are named as the recipe uses them: in a sequential space, per stage and in the trial's
    merge order, the first input of a later stage being the previous stage's merge."""
    space = bench.space
    groups = space.groups(bench.num_layers)
    order = (
        [int(i) for i in trial.params["merge_order"].split(">")] if "merge_order" in trial.params else None
    )
    names = [Path(bench.model_paths[i]).name for i in (order or range(len(bench.model_paths)))]
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
    for c in space.coefficients(method, bench.num_layers):
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
