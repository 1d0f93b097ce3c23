"""Measured per-model defaults, as data: `<model>.toml` in this package, and in `$KEDIT_HOME/defaults/` the user's
own, which wins over the package's key by key.

A file holds one table per method (`[rome]`, `[memit]`, ...) whose keys are the params' field paths (a nested one,
`values.clamp_norm`, as a dotted key or a `[memit.values]` table), each with the measurement that chose it in a
comment. An editor declares the settings it takes from these files as a `Measured`: per setting, its type and the
rule that applies without a measured value (the paper's value, or a function of the model's depth).
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args, get_origin

from kedit_ray.models.loading import kedit_home

PACKAGE_DIR = Path(__file__).resolve().parent
GIVEN, RULE = "given", "rule"   # sources besides a file: the value the params give, the method's rule


class DefaultsError(ValueError):
    """A defaults file that cannot be read or holds a bad value; the message names the file (and the key)."""


def model_key(model: str) -> str:
    """The name a model's defaults files go by: an embedded model's own, else its path's last part (a .gguf file's
    name without the suffix)."""
    return Path(model.rstrip("/")).name.removesuffix(".gguf")


def defaults_files(model: str) -> list[Path]:
    """Where `model`'s defaults may be, lowest precedence first: the package's file, then the user's."""
    name = f"{model_key(model)}.toml"
    return [PACKAGE_DIR / name, kedit_home() / "defaults" / name]


def flatten(table: dict, prefix: str = "") -> dict[str, Any]:
    """{"values": {"clamp_norm": 1.0}} -> {"values.clamp_norm": 1.0}."""
    out = {}
    for key, value in table.items():
        out.update(flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def _read(path: Path) -> dict[str, Any]:
    """A TOML file's tables ({} when there is no such file)."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:   # tomllib.TOMLDecodeError and UnicodeDecodeError are ValueErrors
        raise DefaultsError(f"defaults file {path}: cannot read it: {e}") from None


def model_defaults(model: str, method: str) -> dict[str, tuple[object, str]]:
    """field path -> (value, the file it comes from) in `method`'s table for `model`, the user's file over the
    package's, key by key. The values are unchecked: `Measured.read` checks them against the method's settings."""
    out = {}
    for path in defaults_files(model):
        table = _read(path).get(method, {})
        if not isinstance(table, dict):
            raise DefaultsError(f"defaults file {path}: {method} must be a table ([{method}])")
        out.update({key: (value, str(path)) for key, value in flatten(table).items()})
    return out


def _typed(value: object, kind: Any, where: str) -> object:
    """`value` checked to be a `kind`: int, float (an integer is one too), str, or a list of one of them."""
    if kind is float and type(value) is int:
        return float(value)
    item = get_args(kind)[0] if get_origin(kind) is list else None
    ok = type(value) is kind if item is None else isinstance(value, list) and all(type(x) is item for x in value)
    if not ok:
        raise DefaultsError(f"{where}: expected {kind if item else kind.__name__}, got {value!r}")
    return value


@dataclass(frozen=True)
class Rule:
    """A setting's type (a file's value must have it) and what applies without a measured value: `value`, a
    constant or a function of the model's depth (its number of layers); `words` say what it is."""

    kind: Any
    value: Any = None
    words: str = ""

    def apply(self, n_layers: int | None) -> tuple[object, str]:
        """(value, source); without `n_layers`, a value that depends on the depth is given as its words."""
        if not callable(self.value):
            return self.value, f"{RULE} ({self.words})" if self.words else RULE
        return (self.words if n_layers is None else self.value(n_layers)), RULE


class Measured:
    """The settings a method takes from the defaults files (its `table` there): field path -> Rule."""

    def __init__(self, table: str, rules: dict[str, Rule]):
        self.table, self.rules = table, rules

    def read(self, model: str) -> dict[str, tuple[object, str]]:
        """field path -> (value, file) from `model`'s defaults files, each value checked against its rule."""
        out = {}
        for path, (value, file) in model_defaults(model, self.table).items():
            where = f"defaults file {file}: [{self.table}] {path}"
            if path not in self.rules:
                raise DefaultsError(f"{where}: not a setting the defaults files give {self.table} (those: "
                                    f"{', '.join(self.rules)})")
            out[path] = (_typed(value, self.rules[path].kind, where), file)
        return out

    def settings(self, model: str, given: dict[str, object] | None = None,
                 n_layers: int | None = None) -> dict[str, tuple[object, str]]:
        """field path -> (value, source) for `model`: the value `given` (not None), else its defaults files',
        else the rule's (its words where it depends on the depth and `n_layers` is None)."""
        given, found = given or {}, self.read(model)
        out = {}
        for path, rule in self.rules.items():
            if given.get(path) is not None:
                out[path] = (given[path], GIVEN)
            else:
                out[path] = found[path] if path in found else rule.apply(n_layers)
        return out

    def value(self, lm: Any, path: str) -> Any:
        """One setting for a model at hand (anything with `name` and `n_layers`, e.g. an LM)."""
        return self.settings(lm.name, n_layers=lm.n_layers)[path][0]
