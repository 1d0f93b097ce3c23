"""CPU workers of one node share one read-only copy of the weights (kedit_ray.distributed.shared): the model built on
the shared arrays is the private load bit for bit, a write copies the weight first, and on Ray one worker's edit
never reaches another's weights."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from kedit_ray.distributed.shared import _arrays, file_mapped, sharing, tensors
from kedit_ray.distributed.worker import ModelWorker
from kedit_ray.editors.delta import Delta
from kedit_ray.models import load
from kedit_ray.models.weights import SHARED
from kedit_ray.spec import ModelSpec, Resources

TESTS = str(Path(__file__).resolve().parent)
IDS = torch.tensor([[1, 5, 9, 12, 7, 3]])
MODULE = "model.layers.1.mlp.down_proj"
BF16 = "bfloat16"   # a dtype other than the checkpoint's: the load makes the weights anew, the store shares them


def digest(model: torch.nn.Module) -> str:
    """sha256 of every parameter's bytes, in order."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode() + p.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def delta_for(lm) -> Delta:
    shape = lm.model.get_submodule(MODULE).weight.shape
    return Delta({MODULE: 0.1 * torch.randn(shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)})


def mapping_of(address: int) -> str:
    """The path of the mapping of this process that holds `address` ("" for anonymous memory)."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        if lo <= address < hi:
            return fields[5] if len(fields) == 6 else ""
    return ""


class Probe(ModelWorker):
    """A worker that edits on demand and reports its weights (a Ray actor in the test below)."""

    def __init__(self, model: ModelSpec, index: int, cpus: float, gpus: list | None = None):
        super().__init__(model, index, cpus, gpus)
        self.delta = None

    def state(self) -> tuple[str, np.ndarray, int, str]:
        """(digest of the weights, logits of IDS in float64, parameters still shared, the mapping of MODULE's W)."""
        with torch.no_grad():
            logits = self.lm.model(input_ids=IDS).logits.double().numpy()
        shared = sum(bool(getattr(p, SHARED, False)) for p in self.lm.model.parameters())
        w = self.lm.model.get_submodule(MODULE).weight
        return digest(self.lm.model), logits, shared, mapping_of(w.data_ptr())

    def edit(self) -> None:
        self.delta = delta_for(self.lm).apply(self.lm.model)

    def revert(self) -> None:
        self.delta.revert(self.lm.model)


def shared_copy(tiny_dir: str) -> tuple[dict, dict]:
    """What a node's store holds for the tiny model in bfloat16 (its checkpoint is float32): (dtypes, read-only
    arrays)."""
    dtypes, arrays = _arrays(ModelSpec(tiny_dir, dtype=BF16))
    for a in arrays.values():
        a.flags.writeable = False
    return dtypes, arrays


def built(tiny_dir: str, shared: tuple[dict, dict]):
    return load(tiny_dir, dtype=BF16, weights=tensors(*shared))


@pytest.fixture
def tied_dir(tmp_path) -> str:
    """A tiny Llama whose head is its embedding (tied, as gemma's)."""
    from conftest import make_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    tok = make_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, pad_token_id=0)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "tied")
    tok.save_pretrained(tmp_path / "tied")
    return str(tmp_path / "tied")


@pytest.mark.filterwarnings("ignore:The given NumPy array is not writable")
@pytest.mark.parametrize("which", ["tiny_dir", "tied_dir"])
def test_model_built_on_the_shared_arrays_is_the_private_load(which, request):
    tiny_dir = request.getfixturevalue(which)
    assert file_mapped(load(tiny_dir).model) and _arrays(ModelSpec(tiny_dir)) is None   # the checkpoint mapped
    private = load(tiny_dir, dtype=BF16)
    assert not file_mapped(private.model)
    shared = shared_copy(tiny_dir)
    _, arrays = shared
    lm = built(tiny_dir, shared)
    tied = private.model.lm_head.weight is private.model.model.embed_tokens.weight
    assert tied == (which == "tied_dir") and tied == (lm.model.lm_head.weight is lm.model.model.embed_tokens.weight)
    assert lm.fingerprint == private.fingerprint and digest(lm.model) == digest(private.model)
    for name, p in lm.model.named_parameters():                  # the arrays themselves, not copies
        assert p.data_ptr() == arrays[name].ctypes.data, name
    with torch.no_grad():
        assert torch.equal(lm.model(input_ids=IDS).logits, private.model(input_ids=IDS).logits)
    with pytest.raises(ValueError, match="no model.norm.weight"):
        load(tiny_dir, dtype=BF16, weights={n: t for n, t in tensors(*shared).items() if n != "model.norm.weight"})


