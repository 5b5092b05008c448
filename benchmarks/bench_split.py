"""Where a search candidate's time goes: the merge kernel vs everything else (planning, cuts, norms).

For one locally made model size and dtype, per task-vector method: the best of three candidates
with new densities (after one untimed candidate), split into time inside `numba_kernels.merge` and
the rest of `ResidentEngine.write_into`; bytes touched / time, and the share of a memcpy measured
right after the method's candidates. Quicker than bench_engine.py (no mergekit), for profiling.

    .venv/bin/python benchmarks/bench_split.py [--size 100M] [--dtype float32] [--methods ...]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_engine import SIZES, _live, candidate, make_models, memcpy_gbps  # noqa: E402


def main() -> None:
    from mergesearch.candidates import ResidentEngine, numba_kernels

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="100M", choices=list(SIZES), help="model size")
    ap.add_argument("--dtype", default="float32", help="torch dtype of the models")
    ap.add_argument(
        "--methods",
        default="task_arithmetic,dare_linear,dare_ties,ties,breadcrumbs,della",
        help="task-vector methods to time (della runs with the rank cache)",
    )
    args = ap.parse_args()
    in_kernel = [0.0]
    merge = numba_kernels.merge

    def timed(*a):
        t0 = time.perf_counter()
        merge(*a)
        in_kernel[0] += time.perf_counter() - t0

    numba_kernels.merge = timed
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_models(Path(tmp), args.size, getattr(torch, args.dtype))
        engine = ResidentEngine(paths, base=paths[0], exact=False, cache_ranks=True)
        model = _live(paths[0], engine)
        model_bytes = sum(v.numel() * v.element_size() for v in engine.inputs.weights(paths[0]).values())
        touched = (len(paths) + 1) * model_bytes  # read base and K task vectors, write one model
        print("| method | candidate s | in the kernel s | the rest s | GB/s | memcpy GB/s | % of memcpy |")
        print("|---|---|---|---|---|---|---|")
        for method in args.methods.split(","):
            engine.write_into(model, candidate(method, paths, 0), seed=0)
            best = (float("inf"), 0.0)
            for rep in range(1, 4):
                in_kernel[0] = 0.0
                t0 = time.perf_counter()
                engine.write_into(model, candidate(method, paths, rep), seed=0)
                best = min(best, (time.perf_counter() - t0, in_kernel[0]))
            total, kernel = best
            bw, gbps = memcpy_gbps(), touched / total / 1e9
            print(
                f"| {method} | {total:.4f} | {kernel:.4f} | {total - kernel:.4f} | {gbps:.1f} | {bw:.1f} | "
                f"{100 * gbps / bw:.0f}% |",
                flush=True,
            )


if __name__ == "__main__":
    main()
