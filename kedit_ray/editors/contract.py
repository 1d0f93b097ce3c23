"""The editor contract: what the protocols, the workers, `export` and the CLI ask of an editor.

An editor is a subclass of `Editor` with a params dataclass; `register(name, editor, params)` adds it to the
registry and so to `kedit eval --method` and its options. Callers ask the type, never `hasattr` or a name:
    kind        "delta": its edits are weight `Delta`s (ΔW: revert, sequential runs and export work unchanged);
                "adaptor": edits that wrap modules (GRACE's codebook), which `export` refuses with `refusal`
    batched     whether `edit_batch` edits many requests at once; otherwise a batch is edited request by request
    prepare, commit, reset, state / load_state, check_settings, stats_need: hooks with do-nothing defaults

Each params field that a user may set declares its command-line option in its metadata with `option(...)`:
flag, help, how the text parses, and its range. A flag several editors declare (`--layer`) must parse alike.
"""
from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from kedit_ray.models import LM
from kedit_ray.requests import EditRequest


class Editor(abc.ABC):
    """One editing method. `hp` holds its params dataclass."""

    name: ClassVar[str]
    kind: ClassVar[str] = "delta"
    refusal: ClassVar[str] = ""     # adaptors: why no weights checkpoint can hold the edit
    batched: ClassVar[bool] = False
    hp: Any

    @abc.abstractmethod
    def edit(self, lm: LM, request: EditRequest):
        """One request on the model as it is: an `Edit` (a `Delta` for kind "delta"), not yet applied."""

    def edit_batch(self, lm: LM, requests: list[EditRequest]):
        """Many requests in one edit (only where `batched`)."""
        raise NotImplementedError(f"{self.name} edits one request at a time")

    def prepare(self, lm: LM) -> None:
        """Once, on the unedited model: what must come from it (ROME's and MEMIT's context prefixes), so that a
        worker or a resumed run gets what one process would."""

    def commit(self, lm: LM, requests: list[EditRequest]) -> None:
        """The sequential protocol: an edit of `requests` is now applied for good (AlphaEdit's K_p)."""

    def reset(self) -> None:
        """Forget what `commit` kept: the next run starts afresh."""

    def state(self) -> dict[str, torch.Tensor]:
        """What `commit` kept, as tensors (saved with a sequential run's state)."""
        return {}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise ValueError(f"{self.name} keeps no state, yet got {sorted(state)}")

    def check_settings(self, model: str) -> None:
        """Refuse settings that cannot work for `model` (by name) before any weights load: a SettingError."""

    def stats_need(self, lm: LM):
        """The layer statistics (a covariance.StatsNeed) this editor reads; None: none."""
        return None


class SplitEditor(Editor):
    """The MEMIT family: per request a target z and keys, computed by shares on workers, and one solve on the
    driver (`make_solver`)."""

    batched = True

    @abc.abstractmethod
    def targets(self, lm: LM, requests: list[EditRequest]) -> tuple[torch.Tensor, dict]: ...

    @abc.abstractmethod
    def inputs(self, lm: LM, requests: list[EditRequest], layer: int) -> tuple[torch.Tensor, torch.Tensor]: ...

    @abc.abstractmethod
    def make_solver(self, dims: dict[int, int], covs: dict, labels: dict, lam: float): ...


# ---------------------------------------------------------------- options

@dataclass(frozen=True)
class Option:
    """A params field's command-line option: `parse` turns the text into the value and checks its range
    (kedit_ray.options.positive, ...); `sets`: a flag without a value, setting the field to `sets`."""

    flag: str
    help: str
    parse: Callable[[str], Any] | None = None
    choices: tuple | None = None
    sets: Any = None

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")

    def kwargs(self) -> dict:
        """argparse's add_argument keywords (default None: a flag not given leaves the editor's default)."""
        if self.sets is not None:
            return {"action": "store_const", "const": self.sets, "default": None, "help": self.help}
        return {"type": self.parse, "choices": self.choices, "default": None, "help": self.help}

    def same_as(self, other: Option) -> bool:
        """Whether both parse a command line alike (help may differ)."""
        return (self.parse, self.choices, self.sets) == (other.parse, other.choices, other.sets)


def option(default: Any = None, help: str = "", **kw) -> Any:
    """A dataclass field with its option: `kw` are Option's fields; the flag defaults to --field-name."""
    return field(default=default, metadata={"option": (help, kw)})


def options_of(params: type, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Option]]:
    """(field path, option) of every field of `params` that has one, its help ending with the field's default
    where that is a value; nested params dataclasses (a field whose default is a dataclass, e.g. MEMIT's `values`)
    give paths of two names."""
    for f in dataclasses.fields(params):
        if "option" in f.metadata:
            text, kw = f.metadata["option"]
            kw = {"flag": "--" + f.name.replace("_", "-"), **kw}
            if f.default not in (None, dataclasses.MISSING) and "sets" not in kw and "default" not in text:
                text += f" (default: {f.default})"
            yield (*path, f.name), Option(help=text, **kw)
        elif f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory):
            yield from options_of(f.default_factory, (*path, f.name))


def flags_of(editors: dict[str, tuple[type, type]]) -> dict[str, tuple[Option, dict[str, tuple[str, ...]]]]:
    """flag -> (its option as first declared, {method: the field it sets}) over the registry; a flag that two
    editors parse differently is an error."""
    out: dict[str, tuple[Option, dict[str, tuple[str, ...]]]] = {}
    for method, (_, params) in editors.items():
        for path, opt in options_of(params):
            first, users = out.setdefault(opt.flag, (opt, {}))
            if not first.same_as(opt):
                raise TypeError(f"{opt.flag}: {method} parses it unlike {', '.join(users)}")
            users[method] = path
    return out
