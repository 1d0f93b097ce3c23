"""Edited models you can ship: save_model writes a Hugging Face directory that plain transformers loads with the
edit in it; apply_deltas merges tiny_saved deltas; GRACE is refused; `kedit edit --save-model` and `kedit apply`."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from kedit_ray.cli import main
from kedit_ray.editors import Grace, GraceParams, Memit, MemitParams, Rome, RomeParams
from kedit_ray.editors.toolkit import ValueParams
from kedit_ray.eval.counterfact import target_nll
from kedit_ray.export import apply_deltas, edit_all, save_edited, save_model
from kedit_ray.models import load
from kedit_ray.models.weights import weight
from kedit_ray.requests import EditRequest

from conftest import make_tiny_lm

# subject last: in a random tiny model that is where one position's MLP output reaches the prediction
A = EditRequest(1, "Space Needle", "the city of {}", "Goa", "Seattle")
B = EditRequest(2, "Eiffel Tower", "the city of {}", "Rome", "Paris")
HP = RomeParams(layer=1, n_prefixes=1, prefix_len=3, use_cov=False, values=ValueParams(steps=8))
EDITED = "model.layers.1.mlp.down_proj"
TEXT = "the city of Space Needle"
DISK_MAP = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.layers.2": "cpu",
            "model.layers.3": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}


@pytest.fixture(scope="module")
def lm(tiny_saved):
    return load(str(tiny_saved))


def plain_load(path):
    """The directory as any transformers user loads it: no kedit involved."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


@torch.no_grad()
def logits(model, tok, text: str = TEXT) -> torch.Tensor:
    return model(tok(text, return_tensors="pt").input_ids).logits[0].double()


def gain(edited, base, req: EditRequest) -> float:
    """How much more log-probability the edited model (model, tokenizer) gives o* after the prompt than `base`."""
    def logp(model, tok):
        return torch.log_softmax(logits(model, tok, req.text)[-1], -1)[tok(" " + req.target_new,
                                                                           add_special_tokens=False).input_ids[0]]
    return (logp(*edited) - logp(*base)).item()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def saved_tensor(out, name: str) -> torch.Tensor:
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        return f.get_tensor(name)


def test_saved_model_loads_in_plain_transformers_with_the_edit(lm, tmp_path, one_thread):
    delta = Rome(HP).edit(lm, A)
    unedited = logits(lm.model, lm.tok)
    lm.model.config.gguf_file = "x.gguf"             # leftovers a shipped config must not carry
    lm.model.config.kedit_note = "made by kedit"
    try:
        with delta.applied(lm.model):
            edited = logits(lm.model, lm.tok)
            out = save_model(lm, tmp_path / "edited")
    finally:
        del lm.model.config.gguf_file, lm.model.config.kedit_note
    assert torch.equal(logits(lm.model, lm.tok), unedited)         # the model in memory is as it was
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edited"]  # nothing left beside it (atomic write)
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    config = json.loads((out / "config.json").read_text())
    assert not [k for k in config if k.startswith("kedit") or k in ("gguf_file", "_model_name_or_path")]

    model, tok = plain_load(out)
    assert tok(TEXT).input_ids == lm.tok(TEXT).input_ids and tok.pad_token == lm.tok.pad_token == "<pad>"
    got = logits(model, tok)
    assert rel(got, edited) <= 1e-6                             # the same float32 weights, the same forward pass
    assert (got - unedited).abs().max() > 1e-2

    with pytest.raises(FileExistsError, match="not an empty directory"):
        save_model(lm, out)


def test_offloaded_and_bfloat16_models_save_their_real_edited_weights(tiny_saved, lm, tmp_path, one_thread):
    delta = Rome(HP).edit(lm, A)
    w0 = weight(lm.model, EDITED).clone()
    off = load(str(tiny_saved), device_map=DISK_MAP, offload_folder=str(tmp_path / "offload"))
    out = save_edited(off, delta, tmp_path / "offloaded")
    assert torch.equal(saved_tensor(out, f"{EDITED}.weight"), w0 + delta.deltas[EDITED])
    with delta.applied(lm.model):
        assert rel(logits(*plain_load(out)), logits(lm.model, lm.tok)) <= 1e-6

    half = load(str(tiny_saved), dtype="bfloat16")
    out = save_edited(half, delta, tmp_path / "bf16")
    w = saved_tensor(out, f"{EDITED}.weight")
    w_half = w0.to(torch.bfloat16).float()          # W as loaded in bfloat16, then W + ΔW rounded once
    assert w.dtype == torch.bfloat16 and torch.equal(w, (w_half + delta.deltas[EDITED]).to(torch.bfloat16))


