"""Read or patch named modules inside a `with` block (ROME's nethook idea, kept small).

    with Trace(model, "model.layers.4.mlp.down_proj", retain_input=True) as t:
        model(**batch)
    k = t.input                       # the keys fed to W_out

`edit_output(output, name)` / `edit_input(input, name)` return a replacement; `stop=True` ends the
forward pass right after the module (raises StopForward, swallowed on exit).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn


class StopForward(Exception):
    """Raised to end a forward pass early; caught by the Trace that raised it."""


def get_module(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise LookupError(f"no module named {name!r} in {type(model).__name__}") from None


class Trace(contextlib.AbstractContextManager):
    def __init__(self, model: nn.Module, name: str, retain_input: bool = False, retain_output: bool = False,
                 edit_input: Callable | None = None, edit_output: Callable | None = None,
                 stop: bool = False, detach: bool = True):
        self.name, self.input, self.output = name, None, None
        module = get_module(model, name)

        def keep(x):
            return x.detach() if detach and isinstance(x, torch.Tensor) else x

        def pre_hook(_m, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            if edit_input is not None:
                x = edit_input(x, name)
                args = (x, *args[1:]) if args else args
                if not args:
                    kwargs = {**kwargs, next(iter(kwargs)): x}
            if retain_input:
                self.input = keep(x)
            return args, kwargs

        def hook(_m, _args, out):
            if edit_output is not None:
                out = edit_output(out, name)
            if retain_output:
                self.output = keep(out[0] if isinstance(out, tuple) else out)
            if stop:
                raise StopForward
            return out

        self._handles = []
        if retain_input or edit_input is not None:
            self._handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
        if retain_output or edit_output is not None or stop:
            self._handles.append(module.register_forward_hook(hook))

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __exit__(self, exc_type, exc, tb):
        self.close()
        return exc_type is StopForward


class TraceDict(dict, contextlib.AbstractContextManager):
    """Several Traces at once; `stop=True` stops after the last named module (in the order given)."""

    def __init__(self, model: nn.Module, names: Iterable[str], stop: bool = False, **kw):
        super().__init__()
        names = list(names)
        for i, name in enumerate(names):
            self[name] = Trace(model, name, stop=stop and i == len(names) - 1, **kw)

    def __exit__(self, exc_type, exc, tb):
        for t in self.values():
            t.close()
        return exc_type is StopForward


def token_grid(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """A module's input or output x as [batch, time, d] for the batch `ids` [batch, time]: inside a mixture of
    experts the tokens arrive flattened to [batch·time, d] (Qwen2-MoE's shared expert)."""
    return x.reshape(*ids.shape[:2], x.shape[-1])


def stores_transposed(module: nn.Module) -> bool:
    """Whether the module keeps W as [in, out] (GPT-2's Conv1D) rather than [out, in]."""
    return type(module).__name__ == "Conv1D"


def weight_of(module: nn.Module) -> torch.Tensor:
    """W as [out, in], a view of the parameter."""
    return module.weight.T if stores_transposed(module) else module.weight


@contextlib.contextmanager
def start_at_layer(model: nn.Module, layer_template: str, layer: int, hidden: torch.Tensor) -> Iterator[None]:
    """Run only blocks >= `layer`: blocks below pass their input through, and block `layer` gets `hidden`
    (the cached residual stream entering it) instead. Masks and positions still come from the model."""
    skipped = [get_module(model, layer_template.format(i)) for i in range(layer)]

    def identity(*args, **kwargs):
        return args[0] if args else kwargs["hidden_states"]

    saved = [block.__dict__.get("forward") for block in skipped]  # accelerate may wrap forward per instance
    for block in skipped:
        block.forward = identity
    try:
        with Trace(model, layer_template.format(layer), edit_input=lambda _x, _n: hidden, detach=False):
            yield
    finally:
        for block, fwd in zip(skipped, saved):
            if fwd is None:
                del block.forward
            else:
                block.forward = fwd


@contextlib.contextmanager
def head_at(model: nn.Module, head_name: str, rows: torch.Tensor, cols: torch.Tensor) -> Iterator[None]:
    """Compute vocabulary logits only at (rows[i], cols[i]): the head sees those hidden states alone,
    so the model's logits come back as [1, len(rows), vocab]."""
    def gather(h, _name):   # h may sit on the previous block's device (a model split over devices)
        return h[rows.to(h.device), cols.to(h.device)].unsqueeze(0)

    with Trace(model, head_name, edit_input=gather, detach=False):
        yield
