"""Command line: parse, call the library, print. Every command is a library call."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .errors import MergeSearchError


def _cmd_merge(args: argparse.Namespace) -> int:
    from .engine import merge

    out = merge(
        args.recipe,
        args.out_dir,
        seed=args.seed,
        device=args.device,
        overwrite=args.overwrite,
        allow_pickle=args.allow_pickle,
        shard_size=args.shard_size,
        progress=not args.quiet,
    )
    if not args.quiet:
        print(f"wrote {out}")
    return 0


def _cmd_zoo(args: argparse.Namespace) -> int:
    from .zoo import build_zoo

    zoo = build_zoo(args.out, progress=not args.quiet, log=(lambda s: None) if args.quiet else print)
    print(f"zoo at {zoo.root} (built in {zoo.seconds:.0f}s)")
    skills = list(next(iter(zoo.scores.values())))
    print("exact match on test splits:")
    print(f"  {'model':10s}" + "".join(f"{s:>10s}" for s in skills))
    for name, scores in zoo.scores.items():
        print(f"  {name:10s}" + "".join(f"{scores[s]:10.3f}" for s in skills))
    for name, check in zoo.checks.items():
        print(f"  [{'ok' if check['ok'] else 'FAIL'}] {name}: {check['detail']}")
    for name, path in zoo.models.items():
        print(f"  {name}: {path}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    import json

    from .evaluation import evaluate_model

    rows = evaluate_model(
        args.model_dir,
        [t for t in args.tasks.split(",") if t],
        split=args.split,
        limit=args.limit,
        backend=args.backend,
        device=args.device,
        evals_dir=args.evals_dir,
    )
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'task':14s} {'metric':12s} {'n':>5s} {'value':>8s}   95% CI (bootstrap)   seconds")
    for r in rows:
        print(
            f"{r['task']:14s} {r['metric']:12s} {r['n']:5d} {r['value']:8.4f}   "
            f"[{r['ci_low']:.4f}, {r['ci_high']:.4f}]   {r['seconds']:.2f}"
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mergesearch",
        description="Learn model-merge coefficients: search, merge, evaluate, export mergekit recipes.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    m = sub.add_parser(
        "merge",
        help="merge models from a mergekit YAML recipe into a Hugging Face folder",
        description="Stream a mergekit-style recipe (one document, or mergekit-multi stages "
        "separated by ---) tensor by tensor into OUT_DIR. Results equal mergekit 0.1.5's.",
    )
    m.add_argument("recipe", help="mergekit YAML recipe file")
    m.add_argument("out_dir", help="output model folder (written atomically)")
    m.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed for DARE/DELLA draws; equals mergekit-yaml --random-seed N bit for bit (on CPU)",
    )
    m.add_argument(
        "--device", default="cpu", help="where the math runs: cpu, cuda, cuda:N or auto (default: cpu)"
    )
    m.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    m.add_argument(
        "--allow-pickle",
        action="store_true",
        help="accept pickle .bin checkpoints (loaded with torch.load(weights_only=True)); "
        "refused by default because pickle can run code",
    )
    m.add_argument(
        "--shard-size", default="5GB", help="maximum bytes per output shard, e.g. 5GB, 500MB (default: 5GB)"
    )
    m.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")
    m.set_defaults(func=_cmd_merge)

    z = sub.add_parser("zoo", help="build the demo model zoo (a base and specialists, on the CPU)")
    zsub = z.add_subparsers(dest="zoo_command", required=True, metavar="ACTION")
    zb = zsub.add_parser(
        "build",
        help="build or reuse the cached zoo and print its scores",
        description="Pretrain a tiny Llama on close variants of each skill, fine-tune one specialist per "
        "skill, score all on the test splits. Cached: a second call returns at once. The cache lives "
        "under $MERGESEARCH_HOME/zoo (default ~/.cache/mergesearch/zoo).",
    )
    zb.add_argument("--out", default=None, help="zoo folder (default: the cache under $MERGESEARCH_HOME)")
    zb.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    zb.set_defaults(func=_cmd_zoo)

    e = sub.add_parser(
        "eval",
        help="score a model folder on tasks, with 95%% bootstrap intervals",
        description="Score MODEL_DIR on tasks from evals/ (by name) or task YAML files (by path).",
    )
    e.add_argument("model_dir", help="Hugging Face model folder with tokenizer files")
    e.add_argument(
        "--tasks", required=True, help="comma-separated task names or YAML paths, e.g. add,reverse"
    )
    e.add_argument("--split", default="test", help="split to score: search or test (default: test)")
    e.add_argument(
        "--limit", type=int, default=None, help="score only the first N examples of the fixed shuffle"
    )
    e.add_argument(
        "--backend",
        default="native",
        choices=["native", "lm-eval"],
        help="native (batched, teacher-forced) or lm-eval (lm-evaluation-harness)",
    )
    e.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    e.add_argument(
        "--evals-dir", default=None, help="folder of task YAMLs (default: the repository's evals/)"
    )
    e.add_argument("--json", action="store_true", help="print the rows as JSON for scripts")
    e.set_defaults(func=_cmd_eval)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except MergeSearchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
