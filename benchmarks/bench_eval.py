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
    print("| model | task | examples | native s | lm-eval s | lm-eval / native | agreement |")
    print("|---|---|---|---|---|---|---|")
    for model_name, task_name in (("add", "add"), ("reverse", "reverse"), ("add", "reverse")):
        model, tok = load_model(zoo.models[model_name])
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
