"""Does "converged" hold? Run a study until its patience says converged, continue it, and score
both bests on the test split (issue 28).

    .venv/bin/python benchmarks/convergence_check.py --space search_spaces/smollm2_ta_blocks_screened.yaml \\
        --patience 5g --more 100 --out results/convergence_smollm2
    .venv/bin/python benchmarks/convergence_check.py --demo-seed 4 --patience 5g --more 300 --out /tmp/conv

1. `mergesearch search SPACE --patience P` with a large budget: the study stops when converged
   (or on `--max-trials`), and prints its convergence line.
2. `mergesearch search SPACE --patience 0 --trials N+more --set-budget`: the same study, `--more`
   trials on.
3. The best trial before and after (the report's rule), exported, merged and scored on the test
   split; the table gives both, the gain with its paired 95 % interval and that interval's
   half-width: "converged" holds when the gain is below it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def main() -> None:
    from head_to_head import chosen, cli, paired, score, space_of

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--space", help="a search space YAML")
    g.add_argument(
        "--demo-seed", type=int, help="the demo zoo of this seed, the demo's space made single-objective"
    )
    ap.add_argument("--patience", default="5g", help="the rule checked (default 5g: 5 sampler generations)")
    ap.add_argument("--more", type=int, required=True, help="trials run on after convergence")
    ap.add_argument("--max-trials", type=int, default=2000, help="budget of the first run (default 2000)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    space = space_of(args)
    space["trials"] = args.max_trials
    path = out / "space.yaml"
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    env = dict(os.environ, MERGESEARCH_RESULTS=str(out / "results"))
    name = space["name"]
    seconds = {"until_converged": cli(env, "search", str(path), "--patience", args.patience, "-q")}
    first = chosen(env, out / "results", name, False)
    rule = converged_line(out / "results", name)
    n = first["trials"]
    seconds["more"] = cli(
        env, "search", str(path), "--patience", "0", "--trials", str(n + args.more), "--set-budget", "-q"
    )
    second = chosen(env, out / "results", name, False)
    a = score(first, space["tasks"], out / "merged" / f"trial{first['trial']}")
    b = score(second, space["tasks"], out / "merged" / f"trial{second['trial']}")
    gain, lo, hi = paired(b, a)
    test_a = sum(a["test"].values()) / len(a["test"])
    test_b = sum(b["test"].values()) / len(b["test"])
    # the test CI's half-width of one recipe's mean score (binomial, tasks averaged)
    half = (
        1.96
        * (sum(p * (1 - p) / len(a["verdicts"][t]) for t, p in a["test"].items()) ** 0.5)
        / len(a["test"])
    )
    summary = {
        "space": name,
        "patience": args.patience,
        "convergence_line": rule,
        "converged_at_trials": n,
        "best_at_convergence": {"trial": first["trial"], "search": first["search_mean"], "test": test_a},
        "more_trials": args.more,
        "best_after": {"trial": second["trial"], "search": second["search_mean"], "test": test_b},
        "gain_after": [gain, lo, hi],
        "test_ci_half_width": half,
        "holds": bool(gain < half),
        "seconds": seconds,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


def converged_line(results: Path, name: str) -> str:
    """The study's convergence line, as `mergesearch search` prints it."""
    import optuna

    from mergesearch.search.convergence import convergence
    from mergesearch.search.trials import StudyAttr, records

    s = optuna.load_study(study_name=name, storage=f"sqlite:///{results / name / 'study.db'}")
    rule = s.user_attrs[StudyAttr.PATIENCE]
    return convergence(records(s), rule["trials"], None, rule["rule"]).line()


if __name__ == "__main__":
    main()
