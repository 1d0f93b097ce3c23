"""`--dtype auto`: the compute dtype the machine that runs the model does best.

    a GPU                               bfloat16, or float16 where the GPU lacks bfloat16
    a CPU with native bfloat16          bfloat16 (x86 flags avx512_bf16 or amx_bf16 in /proc/cpuinfo)
    any other CPU                       float32
"""
from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch

BF16_FLAGS = {"avx512_bf16", "amx_bf16"}   # x86 CPU flags of native bfloat16 arithmetic (AVX-512 BF16, AMX)


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str]:
    """The CPU's feature flags: the first "flags" line of `cpuinfo` (none where it has none or cannot be read)."""
    try:
        lines = Path(cpuinfo).read_text().splitlines()
    except OSError:
        return set()
    for line in lines:
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return set()


def auto_dtype(gpu: bool | None = None, cpuinfo: str | Path = "/proc/cpuinfo") -> tuple[str, str]:
    """(dtype name, why) for a model on a GPU (`gpu`; default: whether CUDA sees one) or on this CPU."""
    if gpu is None:
        gpu = torch.cuda.is_available()
    if gpu:
        if torch.cuda.is_bf16_supported():
            return "bfloat16", "a GPU with bfloat16"
        return "float16", "a GPU without bfloat16"
    native = sorted(BF16_FLAGS & cpu_flags(cpuinfo))
    if native:
        return "bfloat16", f"a CPU with native bfloat16 ({', '.join(native)})"
    return "float32", f"a CPU without native bfloat16 (none of {', '.join(sorted(BF16_FLAGS))})"


def places_on_gpu(device_map: str | dict | None) -> bool:
    """Whether `load` with this (parsed) device map puts weights on a GPU: None keeps the model on the CPU."""
    if device_map is None or not torch.cuda.is_available():
        return False
    if isinstance(device_map, str):
        return device_map != "cpu"
    return any(str(v) not in ("cpu", "disk") for v in device_map.values())


def resolve_dtype(dtype: str, device_map: str | dict | None = None) -> str:
    """`dtype` itself, or for "auto" the one `auto_dtype` picks where the model goes, said once per process on
    stderr."""
    if dtype != "auto":
        return dtype
    name, why = auto_dtype(places_on_gpu(device_map))
    _say(f"[kedit] --dtype auto: {name} ({why})")
    return name


@functools.cache
def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
