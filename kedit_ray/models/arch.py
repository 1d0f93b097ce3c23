"""Architecture registry: where the layers, MLP projections, attention and head live."""
from __future__ import annotations

import inspect
from dataclasses import dataclass, fields

from torch import nn

from kedit_ray.models.hooks import weight_of


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
# Gemma 3 4B and up: the text model inside the image-text one (gemma-3-270m and 1B are gemma3_text)
_GEMMA3_MM = _decoder("model.language_model.layers", "up_proj", "down_proj", "self_attn", "mlp",
                      "model.language_model.embed_tokens", "model.language_model.norm", "lm_head")

ARCHS: dict[str, Arch] = {
    "gpt2": _decoder("transformer.h", "c_fc", "c_proj", "attn", "mlp", "transformer.wte", "transformer.ln_f", "lm_head"),
    "gptj": _decoder("transformer.h", "fc_in", "fc_out", "attn", "mlp", "transformer.wte", "transformer.ln_f", "lm_head"),
    "gpt_neox": _decoder("gpt_neox.layers", "dense_h_to_4h", "dense_4h_to_h", "attention", "mlp",
                         "gpt_neox.embed_in", "gpt_neox.final_layer_norm", "lm_head"),
    **{t: _LLAMA_LIKE for t in ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text")},
    "gemma3": _GEMMA3_MM,
}

TEMPLATE_FLAGS = {f.name: "--" + f.name.replace("_", "-") + "-template" for f in fields(Arch)}


class UnknownArchitecture(ValueError):
    pass


def _projection(m: nn.Module) -> bool:
    """A 2-D linear map the editors can change: nn.Linear, or GPT-2's Conv1D."""
    return isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"


def _attention(m: nn.Module) -> bool:
    return "attention_mask" in inspect.signature(m.forward).parameters


def discover(model: nn.Module) -> tuple[dict[str, str], dict[str, str]]:
    """Templates found from the model's structure, and for each field not found, why.

    embed, lm_head: the model's input and output embeddings. layer: the nn.ModuleList of num_hidden_layers blocks
    (the one beside the embedding, where an image-text model has several). final_norm: the first module holding
    only 1-D parameters registered after the blocks, beside them. In block 0, attn is the child whose forward
    takes an attention_mask and mlp the one other child holding matrices; in the MLP, mlp_out is the last
    projection whose output has the hidden size, mlp_in the last one before it that reads the hidden size."""
    found: dict[str, str] = {}
    why: dict[str, str] = {}
    names = {id(m): n for n, m in model.named_modules()}
    for field, module in (("embed", model.get_input_embeddings()), ("lm_head", model.get_output_embeddings())):
        if module is not None and id(module) in names:
            found[field] = names[id(module)]
    n, hidden = num_layers(model), model.config.get_text_config().hidden_size
    lists = [name for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n and name]
    beside = found.get("embed", "").rpartition(".")[0]
    lists.sort(key=lambda name: name.rpartition(".")[0] != beside)     # the blocks beside the embedding first
    if not lists:
        why["layer"] = f"no nn.ModuleList of {n} (num_hidden_layers) blocks"
        return found, why
    blocks = lists[0]
    found["layer"] = blocks + ".{}"
    parent, _, list_name = blocks.rpartition(".")
    siblings = list(model.get_submodule(parent).named_children())
    after = [name for name, _ in siblings].index(list_name) + 1
    norms = [name for name, m in siblings[after:] if {p.dim() for p in m.parameters()} == {1}]
    if norms:
        found["final_norm"] = f"{parent}.{norms[0]}" if parent else norms[0]
    children = [(name, m) for name, m in model.get_submodule(blocks + ".0").named_children()
                if any(p.dim() >= 2 for p in m.parameters())]
    attn = [name for name, m in children if _attention(m)]
    mlp = [(name, m) for name, m in children if not _attention(m)]
    if len(attn) == 1:
        found["attn"] = f"{blocks}.{{}}.{attn[0]}"
    if len(mlp) != 1:
        why["mlp"] = f"block {blocks}.0 has {len(mlp)} children other than attention holding matrices, not one MLP"
        return found, why
    mlp_name, mlp_module = mlp[0]
    found["mlp"] = f"{blocks}.{{}}.{mlp_name}"
    projections = [(name, m) for name, m in mlp_module.named_modules() if _projection(m)]
    outs = [i for i, (_, m) in enumerate(projections) if weight_of(m).shape[0] == hidden]
    ins = [name for name, m in projections[:outs[-1]] if weight_of(m).shape[1] == hidden] if outs else []
    if outs and ins:
        found["mlp_out"] = f"{blocks}.{{}}.{mlp_name}.{projections[outs[-1]][0]}"
        found["mlp_in"] = f"{blocks}.{{}}.{mlp_name}.{ins[-1]}"
        return found, why
    fused = [(name, p) for name, p in mlp_module.named_parameters() if p.dim() > 2]
    if fused:
        name, p = fused[0]
        why["mlp_out"] = why["mlp_in"] = (
            f"{blocks}.0.{mlp_name} is a mixture of experts whose experts are fused into 3-D parameters "
            f"({name} {list(p.shape)}) and it has no dense path (a shared expert's Linear); the editors change one "
            f"2-D projection W seen by every token, so they cannot edit its MLPs")
    else:
        why["mlp_out"] = why["mlp_in"] = f"{blocks}.0.{mlp_name} has no projection pair from and to the hidden size"
    return found, why


def detect_arch(model: nn.Module, overrides: dict[str, str] | None = None) -> Arch:
    """The registry entry for `config.model_type`, else the templates found from the model's structure
    (`discover`); any templates given by hand replace either."""
    overrides = {k: v for k, v in (overrides or {}).items() if v}
    model_type = getattr(model.config, "model_type", "?")
    base = ARCHS.get(model_type)
    if base is not None:
        templates = {**base.__dict__, **overrides}
    else:
        found, why = discover(model)
        templates = {**found, **overrides}
        missing = [f for f in TEMPLATE_FLAGS if f not in templates]
        if missing:
            flags = " ".join(f"{TEMPLATE_FLAGS[f]} TEMPLATE" for f in missing)
            reasons = "; ".join(dict.fromkeys(why[f] for f in missing if f in why))
            raise UnknownArchitecture(
                f"architecture {model_type!r} is not in the registry (known: {', '.join(sorted(ARCHS))}) and its "
                f"{', '.join(missing)} could not be found from its structure{': ' + reasons if reasons else ''}; "
                f"pass the module name templates by hand, e.g. {flags} "
                f"(use {{}} for the layer index, as in 'model.layers.{{}}.mlp.down_proj')")
    arch = Arch(**templates)
    names = dict(model.named_modules())
    for field in TEMPLATE_FLAGS:
        name = arch.name(field, 0)
        if name not in names:
            raise UnknownArchitecture(f"module {name!r} ({field}) is not in this {model_type} model; "
                                      f"pass {TEMPLATE_FLAGS[field]} TEMPLATE")
        if field in ("mlp_in", "mlp_out") and not _projection(names[name]):
            raise UnknownArchitecture(f"module {name!r} ({field}) of this {model_type} model is a "
                                      f"{type(names[name]).__name__}, not a Linear or Conv1D the editors can change; "
                                      f"pass {TEMPLATE_FLAGS[field]} TEMPLATE")
    return arch


def num_layers(model: nn.Module) -> int:
    cfg = model.config.get_text_config()
    return getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer")


def check_layer(model: nn.Module, layer: int) -> int:
    n = num_layers(model)
    if not 0 <= layer < n:
        raise ValueError(f"layer {layer} does not exist: the model has layers 0..{n - 1}")
    return layer
