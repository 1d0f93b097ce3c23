"""Models split or offloaded by accelerate: edit, apply, revert, save, stats and tracing read and write the real
weights (kedit_ray.models.weights), whether a module sits on a device or in accelerate's offload store.

The tiny Llama is tiny_saved to disk and reloaded through kedit_ray.models.load with device maps that put modules on
"disk" (their parameters on "meta", the values in the checkpoint or offload folder) and on "cpu"; on this
CPU-only machine "cpu" is plain placement, and `accelerate.cpu_offload` gives the in-memory store GPUs use for
"cpu". Each result must equal the plain model's: the two run the same float operations in the same order, so
the comparisons allow only float32 rounding (relative 1e-5)."""
from __future__ import annotations

import json

import pytest
import torch

from kedit_ray.editors import FT, Delta, Grace, GraceParams, Memit, MemitParams, Rome, RomeParams
from kedit_ray.editors.ft import FTParams
from kedit_ray.models import load
from kedit_ray.models.weights import WeightAccessError, is_offloaded, param, weight
from kedit_ray.requests import EditRequest


REQ = EditRequest(0, "Space Needle", "The {} is located in the city of", "Goa", "Seattle",
                  paraphrase_prompts=["The Space Needle can be found in the city of"])
LAYER = 1
EDITED = f"model.layers.{LAYER}.mlp.down_proj"
# the edited layer, the embeddings and the head on disk; the rest on the CPU
DISK_MAP = {"model.embed_tokens": "disk", "model.layers.0": "cpu", "model.layers.1": "disk", "model.layers.2": "cpu",
            "model.layers.3": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "disk"}


@pytest.fixture(scope="module")
def plain(tiny_saved):
    return load(str(tiny_saved))


@pytest.fixture(scope="module")
def offloaded(tiny_saved, tmp_path_factory):
    return load(str(tiny_saved), device_map=DISK_MAP, offload_folder=str(tmp_path_factory.mktemp("offload")))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm()).item()


@torch.no_grad()
def logits(lm, text: str = "The Space Needle is located in the city of") -> torch.Tensor:
    ids = lm.tok(text, return_tensors="pt").input_ids.to(lm.input_device)
    return lm.model(ids).logits[0].cpu()


def test_offloaded_weights_live_in_the_store(plain, offloaded):
    assert is_offloaded(offloaded.model, f"{EDITED}.weight") and not is_offloaded(plain.model, f"{EDITED}.weight")
    assert torch.equal(weight(offloaded.model, EDITED), weight(plain.model, EDITED))
    assert offloaded.fingerprint == plain.fingerprint
    assert offloaded.input_device == torch.device("cpu")           # the embeddings are on disk, they compute here
    assert rel(logits(offloaded), logits(plain)) <= 1e-5


def test_rome_on_an_offloaded_layer_equals_the_plain_one_and_reverts_bit_for_bit(plain, offloaded, tmp_path,
                                                                                    one_thread):
    hp = RomeParams(layer=LAYER, n_prefixes=2, use_cov=False)
    d_plain, d_off = Rome(hp).edit(plain, REQ), Rome(hp).edit(offloaded, REQ)
    assert list(d_off.deltas) == [EDITED] and d_off.deltas[EDITED].dtype == torch.float32
    assert rel(d_off.deltas[EDITED], d_plain.deltas[EDITED]) <= 1e-5

    w0 = weight(offloaded.model, EDITED).clone()
    before = logits(offloaded)
    with d_off.applied(offloaded.model):
        assert is_offloaded(offloaded.model, f"{EDITED}.weight")   # still offloaded: the store holds W'
        assert torch.equal(weight(offloaded.model, EDITED), w0 + d_off.deltas[EDITED])
        after = logits(offloaded)
        with d_plain.applied(plain.model):
            edited_plain = logits(plain)
    assert (after - before).abs().max() > 1e-3                     # the edit is not lost in the offload store
    assert rel(after, edited_plain) <= 1e-5
    assert torch.equal(weight(offloaded.model, EDITED), w0)
    assert torch.equal(logits(offloaded), before)                   # reverted bit for bit

    path = d_off.save(tmp_path / "delta.safetensors")
    loaded = Delta.load(path)
    loaded.check_model(offloaded.name, offloaded.fingerprint)
    with loaded.applied(offloaded.model):
        assert torch.equal(logits(offloaded), after)


def test_memit_and_ft_on_offloaded_layers(plain, offloaded, one_thread):
    hp = MemitParams(layers=[1, 2], use_cov=False, n_prefixes=1)   # layer 1 on disk, layer 2 on the CPU
    d_plain, d_off = Memit(hp).edit(plain, REQ), Memit(hp).edit(offloaded, REQ)
    for name in d_plain.deltas:
        assert rel(d_off.deltas[name], d_plain.deltas[name]) <= 1e-5
    ft = FTParams(layer=LAYER, steps=3)
    f_plain, f_off = FT(ft).edit(plain, REQ), FT(ft).edit(offloaded, REQ)
    assert rel(f_off.deltas[EDITED], f_plain.deltas[EDITED]) <= 1e-5
    before = logits(offloaded)
    with f_off.applied(offloaded.model):
        assert not torch.equal(logits(offloaded), before)
    assert torch.equal(logits(offloaded), before)