@pytest.mark.filterwarnings("ignore:The given NumPy array is not writable")
def test_a_write_to_a_shared_weight_copies_it_first_and_reverts_bit_for_bit(tiny_dir):
    shared = shared_copy(tiny_dir)
    _, arrays = shared
    before = {n: a.copy() for n, a in arrays.items()}
    lm = built(tiny_dir, shared)
    for p in lm.model.parameters():
        setattr(p, SHARED, True)
    w0 = lm.model.get_submodule(MODULE).weight.detach().clone()
    start = digest(lm.model)
    delta = delta_for(lm).apply(lm.model)
    w = lm.model.get_submodule(MODULE).weight
    assert not getattr(w, SHARED) and w.data_ptr() != arrays[f"{MODULE}.weight"].ctypes.data
    expected = (w0.double() + delta.deltas[MODULE]).to(w0.dtype)      # W + ΔW summed wide, cast once
    assert torch.equal(w, expected)
    assert all(np.array_equal(arrays[n], before[n]) for n in arrays)  # the shared copy never written
    others = [p for n, p in lm.model.named_parameters() if n != f"{MODULE}.weight"]
    assert all(getattr(p, SHARED) for p in others)                     # only the edited weight was copied
    delta.revert(lm.model)
    assert digest(lm.model) == start


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray of 2 CPUs, the tests' modules on the workers' path; objects over 1 kB in the shared store (Ray
    hands smaller ones over inline, copied)."""
    import ray

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", os.pathsep.join(filter(None, [TESTS, os.environ.get("PYTHONPATH")])))
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING",
                 _node_ip_address="127.0.0.1",
                 _system_config={"max_direct_call_object_size": 1024})   # the tiny model's 80 kB in the store too
        yield
        ray.shutdown()


def test_one_workers_edit_never_reaches_another_sharing_its_weights(local_ray, tiny_dir):
    import ray

    from kedit_ray.distributed.pool import RayPool

    def states(pool):
        return [ray.get(a.state.remote()) for a in sorted(pool.info, key=lambda a: pool.index[a])]

    with RayPool(Probe, (ModelSpec(tiny_dir, dtype=BF16),), Resources(2, cpus_per_worker=0.5, share_weights=False),
                 2) as pool:
        assert pool.store is None
        private = states(pool)[0]
    with RayPool(Probe, (ModelSpec(tiny_dir, dtype=BF16),), Resources(2, cpus_per_worker=0.5, share_weights=True),
                 2) as pool:
        a, b = sorted(pool.info, key=lambda a: pool.index[a])
        start = states(pool)
        for digest_, logits, shared, where in start:   # both map the node's copy, which is the private load
            assert digest_ == private[0] and np.array_equal(logits, private[1])
            assert shared == len(list(load(tiny_dir).model.parameters())) and "plasma" in where, where
        ray.get(a.edit.remote())
        (da, la, sa, wa), (db, lb, sb, wb) = states(pool)
        assert da != start[0][0] and not np.array_equal(la, start[0][1])   # a edited, on its private copy
        assert sa == start[0][2] - 1 and "plasma" not in wa
        assert (db, sb, wb) == (start[1][0], start[1][2], start[1][3])
        assert np.array_equal(lb, start[1][1])                             # b untouched
        ray.get(a.revert.remote())
        da, la, _, _ = states(pool)[0]
        assert da == start[0][0] and np.array_equal(la, start[0][1])       # a reverted bit for bit


def test_offloaded_models_load_as_before_and_the_flag_turns_sharing_off(tiny_dir):
    import argparse

    from kedit_ray.options import add_ray_args

    spec = ModelSpec(tiny_dir, device_map={"": "cpu"})          # a device map: today's load, the store never asked
    worker = sharing(Probe)(spec, index=0, cpus=1, gpus=[], store=None)
    assert not any(getattr(p, SHARED, False) for p in worker.lm.model.parameters())
    p = argparse.ArgumentParser()
    add_ray_args(p, "eval")
    assert not Resources.from_args(p.parse_args([])).share_weights
    assert Resources.from_args(p.parse_args(["--share-weights"])).share_weights


def test_a_loaded_tokenizer_keeps_no_python_copy_of_its_vocabulary():
    """transformers 5 builds gemma's tokenizer from Python vocab and merges and keeps them (185 MB a worker for
    262,144 words); `wrap` drops them: the tokenizer encodes, decodes and saves as before."""
    import tempfile

    from transformers import AutoTokenizer
    from transformers.models.gemma.tokenization_gemma import GemmaTokenizer

    from kedit_ray.models.loading import slim

    words = ["▁the", "▁Space", "▁Need", "le", "▁is", "▁in", "▁Seattle", "▁Paris"]
    vocab = {**{t: i for i, t in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"])},
             **{w: 5 + i for i, w in enumerate(words)}, "▁Nee": 13, "d": 14}
    plain, slimmed = (GemmaTokenizer(vocab=dict(vocab), merges=[("▁Nee", "d")]) for _ in range(2))
    text = ["the Space Needle is in Seattle", "in Paris Needle"]
    slim(slimmed)
    assert slimmed._vocab is None and slimmed._merges is None and plain._vocab is not None
    assert slimmed(text).input_ids == plain(text).input_ids and slimmed.get_vocab() == plain.get_vocab()
    assert slimmed.batch_decode(plain(text).input_ids) == plain.batch_decode(plain(text).input_ids)
    with tempfile.TemporaryDirectory() as d:
        slimmed.save_pretrained(d)
        assert AutoTokenizer.from_pretrained(d)(text).input_ids == plain(text).input_ids


def test_a_worker_imports_no_pandas():
    """What every worker process holds whatever it shares: the worker modules leave pandas (pyarrow.dataset's, ~35 MB
    a process) to the driver, which reads results."""
    import subprocess
    import sys

    code = ("import sys, kedit_ray.distributed.batch, kedit_ray.distributed.suite, kedit_ray.distributed.stats, "
            "kedit_ray.distributed.trace; "
            "print(sorted(m for m in ('pandas', 'pyarrow.dataset', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
