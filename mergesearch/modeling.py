"""Loading a Hugging Face causal LM and its tokenizer, with explicit device and dtype."""

from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import parse_dtype
from .errors import MergeSearchError


def compute_dtype(device: str | torch.device, stored: torch.dtype) -> torch.dtype:
    """The dtype a model is scored in: float32 on the CPU (CPUs without bf16 matrix units run
    bf16 matmuls slower, and every score of a study and of `mergesearch eval` must be computed
    alike), the checkpoint's own dtype on an accelerator."""
    return torch.float32 if torch.device(device).type == "cpu" else stored


def resolve_device(device: str | None = "auto") -> str:
    """`auto` (the default everywhere) is CUDA when PyTorch sees a GPU, else the CPU; anything
    else is passed through (`cpu`, `cuda`, `cuda:1`), refused early when CUDA is named but absent."""
    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise MergeSearchError(f"device {device!r}: PyTorch sees no CUDA GPU here; use --device cpu or auto")
    return str(device)


def load_model(path: str | Path, device: str = "cpu", dtype: str | None = None):
    """(model, tokenizer) from a local folder; never runs remote code, never downloads."""
    import transformers

    transformers.utils.logging.disable_progress_bar()  # a per-file bar for a tiny load is noise
    p = Path(path)
    if not p.exists():
        raise MergeSearchError(
            f"{p}: model folder does not exist (a local Hugging Face folder; hub ids are not fetched)"
        )
    if not (p / "config.json").is_file():
        raise MergeSearchError(f"{p}: not a model folder (no config.json)")
    tok = load_tokenizer(p)
    if dtype:
        kw = {"dtype": parse_dtype(dtype)}
    else:  # compute_dtype's rule; "auto" is the checkpoint's dtype
        kw = {"dtype": torch.float32 if torch.device(device).type == "cpu" else "auto"}
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(p), local_files_only=True, trust_remote_code=False, **kw
    )
    model.to(device).eval()
    return model, tok


def load_tokenizer(path: str | Path):
    """The folder's tokenizer, with a pad token; a clear error when it has no tokenizer files."""
    import transformers

    p = Path(path)
    if not any((p / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise MergeSearchError(
            f"{p}: no tokenizer files (tokenizer.json, tokenizer.model or vocab.json); "
            "copy them from the base model"
        )
    tok = transformers.AutoTokenizer.from_pretrained(str(p), local_files_only=True, trust_remote_code=False)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def live_model(path: str | Path, weights: dict[str, torch.Tensor], device: str = "cpu"):
    """A model whose parameters are copies of `weights` (an engine's resident base),
    built from config.json without reading or memory-mapping the checkpoint a second time, so a
    search holds the model once as the live model and once as the engine's base, nothing more."""
    import transformers

    p = Path(path)
    config = transformers.AutoConfig.from_pretrained(str(p), local_files_only=True, trust_remote_code=False)
    dtype = compute_dtype(device, next(iter(weights.values())).dtype)
    try:  # skip random initialization: every parameter is overwritten below
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers: initialize, then overwrite
        from contextlib import nullcontext as no_init_weights
    with no_init_weights():
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    if getattr(config, "tie_word_embeddings", False):
        # Without weight init, from_config leaves the head untied (an uninitialized copy): tie it
        # to the embeddings, as from_pretrained does, so a tied model's head is its embeddings.
        model.tie_weights()
    model.to(device)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in weights:
                param.copy_(weights[name])
            elif not (getattr(config, "tie_word_embeddings", False) and name == "lm_head.weight"):
                raise MergeSearchError(f"{p}: tensor {name} of the model is missing from the checkpoint")
    return model.eval()
