"""report.md: the verdict (the learned recipe against the best known recipe, with what to try when
it lost), the cost of the search, every candidate on both splits, merge orders, plots and the best
recipe."""

from __future__ import annotations

from ..search import MERGE_SEED, Bench
from ..search.trials import TrialRecord
from .export import recipe_text, zoo_names


def fmt_ci(r: dict) -> str:
    return f"{r['value']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]"


ADVICE = (
    "What to try: more trials (`mergesearch search SPACE --trials N --set-budget` resumes with a larger "
    "budget); fewer coefficients (`granularity: block:4` or `model`, fewer `components`), which a "
    "budget can search; a larger last `fidelity` rung, so that search scores are less noisy; "
    "another method or wider parameter ranges."
)


def verdict(summary: dict) -> list[str]:
    """The headline: the learned recipe against the best known recipe, and what to do when it lost."""
    g = summary["gain"]
    ci = f"paired 95 % CI [{g['ci95'][0]:+.3f}, {g['ci95'][1]:+.3f}]"
    base = summary.get("best_is_baseline")
    if base:
        head = (
            f"**No learned recipe beat the known recipes on the search split:** the best trial "
            f"({summary['best_trial']}) is the known recipe {base}, test mean {g['best_test_mean']:.3f}; "
            f"the best known recipe on the test split is {g['known_recipe']} "
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


def convergence_lines(c: dict | None) -> list[str]:
    """Whether the study converged or stopped on its budget, and what more trials bought lately."""
    if not c:
        return []
    rule = f"patience {c.get('patience_rule') or c['patience']}" + (
        "" if c["patience_from"] == "space" else ", the report's default: the space sets none"
    )
    more = (
        "by this rule more trials are not expected to pay (docs/reports.md: how the rule was checked)"
        if c["converged"]
        else "it stopped on its budget, not converged: more trials may still pay"
    )
    return [f"Convergence ({rule}): {c['line']}; {more}.", ""]


def screening_line(c: dict) -> str:
    """What screen-then-confirm spent, and how well the screen ranked what it sent on."""

    def rho(x: float) -> str:
        return "n/a (fewer than 3)" if x != x else f"{x:+.2f}"

    return (
        f" Screen, then confirm: {c['screened']} candidates screened ({c['screen_examples_per_trial']:.0f} examples "
        f"each), {c['confirmed']} confirmed on the whole search split ({c['examples_confirmed']} examples, "
        f"{c['examples_screened_only']} on candidates only screened). Screen estimate vs confirmed score, "
        f"rank correlation over the {c['confirmed_after_screen']} screened then confirmed: "
        f"{rho(c['rank_correlation'])}; over the {c.get('raced', 0)} the screen sent on (confirmed, or stopped "
        f"on the way on more examples): {rho(c.get('rank_correlation_raced', float('nan')))}. "
        "Only confirmed scores are reported as the best."
    )


def markdown(summary: dict, plots: dict[str, str], best: TrialRecord, bench: Bench) -> str:
    tasks = [t.name for t in bench.tasks]
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
        lines += verdict(summary)
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
        )
        + (screening_line(c["screening"]) if "screening" in c else ""),
        "",
        *convergence_lines(summary.get("convergence")),
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
            + " | ".join(fmt_ci(c["test"][t]) for t in tasks)
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
                + " | ".join(fmt_ci(o["test"][t]) for t in tasks)
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
        recipe_text(best, zoo_names(bench.folders)).rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)
