"""The one place that reads and writes a module's real weights, wherever accelerate keeps them.

A model dispatched by accelerate (`device_map`) keeps each module's parameters on a device (cuda:1, cpu) or
offloads them: the parameter is then an empty tensor on "meta", and the module's AlignDevicesHook loads the
real values from its `weights_map` (CPU memory, or safetensors / the offload folder on disk) for every forward
pass. Writing the meta tensor does nothing, and the next pass reads the store again. So editors, deltas and
fingerprints read and write through here:

    param(model, "model.layers.2.mlp.down_proj.weight")   the values: the parameter itself, or for an offloaded
                                                           one the stored tensor (CPU); never write to either
    set_param(model, name, value)                          into the parameter, or into the offload store
    weight(model, module) / set_weight(model, module, W)   W as [out, in] (GPT-2's Conv1D stores it transposed)
    execution_device(model, module)                        where the module computes

A parameter marked SHARED holds another process's read-only pages (the weights the CPU workers of a node share,
kedit_ray.distributed.shared): its first write gives it a private copy first (copy on write), so that an edit never
reaches the other workers.

A write to an offloaded weight goes to the store's in-memory part (OffloadedWeightsLoader.state_dict, which
accelerate reads before the disk): one matrix of CPU memory per edited module. The checkpoint and the offload
folder are never written. What cannot be written (an integer or quantised weight, a meta tensor with no hook
holding its values, an unknown store) raises WeightAccessError naming the module.
"""
from __future__ import annotations

from collections.abc import MutableMapping

import torch
from torch import nn

from kedit_ray.models.hooks import get_module, stores_transposed


SHARED = "_kedit_shared"   # attribute set (True) on a parameter whose storage is shared read-only


class WeightAccessError(ValueError):
    """A weight that cannot be read or written here; the message names the module."""


def _align_hook(module: nn.Module):
    """The accelerate AlignDevicesHook on `module` (possibly inside a SequentialHook), or None."""
    hook = getattr(module, "_hf_hook", None)
    for h in getattr(hook, "hooks", [hook]):
        if h is not None and hasattr(h, "weights_map") and hasattr(h, "execution_device"):
            return h
    return None


def _offload_entry(model: nn.Module, name: str) -> tuple[object, str]:
    """(hook, key): the accelerate hook whose weights_map holds the offloaded parameter `name`, and its key there.
    The innermost hook that loads it wins: the module's own, else an ancestor's that places its submodules."""
    parts = name.split(".")
    for i in range(len(parts) - 1, -1, -1):
        hook = _align_hook(model.get_submodule(".".join(parts[:i])))
        if hook is not None and hook.offload and hook.weights_map is not None and \
                (i == len(parts) - 1 or hook.place_submodules):
            return hook, ".".join(parts[i:])
    raise WeightAccessError(f"{name} is on the meta device and no accelerate hook holds its values "
                            f"(the model was not dispatched by accelerate?)")


def _store(weights_map, key: str) -> tuple[MutableMapping, str]:
    """The writable mapping behind a weights_map and the full key there (PrefixedDataset adds prefixes)."""
    from accelerate.utils import OffloadedWeightsLoader, PrefixedDataset

    while isinstance(weights_map, PrefixedDataset):
        key, weights_map = weights_map.prefix + key, weights_map.dataset
    if isinstance(weights_map, OffloadedWeightsLoader):
        return weights_map.state_dict, key       # read before the index (disk)
    if isinstance(weights_map, MutableMapping):
        return weights_map, key
    raise WeightAccessError(f"{key} is offloaded to a store kedit cannot write ({type(weights_map).__name__})")


def _get_param(model: nn.Module, name: str) -> nn.Parameter:
    try:
        return model.get_parameter(name)
    except AttributeError:
        raise LookupError(f"no parameter named {name!r} in {type(model).__name__}") from None


def is_offloaded(model: nn.Module, name: str) -> bool:
    """Whether parameter `name` lives in an offload store (its tensor in the model is on "meta")."""
    return _get_param(model, name).device.type == "meta"


def param(model: nn.Module, name: str) -> torch.Tensor:
    """The real values of parameter `name`: the parameter itself, or for an offloaded one the stored tensor (on
    the CPU; loaded from disk if it is there). Read only: write with `set_param`."""
    p = _get_param(model, name)
    if p.device.type != "meta":
        return p
    hook, key = _offload_entry(model, name)
    return hook.weights_map[key]


def set_param(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Set parameter `name` to `value` (cast to its dtype): in place on its device, or in the offload store."""
    p = _get_param(model, name)
    if tuple(value.shape) != tuple(p.shape):
        raise ValueError(f"{name}: value of shape {tuple(value.shape)} for a parameter of shape {tuple(p.shape)}")
    if not p.dtype.is_floating_point:
        raise WeightAccessError(f"{name} is stored as {p.dtype} (a quantised model?): kedit edits only "
                                f"floating-point weights; load the model unquantised")
    with torch.no_grad():
        if p.device.type != "meta":
            if getattr(p, SHARED, False):   # copy on write: fresh memory of this process's own, written whole
                p.data = torch.empty_like(p)
                setattr(p, SHARED, False)
            p.copy_(value)
            return
        hook, key = _offload_entry(model, name)
        store, full = _store(hook.weights_map, key)
        store[full] = value.detach().to("cpu", p.dtype).contiguous().clone()


def weight(model: nn.Module, module: str) -> torch.Tensor:
    """W of `module` as [out, in] (read only; see `param`)."""
    w = param(model, f"{module}.weight")
    return w.T if stores_transposed(get_module(model, module)) else w


def bias(model: nn.Module, module: str) -> torch.Tensor | None:
    """b of `module`, or None when it has none."""
    return param(model, f"{module}.bias") if getattr(get_module(model, module), "bias", None) is not None else None


def set_weight(model: nn.Module, module: str, w: torch.Tensor) -> None:
    """Set W of `module` from [out, in]."""
    set_param(model, f"{module}.weight", w.T if stores_transposed(get_module(model, module)) else w)


def _as_device(d) -> torch.device:
    return torch.device("cuda", d) if isinstance(d, int) else torch.device(d)


def execution_device(model: nn.Module, module: str) -> torch.device:
    """Where `module` computes: its accelerate hook's execution device, else the device of its tensors, else an
    enclosing module's execution device."""
    mod = get_module(model, module)
    hook = _align_hook(mod)
    if hook is not None and hook.execution_device is not None:
        return _as_device(hook.execution_device)
    for t in (*mod.parameters(), *mod.buffers()):
        if t.device.type != "meta":
            return t.device
    parts = module.split(".") if module else []
    for i in range(len(parts) - 1, -1, -1):
        hook = _align_hook(model.get_submodule(".".join(parts[:i])))
        if hook is not None and hook.execution_device is not None:
            return _as_device(hook.execution_device)
    raise WeightAccessError(f"{module or 'the model'} has no tensor on a device and no accelerate hook says where "
                            f"it computes")
