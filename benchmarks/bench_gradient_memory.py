"""The gradient warm start's memory and result: peak RSS and peak anonymous RSS of the whole
process (bench loaded, then `learn_coefficients` for a few steps), as multiples of the model in
fp32, and the learned coefficients, so two versions of the code can be compared on one space.
It uses only what every version has (`Bench(space, resolve=...)`, `learn_coefficients`), so it
runs against an older checkout too (`PYTHONPATH=<checkout>`).

    .venv/bin/python benchmarks/bench_gradient_memory.py --space search_spaces/smollm2_ta_blocks.yaml --steps 5
    .venv/bin/python benchmarks/bench_gradient_memory.py --scale ~/.cache/mergesearch/scale/smollm2-1.7b \\
        --steps 2 --batch 4 --placement disk                       # the bench_scale.py models
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--space", default=None, help="a space YAML")
    ap.add_argument(
        "--scale", default=None, help="a bench_scale.py models folder instead (K = 3, task largest)"
    )
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--placement", default=None, help="the bench's input placement (versions that have it)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from benchmarks.bench_scale import AnonPeak
    from mergesearch.search import Bench, load_space
    from mergesearch.search.gradient import learn_coefficients
    from mergesearch.search.space_file import space_from_dict
    from mergesearch.sources import resolve_model

    anon = AnonPeak()
    if args.scale:
        root = Path(args.scale).expanduser()
        space = space_from_dict(
            {
                "name": "scale",
                "base": str(root / "base"),
                "models": [str(root / f"ft{i}") for i in (1, 2, 3)],
                "method": "task_arithmetic",
                "granularity": "layer",
                "parameters": {"weight": [0.0, 1.0]},
                "tasks": ["largest"],
                "objective": "mean",
                "fidelity": [32],
            }
        )
    else:
        space = load_space(args.space)
    kw = {"placement": args.placement} if args.placement else {}
    bench = Bench(space, resolve=resolve_model, **kw)
    fp32 = 4 * sum(p.numel() for p in bench.model.parameters())
    t0 = time.perf_counter()
    r = learn_coefficients(bench, seconds=None, steps=args.steps, batch=args.batch, seed=0)
    seconds = time.perf_counter() - t0
    peak = _vm("VmHWM")
    row = {
        "steps": r.steps,
        "seconds": round(seconds, 1),
        "fp32_model_gib": fp32 / 2**30,
        "peak_rss_gib": peak / 2**30,
        "peak_anon_gib": anon.stop() / 2**30,
        "peak_rss_x_model": peak / fp32,
        "losses": r.losses,
        "values": r.values,
    }
    print(json.dumps(row))
    if args.out:
        Path(args.out).write_text(json.dumps(row, indent=1))


def _vm(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(key)


if __name__ == "__main__":
    main()
