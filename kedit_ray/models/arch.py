"""Architecture registry: where the layers, MLP projections, attention and head live."""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass(frozen=True)
class Arch:
    """Module name templates; `{}` stands for the layer index."""

    layer: str        # one decoder block
    mlp_in: str       # MLP input projection (up / fc_in)
    mlp_out: str      # MLP output projection (down / fc_out): ROME's W, keys k are its inputs
    attn: str         # attention block
    mlp: str          # whole MLP block
    embed: str        # token embedding
    final_norm: str   # norm before the head
    lm_head: str      # vocabulary projection

    def name(self, field: str, layer: int | None = None) -> str:
        template = getattr(self, field)
        return template.format(layer) if "{}" in template else template


def _decoder(prefix: str, up: str, down: str, attn: str, mlp: str, embed: str, norm: str, head: str) -> Arch:
    block = prefix + ".{}"
    return Arch(block, f"{block}.{mlp}.{up}", f"{block}.{mlp}.{down}", f"{block}.{attn}", f"{block}.{mlp}",
                embed, norm, head)


_LLAMA_LIKE = _decoder("model.layers", "up_proj", "down_proj", "self_attn", "mlp",
                       "model.embed_tokens", "model.norm", "lm_head")

ARCHS: dict[str, Arch] = {
    "gpt2": _decoder("transformer.h", "c_fc", "c_proj", "attn", "mlp", "transformer.wte", "transformer.ln_f", "lm_head"),
    "gptj": _decoder("transformer.h", "fc_in", "fc_out", "attn", "mlp", "transformer.wte", "transformer.ln_f", "lm_head"),
    "gpt_neox": _decoder("gpt_neox.layers", "dense_h_to_4h", "dense_4h_to_h", "attention", "mlp",
                         "gpt_neox.embed_in", "gpt_neox.final_layer_norm", "embed_out"),
    **{t: _LLAMA_LIKE for t in ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "gemma3_text")},
}

TEMPLATE_FLAGS = {f.name: "--" + f.name.replace("_", "-") + "-template" for f in fields(Arch)}


class UnknownArchitecture(ValueError):
    pass


def detect_arch(model: torch.nn.Module, overrides: dict[str, str] | None = None) -> Arch:
    """The registry entry for `config.model_type`, with any templates given by hand replacing it."""
    overrides = {k: v for k, v in (overrides or {}).items() if v}
    model_type = getattr(model.config, "model_type", "?")
    base = ARCHS.get(model_type)
    if base is None:
        missing = [f for f in TEMPLATE_FLAGS if f not in overrides]
        if missing:
            flags = " ".join(f"{TEMPLATE_FLAGS[f]} TEMPLATE" for f in missing)
            raise UnknownArchitecture(
                f"unknown architecture {model_type!r} (known: {', '.join(sorted(ARCHS))}); "
                f"pass the module name templates by hand, e.g. {flags} "
                f"(use {{}} for the layer index, as in 'model.layers.{{}}.mlp.down_proj')")
        return Arch(**overrides)
    arch = Arch(**{**base.__dict__, **overrides})
    names = dict(model.named_modules())
    for field in ("mlp_out", "mlp_in", "layer"):
        if arch.name(field, 0) not in names:
            raise UnknownArchitecture(f"module {arch.name(field, 0)!r} ({field}) is not in this {model_type} model; "
                                      f"pass {TEMPLATE_FLAGS[field]} TEMPLATE")
    return arch


def num_layers(model: torch.nn.Module) -> int:
    cfg = model.config
    return getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer")


def check_layer(model: torch.nn.Module, layer: int) -> int:
    n = num_layers(model)
    if not 0 <= layer < n:
        raise ValueError(f"layer {layer} does not exist: the model has layers 0..{n - 1}")
    return layer
