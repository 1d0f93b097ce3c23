"""LoRA through peft on tiny random Llamas: the merged Delta is the trained adapter's (α/r)·B A, applying it gives
the adapted model's logits, peft leaves nothing behind, a batch trains one adapter, `kedit edit` exports it; and
the real gemma-3-270m.

u = 2⁻²⁴, float32's unit roundoff: a float32 dot product of length n is off by at most n·u·(|B||A|)."""
from __future__ import annotations

import json

import pytest
import torch

from kedit_ray.cli import build_parser, editor_params, main
from kedit_ray.editors import Delta, LoRA, LoRAParams, make_editor
from kedit_ray.editors import lora as lora_module
from kedit_ray.editors.lora import ADAPTER
from kedit_ray.eval.counterfact import target_nll
from kedit_ray.models import load
from kedit_ray.requests import EditRequest

pytestmark = pytest.mark.usefixtures("one_thread")
U = 2.0 ** -24
REQ = EditRequest(0, "Space Needle", "the city of {}", "Goa Rome", "Seattle")     # a two-token target
REQS = [REQ, EditRequest(1, "Eiffel Tower", "the city of {}", "Rome", "Paris"),
        EditRequest(2, "Danielle Darrieux", "The mother tongue of {} is", "English", "French")]
HP = dict(layers=[1, 2], rank=4, alpha=8.0, lr=1e-2, steps=20, stop_nll=0.0)
NAMES = ["model.layers.1.mlp.down_proj", "model.layers.2.mlp.down_proj"]


def logits(lm, text: str = REQ.text) -> torch.Tensor:
    with torch.no_grad():
        return lm.model(input_ids=torch.tensor([lm.tok(text).input_ids])).logits[0]


def nll(lm, reqs: list[EditRequest]) -> torch.Tensor:
    return target_nll(lm, [r.text for r in reqs], [r.target_new for r in reqs])


def spy_on_merge(monkeypatch, lm) -> dict:
    """What the editor merges, seen at that moment: each LoRA layer's A, B, α/r and peft's own ΔW, and the
    logits of the model with the adapters in."""
    seen = {}

    def spy(layers):
        from peft.tuners.lora import LoraLayer

        seen["wrapped"] = sorted(n for n, m in lm.model.named_modules() if isinstance(m, LoraLayer))
        seen["logits"] = logits(lm)
        seen["adapter"] = {n: (m.lora_A[ADAPTER].weight.detach().clone(), m.lora_B[ADAPTER].weight.detach().clone(),
                               m.scaling[ADAPTER], m.get_delta_weight(ADAPTER).detach().clone())
                           for n, m in layers.items()}
        return real(layers)

    real = lora_module.merged
    monkeypatch.setattr(lora_module, "merged", spy)
    return seen


def test_the_delta_is_the_trained_adapter_and_the_model_is_left_as_it_was(tiny_lm, monkeypatch):
    """ΔW = (α/r)·B A of the trained adapter (and peft's own merge agrees, within float32 rounding); edit() leaves
    the same module objects, no peft attribute, the requires_grad flags and every weight bit for bit."""
    lm = tiny_lm
    lm.model.model.norm.weight.requires_grad_(True)                # a flag peft would clear: it must come back
    flags = {n: p.requires_grad for n, p in lm.model.named_parameters()}
    modules = [(n, id(m)) for n, m in lm.model.named_modules()]
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    out0, rng = logits(lm), torch.random.get_rng_state()
    seen = spy_on_merge(monkeypatch, lm)
    delta = LoRA(LoRAParams(**HP)).edit(lm, REQ)

    assert seen["wrapped"] == NAMES and sorted(delta.deltas) == NAMES
    for name, (a, b, scale, peft_dw) in seen["adapter"].items():
        assert a.shape == (4, 64) and b.shape == (32, 4) and scale == 8.0 / 4 and b.abs().max() > 0
        exact = scale * (b.double() @ a.double())
        size = scale * (b.double().abs() @ a.double().abs())
        dw = delta.deltas[name]
        assert dw.dtype == torch.float32 and ((dw.double() - exact).abs() <= 2 * U * size).all()   # one rounding
        assert ((peft_dw.double() - exact).abs() <= (4 + 2) * U * size).all()                      # float32 B A
    assert [(n, id(m)) for n, m in lm.model.named_modules()] == modules
    assert not hasattr(lm.model, "peft_config")
    assert {n: p.requires_grad for n, p in lm.model.named_parameters()} == flags
    assert all(p.grad is None for p in lm.model.parameters())     # training reached the adapters alone
    assert all(torch.equal(v, before[k]) for k, v in lm.model.state_dict().items())
    assert torch.equal(logits(lm), out0)                           # no hook nor wrapper left in the forward pass
    assert torch.equal(torch.random.get_rng_state(), rng)          # A's seed did not touch the caller's generator


