"""`kedit suite FILE --out DIR`: many `kedit eval` runs from one TOML file, on one pool, and one report.

FILE holds a `[[run]]` table per run (name, editor, data; dataset, protocol, limit, model and options optional)
and, at the top, a `model` and `options` every run starts from. `options` are `kedit eval`'s options under their
flag's name (`v_clamp = 1` or `"v-clamp" = 1` for --v-clamp; `generate = true`; `checkpoints = [50, 100]`): each
run becomes exactly the `kedit eval` command line those make, parsed by kedit eval's own parser and checked like
it, before any model loads. Relative paths (data, editor_checkpoint, stats_corpus, ike_pool) are read from the
current directory, as `kedit eval`'s are.

Each run is `kedit eval ... --out DIR/<name>` (kedit_ray.cli.cmd_eval), so DIR/<name> holds what kedit eval
writes and resumes as it does. The runs share one pool (kedit_ray.distributed.suite): each worker loads the model
once and serves every run that uses it; runs of the same model are run one after another. DIR/suite.json records
each run's settings key, whether it is complete and its workers' peak memory; a rerun skips the complete runs
whose settings are unchanged, and each run's provenance: when it ended, kedit-ray's commit, the load average and
its workers' machine. After each run (and at the end of a rerun with nothing to run) DIR/report.txt holds `kedit
report`'s table over the runs and their cost (s/edit, peak memory), beside DIR/report.png, and DIR/report.md the
same as a results page: a table per dataset with each run's cost and provenance, the command and the figures.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from kedit_ray.io import file_sha256, write_json
from kedit_ray.options import ray_flags

RUN_FIELDS = ("name", "editor", "data", "dataset", "protocol", "limit", "model", "options")
TOP_FIELDS = ("run", "model", "options")
# eval options the suite sets itself: a run's fields, DIR/<name>, and the pool (the suite's command line)
OWN_FLAGS = ("--method", "--model", "--data", "--dataset", "--protocol", "--limit", "--out", "--debug", "--help",
             *ray_flags())
INPUTS = ("editor_checkpoint", "stats_corpus", "ike_pool")   # options naming files, read from the current directory
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
PROVENANCE = ("date", "commit", "load")   # a run's, beside its workers' peaks and machine in suite.json


class SuiteError(ValueError):
    """A suite file that cannot run; the message names the file, the run and the field."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise SuiteError(message)


def eval_parser() -> argparse.ArgumentParser:
    """`kedit eval`'s parser, raising SuiteError instead of exiting."""
    from kedit_ray.cli import add_eval_args

    p = _Parser(prog="kedit eval", add_help=False)
    add_eval_args(p)
    return p


@dataclass
class Run:
    """One run of the suite: its name, its `kedit eval` arguments (but --out and the pool's), and a key of its
    settings (its table with the suite's defaults, and its data by content)."""

    name: str
    argv: list[str]
    key: str
    where: str                       # "FILE: run N 'name'", for messages
    inputs: list[tuple[str, str]]    # (field, path) of the files it reads


def _option_argv(action: argparse.Action, value) -> list[str]:
    """The command-line words of one option's TOML value."""
    flag = action.option_strings[-1]
    if action.nargs == 0:   # a switch
        if not isinstance(value, bool):
            raise SuiteError(f"expected true or false, got {value!r}")
        return [flag] if value else []
    if isinstance(value, bool):
        raise SuiteError(f"expected a value, got {value!r}")
    if isinstance(value, dict):
        return [flag, json.dumps(value)]
    if isinstance(value, list):
        words = [str(v) for v in value]
        return [flag, *words] if action.nargs in ("+", "*") else [flag, ",".join(words)]
    return [flag, str(value)]


def _field(table: dict, key: str, kind: type | tuple, where: str, required: bool = False):
    value = table.get(key)
    if value is None:
        if required:
            raise SuiteError(f"{where}: {key}: missing (every [[run]] needs name, editor and data)")
        return None
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise SuiteError(f"{where}: {key}: expected {names}, got {type(value).__name__} {value!r}")
    return value


