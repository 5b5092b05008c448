"""Native harness vs lm-evaluation-harness on the same task, model and examples.

    .venv/bin/python benchmarks/bench_eval.py [--limit 300] [--repeat 3]          # demo zoo
    .venv/bin/python benchmarks/bench_eval.py --model smollm2 [--limit 200] [--threads 1,2]

Zoo: the time of each (best of --repeat, after one warm-up call each), the ratio, and how many
per-example verdicts agree.

SmolLM2 (generative tasks, lm-eval `generate_until`): for each thread count and task, one run of
lm-eval, native cold (no drafts), and native as a search scores a candidate (the drafts are a
neighbouring candidate's outputs: the derived model `noisy-1` scored first); per-example
verdict agreement of every native run with lm-eval, examples per second and the ratios.
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
    ap.add_argument("--limit", type=int, default=None, help="examples per task (zoo 300, smollm2 200)")
    ap.add_argument("--repeat", type=int, default=3, help="zoo only: best of this many")
    ap.add_argument("--model", default="zoo", choices=["zoo", "smollm2"])
    ap.add_argument("--threads", default="1,2", help="smollm2 only: torch thread counts to measure")
    ap.add_argument("--tasks", default="word_problems,chat_arith", help="smollm2 only: generative tasks")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if args.model == "smollm2":
        return smollm2(args)
    args.limit = args.limit or 300
    threads = configure_threads()
    zoo = build_zoo(progress=False, log=lambda s: None)
    print(f"torch threads {threads}; zoo {zoo.root}")
    print(
        "merged = task arithmetic λ=0.8, weights 1/1, of the add and reverse specialists (mixed verdicts)\n"
    )
    print("| model | task | examples | native s | lm-eval s | lm-eval / native | agreement |")
    print("|---|---|---|---|---|---|---|")
    from mergesearch.candidates import ResidentEngine
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


def smollm2(args) -> None:
    import torch

    from mergesearch.evaluation import NativeEvaluator, find_task
    from mergesearch.evaluation.lmeval import LMEvalBackend
    from mergesearch.modeling import load_model
    from mergesearch.smollm2 import derived_models, smollm2_folder

    limit = args.limit or 200
    base = smollm2_folder()
    neighbour = derived_models(base)[0]
    model, tok = load_model(base, device=args.device)
    near, _ = load_model(neighbour, device=args.device)
    near_state = {k: v.clone() for k, v in near.state_dict().items()}
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    del near
    print(f"SmolLM2-135M-Instruct ({base}), {args.device}, fp32 compute, {limit} test examples per task")
    print(
        "| threads | task | EM | lm-eval s | native cold s | native drafted s | ex/s lm-eval / cold / drafted "
        "| cold vs lm-eval | drafted vs lm-eval | agree cold | agree drafted | drafts accepted |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        for name in args.tasks.split(","):
            task = find_task(name)
            lm = LMEvalBackend(model, tok, batch_size=64)
            lm.evaluate(task, "test", 2)  # warm-up (task manager, dataset cache)
            t0 = time.perf_counter()
            ref = lm.evaluate(task, "test", limit)
            t_lm = time.perf_counter() - t0
            cold_ev = NativeEvaluator(model, tok)
            cold_ev.evaluate(task, "test", 2)  # warm-up
            t0 = time.perf_counter()
            cold = cold_ev.evaluate(task, "test", limit)
            t_cold = time.perf_counter() - t0
            # A search: the previous candidate (the neighbour) fills the drafts, then this one.
            ev = NativeEvaluator(model, tok, reuse_outputs=True)
            model.load_state_dict(near_state)
            ev.evaluate(task, "test", limit)
            model.load_state_dict(base_state)
            t0 = time.perf_counter()
            drafted = ev.evaluate(task, "test", limit)
            t_dr = time.perf_counter() - t0
            gen = drafted.extra["generated_tokens"]
            print(
                f"| {threads} | {name} | {ref.value:.3f} | {t_lm:.1f} | {t_cold:.1f} | {t_dr:.1f} | "
                f"{limit / t_lm:.1f} / {limit / t_cold:.1f} / {limit / t_dr:.1f} | {t_lm / t_cold:.2f}× | "
                f"{t_lm / t_dr:.2f}× | {int((cold.scores == ref.scores).sum())}/{limit} | "
                f"{int((drafted.scores == ref.scores).sum())}/{limit} | "
                f"{drafted.extra['accepted_draft_tokens']}/{gen} tokens |",
                flush=True,
            )
            assert cold.extra["responses"] == drafted.extra["responses"]


if __name__ == "__main__":
    main()