def test_applied_delta_gives_the_adapted_logits_lowers_the_nll_and_reverts(tiny_lm64, monkeypatch, tmp_path):
    """In float64 the merged weights compute what the adapters did: the logits agree far inside a float32 rounding
    of their size; the target NLL falls; revert restores every weight bit for bit; save/load keeps ΔW exactly."""
    lm = tiny_lm64
    seen = spy_on_merge(monkeypatch, lm)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    nll0 = nll(lm, [REQ]).item()
    delta = LoRA(LoRAParams(**HP)).edit(lm, REQ)
    assert all(d.dtype == torch.float64 for d in delta.deltas.values())     # the adapters take the model's dtype
    with delta.applied(lm.model):
        out = logits(lm)
        nll1 = nll(lm, [REQ]).item()
    assert (out - seen["logits"]).abs().max() <= U * seen["logits"].abs().max()
    # v_nll: the last adapter's NLL while training; both NLLs take float32 log-softmax of the same float64 logits
    assert nll1 < nll0 - 1.0 and abs(nll1 - delta.meta["v_nll"]) <= 8 * U * out.abs().max()
    assert all(torch.equal(v, before[k]) for k, v in lm.model.state_dict().items())
    again = Delta.load(delta.save(tmp_path / "lora.safetensors"))
    assert all(torch.equal(again.deltas[k], d) for k, d in delta.deltas.items())


def test_a_batch_trains_one_adapter_on_every_request(tiny_lm):
    lm = tiny_lm
    editor = LoRA(LoRAParams(**{**HP, "steps": 30}))
    assert editor.batched and editor.kind == "delta"
    nll0 = nll(lm, REQS)
    delta = editor.edit_batch(lm, REQS)
    assert sorted(delta.deltas) == NAMES and delta.meta["case_ids"] == [0, 1, 2] and delta.meta["rank"] == 4
    with delta.applied(lm.model):
        assert (nll(lm, REQS) < nll0 - 0.5).all()
    one, again = editor.edit(lm, REQ), editor.edit(lm, REQ)           # A from a fixed seed: the same edit
    assert one.meta["case_id"] == 0 and all(torch.equal(one.deltas[k], again.deltas[k]) for k in NAMES)


def test_the_batch_and_sequential_protocols_run_it_and_restore_the_model(tiny_lm):
    from kedit_ray.eval.protocols import run_batch, run_sequential

    before = {k: v.clone() for k, v in tiny_lm.model.state_dict().items()}
    editor = LoRA(LoRAParams(**{**HP, "steps": 10}))
    rows = run_batch(tiny_lm, editor, REQS, 3, "lora", progress=False)
    seq, _ = run_sequential(tiny_lm, editor, REQS, 1, None, [], "lora", progress=False)
    for r in rows + seq:
        assert r["error"] is None and r["efficacy_magnitude"] > r["pre_efficacy_magnitude"], r
    assert all(torch.equal(v, before[k]) for k, v in tiny_lm.model.state_dict().items())


def test_modules_by_field_and_template_bfloat16_and_refusals(tiny_lm):
    lm = tiny_lm
    lm.model.to(torch.bfloat16)
    hp = dict(HP, steps=3, modules=["mlp_in", "model.layers.{}.mlp.gate_proj"])
    delta = LoRA(LoRAParams(**hp)).edit(lm, REQ)
    assert sorted(delta.deltas) == sorted(f"model.layers.{x}.mlp.{p}_proj" for x in (1, 2) for p in ("up", "gate"))
    assert all(d.dtype == torch.float32 for d in delta.deltas.values())     # peft's float32 adapters, not bf16
    assert all(p.dtype == torch.bfloat16 for p in lm.model.parameters())
    with pytest.raises(ValueError, match="--lora-modules"):
        LoRA(LoRAParams(**dict(hp, modules=["model.layers.{}.mlp.nothing"]))).edit(lm, REQ)
    with pytest.raises(ValueError, match="linear maps; model.layers.1.mlp is a LlamaMLP"):
        LoRA(LoRAParams(**dict(hp, modules=["mlp"]))).edit(lm, REQ)
    with pytest.raises(ValueError, match="layers 0..3"):
        LoRA(LoRAParams(**dict(hp, layers=[4]))).edit(lm, REQ)