def _run(table: dict, defaults: dict, index: int, file: str, parser: argparse.ArgumentParser) -> Run:
    """Check one [[run]] table (with the suite's `defaults`) and make its `kedit eval` arguments."""
    from kedit_ray.cli import make_checked_editor
    from kedit_ray.datasets.registry import DATASETS
    from kedit_ray.editors import EDITORS
    from kedit_ray.spec import PROTOCOLS

    where = f"{file}: run {index}"
    if not isinstance(table, dict):
        raise SuiteError(f"{where}: expected a [[run]] table, got {type(table).__name__}")
    name = _field(table, "name", str, where, required=True)
    where = f"{file}: run {index} {name!r}"
    if not NAME.fullmatch(name):
        raise SuiteError(f"{where}: name: letters, digits, '.', '_' and '-' only (it names DIR/<name>)")
    if unknown := sorted(set(table) - set(RUN_FIELDS)):
        raise SuiteError(f"{where}: unknown field(s) {unknown}; known: {', '.join(RUN_FIELDS)}")
    editor = _field(table, "editor", str, where, required=True)
    if editor not in EDITORS:
        raise SuiteError(f"{where}: editor: unknown editor {editor!r}; known: {', '.join(sorted(EDITORS))}")
    data = _field(table, "data", (str, list), where, required=True)
    data = [data] if isinstance(data, str) else data
    if not data or not all(isinstance(d, str) and d for d in data):
        raise SuiteError(f"{where}: data: expected a path or a list of paths, got {data!r}")
    dataset = _field(table, "dataset", str, where) or "auto"
    if dataset not in ("auto", *DATASETS):
        raise SuiteError(f"{where}: dataset: {dataset!r} is not one of auto, {', '.join(DATASETS)}")
    protocol = _field(table, "protocol", str, where) or "single"
    if protocol not in PROTOCOLS:
        raise SuiteError(f"{where}: protocol: {protocol!r} is not one of {', '.join(PROTOCOLS)}")
    limit = _field(table, "limit", int, where)
    if limit is not None and limit < 0:
        raise SuiteError(f"{where}: limit: expected an integer ≥ 0, got {limit}")
    model = _field(table, "model", str, where) or defaults["model"]
    options = {**defaults["options"], **(_field(table, "options", dict, where) or {})}

    inputs = [("data", str(Path(d).resolve())) for d in data]
    argv = ["--method", editor, "--model", model, "--dataset", dataset, "--protocol", protocol,
            "--data", *[p for _, p in inputs]] + (["--limit", str(limit)] if limit is not None else [])
    flags = {s: a for a in parser._actions for s in a.option_strings}
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if flag in OWN_FLAGS:
            raise SuiteError(f"{where}: options.{key}: set by the suite (a run's fields, or `kedit suite`'s own "
                             "options), not an option here")
        if flag not in flags:
            raise SuiteError(f"{where}: options.{key}: `kedit eval` has no option {flag}")
        try:
            words = _option_argv(flags[flag], value)
            if words and key.replace("-", "_") in INPUTS:
                words = [flag, str(Path(words[1]).resolve())]
                inputs.append((f"options.{key}", words[1]))
            parser.parse_args(["--data", "x", "--out", "x", *words])
        except SuiteError as e:
            raise SuiteError(f"{where}: options.{key}: {str(e).removeprefix(f'argument {flag}: ')}") from None
        argv += words
    args = parser.parse_args([*argv, "--out", "x"])
    try:
        make_checked_editor(args)
    except ValueError as e:   # the message starts with the flag at fault: named as its option
        text = str(e)
        flag = re.match(r"--[\w-]+", text)
        field = "options" if flag is None or flag[0] in OWN_FLAGS else f"options.{flag[0][2:].replace('-', '_')}"
        raise SuiteError(f"{where}: {field}: {text.removeprefix(f'{flag[0]}: ') if flag else text}") from None
    shas = [file_sha256(d) for d in data if Path(d).is_file()]   # the data by content, wherever it lies
    settings = {"run": {**table, "model": model, "options": options}, "data": shas}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return Run(name, argv, key, where, inputs)


