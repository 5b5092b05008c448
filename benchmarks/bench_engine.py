"""In-memory candidate speed: mergesearch's ResidentEngine vs mergekit 0.1.5 merge_state_dicts.

For locally made Llama-layout models (base + 2 fine-tunes) of several sizes and dtypes, per
method: the time to materialize one candidate into a live model with the search's engine
(`exact=False`: task-vector bank, its own DARE/DELLA draws) and with the exact engine (mergekit's
result bit for bit), each candidate with densities the engine has not seen; the bytes such a
candidate must touch at minimum (read base and K inputs, write one model); memcpy bandwidth
measured in the same process, again just before each row (this VM's bandwidth drifts), and the
fraction of it reached; mergekit's time for the same candidate, and the ratios.

    .venv/bin/python benchmarks/bench_engine.py [--sizes 10M,100M] [--dtypes float32,bfloat16] [--repeat 3]
    .venv/bin/python benchmarks/bench_engine.py --memory [--sizes ...]   # peak memory of a search
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = {"10M": (256, 8, 1024, 8000), "100M": (768, 12, 2048, 16000), "500M": (1536, 16, 4096, 32000)}
METHODS = {
    "linear": {"weight": [0.5, 0.5]},
    "task_arithmetic": {"weight": [0.6, 0.5]},
    "dare_linear": {"weight": [0.6, 0.5], "density": [0.5, 0.6]},
    "dare_ties": {"weight": [0.6, 0.5], "density": [0.5, 0.6]},
    "ties": {"weight": [0.6, 0.5], "density": [0.5, 0.6]},
    "breadcrumbs": {"weight": [0.6, 0.5], "density": [0.5, 0.6]},
    "della": {"weight": [0.6, 0.5], "density": [0.5, 0.6]},
}


def memcpy_gbps(nbytes: int = 512 * 2**20, repeat: int = 5) -> float:
    """(read + write bytes) / second of a large tensor copy, best of `repeat`."""
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best / 1e9


def make_models(root: Path, size: str, dtype: torch.dtype) -> list[str]:
    from benchmarks.bench_merge import llama_shapes, write_llama

    hidden, layers, inter, vocab = SIZES[size]
    shapes = llama_shapes(hidden, layers, inter, vocab)
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": hidden // 64,
        "num_key_value_heads": hidden // 64,
        "vocab_size": vocab,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
    }
    g = torch.Generator().manual_seed(0)
    base = {n: (0.02 * torch.randn(s, generator=g)).to(dtype) for n, s in shapes.items()}
    write_llama(root / "base", base, cfg)
    paths = [str(root / "base")]
    for i in range(2):
        write_llama(
            root / f"ft{i}",
            {n: (v.float() + 0.01 * torch.randn(v.shape, generator=g)).to(dtype) for n, v in base.items()},
            cfg,
        )
        paths.append(str(root / f"ft{i}"))
    return paths


def memory(paths: list[str], dtype_name: str, cache_ranks: bool = False) -> None:
    """Resident memory of a search-like process (task-vector engine + one live model, a candidate
    of every task-vector method) above the RSS after imports, in model sizes."""

    from mergesearch.candidates import ResidentEngine, return_freed_memory

    floor = _vm("VmHWM")
    # what a search over task-vector methods holds
    engine = ResidentEngine(paths, base=paths[0], exact=False, cache_ranks=cache_ranks)
    model = _live(paths[0], engine)
    return_freed_memory()  # as search.Bench does after building the live model
    model_bytes = sum(v.numel() * v.element_size() for v in engine.inputs.weights(paths[0]).values())
    loaded = _vm("VmRSS") - floor
    for method in METHODS:  # DELLA last: its peak is also reported apart
        if method == "della":
            before_della = _vm("VmHWM") - floor
        for rep in range(2) if method != "linear" else ():
            engine.write_into(model, candidate(method, paths, rep), seed=0)
    peak, steady = _vm("VmHWM") - floor, _vm("VmRSS") - floor
    k = len(paths) - 1
    print(
        f"| {dtype_name} | {model_bytes / 2**20:.0f} MiB | {loaded / model_bytes:.2f} | {peak / model_bytes:.2f} | "
        f"{before_della / model_bytes:.2f} | {steady / model_bytes:.2f} | {(2 + k) * 1.1:.1f} |",
        flush=True,
    )


def _live(base: str, engine):
    """The live model as a search builds it (from config, parameters copied from the engine)."""
    from mergesearch.modeling import live_model

    return live_model(base, engine.inputs.weights(base))


def _vm(key: str) -> int:
    """VmHWM / VmRSS of this process in bytes. (getrusage's ru_maxrss would include the RSS
    the parent had when it forked this process: the models' generation peak.)"""
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(key)


def candidate(method: str, paths: list[str], rep: int = 0):
    """The benchmark's candidate; repeat `rep` shifts every density by 0.01·rep, so each timed
    candidate has densities the engine has not seen (as in a search over continuous densities)."""
    from mergesearch.recipe import Recipe, Source

    if method == "linear":
        return Recipe("linear", models=[Source(p, {"weight": 0.5}) for p in paths[1:]])
    # and densities differ between methods too: DARE methods share their draws and norms
    shift = 0.01 * rep + 0.001 * list(METHODS).index(method)
    params = {k: [x + shift for x in v] if k == "density" else v for k, v in METHODS[method].items()}
    models = [Source(p, {k: v[i] for k, v in params.items()}) for i, p in enumerate(paths[1:])]
    return Recipe(method, base_model=paths[0], models=models)


def _time_candidates(engine, model, method: str, paths: list[str], repeat: int) -> tuple[float, float]:
    """Best times of `repeat` candidates with new densities and of `repeat` candidates with a
    density seen before (a stepped search space), after one untimed candidate (which also builds
    what the engine keeps per study: samples, norms, tables, rank cache)."""
    engine.write_into(model, candidate(method, paths, 0), seed=0)
    new, seen = [], []
    for rep in range(1, repeat + 1):
        for times, r in ((new, rep), (seen, 0)):
            t0 = time.perf_counter()
            engine.write_into(model, candidate(method, paths, r), seed=0)
            times.append(time.perf_counter() - t0)
    return min(new), min(seen)


def main() -> None:
    from mergekit.merge_methods import merge_state_dicts

    from mergesearch.candidates import ResidentEngine

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10M,100M", help="model sizes, from: " + ", ".join(SIZES))
    ap.add_argument("--dtypes", default="float32,bfloat16", help="torch dtypes of the models")
    ap.add_argument("--methods", default=",".join(METHODS), help="merge methods to time")
    ap.add_argument("--repeat", type=int, default=3, help="timed candidates per engine and method")
    ap.add_argument("--mergekit-repeat", type=int, default=1, help="timed mergekit runs per method")
    ap.add_argument(
        "--threads", type=int, default=None, help="torch and numba threads (default: theirs, the cores)"
    )
    ap.add_argument(
        "--engines",
        default="search,exact",
        help="which of our engines to time (the exact one is slow on big models)",
    )
    ap.add_argument(
        "--memory",
        action="store_true",
        help="measure peak memory of a search-like process (each size/dtype in a fresh process)",
    )
    args = ap.parse_args()
    if args.memory:
        import subprocess

        print(
            "| size | dtype | model | × model after loading | × model peak | × model peak before DELLA | "
            "× model after candidates | bound |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for size in args.sizes.split(","):
            for dname in args.dtypes.split(","):
                for ranks in ("", "ranks"):
                    with tempfile.TemporaryDirectory() as tmp:
                        paths = make_models(Path(tmp), size, getattr(torch, dname))
                        print(f"| {size}{' (DELLA rank cache)' if ranks else ''} ", end="", flush=True)
                        cmd = [sys.executable, __file__, "--_memory-one", dname, ranks, *paths]
                        subprocess.run(cmd, check=True)
        return
    import numba

    if args.threads:
        torch.set_num_threads(args.threads)
        numba.set_num_threads(args.threads)
    bw = memcpy_gbps()
    print(
        f"torch {torch.__version__}, numba {numba.__version__}, {torch.get_num_threads()} threads, "
        f"memcpy {bw:.2f} GB/s (read+write)\n"
    )
    print(
        "| size | dtype | method | search engine s | seen density s | exact engine s | bytes touched | GB/s | "
        "memcpy GB/s | % of memcpy | mergekit s | mergekit / search | mergekit / exact |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    engines = args.engines.split(",")
    methods = args.methods.split(",")
    for size in args.sizes.split(","):
        for dname in args.dtypes.split(","):
            dtype = getattr(torch, dname)
            with tempfile.TemporaryDirectory() as tmp:
                paths = make_models(Path(tmp), size, dtype)
                rows: dict[str, dict[str, float]] = {m: {} for m in methods}
                # mergekit, and linear, from the models themselves (one engine at a time: memory)
                plain = ResidentEngine(paths)
                model = _live(paths[0], plain)
                sds = [plain.inputs.weights(p) for p in paths]
                model_bytes = sum(v.numel() * v.element_size() for v in sds[0].values())
                for method in methods:
                    if method == "linear":
                        rows[method]["memcpy"] = memcpy_gbps()
                        t, _ = _time_candidates(plain, model, method, paths, args.repeat)
                        rows[method].update(search=t, seen=t, exact=t)
                        mk = ({1: sds[1], 2: sds[2]}, method)
                        kw = {"parameters": {"weight": {1: 0.5, 2: 0.5}}}
                    else:
                        mk = ({0: sds[0], 1: sds[1], 2: sds[2]}, method)
                        params = {k: {i + 1: x for i, x in enumerate(v)} for k, v in METHODS[method].items()}
                        kw = {"parameters": params, "base": 0}
                    best = float("inf")
                    for _ in range(args.mergekit_repeat):
                        t0 = time.perf_counter()
                        merge_state_dicts(*mk, **kw)
                        best = min(best, time.perf_counter() - t0)
                    rows[method]["mergekit"] = best
                del plain, sds, model
                # task-vector engines: the search's (exact=False) and the exact one
                for mode in engines:
                    engine = ResidentEngine(paths, base=paths[0], exact=mode == "exact")
                    model = _live(paths[0], engine)
                    for method in methods:
                        if method != "linear":
                            if mode == "search":
                                rows[method]["memcpy"] = memcpy_gbps()
                            new, seen = _time_candidates(engine, model, method, paths, args.repeat)
                            rows[method][mode] = new
                            rows[method].setdefault("seen", seen)
                    del engine, model
                if "della" in methods:  # the search engine with DELLA's rank cache
                    engine = ResidentEngine(paths, base=paths[0], exact=False, cache_ranks=True)
                    model = _live(paths[0], engine)
                    bw_row = memcpy_gbps()
                    new, seen = _time_candidates(engine, model, "della", paths, args.repeat)
                    rows["della (rank cache)"] = dict(rows["della"], search=new, seen=seen, memcpy=bw_row)
                    del engine, model
                for method, r in rows.items():
                    k = 2
                    touched = (
                        k + (0 if method == "linear" else 1) + 1
                    ) * model_bytes  # read inputs, write one
                    gbps = touched / r["search"] / 1e9
                    exact = r.get("exact", float("nan"))
                    mc = r.get("memcpy", bw)
                    print(
                        f"| {size} | {dname} | {method} | {r['search']:.3f} | {r['seen']:.3f} | {exact:.3f} | "
                        f"{touched / 1e6:.0f} MB | {gbps:.2f} | {mc:.1f} | {100 * gbps / mc:.0f}% | {r['mergekit']:.3f} | "
                        f"{r['mergekit'] / r['search']:.1f}× | {r['mergekit'] / exact:.1f}× |",
                        flush=True,
                    )
    print(f"\npeak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


if __name__ == "__main__":
    if len(sys.argv) > 3 and sys.argv[1] == "--_memory-one":
        import transformers

        import mergesearch.engine  # noqa: F401

        # import the model code (transformers loads it lazily) before the floor is read
        transformers.LlamaForCausalLM(
            transformers.LlamaConfig(
                vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1
            )
        )

        memory(sys.argv[4:], sys.argv[2], cache_ranks=sys.argv[3] == "ranks")
    else:
        main()
