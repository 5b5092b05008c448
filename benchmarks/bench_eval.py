"""Native harness vs lm-evaluation-harness on the same task, model and examples.

    .venv/bin/python benchmarks/bench_eval.py [--limit 300] [--repeat 3]

Prints the time of each (best of --repeat, after one warm-up call each), the ratio, and how
many per-example verdicts agree.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def main() -> None:
    from mergesearch.evaluation import NativeEvaluator, configure_threads, find_task
    from mergesearch.evaluation.lmeval import LMEvalBackend
    from mergesearch.modeling import load_model
    from mergesearch.zoo import build_zoo

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=300)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    threads = configure_threads()
    zoo = build_zoo(progress=False, log=lambda s: None)
    print(f"torch threads {threads}; zoo {zoo.root}")
    print(
        "merged = task arithmetic λ=0.8, weights 1/1, of the add and reverse specialists (mixed verdicts)\n"
    )
    print("| model | task | examples | native s | lm-eval s | lm-eval / native | agreement |")
    print("|---|---|---|---|---|---|---|")
    from mergesearch.engine import ResidentEngine
    from mergesearch.recipe import Recipe, Source

    # A merge with mixed verdicts (task arithmetic λ=0.8 of the two specialists) is the real test.
    refs = [str(zoo.models[m]) for m in ("base", "add", "reverse")]
    merged = Recipe(
        "task_arithmetic",
        base_model=refs[0],
        parameters={"lambda": 0.8},
        models=[Source(r, {"weight": 1.0}) for r in refs[1:]],
    )
    for model_name, task_name in (
        ("add", "add"),
        ("reverse", "reverse"),
        ("add", "reverse"),
        ("merged", "add"),
        ("merged", "reverse"),
    ):
        model, tok = load_model(zoo.models["base" if model_name == "merged" else model_name])
        if model_name == "merged":
            ResidentEngine(refs).write_into(model, merged)
        task = find_task(task_name)
        native, lm = NativeEvaluator(model, tok), LMEvalBackend(model, tok, batch_size=64)
        n_res, l_res = (
            native.evaluate(task, "test", args.limit),
            lm.evaluate(task, "test", args.limit),
        )  # warm-up
        tn, tl = [], []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            n_res = native.evaluate(task, "test", args.limit)
            tn.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            l_res = lm.evaluate(task, "test", args.limit)
            tl.append(time.perf_counter() - t0)
        agree = int((n_res.scores == l_res.scores).sum())
        print(
            f"| {model_name} | {task_name} (EM native {n_res.value:.3f}, lm-eval {l_res.value:.3f}) | {n_res.n} | "
            f"{min(tn):.3f} | {min(tl):.3f} | {min(tl) / min(tn):.1f}× | {agree}/{n_res.n} |"
        )


if __name__ == "__main__":
    main()
