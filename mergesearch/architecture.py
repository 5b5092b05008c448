"""Where a tensor sits in a model: its layer index and component, per architecture.

Adding an architecture is one entry in ARCHITECTURES.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

COMPONENTS = ("attention", "mlp", "embedding", "norm", "head", "other")


@dataclass(frozen=True)
class Architecture:
    name: str
    layer_prefix: str  # regex with one group, the layer index, e.g. r"model\.layers\.(\d+)\."
    num_layers_key: str  # config.json key holding the layer count
    # (substring, component), first match wins; checked against the full tensor name
    components: tuple[tuple[str, str], ...]
    # names that may stand in for one another when a model ties its embeddings
    tied: tuple[tuple[str, str], ...] = ()

    def layer_of(self, name: str) -> int | None:
        m = re.match(self.layer_prefix, name)
        return int(m.group(1)) if m else None

    def with_layer(self, name: str, layer: int) -> str:
        """The same tensor name in another layer."""
        m = re.match(self.layer_prefix, name)
        if not m:
            return name
        return name[: m.start(1)] + str(layer) + name[m.end(1) :]

    def component_of(self, name: str) -> str:
        for needle, component in self.components:
            if needle in name:
                return component
        return "other"


_DECODER_COMPONENTS = (
    ("self_attn", "attention"),
    ("mlp", "mlp"),
    ("embed_tokens", "embedding"),
    ("norm", "norm"),
    ("lm_head", "head"),
)

ARCHITECTURES: dict[str, Architecture] = {
    arch.name: arch
    for arch in (
        Architecture(
            "llama",  # also Mistral, Qwen2, Qwen3, Gemma: model.layers.N.
            r"model\.layers\.(\d+)\.",
            "num_hidden_layers",
            _DECODER_COMPONENTS,
            tied=(("lm_head.weight", "model.embed_tokens.weight"),),
        ),
        Architecture(
            "gpt2",
            r"(?:transformer\.)?h\.(\d+)\.",
            "n_layer",
            (
                (".attn.", "attention"),
                (".mlp.", "mlp"),
                ("wte", "embedding"),
                ("wpe", "embedding"),
                ("ln_", "norm"),
                ("lm_head", "head"),
            ),
            tied=(("lm_head.weight", "transformer.wte.weight"),),
        ),
        Architecture(
            "generic",  # any "<...>.layers.N." / ".h.N." / ".blocks.N." layout
            r"(?:.*?\.)?(?:layers|h|blocks|layer)\.(\d+)\.",
            "num_hidden_layers",
            (
                ("attn", "attention"),
                ("attention", "attention"),
                ("mlp", "mlp"),
                ("ffn", "mlp"),
                ("feed_forward", "mlp"),
                ("embed", "embedding"),
                ("wte", "embedding"),
                ("norm", "norm"),
                ("ln", "norm"),
                ("lm_head", "head"),
            ),
        ),
    )
}

_MODEL_TYPES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "qwen3": "llama",
    "gemma": "llama",
    "gemma2": "llama",
    "phi3": "llama",
    "gpt2": "gpt2",
}


def architecture_for(config: dict) -> Architecture:
    """The architecture entry for a Hugging Face config.json (generic when unknown)."""
    return ARCHITECTURES[_MODEL_TYPES.get(config.get("model_type", ""), "generic")]


def num_layers(config: dict, arch: Architecture) -> int | None:
    for key in (arch.num_layers_key, "num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(config.get(key), int):
            return config[key]
    return None