def load_suite(path: str | Path) -> list[Run]:
    """The runs of a suite file, each checked as `kedit eval` checks its options; a SuiteError names the file, the
    run and the field."""
    from kedit_ray.models.loading import DEFAULT_MODEL

    file = str(path)
    try:
        doc = tomllib.loads(Path(path).read_text())
    except OSError as e:
        raise SuiteError(f"{file}: cannot read it ({e.strerror or e})") from None
    except tomllib.TOMLDecodeError as e:
        raise SuiteError(f"{file}: not valid TOML ({e})") from None
    if unknown := sorted(set(doc) - set(TOP_FIELDS)):
        raise SuiteError(f"{file}: unknown top-level field(s) {unknown}; known: {', '.join(TOP_FIELDS)}")
    runs = doc.get("run")
    if not isinstance(runs, list) or not runs:
        raise SuiteError(f"{file}: run: no [[run]] tables")
    defaults = {"model": _field(doc, "model", str, file) or DEFAULT_MODEL,
                "options": _field(doc, "options", dict, file) or {}}
    parser = eval_parser()
    out = [_run(t, defaults, i, file, parser) for i, t in enumerate(runs, 1)]
    seen: set[str] = set()
    for r in out:
        if r.name in seen:
            raise SuiteError(f"{r.where}: name: {r.name!r} names an earlier run too")
        seen.add(r.name)
    return out


def check_inputs(runs: list[Run]) -> None:
    """Every file a run reads is there (data, a learned editor's trained network, a stats corpus)."""
    for r in runs:
        for field, p in r.inputs:
            if not Path(p).exists():
                hint = " (make it with `kedit train`)" if field.endswith("editor_checkpoint") else ""
                raise SuiteError(f"{r.where}: {field}: {p} does not exist{hint}")


def _model_key(run: Run, parser: argparse.ArgumentParser) -> str:
    """What decides the model a run's workers hold (runs that share it share a pool)."""
    from kedit_ray.options import model_kw

    args = parser.parse_args([*run.argv, "--out", "x"])
    return json.dumps([args.model, model_kw(args)], sort_keys=True, default=str)


def _done(out: Path, run: Run, state: dict) -> bool:
    """Whether `run` went through before with the same settings (complete, and not every case failed)."""
    entry = state.get(run.name, {})
    return entry.get("key") == run.key and entry.get("complete") is True and (out / run.name / "summary.json").exists()


def run_suite(path: str | Path, out: str | Path, pool_argv: list[str]) -> int:
    """Run every run of the suite at `path` into OUT/<name> on one pool (`pool_argv`: --workers, --address, ...),
    then write the report; 0 when every run went through, else the worst `kedit eval` status."""
    import pyarrow as pa

    from kedit_ray.cli import cmd_eval
    from kedit_ray.distributed.pool import lending
    from kedit_ray.distributed.suite import SharedPool
    from kedit_ray.errors import PoolError
    from kedit_ray.spec import Resources

    runs = load_suite(path)
    check_inputs(runs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    parser = eval_parser()
    groups: dict[str, list[Run]] = {}
    for r in runs:   # runs of one model one after another, so each worker loads it once
        groups.setdefault(_model_key(r, parser), []).append(r)
    state_path = out / "suite.json"
    state = json.loads(state_path.read_text())["runs"] if state_path.exists() else {}
    command = " ".join(["kedit suite", str(path), *pool_argv, "--out", str(out)])
    version = commit()
    shared = SharedPool(Resources.from_args(parser.parse_args(["--data", "x", "--out", "x", *pool_argv])))
    worst, text = 0, None
    try:
        with lending(shared):
            for i, r in enumerate([r for g in groups.values() for r in g], 1):
                if _done(out, r, state):
                    print(f"[kedit] suite: {r.name} ({i}/{len(runs)}) is complete; skipped", file=sys.stderr)
                    continue
                print(f"[kedit] suite: {r.name} ({i}/{len(runs)}): kedit eval {' '.join(r.argv)}", file=sys.stderr,
                      flush=True)
                shared.run, shared.used, load = r.name, False, os.getloadavg()[0]
                try:
                    code = cmd_eval(parser.parse_args([*r.argv, "--out", str(out / r.name), *pool_argv]))
                except (ValueError, OSError, PoolError, pa.ArrowException) as e:   # this run's; the others go on
                    print(f"kedit suite: error: run {r.name!r}: {' '.join(str(e).split())}", file=sys.stderr)
                    worst = 2
                    continue
                worst = max(worst, code)
                summary = out / r.name / "summary.json"
                complete = summary.exists() and json.loads(summary.read_text()).get("complete") is True
                before = state.get(r.name, {})
                ran = {"workers": shared.peaks(), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                       "commit": version, "load": [round(load, 2), round(os.getloadavg()[0], 2)]} if shared.used \
                    else {k: before[k] for k in ("workers", *PROVENANCE) if k in before}
                state[r.name] = {"key": r.key, "complete": complete and code == 0, **ran}
                write_json(state_path, {"file": str(path), "command": command, "runs": state})
                text = write_report(out, runs, state, command)   # after each run: a suite cut short has its report
    finally:
        shared.close()
    print(text if text is not None else write_report(out, runs, state, command))
    return worst


def commit() -> str | None:
    """The commit of the kedit-ray checkout this runs from ("+changes" with uncommitted changes to its tracked
    files), None outside a git checkout."""
    root = Path(__file__).resolve().parents[1]
    try:
        git = [subprocess.run(["git", "-C", str(root), *cmd], capture_output=True, text=True, check=True,
                              timeout=30).stdout.strip()
               for cmd in (["rev-parse", "--short", "HEAD"], ["status", "--porcelain", "--untracked-files=no"])]
    except (OSError, subprocess.SubprocessError):
        return None
    return git[0] + ("+changes" if git[1] else "")


def _gib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f}"


