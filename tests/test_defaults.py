"""Measured per-model defaults as data (kedit_ray/defaults/<model>.toml), the user's files over them, and
`kedit defaults`. The editors resolve exactly the values their dicts in code held before the move."""
from __future__ import annotations

import tomllib
from types import SimpleNamespace

import pytest
import torch

from kedit_ray.cli import main
from kedit_ray.defaults import PACKAGE_DIR, DefaultsError, model_defaults, model_key
from kedit_ray.editors import alphaedit, emmet, ft, grace, ike, ke, lora, memit, mend, rome, ultraedit, wise
from kedit_ray.editors.grace import GraceParams
from kedit_ray.editors.memit import MemitParams, settle
from kedit_ray.editors.toolkit import ValueParams
from kedit_ray.errors import SettingError

GATE = "model.layers.{}.mlp.gate_proj"
MEASURED = [rome, memit, alphaedit, emmet, grace, ft, ke, mend, ultraedit, lora, ike, wise]


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    """An empty KEDIT_HOME: no user defaults unless a test writes one."""
    monkeypatch.setenv("KEDIT_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def user_file(home, model: str, text: str):
    path = home / "defaults" / f"{model}.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def model(name: str, n_layers: int) -> SimpleNamespace:
    """What the editors' defaults read of a model: its name and depth (and where MEMIT's z is computed)."""
    return SimpleNamespace(name=name, n_layers=n_layers, input_device=torch.device("cpu"))


def resolved(lm) -> dict:
    """Every measured setting as the editors resolve it for `lm`."""
    hp = settle(MemitParams(), lm)
    return {"rome": (rome.default_layer(lm), rome.value_params(lm, ValueParams()).clamp_norm),
            "memit": (hp.layers, hp.mom2_update_weight, hp.z_module, hp.values.clamp_norm),
            "alphaedit": settle(MemitParams(), lm, "alphaedit") == hp,
            "grace": grace.default_layer(lm), "ft": ft.default_layer(lm),
            "ke": ke.KEConfig().default_layers(lm), "mend": mend.MENDConfig().default_layers(lm),
            "ultraedit": (ultraedit.MEASURED.value(lm, "layers"), ultraedit.MEASURED.value(lm, "modules"),
                          ultraedit.UltraEdit().eta(lm))}


def table(capsys, *argv: str) -> dict[str, tuple[str, str]]:
    """`kedit defaults ARGV` as setting -> (value, source)."""
    assert main(["defaults", *argv]) == 0
    head, *lines = capsys.readouterr().out.splitlines()
    assert head.split() == ["setting", "value", "source"]
    v, s = head.index("value"), head.index("source")            # aligned columns
    return {line[:v].strip(): (line[v:s].strip(), line[s:]) for line in lines}


def test_the_package_files_parse_and_hold_both_models():
    for name in ("gemma-3-270m", "smollm2-135m"):
        with open(PACKAGE_DIR / f"{name}.toml", "rb") as f:
            tables = tomllib.load(f)
        assert {"rome", "memit", "alphaedit", "emmet", "grace", "ke", "ultraedit", "lora"} <= set(tables), name
        for module in MEASURED:
            module.MEASURED.read(name)                        # every key known, every value of its type
    assert model_defaults("gemma-3-270m", "memit")["values.clamp_norm"] == (1.0, str(PACKAGE_DIR / "gemma-3-270m.toml"))


def test_the_editors_resolve_the_values_they_held_in_code():
    assert resolved(model("gemma-3-270m", 18)) == {
        "rome": (2, 1.0), "memit": ([2], 200.0, "mlp_out", 1.0), "alphaedit": True, "grace": 8, "ft": 4,
        "ke": [12, 13], "mend": [15, 16, 17], "ultraedit": ([12, 13, 14, 15, 16], ["mlp_in", GATE], 3e-5)}
    assert resolved(model("smollm2-135m", 30)) == {
        "rome": (4, 4.0), "memit": ([2, 3, 4, 5], 2000.0, "layer", 0.75), "alphaedit": True, "grace": 15, "ft": 10,
        "ke": [22, 23], "mend": [21, 22, 23], "ultraedit": ([20, 21, 22, 23, 24, 25, 26], ["mlp_in", GATE], 1e-4)}
    assert resolved(model("other", 24)) == {                 # the rules: the papers', or by the depth
        "rome": (8, 4.0), "memit": ([4, 5, 6, 7], 15000.0, "layer", 0.75), "alphaedit": True, "grace": 12, "ft": 8,
        "ke": [15, 16], "mend": [21, 22, 23], "ultraedit": ([16, 17, 18, 19, 20, 21], ["mlp_in"], 3e-5)}
    assert (grace.eps_init("gemma-3-270m", GraceParams()), grace.eps_init("smollm2-135m", GraceParams())) == (150, 15)
    with pytest.raises(SettingError, match="no measured ε_init for 'other'"):
        grace.eps_init("other", GraceParams())
    spread = settle(MemitParams(layers=[1, 2]), model("gemma-3-270m", 18))   # several layers: the paper's z, bound
    assert (spread.z_module, spread.values.clamp_norm, spread.mom2_update_weight) == ("layer", 0.75, 200.0)


def test_a_path_goes_by_its_last_part():
    assert [model_key(m) for m in ("gemma-3-270m", "/models/smollm2-135m/", "x/gemma-3-270m.gguf")] == \
        ["gemma-3-270m", "smollm2-135m", "gemma-3-270m"]
    assert rome.default_layer(model("/models/smollm2-135m", 30)) == 4


def test_a_user_file_wins_key_by_key_and_a_flag_over_both(home, capsys):
    path = user_file(home, "gemma-3-270m", "[rome]\nlayer = 3   # mine\n[memit.values]\nclamp_norm = 2\n")
    lm = model("gemma-3-270m", 18)
    assert (rome.default_layer(lm), rome.value_params(lm, ValueParams()).clamp_norm) == (3, 1.0)
    assert settle(MemitParams(), lm).values.clamp_norm == 2.0                    # an integer is a float too
    assert (settle(MemitParams(), lm).layers, ft.default_layer(lm)) == ([2], 4)   # other keys: the package's
    rows = table(capsys, "--model", "gemma-3-270m", "--method", "rome")
    assert rows["layer"] == ("3", f"user file {path}")
    assert rows["values.clamp_norm"] == ("1.0", f"package file {PACKAGE_DIR / 'gemma-3-270m.toml'}")
    assert rows["n_prefixes"] == ("5", "rule")
    rows = table(capsys, "--model", "gemma-3-270m", "--method", "rome", "--layer", "5", "--v-clamp", "0.5")
    assert (rows["layer"], rows["values.clamp_norm"]) == (("5", "flag"), ("0.5", "flag"))


def test_kedit_defaults_names_the_rule_where_nothing_is_measured(capsys):
    rows = table(capsys, "--model", "/models/other", "--method", "ultraedit")
    assert rows["layers"] == ("the band from 2/3 to 9/10 of the depth", "rule")
    assert rows["eta"] == ("3e-05", "rule")
    rows = table(capsys, "--model", "smollm2-135m", "--method", "ft-l")                # FT-L takes FT's [ft]
    assert rows["layer"][1] == "rule" and rows["norm_constraint"] == ("0.0005", "rule")
    assert table(capsys, "--method", "ft-l")["layer"] == ("4", f"package file {PACKAGE_DIR / 'gemma-3-270m.toml'}")
    rows = table(capsys, "--method", "memit", "--layers", "2,4")                  # gemma-3-270m, spread
    assert rows["z_module"][0] == "layer" and rows["values.clamp_norm"][0] == "0.75"


@pytest.mark.parametrize("text, match", [("[rome\nlayer = 2\n", "cannot read it"),
                                         ('[rome]\nlayer = "two"\n', r"\[rome\] layer: expected int, got 'two'"),
                                         ("[rome]\nlayers = [2]\n", r"\[rome\] layers: not a setting"),
                                         ("rome = 2\n", "must be a table")])
def test_a_bad_user_file_is_an_error_naming_it(home, capsys, text, match):
    path = user_file(home, "gemma-3-270m", text)
    with pytest.raises(DefaultsError, match=match) as e:
        rome.default_layer(model("gemma-3-270m", 18))
    assert str(path) in str(e.value)
    assert main(["defaults", "--method", "rome"]) == 2
    assert f"kedit defaults: error: defaults file {path}" in capsys.readouterr().err