def test_an_offloaded_layer_gets_the_plain_models_edit(tiny_saved, tmp_path):
    """Layer 1 on disk (its W on "meta"), layer 2 on the CPU: the adapters still train where the modules compute, and
    the delta is the plain model's (the same float operations in the same order: float32 rounding at most)."""
    from test_offload import DISK_MAP, logits as off_logits, rel

    plain, off = load(str(tiny_saved)), load(str(tiny_saved), device_map=DISK_MAP, offload_folder=str(tmp_path))
    hp = LoRAParams(**dict(HP, steps=5))
    want, got = LoRA(hp).edit(plain, REQ), LoRA(hp).edit(off, REQ)
    assert all(rel(got.deltas[n], want.deltas[n]) <= 1e-5 for n in NAMES)
    before = off_logits(off)
    with got.applied(off.model):
        assert not torch.equal(off_logits(off), before)
    assert torch.equal(off_logits(off), before)


def test_flags_parse_into_the_params():
    args = build_parser().parse_args(["eval", "--data", "x", "--out", "o", "--method", "lora", "--layers", "1-2",
                                      "--lora-modules", "mlp_out,mlp_in", "--lora-rank", "2", "--lora-alpha", "4",
                                      "--v-steps", "3", "--v-lr", "0.01", "--v-stop-nll", "0"])
    params = editor_params(args)
    assert params == {"layers": [1, 2], "modules": ["mlp_out", "mlp_in"], "rank": 2, "alpha": 4.0, "steps": 3,
                      "lr": 0.01, "stop_nll": 0.0}
    assert make_editor("lora", params).hp == LoRAParams(**params)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", "--data", "x", "--out", "o", "--method", "lora", "--lora-rank", "0"])


def test_measured_defaults_and_the_rules(tmp_path, monkeypatch):
    from types import SimpleNamespace

    monkeypatch.setenv("KEDIT_HOME", str(tmp_path))            # no user defaults file
    keys = ("layers", "modules", "rank", "alpha", "lr", "stop_nll")
    gemma, other = SimpleNamespace(name="gemma-3-270m", n_layers=18), SimpleNamespace(name="other", n_layers=2)
    smol = SimpleNamespace(name="smollm2-135m", n_layers=30)
    assert [lora_module.MEASURED.value(gemma, k) for k in keys] == [[0, 1, 2], ["mlp_out"], 8, 16.0, 1e-3, 0.5]
    assert [lora_module.MEASURED.value(smol, k) for k in keys] == [[3, 4, 5], ["mlp_out"], 8, 16.0, 1e-3, 0.5]
    assert [lora_module.MEASURED.value(other, k) for k in keys] == [[0, 1], ["mlp_out"], 8, 16.0, 1e-3, 0.5]


def test_kedit_edit_exports_a_model_with_every_request(tiny_dir, tmp_path, capsys):
    """`kedit edit --method lora --requests F --save-model DIR`: export's edit_all takes the batch in one adapter;
    the saved model, loaded afresh, prefers each new target more than the unedited one does."""
    requests = tmp_path / "requests.jsonl"
    requests.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in REQS[:2]))
    assert main(["edit", "--model", tiny_dir, "--method", "lora", "--layers", "1,2", "--lora-rank", "4",
                 "--v-lr", "0.01", "--v-steps", "20", "--requests", str(requests),
                 "--save-model", str(tmp_path / "edited")]) == 0
    assert "2 edits" in capsys.readouterr().out
    base, edited = load(tiny_dir), load(str(tmp_path / "edited"))
    assert (nll(edited, REQS[:2]) < nll(base, REQS[:2]) - 0.5).all()


@pytest.mark.slow
def test_gemma_ten_counterfact_edits(gemma):
    """The single protocol on the first 10 CounterFact cases with the measured defaults: ES ≥ 0.9 (measured: 1.0 on
    the first 30)."""
    from conftest import data_file
    from kedit_ray.datasets import load_requests
    from kedit_ray.eval.counterfact import counterfact_scores

    reqs = load_requests(data_file("counterfact-edit.json"), limit=10)[0]
    editor, es = LoRA(), []
    for r in reqs:
        with editor.edit(gemma, r).applied(gemma.model):
            es.append(counterfact_scores(gemma, r)["efficacy_score"])
    assert sum(es) / len(es) >= 0.9, es
