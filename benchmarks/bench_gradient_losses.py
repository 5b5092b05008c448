"""The gradient on generative tasks (issue 28): which loss and learning rate, if any, lead to a
point that scores above task arithmetic λ=1, on the search split and on the test split.

    .venv/bin/python benchmarks/bench_gradient_losses.py --space search_spaces/smollm2_lists_blocks.yaml \\
        --steps 12 --variants nll:0.05 normalized:0.05 entropy:0.05 nll:0.01 --out results/gradient_losses_lists

Every variant starts at task arithmetic λ=1 (every weight 1) and runs `--steps` Adam steps of
`--batch` examples per task (`search/gradient.py`, `learn_coefficients(loss=..., lr=...)`); its
point is then merged and scored by generation on both whole splits, as a trial would be.
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
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--space", required=True)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument(
        "--variants", nargs="+", default=["nll:0.05"], help="LOSS:LR, LOSS one of nll, normalized, entropy"
    )
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    from mergesearch.search import Bench, load_space
    from mergesearch.search import gradient as G
    from mergesearch.sources import resolve_model

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    space = load_space(args.space)
    bench = Bench(space, resolve=resolve_model)
    keys = [c.key for c in space.coefficients(G.FAMILY, bench.num_layers)]
    start = {k: 1.0 for k in keys}

    def scores(values: dict) -> dict:
        bench.merge(bench.recipes(values))
        res = {}
        for split in ("search", "test"):
            r, _ = bench.evaluate(split)
            res[split] = {k: v.value for k, v in r.items()}
            res[split + "_mean"] = sum(res[split].values()) / len(res[split])
        return res

    rows = [{"variant": "task_arithmetic λ=1 (the start)", **scores(start)}]
    print(json.dumps(rows[-1]), flush=True)
    for v in args.variants:
        loss, lr = v.split(":")
        t0 = time.perf_counter()
        g = G.learn_coefficients(
            bench, steps=args.steps, seconds=None, lr=float(lr), batch=args.batch, start=start, loss=loss
        )
        row = {
            "variant": f"{loss}, lr {lr}",
            "steps": g.steps,
            "seconds": time.perf_counter() - t0,
            "losses": [round(x, 4) for x in g.losses],
            "values": g.values,
            **scores(g.values),
        }
        rows.append(row)
        print(json.dumps({k: row[k] for k in row if k not in ("values",)}), flush=True)
    (out / "summary.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(f"\n{space.name}: {args.steps} steps of {args.batch} examples per task, from task arithmetic λ=1\n")
    print("| variant | loss first → last | search mean | test mean | test per task | s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        losses = f"{r['losses'][0]:.3f} → {r['losses'][-1]:.3f}" if "losses" in r else "—"
        tasks = ", ".join(f"{k} {x:.3f}" for k, x in r["test"].items())
        print(
            f"| {r['variant']} | {losses} | {r['search_mean']:.3f} | {r['test_mean']:.3f} | {tasks} | "
            f"{r.get('seconds', 0):.0f} |"
        )


if __name__ == "__main__":
    main()
