"""Examples against score: the incumbent's test score as a study spends examples, for a
full-fidelity study and screen-then-confirm studies of the same space and zoo.

Each study's incumbent (its best trial scored on the whole search split, as the study knew it
after each trial) is scored on the test split with the exact engine, and plotted against the
examples the study had scored by then. The final incumbents are compared with the full-fidelity
one by a paired bootstrap interval on the test split. `--audit N` also scores N of a screened
study's screened-only candidates on the whole search split, to measure the screen's error and
its rank correlation beyond the candidates it sent to confirmation.

    .venv/bin/python benchmarks/screening_curve.py \\
        --study smollm2_ta_blocks=results/smollm2_ta_blocks/study.db \\
        --study smollm2_ta_blocks_screened=results/smollm2_ta_blocks_screened/study.db \\
        --out results/screening_curve [--audit 12]

The first --study is the full-fidelity reference; all must be studies of one space (up to its
screening settings).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def incumbents(study) -> list[tuple[int, int, object]]:
    """(examples scored so far, trial number, record) at each change of the confirmed best."""
    from mergesearch.search.trials import SCREENED_FITNESS, records

    out, spent, best = [], 0, -np.inf
    for t in sorted(records(study), key=lambda t: t.number):
        spent += sum(t.examples.values())
        if t.complete and t.fitness != SCREENED_FITNESS and t.values[0] > best:
            best = t.values[0]
            out.append((spent, t.number, t))
    return out, spent


def main() -> None:
    import optuna

    from mergesearch.recipe import parse_recipes
    from mergesearch.report.files import atomic_text
    from mergesearch.report.scoring import Scored, paired_gain
    from mergesearch.search import Bench, space_of
    from mergesearch.search.screening import spearman
    from mergesearch.search.trials import SCREENED_FITNESS, records
    from mergesearch.sources import resolve_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--study", action="append", required=True, help="NAME=PATH/TO/study.db (first: full fidelity)"
    )
    ap.add_argument("--out", type=Path, required=True, help="folder for curve.csv, curve.png, summary.json")
    ap.add_argument(
        "--audit", type=int, default=0, help="screened-only candidates to score on the whole search split"
    )
    ap.add_argument("--fractions", type=int, nargs="*", default=[20, 50],
                    help="also compare the incumbent each study had after 1/k of the full study's examples")  # fmt: skip
    args = ap.parse_args()
    studies = {}
    for spec in args.study:
        name, _, path = spec.partition("=")
        studies[name] = optuna.load_study(study_name=name, storage=f"sqlite:///{Path(path).resolve()}")
    first = next(iter(studies.values()))
    bench = Bench(space_of(first), resolve=resolve_model)
    bench.use_exact_engine()  # what reports score: the model mergekit builds
    weights = bench.space.task_weights or None
    cache: dict[tuple[str, int], Scored] = {}

    def test_of(name: str, t) -> Scored:
        if (name, t.number) not in cache:
            res, _ = bench.score(parse_recipes(t.recipe), "test")
            cache[name, t.number] = Scored(f"{name}:{t.number}", t.recipe, {}, res, task_weights=weights)
            print(f"{name} trial {t.number}: test mean {cache[name, t.number].test_mean:.3f}", flush=True)
        return cache[name, t.number]

    rows, summary = [], {"studies": {}}
    finals = {}
    for name, s in studies.items():
        steps, total = incumbents(s)
        for spent, number, t in steps:
            rows.append({"study": name, "examples": spent, "trial": number, "search": t.values[0],
                         "test": test_of(name, t).test_mean})  # fmt: skip
        done = records(s)
        screened = [t for t in done if t.screen]
        finals[name] = test_of(name, steps[-1][2])
        summary["studies"][name] = {
            "trials": len([t for t in done if t.values is not None]),
            "examples": total,
            "final_trial": steps[-1][1],
            "final_search": steps[-1][2].values[0],
            "final_test": finals[name].test_mean,
            "incumbents": len(steps),
            "confirmed": len([t for t in done if t.fitness == "confirmed"]),
            "screen_examples_per_trial": float(
                np.mean([sum(t.screen["examples"].values()) for t in screened])
            )
            if screened
            else None,
            "confirmation_examples_per_confirmed": float(
                np.mean([sum(t.examples.values()) for t in done if t.screen and t.fitness == "confirmed"])
            )
            if any(t.screen and t.fitness == "confirmed" for t in done)
            else None,
        }
    full_name = next(iter(studies))
    for name in list(studies)[1:]:
        gain, lo, hi = paired_gain(finals[full_name], finals[name])
        d = summary["studies"][name]
        d["full_minus_this"] = {"gain": gain, "ci95": [lo, hi], "within_ci": lo <= 0 <= hi}
        d["examples_ratio"] = summary["studies"][full_name]["examples"] / d["examples"]
        # Anytime: the incumbent the study had when it had spent 1/k of the full study's examples
        # (what a study with that example budget would have reported), against the full final.
        full_total = summary["studies"][full_name]["examples"]
        steps, _ = incumbents(studies[name])
        for k in args.fractions:
            before = [st for st in steps if st[0] <= full_total / k]
            if not before:
                continue
            spent, number, t = before[-1]
            gain, lo, hi = paired_gain(finals[full_name], test_of(name, t))
            d[f"at_1/{k}"] = {"budget": full_total / k, "trial": number, "examples_at_incumbent": spent,
                              "test": test_of(name, t).test_mean, "full_minus_this": gain, "ci95": [lo, hi],
                              "within_ci": lo <= 0 <= hi}  # fmt: skip
        if args.audit:
            s = studies[name]
            only = [t for t in records(s) if t.fitness == SCREENED_FITNESS and t.values is not None]
            pick = np.random.default_rng(0).choice(len(only), size=min(args.audit, len(only)), replace=False)
            by_number = {t.number: t for t in records(s)}
            est, own, truth, beat = [], [], [], 0
            for i in sorted(pick):
                t = only[i]
                ref = by_number[int(next(iter(t.screen["reference"].values())).split()[-1])]
                res, _ = bench.score(parse_recipes(t.recipe), "search", bench.space.whole)
                truth.append(float(bench.objective_value({k: v.value for k, v in res.items()})))
                est.append(t.values[0])
                own.append(float(bench.objective_value(t.screen["unpaired"])))
                beat += truth[-1] > ref.values[0]  # an improvement the screen did not send on
                print(f"audit {name} trial {t.number}: paired {est[-1]:.3f} unpaired {own[-1]:.3f} "
                      f"whole split {truth[-1]:.3f}", flush=True)  # fmt: skip

            def quality(x, truth=truth):
                err = np.array(x) - np.array(truth)
                return {"mean_error": float(err.mean()), "rmse": float(np.sqrt((err**2).mean())),
                        "rank_correlation": spearman(x, truth)}  # fmt: skip

            d["audit"] = {"candidates": len(est), "paired": quality(est), "unpaired": quality(own),
                          "beat_their_incumbent": beat}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    import pandas as pd

    df = pd.DataFrame(rows)
    df.to_csv(args.out / "curve.csv", index=False)
    atomic_text(args.out / "summary.json", json.dumps(summary, indent=2, default=float))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, g in df.groupby("study", sort=False):
        total = summary["studies"][name]["examples"]
        xs = list(g["examples"]) + [total]
        ys = list(g["test"]) + [g["test"].iloc[-1]]
        ax.step(xs, ys, where="post", label=f"{name} ({total} examples)")
        ax.plot(g["examples"], g["test"], "o", ms=3, color=ax.lines[-1].get_color())
    full_total = summary["studies"][full_name]["examples"]
    for k in args.fractions:
        ax.axvline(full_total / k, ls=":", c="#999")
        ax.text(full_total / k, ax.get_ylim()[0], f" 1/{k}", fontsize=7, color="#666", va="bottom")
    ax.set_xscale("log")
    ax.set_xlabel("examples scored so far (log)")
    ax.set_ylabel("incumbent's test mean")
    ax.set_title("incumbent's test score against examples spent")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out / "curve.png", dpi=120)
    print(json.dumps(summary, indent=2, default=float))


if __name__ == "__main__":
    main()