def _peaks(state: dict, name: str) -> tuple[float | None, float | None]:
    """The largest resident and CUDA peak (bytes) of run `name`'s workers, None where not measured."""
    peaks = state.get(name, {}).get("workers", [])
    return tuple(max((p[k] for p in peaks if p.get(k) is not None), default=None) for k in ("peak_rss", "peak_cuda"))


def write_report(out: Path, runs: list[Run], state: dict, command: str) -> str:
    """`kedit report`'s table and figure over the runs with results (DIR/report.png; with several datasets, also
    DIR/report-<dataset>.png each), and each run's cost: s/edit and its workers' peak memory; the text goes to
    DIR/report.txt too, the results page to DIR/report.md (`write_markdown`)."""
    from kedit_ray.eval.report import load_run, plot, render
    from kedit_ray.io import atomic_write

    loaded = [load_run(out / r.name) for r in runs if (out / r.name / "results").is_dir()]
    write_markdown(out, runs, state, command, {Path(run.path).name: run.dataset for run in loaded})
    if not loaded:
        return "no run wrote results"
    text = render(loaded, out / "report.png")
    by_dataset: dict[str, list] = {}
    for run in loaded:
        by_dataset.setdefault(run.dataset, []).append(run)
    if len(by_dataset) > 1:   # the figure over all runs, and one per dataset (its runs' bars side by side)
        text += "".join(f"\n{name}: {plot(group, out / f'report-{name}.png')}" for name, group in by_dataset.items())
    lines = [("run", "cases", "errors", "s/edit", "peak RSS GiB", "peak CUDA GiB")]
    for r in runs:
        summary = out / r.name / "summary.json"
        s = json.loads(summary.read_text()) if summary.exists() else {}
        rss, cuda = _peaks(state, r.name)
        spe = s.get("seconds_per_edit")
        lines.append((r.name, str(s.get("cases", "-")), str(s.get("errors", "-")),
                      "-" if spe is None else f"{spe:.3f}", _gib(rss), _gib(cuda)))
    widths = [max(len(row[i]) for row in lines) for i in range(len(lines[0]))]
    cost = "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in lines)
    text += f"\n\ncost per run (peak memory: the largest of its workers' peaks during the run)\n{cost}\n"
    atomic_write(out / "report.txt", lambda tmp: Path(tmp).write_text(text))
    return text


