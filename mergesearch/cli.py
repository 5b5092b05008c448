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
