"""Disk-to-disk dare_ties of locally made ~100M-parameter models: mergesearch vs mergekit-yaml.

Both run as separate processes on the same config in the same run; each is wrapped so its
own peak RSS is read from getrusage. Outputs are compared bit for bit (same seed).

    .venv/bin/python benchmarks/bench_merge.py [--hidden 768 --layers 12 --vocab 16000] [--repeat 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def llama_shapes(hidden: int, layers: int, inter: int, vocab: int) -> dict[str, tuple[int, ...]]:
    shapes = {
        "model.embed_tokens.weight": (vocab, hidden),
        "lm_head.weight": (vocab, hidden),
        "model.norm.weight": (hidden,),
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[p + f"self_attn.{n}.weight"] = (hidden, hidden)
        shapes[p + "mlp.gate_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.up_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, inter)
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
    return shapes


def write_llama(path: Path, sd: dict[str, torch.Tensor], cfg: dict) -> None:
    """A Llama-layout Hugging Face folder with its weights in two shards."""
    path.mkdir(parents=True, exist_ok=True)
    names = sorted(sd)
    weight_map = {}
    for k, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :])):
        fname = f"model-{k + 1:05d}-of-00002.safetensors"
        save_file({n: sd[n] for n in part}, str(path / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(cfg, indent=2))


def timed(cmd: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one command, measured in a fresh wrapper process."""
    wrapper = (
        "import resource, subprocess, sys, time\n"
        "t = time.perf_counter(); r = subprocess.run(sys.argv[1:]); dt = time.perf_counter() - t\n"
        "print(dt, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)\n"
    )
    p = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed:\n{p.stderr[-3000:]}")
    wall, rss_kb = p.stdout.strip().splitlines()[-1].split()
    return float(wall), int(rss_kb) * 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--inter", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=16000)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "_work" / "merge")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    work = args.work
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    t0 = time.perf_counter()
    shapes = llama_shapes(args.hidden, args.layers, args.inter, args.vocab)
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.hidden,
        "intermediate_size": args.inter,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.hidden // 64,
        "num_key_value_heads": args.hidden // 64,
        "vocab_size": args.vocab,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "dtype": args.dtype,
    }
    g = torch.Generator().manual_seed(0)
    base = {n: (0.02 * torch.randn(s, generator=g)).to(dtype) for n, s in shapes.items()}
    write_llama(work / "base", base, cfg)
    for i in range(3):
        ft = {n: (v.float() + 0.01 * torch.randn(v.shape, generator=g)).to(dtype) for n, v in base.items()}
        write_llama(work / f"ft{i}", ft, cfg)
        del ft
    n = sum(v.numel() for v in base.values())
    del base
    model_bytes = sum(f.stat().st_size for f in (work / "base").glob("*.safetensors"))
    print(
        f"made 4 models of {n / 1e6:.1f}M params ({model_bytes / 1e6:.0f} MB each) in {time.perf_counter() - t0:.0f}s"
    )

    recipe = work / "dare_ties.yml"
    recipe.write_text(
        f"merge_method: dare_ties\nbase_model: {work / 'base'}\nmodels:\n"
        + "".join(
            f"  - model: {work / f'ft{i}'}\n    parameters: {{weight: {w}, density: {d}}}\n"
            for i, (w, d) in enumerate([(0.5, 0.5), (0.3, 0.7), (0.4, 0.6)])
        )
    )
    ms_cmd = [
        str(VENV_BIN / "mergesearch"),
        "merge",
        str(recipe),
        str(work / "out_ms"),
        "--seed",
        "0",
        "-q",
        "--overwrite",
    ]
    mk_cmd = [
        str(VENV_BIN / "mergekit-yaml"),
        str(recipe),
        str(work / "out_mk"),
        "--random-seed",
        "0",
        "--no-copy-tokenizer",
        "--no-write-model-card",
        "--quiet",
        "--allow-crimes",
    ]
    rows = []
    for r in range(args.repeat):
        shutil.rmtree(work / "out_mk", ignore_errors=True)
        mk = timed(mk_cmd)
        ms = timed(ms_cmd)
        rows.append((ms, mk))
        print(
            f"run {r + 1}: mergesearch {ms[0]:.1f}s {ms[1] / 2**20:.0f} MiB | mergekit {mk[0]:.1f}s {mk[1] / 2**20:.0f} MiB"
        )

    from tests.tiny_models import load_weights

    a, b = load_weights(work / "out_ms"), load_weights(work / "out_mk")
    identical = sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    ms_t = min(r[0][0] for r in rows)
    mk_t = min(r[1][0] for r in rows)
    ms_rss = max(r[0][1] for r in rows)
    mk_rss = max(r[1][1] for r in rows)
    largest = max(v.numel() * v.element_size() for v in a.values())
    print(
        f"\nbest of {args.repeat}: mergesearch {ms_t:.1f}s, mergekit {mk_t:.1f}s, ratio mergekit/mergesearch = {mk_t / ms_t:.2f}x"
    )
    print(
        f"peak RSS: mergesearch {ms_rss / 2**20:.0f} MiB, mergekit {mk_rss / 2**20:.0f} MiB; "
        f"one model = {model_bytes / 2**20:.0f} MiB; largest tensor = {largest / 2**20:.1f} MiB"
    )
    print(f"outputs bit-identical: {identical}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