def test_apply_deltas_merges_saved_deltas_like_applying_them_in_memory(tiny_saved, lm, tmp_path, one_thread):
    d1 = Rome(HP).edit(lm, A)
    with d1.applied(lm.model):
        d2 = Rome(HP).edit(lm, B)                    # made on the model with the first edit, as in sequence
        with d2.applied(lm.model):
            want = {n: p.clone() for n, p in lm.model.state_dict().items()}
    paths = [d1.save(tmp_path / "d1.safetensors"), d2.save(tmp_path / "d2.safetensors")]
    out = apply_deltas(str(tiny_saved), paths, tmp_path / "merged")
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        for name, w in want.items():
            if name in f.keys():
                assert torch.equal(f.get_tensor(name), w), name

    other = make_tiny_lm(seed=1)                     # another model: its delta is refused, naming both
    foreign = Rome(HP).edit(other, A).save(tmp_path / "foreign.safetensors")
    with pytest.raises(ValueError, match="foreign.safetensors.*tiny-llama-1"):
        apply_deltas(str(tiny_saved), [paths[0], foreign], tmp_path / "refused")
    assert not (tmp_path / "refused").exists()


def test_grace_is_refused_with_its_reason(tiny_saved, lm, tmp_path, one_thread):
    adaptor = Grace(GraceParams(layer=1, eps_init=1.0, steps=3)).edit(lm, A)
    with adaptor.applied(lm.model), pytest.raises(ValueError, match="GRACE.*cannot be merged"):
        save_model(lm, tmp_path / "g")
    with pytest.raises(ValueError, match="GRACE.*cannot be merged"):
        save_edited(lm, adaptor, tmp_path / "g")
    path = adaptor.save(tmp_path / "codebook.safetensors")
    with pytest.raises(ValueError, match="codebook.safetensors is a GRACE codebook"):
        apply_deltas(str(tiny_saved), [path], tmp_path / "g")
    with pytest.raises(ValueError, match="GRACE"):
        edit_all(Grace(GraceParams(layer=1, eps_init=1.0)), lm, [A])
    assert not (tmp_path / "g").exists()


def test_memit_over_requests_gives_one_model_with_all_of_them(lm, tmp_path, one_thread):
    memit = Memit(MemitParams(layers=[1], use_cov=False, n_prefixes=1, mom2_update_weight=1.0,
                              values=ValueParams(steps=8)))
    delta = edit_all(memit, lm, [A, B])
    assert delta.meta["case_ids"] == [1, 2]
    before = target_nll(lm, [A.text, B.text], [A.target_new, B.target_new])
    out = save_edited(lm, delta, tmp_path / "memit")
    edited = load(str(out))
    after = target_nll(edited, [A.text, B.text], [A.target_new, B.target_new])
    assert (after < before - 0.5).all(), (before, after)


def test_cli_edit_save_model_requests_and_apply(tiny_saved, tmp_path, capsys, one_thread):
    common = ["--model", str(tiny_saved), "--no-cov", "--v-steps", "8"]
    assert main(["edit", *common, "--layer", "1", "--prompt", A.prompt, "--subject", A.subject,
                 "--target-new", A.target_new, "--save", str(tmp_path / "d.safetensors"),
                 "--save-model", str(tmp_path / "edited")]) == 0
    assert main(["apply", "--model", str(tiny_saved), "--delta", str(tmp_path / "d.safetensors"),
                 "--out", str(tmp_path / "applied")]) == 0
    name = f"{EDITED}.weight"
    assert torch.equal(saved_tensor(tmp_path / "edited", name), saved_tensor(tmp_path / "applied", name))
    assert not torch.equal(saved_tensor(tmp_path / "edited", name), saved_tensor(tiny_saved, name))
    base = plain_load(tiny_saved)
    assert gain(plain_load(tmp_path / "edited"), base, A) > 1.0

    requests = tmp_path / "requests.jsonl"
    requests.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in (A, B)))
    assert main(["edit", *common, "--method", "memit", "--layers", "1", "--mom2-weight", "1",
                 "--requests", str(requests), "--save-model", str(tmp_path / "memit")]) == 0
    assert "2 edits" in capsys.readouterr().out
    edited = plain_load(tmp_path / "memit")
    assert gain(edited, base, A) > 1.0 and gain(edited, base, B) > 1.0

    foreign = Rome(HP).edit(make_tiny_lm(seed=1), A).save(tmp_path / "foreign.safetensors")
    assert main(["apply", "--model", str(tiny_saved), "--delta", str(foreign), "--out", str(tmp_path / "no")]) == 2
    assert "foreign.safetensors" in capsys.readouterr().err
    assert main(["edit", "--model", str(tiny_saved), "--method", "grace", "--eps-init", "1", "--prompt", A.prompt,
                 "--subject", A.subject, "--target-new", A.target_new, "--save-model", str(tmp_path / "g")]) == 2
    assert "--save-model" in capsys.readouterr().err and not (tmp_path / "g").exists()
