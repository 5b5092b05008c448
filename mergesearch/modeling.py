"""Loading a Hugging Face causal LM and its tokenizer, with explicit device and dtype."""

from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import parse_dtype
from .errors import MergeSearchError


def load_model(path: str | Path, device: str = "cpu", dtype: str | None = None):
    """(model, tokenizer) from a local folder; never runs remote code, never downloads."""
    import transformers

    transformers.utils.logging.disable_progress_bar()  # a per-file bar for a tiny load is noise
    p = Path(path)
    if not (p / "config.json").is_file():
        raise MergeSearchError(f"{p}: not a model folder (no config.json)")
    if not any((p / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise MergeSearchError(
            f"{p}: no tokenizer files (tokenizer.json, tokenizer.model or vocab.json); "
            "copy them from the base model"
        )
    tok = transformers.AutoTokenizer.from_pretrained(str(p), local_files_only=True, trust_remote_code=False)
    kw = {"dtype": parse_dtype(dtype)} if dtype else {"dtype": torch.float32}
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(p), local_files_only=True, trust_remote_code=False, **kw
    )
    model.to(device).eval()
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok
