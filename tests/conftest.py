"""Shared fixtures: a tiny random Llama with a word-level tokenizer, and the real gemma-3-270m."""
from __future__ import annotations

import importlib
import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch

# Tests see only the layer statistics they compute themselves (Ray workers inherit this too).
os.environ["KEDIT_STATS_CACHE"] = tempfile.mkdtemp(prefix="kedit-stats-")
# the shared data beside the checkout (/work/shared/data for /work/main); KEDIT_TEST_DATA names another place
DATA = Path(os.environ.get("KEDIT_TEST_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
WORDS = ("The Where What the of in is a city located can be found Space Needle Eiffel Tower Seattle Paris Goa Rome London "
         "mother tongue language French English speaks Danielle Darrieux Michel Rocard native speaker "
         "capital country France Italy Spain Berlin Germany was born by made company product religion").split()


def job_script(name: str):
    """jobs/<name>.py as a module (a job imports its sibling `paths` as Ray runs it: from jobs/)."""
    jobs = str(Path(__file__).resolve().parents[1] / "jobs")
    sys.path.insert(0, jobs)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(jobs)


def data_file(name: str) -> Path:
    path = DATA / name
    if not path.exists():
        pytest.skip(f"{path} is absent (shared data is not part of a clone)")
    return path


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<bos>", "<eos>", "<unk>", ".", ",", "'", "?"] + WORDS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    from tokenizers.processors import TemplateProcessing

    core.post_processor = TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                  unk_token="<unk>")
    tok.padding_side = "right"
    return tok


def make_tiny_lm(seed: int = 0, layers: int = 4, hidden: int = 32, inter: int = 64,
                 dtype: torch.dtype = torch.float32):
    """A random Llama; `dtype` float64 for checks that compare two computations (float64 end to end: what differs
    between two correct float arithmetics is then far below any float32 effect the check is about)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from kedit_ray.models import LM, detect_arch
    from kedit_ray.models.loading import fingerprint

    torch.manual_seed(seed)
    tok = make_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=0.3)
    model = LlamaForCausalLM(cfg).to(dtype).eval().requires_grad_(False)
    return LM(model, tok, detect_arch(model), f"tiny-llama-{seed}", fingerprint(model))


@pytest.fixture(scope="session", autouse=True)
def torch_threads():
    """KEDIT_TEST_THREADS=N runs the suite with N torch threads (tests that use `one_thread` keep 1): the numeric
    checks must hold for 1 and 2 threads alike. Unset: torch's default."""
    n = os.environ.get("KEDIT_TEST_THREADS")
    if n:
        torch.set_num_threads(int(n))
    yield torch.get_num_threads()


@pytest.fixture
def one_thread():
    """One torch thread: tiny passes run far faster so, above all on shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_lm():
    return make_tiny_lm()


@pytest.fixture
def tiny_dir(tmp_path) -> str:
    """The tiny model saved as a directory, so that it loads by name (CLI, Ray workers)."""
    lm = make_tiny_lm()
    lm.model.save_pretrained(tmp_path / "tiny")
    lm.tok.save_pretrained(tmp_path / "tiny")
    return str(tmp_path / "tiny")


@pytest.fixture(scope="session")
def tiny_saved(tmp_path_factory) -> Path:
    """The tiny model saved once per session, for tests that only read it (loads with device maps, dtypes)."""
    path = tmp_path_factory.mktemp("tiny") / "model"
    lm = make_tiny_lm()
    lm.model.save_pretrained(path)
    lm.tok.save_pretrained(path)
    return path


@pytest.fixture
def tiny_lm64():
    """The same tiny model in float64."""
    return make_tiny_lm(dtype=torch.float64)


@pytest.fixture(scope="session")
def gemma():
    from kedit_ray.models import load

    return load("gemma-3-270m")
