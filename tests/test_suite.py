"""`kedit suite` on a tiny random Llama, its one worker in this process: three runs (sequential FT, batch MEMIT,
single ROME) on one pool give what `kedit eval` gives for each, the model is loaded once, no edit leaks into the
next run, a rerun does nothing and a cut run resumes; bad suite files name the file, the run and the field."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from kedit_ray.cli import main
from kedit_ray.io import write_json
from kedit_ray.results import PartWriter
from kedit_ray.spec import ModelSpec
from kedit_ray.suite import SuiteError, load_suite

from conftest import DATA, job_script
from test_protocols import cases

ROOT = Path(__file__).resolve().parents[1]
# the sequential run comes first: its edits are applied for good during the run, so a leak would show in the next
RUNS = {"ft-seq": ("ft", "sequential", 2, {"layer": 1, "held_out": 1}),
        "memit": ("memit", "batch", 3, {"layers": [1, 2], "batch_size": 3, "no_cov": True}),
        "rome": ("rome", "single", 3, {"layer": 1, "no_cov": True})}
VOLATILE = {"worker", "edit_seconds", "seconds", "key_s", "value_s", "solve_s", "edit_s", "z_s"}


def toml_value(v) -> str:
    return json.dumps(v) if not isinstance(v, bool) else str(v).lower()


def write_suite(path: Path, model: str, data: str) -> Path:
    text = f'model = "{model}"\noptions = {{ v_steps = 2 }}\n'
    for name, (editor, protocol, limit, options) in RUNS.items():
        opts = ", ".join(f"{k} = {toml_value(v)}" for k, v in options.items())
        text += (f'\n[[run]]\nname = "{name}"\neditor = "{editor}"\ndata = "{data}"\nprotocol = "{protocol}"\n'
                 f"limit = {limit}\noptions = {{ {opts} }}\n")
    path.write_text(text)
    return path


def eval_argv(name: str, model: str, data: str, out: Path) -> list[str]:
    """The `kedit eval` command of run `name`."""
    editor, protocol, limit, options = RUNS[name]
    argv = ["eval", "--model", model, "--method", editor, "--protocol", protocol, "--data", data, "--limit",
            str(limit), "--v-steps", "2", "--workers", "1", "--out", str(out)]
    for k, v in options.items():
        flag = "--" + k.replace("_", "-")
        argv += [flag] if v is True else [flag, ",".join(map(str, v)) if isinstance(v, list) else str(v)]
    return argv


def rows(out: Path) -> list[dict]:
    table = ds.dataset(str(out / "results"), format="parquet").to_table().to_pylist()
    return sorted(({k: v for k, v in r.items() if k not in VOLATILE} for r in table),
                  key=lambda r: (r["case_id"], r.get("checkpoint") or 0))


@pytest.fixture
def setup(tmp_path, tiny_dir, monkeypatch):
    """(suite file, model, data, loads): `loads` counts the models loaded in this process."""
    data = tmp_path / "cases.jsonl"
    data.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in cases(4)))
    loads, load = [], ModelSpec.load
    monkeypatch.setattr(ModelSpec, "load", lambda self, *a, **kw: loads.append(self.name) or load(self, *a, **kw))
    return write_suite(tmp_path / "suite.toml", tiny_dir, str(data)), tiny_dir, str(data), loads


def test_suite_runs_as_kedit_eval_on_one_model_and_resumes(setup, tmp_path, monkeypatch, capsys, one_thread):
    suite, model, data, loads = setup
    out = tmp_path / "suite"
    add = PartWriter.add

    def cut(self, row):   # the single run is cut after its first case
        add(self, row)
        if row.get("method") == "rome":
            raise KeyboardInterrupt

    monkeypatch.setattr(PartWriter, "add", cut)
    assert main(["suite", str(suite), "--out", str(out)]) == 130
    assert len(loads) == 1 and len(rows(out / "rome")) == 1
    assert (out / "report.md").read_text().startswith("# suite: 2 of 3 runs")   # the report so far
    monkeypatch.setattr(PartWriter, "add", add)
    capsys.readouterr()
    assert main(["suite", str(suite), "--out", str(out)]) == 0             # resumes: the cut run only
    err = capsys.readouterr().err
    assert "ft-seq (1/3) is complete; skipped" in err and "memit (2/3) is complete; skipped" in err
    assert len(loads) == 2                                                     # once per invocation that ran cases
    state = json.loads((out / "suite.json").read_text())["runs"]
    assert all(state[n]["complete"] and state[n]["workers"][0]["peak_rss"] > 0 for n in RUNS)

    for name in RUNS:   # each run's folder as `kedit eval` writes it for the same run, alone on a fresh model
        ref = tmp_path / "eval" / name
        assert main(eval_argv(name, model, data, ref)) == 0
        assert rows(out / name) == rows(ref), name
        assert {p.name for p in (out / name).iterdir()} == {p.name for p in ref.iterdir()}, name
        got, want = (json.loads((d / "summary.json").read_text()) for d in (out / name, ref))
        assert got.keys() == want.keys() and got["complete"] and got["cases"] == want["cases"]
        assert json.loads((out / name / "config.json").read_text()) == json.loads((ref / "config.json").read_text())
    report = (out / "report.txt").read_text()
    assert all(name in report for name in RUNS) and "peak RSS GiB" in report
    assert (out / "report.png").stat().st_size > 1000
    page = (out / "report.md").read_text()    # the results page: a table row per run, its cost and provenance
    assert page.startswith("# suite: 3 of 3 runs") and f"`kedit suite {suite} " in page and f"--out {out}`" in page
    rows_md = {line.split(" | ")[0].lstrip("| "): line for line in page.splitlines() if line.startswith("| ")}
    assert set(RUNS) <= set(rows_md) and "(report.png)" in page and "(lifelong.png)" in page
    for name in RUNS:
        entry = state[name]
        assert entry["date"] in rows_md[name] and entry["workers"][0]["host"] in page
        assert len(entry["load"]) == 2 and "torch thread" in entry["workers"][0]["host"]
        assert entry["commit"] is None or entry["commit"].split("+")[0] in rows_md[name]

    loads.clear()
    before = {n: (out / n / "summary.json").read_text() for n in RUNS}
    assert main(["suite", str(suite), "--out", str(out)]) == 0            # a rerun: nothing to do
    assert loads == [] and before == {n: (out / n / "summary.json").read_text() for n in RUNS}


def test_select_reverts_edits_and_refuses_a_leak(tiny_dir, one_thread):
    from kedit_ray.distributed.suite import SuiteWorker, model_digest
    from kedit_ray.distributed.worker import Applied, local_ref
    from kedit_ray.editors import Rome, RomeParams
    from kedit_ray.spec import EvalSpec

    worker = SuiteWorker(ModelSpec(tiny_dir), 0, 1, [])
    lm, pristine = worker.lm, model_digest(worker.lm.model)
    spec = EvalSpec(ModelSpec(tiny_dir), "rome", {"layer": 1, "use_cov": False}, "counterfact")
    worker.select("batch", spec, "a")
    delta = Rome(RomeParams(layer=1, use_cov=False)).edit(lm, cases(1)[0])
    worker.sync(Applied((local_ref(delta),)))                  # an edit a run left applied through the pool ...
    assert model_digest(lm.model) != pristine
    worker.select("edit", spec, "b")                           # ... is reverted before the next run
    assert model_digest(lm.model) == pristine and worker.served == ["a", "b"]
    delta.apply(lm.model)                                      # one applied behind the pool's back is refused
    with pytest.raises(RuntimeError, match="before run 'c': an edit was left applied by run 'b'"):
        worker.select("edit", spec, "c")
    delta.revert(lm.model)
    hook = lm.model.model.norm.register_forward_hook(lambda *a: None)   # as is an adaptor's hook left in place
    with pytest.raises(RuntimeError, match="an edit was left applied"):
        worker.select("edit", spec, "c")
    hook.remove()
    worker.select("edit", spec, "c")


def error_of(tmp_path, text: str) -> str:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(SuiteError) as e:
        from kedit_ray.suite import check_inputs

        check_inputs(load_suite(path))
    return str(e.value)


GOOD = '[[run]]\nname = "a"\neditor = "rome"\ndata = "{data}"\n'


@pytest.mark.parametrize("run, words", [
    ('name = "b"\neditor = "nope"\ndata = "{data}"', ["run 2 'b'", "editor", "unknown editor 'nope'"]),
    ('name = "b"\neditor = "rome"', ["run 2 'b'", "data: missing"]),
    ('name = "b"\neditor = "rome"\ndata = "{data}"\nlimit = "ten"', ["run 2 'b'", "limit: expected int"]),
    ('name = "b"\neditor = "rome"\ndata = "{data}"\nlimt = 3', ["run 2 'b'", "unknown field(s) ['limt']"]),
    ('name = "b"\neditor = "rome"\ndata = "{data}"\noptions = {{ v_steps = -1 }}',
     ["run 2 'b'", "options.v_steps", "expected an integer ≥ 1, got '-1'"]),
    ('name = "b"\neditor = "rome"\ndata = "{data}"\noptions = {{ eps_init = 3 }}',
     ["run 2 'b'", "options.eps_init", "does not apply to --method rome"]),
    ('name = "b"\neditor = "rome"\ndata = "{data}"\noptions = {{ no_such = 3 }}',
     ["run 2 'b'", "options.no_such", "no option --no-such"]),
    ('name = "b"\neditor = "rome"\ndata = "{data}"\noptions = {{ workers = 3 }}',
     ["run 2 'b'", "options.workers", "set by the suite"]),
    ('name = "b"\neditor = "rome"\ndata = "{data}"\noptions = {{ share_weights = true }}',
     ["run 2 'b'", "options.share_weights", "set by the suite"]),
    ('name = "a"\neditor = "ft"\ndata = "{data}"', ["run 2 'a'", "name", "earlier run"]),
    ('name = "b"\neditor = "rome"\ndata = "absent.json"', ["run 2 'b'", "data", "absent.json does not exist"]),
    ('name = "b"\neditor = "ke"\ndata = "{data}"\noptions = {{ editor_checkpoint = "runs/none" }}',
     ["run 2 'b'", "options.editor_checkpoint", "does not exist (make it with `kedit train`)"]),
])
def test_bad_suites_name_file_run_and_field(tmp_path, run, words):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(cases(1)[0].to_dict()) + "\n")
    message = error_of(tmp_path, (GOOD + "\n[[run]]\n" + run + "\n").format(data=data))
    assert message.startswith(f"{tmp_path / 'bad.toml'}: "), message
    for w in words:
        assert w in message, (w, message)


@pytest.mark.parametrize("pool", [[], ["--workers", "4", "--share-weights"],
                                  ["--workers", "2", "--cpus-per-worker", "1.5", "--gpus-per-worker", "0.5",
                                   "--address", "auto", "--no-share-weights"]])
def test_the_pool_options_reach_every_run(tmp_path, monkeypatch, pool):
    """`kedit suite`'s pool options, each of them, are the ones each run's `kedit eval` gets."""
    import kedit_ray.suite
    from kedit_ray.cli import build_parser

    got = []
    monkeypatch.setattr(kedit_ray.suite, "run_suite", lambda file, out, pool: got.append(pool) or 0)
    assert main(["suite", "s.toml", "--out", str(tmp_path), *pool]) == 0
    parse = build_parser().parse_args
    suite, run = parse(["suite", "s.toml", "--out", "x", *pool]), parse(["eval", "--data", "x", "--out", "x", *got[0]])
    for dest in ("workers", "cpus_per_worker", "gpus_per_worker", "address", "share_weights"):
        assert getattr(run, dest) == getattr(suite, dest), (dest, got)


def test_not_toml_and_no_runs(tmp_path, capsys):
    assert "not valid TOML" in error_of(tmp_path, "[[run]\nname = 1")
    assert "no [[run]] tables" in error_of(tmp_path, 'model = "x"\n')
    (tmp_path / "s.toml").write_text("[[run]]\n")
    assert main(["suite", str(tmp_path / "s.toml"), "--out", str(tmp_path / "o")]) == 2   # one line, nothing run
    err = capsys.readouterr().err
    assert err.startswith(f"kedit suite: error: {tmp_path / 's.toml'}: run 1: name: missing")
    assert not (tmp_path / "o").exists()


def test_the_page_says_which_incomplete_runs_resume(tmp_path):
    """An incomplete sequential run resumes from its run state; one without (GRACE, WISE, IKE keep none) is marked
    as one to delete before a rerun, since `kedit eval` refuses to go on with it."""
    from kedit_ray.eval.resume import RUN_STATE
    from kedit_ray.suite import Run, write_markdown

    runs = [Run(name, [], name, f"s.toml: run {i} {name!r}", []) for i, name in enumerate(("rome", "ike", "ft"), 1)]
    for run, protocol in zip(runs, ("sequential", "sequential", "single")):
        (tmp_path / run.name).mkdir()
        write_json(tmp_path / run.name / "summary.json", {"complete": False, "protocol": protocol, "cases": 1})
    (tmp_path / "rome" / RUN_STATE).write_bytes(b"")
    page = write_markdown(tmp_path, runs, {}, "kedit suite s.toml", {r.name: "zsre" for r in runs})
    assert "| rome (incomplete: resumes) |" in page and "| ft (incomplete: resumes) |" in page
    assert "| ike (incomplete: no run state, delete its directory to rerun) |" in page


def test_the_record_suite_is_valid():
    """docs/results/record.toml: every registered editor, each run checked as `kedit eval` would check it."""
    from kedit_ray.editors import EDITORS

    for name in ("counterfact-edit.json", "zsre_mend_train-1k.json"):
        if not (DATA / name).exists():
            pytest.skip(f"{DATA / name} is absent (shared data is not part of a clone)")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)
        runs = load_suite(ROOT / "docs" / "results" / "record.toml")
    editors = {r.argv[r.argv.index("--method") + 1] for r in runs}
    assert editors == set(EDITORS) and len(runs) == 2 * len(EDITORS)


def test_two_ray_workers_each_load_the_model_once(setup, tmp_path):
    """On Ray, the rows of every run come from the same two actors: each loaded the model once and served both."""
    import ray

    _, model, data, _ = setup
    suite = tmp_path / "ray.toml"
    suite.write_text(f'model = "{model}"\noptions = {{ v_steps = 2, no_cov = true }}\n'
                     f'[[run]]\nname = "rome"\neditor = "rome"\ndata = "{data}"\noptions = {{ layer = 1 }}\n'
                     f'[[run]]\nname = "rome-2"\neditor = "rome"\ndata = "{data}"\noptions = {{ layer = 2 }}\n')
    out = tmp_path / "out"
    assert main(["suite", str(suite), "--out", str(out), "--workers", "2", "--cpus-per-worker", "1"]) == 0
    assert not ray.is_initialized()
    workers = {n: {r["worker"] for r in ds.dataset(str(out / n / "results")).to_table().to_pylist()}
               for n in ("rome", "rome-2")}
    both = workers["rome"] | workers["rome-2"]
    assert len(both) == 2 and {w.split("@")[0] for w in both} == {"w0", "w1"}, workers
    state = json.loads((out / "suite.json").read_text())["runs"]
    assert {p["worker"] for n in state for p in state[n]["workers"]} == both


def test_job_arguments(tmp_path, monkeypatch):
    """jobs/suite.py: FILE made absolute against the job's directory, a relative --out refused, --address auto."""
    job_argv = job_script("suite").job_argv
    monkeypatch.chdir(tmp_path)
    assert job_argv(["record.toml", "--out", "/abs/out", "--workers", "8"]) == \
        ["suite", "--address", "auto", str(tmp_path / "record.toml"), "--out", "/abs/out", "--workers", "8"]
    assert job_argv(["/s.toml", "--address", "h:1", "--out", "/o"]) == ["suite", "/s.toml", "--address", "h:1",
                                                                          "--out", "/o"]
    with pytest.raises(SystemExit, match="--out runs/x is relative"):
        job_argv(["s.toml", "--out", "runs/x"])
