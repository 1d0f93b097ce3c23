"""The editor contract: every editor a subclass of `Editor`, every params field a flag with help built from the
registry, and an editor added in a test alone runs through `kedit eval` without touching cli.py."""
from __future__ import annotations

import dataclasses
import json

import pyarrow.dataset as ds
import pytest
import torch

from kedit_ray.cli import build_parser, editor_params, main
from kedit_ray.editors import EDITORS, Delta, Editor, register
from kedit_ray.editors.contract import SplitEditor, option, options_of
from kedit_ray.export import edit_all
from kedit_ray.options import UsageError


def fields_of(params: type, prefix: str = "") -> list[tuple[str, dataclasses.Field]]:
    """Every leaf field of a params dataclass, nested ones by their dotted path."""
    out = []
    for f in dataclasses.fields(params):
        nested = f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory)
        out += fields_of(f.default_factory, f"{prefix}{f.name}.") if nested else [(prefix + f.name, f)]
    return out


def test_every_params_field_has_a_flag_and_help_in_its_editors_group():
    text = " ".join(build_parser()._subparsers._group_actions[0].choices["eval"].format_help().split())
    for method, (editor, params) in EDITORS.items():
        assert issubclass(editor, Editor) and editor.kind in ("delta", "adaptor"), method
        flags = {".".join(path): opt for path, opt in options_of(params)}
        for name, f in fields_of(params):
            assert name in flags, f"{method}: params field {name} has no option"
            assert flags[name].help and flags[name].flag.startswith("--"), (method, name)
        group = text.split(f"{method} options:")[1].split(" options:")[0]
        for opt in flags.values():
            assert opt.flag in group, (method, opt.flag)


def test_the_type_answers_what_callers_ask():
    assert EDITORS["grace"][0].kind == "adaptor" and "codebook" in EDITORS["grace"][0].refusal
    split = {m for m, (e, _) in EDITORS.items() if issubclass(e, SplitEditor)}
    batched = {m for m, (e, _) in EDITORS.items() if e.batched}
    assert {"memit", "alphaedit", "emmet"} <= split and not {"rome", "ft", "grace", "ultraedit"} & split
    assert {"memit", "alphaedit", "emmet", "ultraedit"} <= batched and not {"rome", "ft", "grace"} & batched
    grace = EDITORS["grace"][0](EDITORS["grace"][1]())
    with pytest.raises(ValueError, match="adaptor"):
        edit_all(grace, None, [object()])          # refused by its kind, before any model is touched
    with pytest.raises(ValueError, match="keeps no state"):
        EDITORS["ft"][0](EDITORS["ft"][1]()).load_state({"x": torch.zeros(1)})


def test_nested_flags_and_flags_that_do_not_apply():
    args = build_parser().parse_args(["eval", "--data", "x", "--out", "o", "--method", "memit", "--v-steps", "3",
                                      "--z-batch", "2", "--no-v-cache"])
    assert editor_params(args) == {"values": {"steps": 3, "cache_residual": False}, "z_batch": 2}
    args = build_parser().parse_args(["eval", "--data", "x", "--out", "o", "--method", "ke", "--eta", "1e-4"])
    with pytest.raises(UsageError, match="--eta does not apply to --method ke"):
        editor_params(args)
    with pytest.raises(SystemExit):                # a range the option's parser checks: η > 0
        build_parser().parse_args(["eval", "--data", "x", "--out", "o", "--method", "ultraedit", "--eta", "-1"])


@dataclasses.dataclass
class ToyParams:
    layer: int = option(0, "the layer whose MLP output gets a zero ΔW", parse=int)
    shift: float = option(0.0, "added to every entry of ΔW", flag="--toy-shift", parse=float)

    @classmethod
    def from_dict(cls, d: dict) -> ToyParams:
        return cls(**d)


class Toy(Editor):
    name = "toy"

    def __init__(self, params: ToyParams | None = None):
        self.hp = params or ToyParams()

    def edit(self, lm, request) -> Delta:
        name = lm.arch.name("mlp_out", self.hp.layer)
        w = lm.model.get_submodule(name).weight
        return Delta({name: torch.full_like(w, self.hp.shift)}, {"method": self.name, "layer": self.hp.layer})


@pytest.fixture
def toy():
    register("toy", Toy, ToyParams)
    yield
    del EDITORS["toy"]


def test_an_editor_added_in_a_test_runs_through_kedit_eval(toy, tiny_dir, tmp_path, capsys):
    records = [{"case_id": i, "subject": s, "prompt": "The {} is located in the city of", "target_new": "Goa",
                "target_true": t} for i, (s, t) in enumerate([("Space Needle", "Seattle"), ("Eiffel Tower", "Paris")])]
    data = tmp_path / "cf.json"
    data.write_text(json.dumps(records))
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    assert "toy options:" in capsys.readouterr().out
    for shift, out in ((0.0, tmp_path / "zero"), (0.5, tmp_path / "half")):
        assert main(["eval", "--method", "toy", "--model", tiny_dir, "--data", str(data), "--out", str(out),
                     "--layer", "1", "--toy-shift", str(shift)]) == 0
        rows = ds.dataset(str(out / "results"), format="parquet").to_table().to_pylist()
        assert [r["method"] for r in rows] == ["toy", "toy"] and {r["layer"] for r in rows} == {1}
        assert {r["error"] for r in rows} == {None}
        moved = [abs(r["efficacy_magnitude"] - r["pre_efficacy_magnitude"]) for r in rows]
        assert (max(moved) == 0) == (shift == 0)   # a zero ΔW leaves the scores; the flag's value reaches ΔW


def test_a_flag_two_editors_parse_differently_is_refused(toy):
    @dataclasses.dataclass
    class Clash:
        layer: str = option("x", "a layer by name", parse=str)

    register("clash", Toy, Clash)
    try:
        with pytest.raises(TypeError, match="--layer"):
            build_parser()
    finally:
        del EDITORS["clash"]
