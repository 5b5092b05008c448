"""Tiny Hugging Face models written to disk for tests and benchmarks (no downloads)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def write_tokenizer(path: Path) -> None:
    """A byte-level BPE tokenizer with no merges (vocab 259), saved as a fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>"
    )
    fast.save_pretrained(str(path))


def make_base(
    path: Path,
    arch: str = "llama",
    *,
    hidden: int = 64,
    layers: int = 3,
    vocab: int = 259,
    intermediate: int = 128,
    seed: int = 0,
    shard: str | None = None,
    tokenizer: bool = True,
) -> Path:
    import transformers

    torch.manual_seed(seed)
    if arch == "llama":
        cfg = transformers.LlamaConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=128,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=2,
            tie_word_embeddings=False,
        )
        model = transformers.LlamaForCausalLM(cfg)
    elif arch == "gpt2":
        cfg = transformers.GPT2Config(
            vocab_size=vocab,
            n_embd=hidden,
            n_layer=layers,
            n_head=4,
            n_positions=128,
            bos_token_id=1,
            eos_token_id=2,
        )
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        raise ValueError(arch)
    kw = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(str(path), **kw)
    if tokenizer:
        write_tokenizer(path)
    return path


def _weights(path: Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if (path / "model.safetensors").exists():
        return load_file(str(path / "model.safetensors"))
    index = json.loads((path / "model.safetensors.index.json").read_text())
    out = {}
    for f in sorted(set(index["weight_map"].values())):
        out.update(load_file(str(path / f)))
    return out


def make_finetune(
    base: Path, path: Path, seed: int, scale: float = 0.02, dtype: torch.dtype | None = None
) -> Path:
    """base + scale·randn on every float tensor, written as one safetensors file."""
    g = torch.Generator().manual_seed(seed)
    sd = _weights(base)
    out = {}
    for k, v in sd.items():
        v = v + scale * torch.randn(v.shape, generator=g, dtype=v.dtype) if v.is_floating_point() else v
        out[k] = (v.to(dtype) if dtype and v.is_floating_point() else v).contiguous()
    path.mkdir(parents=True, exist_ok=True)
    save_file(out, str(path / "model.safetensors"), metadata={"format": "pt"})
    for f in Path(base).iterdir():
        if f.suffix == ".json" and not f.name.startswith("model.safetensors"):
            shutil.copy2(f, path / f.name)
    return path


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    return _weights(path)
