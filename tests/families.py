"""Tiny random models of every family the editors are checked on, built from each transformers config class.

`make_family_lm(family)` gives an LM (4 layers, hidden 32, the word-level tokenizer of conftest) whose
architecture comes from `detect_arch`: the registry where it has the family, structural discovery otherwise.
"""
from __future__ import annotations

import torch

from conftest import make_tokenizer

HIDDEN, INTER, LAYERS, HEADS, KV_HEADS = 32, 64, 4, 4, 2
_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
_DECODER = dict(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                num_key_value_heads=KV_HEADS, max_position_embeddings=128)
_GEMMA = dict(head_dim=HIDDEN // HEADS, sliding_window=64)   # the config defaults: head_dim 256, window 4096

# family -> (config class name, its fields beyond the vocabulary, the token ids and initializer_range)
CONFIGS: dict[str, tuple[str, dict]] = {
    # GPT-2: Conv1D (W stored [in, out]), tied embeddings, learned positions
    "gpt2": ("GPT2Config", dict(n_embd=HIDDEN, n_inner=INTER, n_layer=LAYERS, n_head=HEADS, n_positions=128)),
    # GPT-J: attention and MLP in parallel off one norm, partial rotary
    "gptj": ("GPTJConfig", dict(n_embd=HIDDEN, n_inner=INTER, n_layer=LAYERS, n_head=HEADS, n_positions=128,
                                rotary_dim=4)),
    # GPT-NeoX: parallel residual, untied `embed_out` head
    "gpt_neox": ("GPTNeoXConfig", dict(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
                                       num_attention_heads=HEADS, max_position_embeddings=128)),
    "llama": ("LlamaConfig", _DECODER),
    "mistral": ("MistralConfig", dict(_DECODER, sliding_window=64)),
    "qwen2": ("Qwen2Config", _DECODER),                                    # biases on q, k, v
    "qwen3": ("Qwen3Config", dict(_DECODER, head_dim=HIDDEN // HEADS)),   # q/k norms; head_dim defaults to 128
    # Gemma 2/3: normed MLP output (post_feedforward_layernorm), scaled and tied embeddings, sliding layers
    "gemma2": ("Gemma2Config", dict(_DECODER, **_GEMMA)),                 # and logit soft caps
    "gemma3_text": ("Gemma3TextConfig", dict(_DECODER, **_GEMMA)),
    # Gemma 3 4B and up: the text model inside an image-text model (its vision tower has as many layers), on text
    "gemma3": ("Gemma3Config", dict(text_config=dict(_DECODER, **_GEMMA), mm_tokens_per_image=4, boi_token_index=4,
                                    eoi_token_index=5, image_token_index=6,
                                    vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=LAYERS,
                                                       num_attention_heads=2, image_size=28, patch_size=14))),
    # not in the registry: found from the model's structure
    "phi3": ("Phi3Config", _DECODER),                                      # fused gate_up_proj and qkv_proj
    "olmo2": ("Olmo2Config", _DECODER),                                    # normed MLP output, no pre-norm
    # a mixture of experts with a dense shared expert (the experts themselves are fused 3-D parameters)
    "qwen2_moe": ("Qwen2MoeConfig", dict(_DECODER, moe_intermediate_size=16, shared_expert_intermediate_size=INTER,
                                         num_experts=4, num_experts_per_tok=2)),
}
# mixtures of experts without a dense path: the editors refuse them (see kedit_ray.models.arch)
FUSED_MOE: dict[str, tuple[str, dict]] = {
    "mixtral": ("MixtralConfig", dict(_DECODER, num_local_experts=4, num_experts_per_tok=2)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(_DECODER, head_dim=HIDDEN // HEADS, moe_intermediate_size=16,
                                         num_experts=4, num_experts_per_tok=2)),
}
FAMILIES = list(CONFIGS)


def make_family_model(family: str, seed: int = 0, vocab: int | None = None) -> torch.nn.Module:
    """A random model of `family` in eval mode with frozen weights."""
    import transformers
    from transformers import AutoModelForCausalLM

    cls_name, fields = {**CONFIGS, **FUSED_MOE}[family]
    text = dict(vocab_size=vocab or len(make_tokenizer()), initializer_range=0.3, **_IDS)
    if "text_config" in fields:                     # an image-text model: the text settings go to its text model
        fields = {**fields, "text_config": {**text, **fields["text_config"]}}
        text = {"initializer_range": 0.3}
    cfg = getattr(transformers, cls_name)(**text, **fields)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).eval().requires_grad_(False)


def make_family_lm(family: str, seed: int = 0):
    from kedit_ray.models import LM, detect_arch
    from kedit_ray.models.loading import fingerprint

    tok = make_tokenizer()
    model = make_family_model(family, seed, len(tok))
    return LM(model, tok, detect_arch(model), f"tiny-{family}-{seed}", fingerprint(model))