def _incomplete(run_dir: Path, s: dict) -> str:
    """How a rerun goes on with an incomplete run: a sequential run resumes from its run state, which only an editor
    whose edits are weight deltas saves (GRACE, WISE and IKE runs start over, from an empty directory)."""
    from kedit_ray.eval.resume import RUN_STATE

    if s.get("protocol") == "sequential" and not (run_dir / RUN_STATE).exists():
        return "incomplete: no run state, delete its directory to rerun"
    return "incomplete: resumes"


def _pair(s: dict, key: str) -> str:
    """"pre → post" of a summary's figure, "-" where it was not measured."""
    pre, post = s.get(f"pre_{key}"), s.get(key)
    return "-" if post is None else f"{post:.2f}" if pre is None else f"{pre:.2f} → {post:.2f}"


def write_markdown(out: Path, runs: list[Run], state: dict, command: str, datasets: dict[str, str]) -> str:
    """DIR/report.md: per dataset a table of its runs (each figure unedited → edited; sequential runs at their last
    checkpoint, with TRR and ERR), their cost and provenance, then the figures; the command and the workers'
    machines above. `datasets`: the dataset of each run with results. Runs without results are listed as not run
    yet."""
    from kedit_ray.eval.report import OPTIONAL
    from kedit_ray.io import atomic_write

    ran = [r for r in runs if r.name in datasets and (out / r.name / "summary.json").exists()]
    hosts = sorted({p["host"] for r in ran for p in state.get(r.name, {}).get("workers", []) if p.get("host")})
    lines = [f"# {out.name}: {len(ran)} of {len(runs)} runs", "",
             f"- Command: `{command}` (from the checkout's root)",
             f"- Machine (the workers'): {'; '.join(hosts) or 'not recorded'}",
             "- Each run's end (date), kedit-ray commit and 1-minute load average (at its start → end) are in its row;",
             "  peak RSS is the largest of its workers' peaks during the run. ES, PS, NS, S: unedited → edited."]
    by_dataset: dict[str, list] = {}
    for r in ran:
        by_dataset.setdefault(datasets[r.name], []).append(r)
    for dataset, group in by_dataset.items():
        summaries = {r.name: json.loads((out / r.name / "summary.json").read_text()) for r in group}
        extra = [(c, k) for c, k in [("TRR", "TRR"), ("ERR", "ERR"), *OPTIONAL]
                 if any(s.get(k) is not None for s in summaries.values())]
        head = ["run", "editor", "protocol", "cases", "errors", "ES", "PS", "NS", "S", *[c for c, _ in extra],
                "s/edit", "peak RSS GiB", "date", "commit", "load"]
        lines += ["", f"## {dataset}", "", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
        for r in group:
            s, st = summaries[r.name], state.get(r.name, {})
            rss, load, spe = _peaks(state, r.name)[0], st.get("load"), s.get("seconds_per_edit")
            name = r.name if s.get("complete") else f"{r.name} ({_incomplete(out / r.name, s)})"
            row = [name, str(s.get("method")), str(s.get("protocol", "single")), str(s.get("cases")),
                   str(s.get("errors")),
                   *[_pair(s, k) for k in ("efficacy_score", "paraphrase_score", "neighborhood_score", "score")],
                   *[_pair(s, k) for _, k in extra], "-" if spe is None else f"{spe:.2f}", _gib(rss),
                   st.get("date", "-"), st.get("commit") or "-", "-" if not load else f"{load[0]:.1f} → {load[1]:.1f}"]
            lines.append("| " + " | ".join(row) + " |")
        figure = f"report-{dataset}.png" if len(by_dataset) > 1 else "report.png"
        lines += ["", f"![{dataset}: ES, PS, NS and S per run, 95% intervals]({figure})"]
    if (out / "lifelong.png").exists():
        lines += ["", "## Against the number of edits (runs scored at two checkpoints or more)", "",
                  "![ES, PS, NS and TRR against the number of edits](lifelong.png)"]
    if pending := [r.name for r in runs if r not in ran]:
        lines += ["", f"Not run yet: {', '.join(pending)}."]
    text = "\n".join(lines) + "\n"
    atomic_write(out / "report.md", lambda tmp: Path(tmp).write_text(text))
    return text
