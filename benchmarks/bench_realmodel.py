"""What a search costs at 135M: zoo training steps, per-trial merge and eval seconds, examples
per trial, trials per hour, peak memory, and CPU thread scaling.

    .venv/bin/python benchmarks/bench_realmodel.py                      # the SmolLM2 zoo (built if needed)
    python benchmarks/bench_realmodel.py --random DIR --device cuda     # random weights, SmolLM2's shape

--random DIR takes a folder with SmolLM2's config.json and tokenizer files (no weights) and makes a
seeded random base and three specialists (base + 1 % of each tensor's std as noise): for machines
without the converted model (the GPU machine here). Random models never emit EOS, so every
generated answer runs to max_new_tokens (8) instead of ~3 tokens: eval seconds are an upper bound.

Each phase runs a real study (`run_search`, SQLite in a temporary results folder) over the shipped
space search_spaces/smollm2_ta_blocks.yaml: `--trials` trials at full fidelity, then as many with
the space's few-example fitness (anchors); the enqueued baseline and sampler are the space's.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def random_zoo(src: Path, out: Path) -> dict[str, Path]:
    import shutil

    import torch
    import transformers
    from safetensors.torch import save_file

    config = transformers.AutoConfig.from_pretrained(str(src))
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    base = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    paths = {}
    for i, name in enumerate(("base", "largest", "nth_word", "to_digits")):
        d = out / name
        d.mkdir(parents=True)
        for f in src.iterdir():
            if f.is_file() and f.suffix in (".json", ".jinja"):
                shutil.copy(f, d / f.name)
        g = torch.Generator().manual_seed(i)
        tensors = {
            k: (
                v
                if i == 0 or v.dim() < 2
                else (v.float() + torch.randn(v.shape, generator=g) * 0.01 * float(v.float().std())).to(
                    v.dtype
                )
            )
            for k, v in base.items()
        }
        save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
        paths[name] = d
    return paths


def train_steps(base: Path, device: str, steps: int) -> float:
    """Seconds per fine-tuning step of the SmolLM2 zoo (batch 16, its own step function)."""
    import random

    import torch

    from mergesearch.evaluation import NativeEvaluator, find_task
    from mergesearch.modeling import load_model
    from mergesearch.smollm2_zoo import SmolZooConfig, _encode, _train_step, skill_record

    model, tok = load_model(base, device=device, dtype="float32")
    model.get_input_embeddings().weight.requires_grad_(False)
    ev = NativeEvaluator(model, tok)
    task = find_task("largest")
    cfg = SmolZooConfig()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    rng = random.Random(0)
    dev = torch.device(device)
    times = []
    for _ in range(steps + 1):  # the first step warms up
        batch = [_encode(ev, task, skill_record("largest", rng)) for _ in range(cfg.batch)]
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            loss = _train_step(model, batch, tok.pad_token_id, dev)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    del model, opt
    return sum(times[1:]) / steps


def thread_scaling(base: Path, threads: list[int]) -> list[tuple[int, float]]:
    import torch

    from mergesearch.evaluation import NativeEvaluator, find_task
    from mergesearch.modeling import load_model

    model, tok = load_model(base, device="cpu")
    ev = NativeEvaluator(model, tok)
    task = find_task("largest")
    out = []
    for n in threads:
        torch.set_num_threads(n)
        ev.evaluate(task, "search", 16)  # warm-up
        t = time.perf_counter()
        ev.evaluate(task, "search", 64)
        out.append((n, time.perf_counter() - t))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--random", type=Path, default=None, help="folder with SmolLM2's config and tokenizer: random weights"
    )
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda (default: auto)")
    ap.add_argument("--trials", type=int, default=12, help="trials per phase (default: 12)")
    ap.add_argument("--train-steps", type=int, default=3, help="fine-tuning steps to time (default: 3)")
    ap.add_argument("--threads", default="", help="CPU thread counts for eval scaling, e.g. 1,2,4,8,16")
    ap.add_argument(
        "--phases", default="full,anchors", help="searches to time: full, anchors (default: both)"
    )
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = ap.parse_args()

    results = Path(tempfile.mkdtemp(prefix="bench-realmodel-"))
    os.environ["MERGESEARCH_RESULTS"] = str(results)
    import torch

    from mergesearch.modeling import resolve_device

    device = resolve_device(args.device)
    if args.random:
        models = random_zoo(args.random, results / "models")
    else:
        from mergesearch.smollm2_zoo import build_smollm2_zoo

        models = build_smollm2_zoo().models
    out: dict = {"device": device, "torch": torch.__version__, "random_weights": bool(args.random)}
    if device == "cuda":
        out["gpu"] = torch.cuda.get_device_name()
    print(f"device {device}; models {'random' if args.random else 'SmolLM2 zoo'}", flush=True)

    if args.train_steps:
        s = train_steps(models["base"], device, args.train_steps)
        out["train_step_s"] = s
        print(
            f"fine-tuning step (batch 16): {s:.3f}s -> 3 specialists x 60 steps = {3 * 60 * s / 60:.1f} min",
            flush=True,
        )
    if args.threads:
        out["threads"] = thread_scaling(models["base"], [int(x) for x in args.threads.split(",")])
        for n, s in out["threads"]:
            print(f"eval 64 examples (largest) with {n} CPU threads: {s:.2f}s", flush=True)

    from mergesearch.search import load_space, run_search, space_from_dict
    from mergesearch.search.trials import records

    for phase, file in (("full", "smollm2_ta_blocks.yaml"), ("anchors", "smollm2_ta_blocks_anchors.yaml")):
        if args.phases and phase not in args.phases.split(","):
            continue
        path = ROOT / "search_spaces" / file
        d = dict(load_space(path).raw, name=f"bench_{phase}", base=str(models["base"]))
        d["models"] = [str(models[m]) for m in ("largest", "nth_word", "to_digits")]
        space = space_from_dict(d, path)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        s = run_search(space, study=f"bench_{phase}", trials=args.trials, device=device, progress=False)
        wall = time.perf_counter() - t
        done = [x for x in records(s) if x.state.is_finished() and x.merge_seconds is not None]
        med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
        row = {
            "trials": len(done),
            "wall_s": wall,
            "trials_per_hour": len(done) / wall * 3600,
            "merge_s_median": med([x.merge_seconds for x in done]),
            "eval_s_median": med([x.eval_seconds for x in done]),
            "examples_per_trial": sum(sum(x.examples.values()) for x in done) / len(done),
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        }
        if device == "cuda":
            row["peak_cuda_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out[phase] = row
        print(
            f"{phase}: "
            + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()),
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