def test_grace_wraps_an_offloaded_layer(offloaded, one_thread):
    adaptor = Grace(GraceParams(layer=LAYER, eps_init=1.0, steps=5)).edit(offloaded, REQ)
    miss = logits(offloaded, "Paris is the capital of France")
    with adaptor.applied(offloaded.model):
        assert torch.equal(logits(offloaded, "Paris is the capital of France"), miss)


def test_stats_on_an_offloaded_model_equal_the_plain_ones(plain, offloaded, one_thread):
    from kedit_ray.stats.accumulate import accumulate

    docs = ["The Space Needle is located in Seattle.", "Danielle Darrieux speaks French.",
            "The Eiffel Tower is in Paris, the capital of France."]
    a = accumulate(plain, [1, 3], "mlp_out", docs, max_len=16, batch_tokens=32)
    b = accumulate(offloaded, [1, 3], "mlp_out", docs, max_len=16, batch_tokens=32)
    assert a.count == b.count > 0
    for layer in (1, 3):
        assert rel(b.sums[layer], a.sums[layer]) <= 1e-5


def test_tracing_on_an_offloaded_model_equals_the_plain_one(plain, offloaded, one_thread):
    from kedit_ray.tracing.trace import TraceParams, trace_fact

    params = TraceParams(kinds=("hidden", "mlp"), window=2, samples=2)
    a = trace_fact(plain, "The Space Needle is located in the city of", "Space Needle", 0.5, params)
    b = trace_fact(offloaded, "The Space Needle is located in the city of", "Space Needle", 0.5, params)
    assert a.answer == b.answer and abs(a.p - b.p) <= 1e-5
    for kind in params.kinds:
        assert abs(a.scores[kind] - b.scores[kind]).max() <= 1e-5


def test_in_memory_offload_store(tiny_saved, plain, one_thread):
    """accelerate's CPU offload (what a GPU device map's "cpu" entries get): every parameter on meta, the values
    in a dict in CPU memory."""
    from accelerate import cpu_offload

    lm = load(str(tiny_saved))
    cpu_offload(lm.model, execution_device="cpu")
    assert is_offloaded(lm.model, f"{EDITED}.weight")
    hp = RomeParams(layer=LAYER, n_prefixes=1, use_cov=False)
    d, d_plain = Rome(hp).edit(lm, REQ), Rome(hp).edit(plain, REQ)
    assert rel(d.deltas[EDITED], d_plain.deltas[EDITED]) <= 1e-5
    before = logits(lm)
    with d.applied(lm.model):
        with d_plain.applied(plain.model):
            assert rel(logits(lm), logits(plain)) <= 1e-5
    assert torch.equal(logits(lm), before)


def test_a_weight_with_no_store_is_refused_naming_it(tiny_saved):
    from accelerate.utils import set_module_tensor_to_device

    lm = load(str(tiny_saved))
    set_module_tensor_to_device(lm.model, f"{EDITED}.weight", "meta")   # no hook holds its values
    d = Delta({EDITED: torch.zeros(weight(lm.model, "model.layers.0.mlp.down_proj").shape)})
    with pytest.raises(WeightAccessError, match=EDITED):
        d.apply(lm.model)
    with pytest.raises(WeightAccessError, match=EDITED):
        param(lm.model, f"{EDITED}.weight")


def test_device_map_from_a_json_file_and_max_memory(tiny_saved, plain, tmp_path, one_thread):
    path = tmp_path / "map.json"
    path.write_text(json.dumps(DISK_MAP))
    lm = load(str(tiny_saved), device_map=str(path))
    assert lm.model.hf_device_map == DISK_MAP and lm.fingerprint == plain.fingerprint
    assert rel(logits(lm), logits(plain)) <= 1e-5

    (tmp_path / "bad.json").write_text("{'model': 'cpu'")
    with pytest.raises(ValueError, match="bad.json"):
        load(str(tiny_saved), device_map=str(tmp_path / "bad.json"))
    with pytest.raises(ValueError, match="lm_head"):
        load(str(tiny_saved), device_map={**DISK_MAP, "lm_head": ["cpu"]})

    # a CPU budget smaller than the model: accelerate puts the rest on disk
    small = load(str(tiny_saved), max_memory=json.dumps({"cpu": "20KB"}))
    assert "disk" in small.model.hf_device_map.values()
    assert small.fingerprint == plain.fingerprint
    assert rel(logits(small), logits(plain)) <= 1e-5
