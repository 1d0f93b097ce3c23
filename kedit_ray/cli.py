"""The `kedit` command: edit, demo, eval, apply, report, suite, defaults, stats, trace, train.

Expected errors (bad input, bad settings, a missing model, damaged files) are printed as one line,
`kedit COMMAND: error: ...`, with exit status 2 (1 when a run went through but every case failed);
`--debug` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import textwrap
import traceback
from collections import Counter
from pathlib import Path

from kedit_ray.options import (HelpFormatter, UsageError, add_model_args, add_ray_args, count, ints, model_kw,
                               positive, positive_float, ray_argv, templates)

DEMO = dict(prompt="The {} is located in the city of", subject="Space Needle", target_new="Goa",
            target_true="Seattle", paraphrase=["The Space Needle can be found in the city of"],
            neighbor=["The Eiffel Tower is located in the city of"])


def add_editor_args(p: argparse.ArgumentParser) -> None:
    """--method and every registered editor's options, a group per editor; a flag shared with an editor above is
    named in the group's description, with its help where this editor's differs."""
    from kedit_ray.editors import EDITORS
    from kedit_ray.editors.contract import flags_of, options_of

    p.add_argument_group("editor").add_argument("--method", default="rome", choices=sorted(EDITORS),
                                                help="the editor")
    flags = flags_of(EDITORS)   # flag -> (its option where first declared, {method: field})
    for method, (_, params) in EDITORS.items():
        opts = [opt for _, opt in options_of(params)]
        mine = [o for o in opts if next(iter(flags[o.flag][1])) == method]
        same = [o.flag for o in opts if o not in mine and flags[o.flag][0].help == o.help]
        text = [f"also {', '.join(same)}, as above"] if same else []
        text += [f"{o.flag}: {o.help}" for o in opts if o not in mine and flags[o.flag][0].help != o.help]
        g = p.add_argument_group(f"{method} options", "\n".join(
            textwrap.fill(t, 76, subsequent_indent="  ", break_on_hyphens=False) for t in text) or None)
        for o in mine:
            g.add_argument(o.flag, dest=o.dest, **o.kwargs())


def editor_params(args: argparse.Namespace) -> dict:
    """The method's parameters from the options given (nested params as dicts); an option the method does not
    have is an error."""
    from kedit_ray.editors import EDITORS
    from kedit_ray.editors.contract import flags_of

    out: dict = {}
    for flag, (opt, users) in flags_of(EDITORS).items():
        value = getattr(args, opt.dest, None)
        if value is None:
            continue
        if args.method not in users:
            raise UsageError(f"{flag} does not apply to --method {args.method}")
        *outer, name = users[args.method]
        node = out
        for key in outer:
            node = node.setdefault(key, {})
        node[name] = value
    return out


def make_checked_editor(args: argparse.Namespace):
    """The editor the options describe, its settings checked for --model before any model is loaded; a setting
    error names its flag."""
    from kedit_ray.editors import EDITORS, make_editor
    from kedit_ray.editors.contract import options_of
    from kedit_ray.errors import SettingError

    flags = {path[-1]: opt.flag for path, opt in options_of(EDITORS[args.method][1])}
    try:
        editor = make_editor(args.method, editor_params(args))
        editor.check_settings(args.model)
    except SettingError as e:
        raise UsageError(f"{flags.get(e.param, e.param)}: {e.reason}") from None
    except TypeError as e:   # a parameter the method does not take
        raise UsageError(f"--method {args.method}: {e}") from None
    return editor


# ---------------------------------------------------------------- edit / demo

def cmd_edit(args: argparse.Namespace) -> int:
    import torch

    from kedit_ray import export
    from kedit_ray.models import load
    from kedit_ray.models.loading import check_model
    from kedit_ray.requests import EditRequest, InvalidRecord

    editor = make_checked_editor(args)
    if args.save_model:   # refused before any work is done
        if editor.kind != "delta":
            raise UsageError(f"--save-model: {editor.refusal}")
        try:
            export.check_out_dir(args.save_model)
        except FileExistsError as e:
            raise UsageError(f"--save-model: {e}") from None
    if args.requests:
        return _edit_requests(args, editor)
    if not (args.prompt and args.subject and args.target_new):
        raise UsageError("--prompt, --subject and --target-new are required (or --requests FILE)")
    try:
        req = EditRequest(0, args.subject, args.prompt, args.target_new, args.target_true or "").validate()
    except InvalidRecord as e:
        raise UsageError(f"--{e.field.replace('_', '-')}: {e.reason}") from None
    check_model(args.model)
    print(f"[kedit] loading {args.model}", flush=True)
    lm = load(args.model, **model_kw(args))
    prompts = [("prompt", req.text)] + [("paraphrase", p) for p in args.paraphrase or []] + \
              [("neighbour", p) for p in args.neighbor or []]

    @torch.no_grad()
    def top(text: str) -> list[tuple[str, float]]:
        enc = lm.tok(text, return_tensors="pt").to(lm.input_device)
        probs = lm.model(**enc, logits_to_keep=1).logits[0, -1].float().softmax(-1)
        p, i = probs.topk(args.top_k)
        return [(lm.tok.decode(t), v) for v, t in zip(p.tolist(), i.tolist())]

    before = [top(t) for _, t in prompts]
    delta = editor.edit(lm, req)
    with delta.applied(lm.model):
        after = [top(t) for _, t in prompts]
    m = delta.meta
    print(f"\n{m['method'].upper()} at layer {m.get('layers', m.get('layer'))} (C: {m.get('cov')}): "
          f"{m.get('v_steps')} v* steps, {sum(m.get(k, 0) for k in ('key_s', 'value_s', 'solve_s')):.1f} s\n")
    for (kind, text), b, a in zip(prompts, before, after):
        print(f"{kind}: {text!r}")
        fmt = lambda xs: ", ".join(f"{t!r} {p:.2f}" for t, p in xs)  # noqa: E731
        print(f"  before: {fmt(b)}\n  after:  {fmt(a)}")
    print()
    return _save(args, lm, delta)


def _save(args: argparse.Namespace, lm, delta) -> int:
    """--save (the delta) and --save-model (the edited model as a Hugging Face directory)."""
    from kedit_ray import export

    if args.save:
        print(f"saved the delta to {delta.save(args.save)}")
    if args.save_model:
        print(f"saved the edited model to {export.save_edited(lm, delta, args.save_model)}")
    return 0


def _edit_requests(args: argparse.Namespace, editor) -> int:
    """`kedit edit --requests FILE`: every request in one delta (MEMIT/AlphaEdit: one batch; others: in turn)."""
    from kedit_ray import export
    from kedit_ray.datasets import load_requests
    from kedit_ray.models import load
    from kedit_ray.models.loading import check_model

    requests, _ = load_requests(args.requests, "auto")
    if not requests:
        raise UsageError(f"--requests {args.requests}: no records")
    check_model(args.model)
    lm = load(args.model, **model_kw(args))
    delta = export.edit_all(editor, lm, requests)
    print(f"{args.method.upper()}: {len(requests)} edits from {args.requests} in one delta")
    return _save(args, lm, delta)


def cmd_apply(args: argparse.Namespace) -> int:
    from kedit_ray.export import apply_deltas

    out = apply_deltas(args.model, args.delta, args.out, args.dtype, args.device_map, args.max_memory,
                       templates(args))
    print(f"saved {args.model} with {len(args.delta)} delta(s) applied to {out}")
    return 0


def add_edit_args(p: argparse.ArgumentParser, demo: bool = False) -> None:
    add_model_args(p)
    add_editor_args(p)
    d = DEMO if demo else {}
    p.add_argument("--prompt", default=d.get("prompt"), help="template with {} for the subject (required without "
                                                             "--requests)")
    p.add_argument("--subject", default=d.get("subject"), help="s, the subject (required without --requests)")
    p.add_argument("--target-new", default=d.get("target_new"), help="o*, the new object (required without --requests)")
    p.add_argument("--target-true", default=d.get("target_true"), help="o, the true object (default: none)")
    p.add_argument("--paraphrase", action="append", default=d.get("paraphrase"),
                   help="a paraphrase of the prompt whose predictions to show (repeatable; default: none)")
    p.add_argument("--neighbor", action="append", default=d.get("neighbor"),
                   help="an unrelated prompt that must keep its answer (repeatable; default: none)")
    p.add_argument("--top-k", type=positive, default=5, help="predictions shown per prompt")
    p.add_argument("--save", default=None, help="write the delta as safetensors to this path (default: not saved)")
    p.add_argument("--save-model", default=None, metavar="DIR",
                   help="write the edited model as a Hugging Face directory that plain transformers loads "
                        "(default: not saved)")
    p.add_argument("--requests", default=None, metavar="FILE",
                   help="edit every request in FILE (JSON, JSONL or Parquet) into one delta, instead of --prompt "
                        "(default: none)")


# ---------------------------------------------------------------- eval / report

def add_eval_args(p: argparse.ArgumentParser) -> None:
    from kedit_ray.datasets.registry import DATASETS

    add_model_args(p)
    add_editor_args(p)
    p.add_argument("--dataset", default="auto", choices=["auto", *DATASETS],
                   help="the layout of --data and the metrics (auto: from the first record's keys)")
    p.add_argument("--data", required=True, nargs="+",
                   help="requests file(s) (JSON, JSONL or Parquet) of one dataset, read one after another (zsRE "
                        "records, numbered by their index, are numbered on after the files before)")
    p.add_argument("--drop-repeats", action="store_true",
                   help="drop the later copy of a request whose subject and prompt came before (says how many)")
    p.add_argument("--limit", type=count, default=None, help="the first N valid records (default: all)")
    p.add_argument("--skip-invalid", action="store_true", help="report bad records and go on")
    add_ray_args(p, "eval")
    p.add_argument("--out", required=True, help="run directory: results/, summary.json, config.json")
    p.add_argument("--fluency", action="store_true",
                   help="also score fluency: the n-gram entropy of 50-token greedy generations (slow on CPU)")
    p.add_argument("--generate", action="store_true",
                   help="also score generated answers: efficacy_generated and paraphrase_generated, the share of "
                        "prompts whose greedy continuation starts with the new target (case and spaces ignored)")
    p.add_argument("--retry-errors", action="store_true", help="rerun the cases whose rows hold an error")
    p.add_argument("--json", action="store_true",
                   help="end by printing the whole summary.json instead of the table, counts and paths (for scripts)")
    p.add_argument("--ppl-docs", type=count, default=0,
                   help="perplexity before and after the edits on the first N documents of the default stats corpus: "
                        "per case, per batch, or at each sequential checkpoint (default: 0, not measured)")
    p.add_argument("--collapse-factor", type=positive_float, default=2.0,
                   help="with --ppl-docs: flag `collapsed` where the edits multiplied the perplexity by more than this")
    g = p.add_argument_group("protocol")
    g.add_argument("--protocol", default="single", choices=["single", "batch", "sequential"],
                   help="single: edit, score, revert per case; batch: B edits at once, then score them; "
                        "sequential: batches applied one after another, scored at checkpoints")
    g.add_argument("--batch-size", type=positive, default=1, help="B, edits per batch (batch and sequential)")
    g.add_argument("--checkpoints", type=ints, default=None,
                   help="sequential: numbers of edits at which to score, e.g. 10,100,1000 (default: the end only, "
                        "which is always one)")
    g.add_argument("--held-out", type=count, default=None,
                   help="sequential: unrelated cases scored at each checkpoint for TRR, the ones right after the "
                        "edited cases in --data (default: a fifth of the valid records, at most 100)")
    g.add_argument("--checkpoint-sample", type=positive, default=None, metavar="N",
                   help="sequential: score a fixed, seeded sample of N of the edits so far at each checkpoint but the "
                        "last, which scores every edit (default: every edit at every checkpoint)")
    g.add_argument("--stop-on-collapse", action="store_true",
                   help="sequential, with --ppl-docs: end the run at the first checkpoint flagged `collapsed`")


def _requests(args: argparse.Namespace, limit: int | None) -> list:
    """The valid requests of --data (the first `limit`), each prompt checked against the model's context."""
    from dataclasses import replace

    from transformers import AutoConfig, AutoTokenizer

    from kedit_ray.datasets import load_requests
    from kedit_ray.datasets.load import dataset_of, fits_context
    from kedit_ray.models.loading import check_model
    from kedit_ray.stats.cache import context_length

    path = check_model(args.model)   # a model that is not there fails here, in seconds, before any worker
    config = AutoConfig.from_pretrained(path)
    context = context_length(getattr(config, "text_config", None) or config)
    kinds = {data: dataset_of(data, args.dataset) for data in args.data}
    if len(set(kinds.values())) > 1:
        raise UsageError("--data: the files hold different datasets ("
                         f"{', '.join(f'{d}: {k}' for d, k in kinds.items())})")
    requests, problems, check = [], [], fits_context(AutoTokenizer.from_pretrained(path), context)
    for data in args.data:   # with --drop-repeats, the limit applies to what is left
        left = None if limit is None or args.drop_repeats else limit - len(requests)
        if left != 0:
            more, bad = load_requests(data, args.dataset, left, args.skip_invalid, check=check)
            if kinds[data] == "zsre" and requests:   # numbered by their index in the file: after the files before
                after = max(r.case_id for r in requests) + 1
                more = [replace(r, case_id=r.case_id + after) for r in more]
            requests, problems = requests + more, problems + bad
    if args.drop_repeats:
        requests = drop_repeats(requests)[:limit]
    if len({r.case_id for r in requests}) < len(requests):
        raise UsageError(f"--data {' '.join(args.data)}: case_ids repeat across the files")
    for p in problems:
        print(f"[kedit] skipped: {p}", file=sys.stderr)
    if problems:
        print(f"[kedit] skipped {len(problems)} invalid records, kept {len(requests)}", file=sys.stderr)
    if not requests:
        raise UsageError(f"{' '.join(args.data)}: no valid records" + (f" (--skip-invalid skipped {len(problems)})"
                                                             if problems else ""))
    return requests


def drop_repeats(requests: list) -> list:
    """`requests` without the later copies of a (subject, prompt) that came before; says how many it dropped."""
    seen, kept = set(), []
    for r in requests:
        if (r.subject, r.prompt) not in seen:
            seen.add((r.subject, r.prompt))
            kept.append(r)
    if len(kept) < len(requests):
        print(f"[kedit] --drop-repeats: dropped {len(requests) - len(kept)} requests whose subject and prompt came "
              "before", file=sys.stderr)
    return kept


def split_held_out(requests: list, limit: int | None, held_out: int | None) -> tuple[list, list]:
    """(edited, held out) for the sequential protocol: the held-out cases are the `held_out` valid records right
    after the edited ones (default: a fifth of the records, at most 100); the edited ones, the first `limit` (all
    but the held-out ones without a limit, or when the file is too short for both)."""
    n = len(requests)
    hold = min(100, n // 5) if held_out is None else held_out
    edit = min(n if limit is None else limit, n - hold)
    if edit < 1:
        raise UsageError(f"--held-out {hold} leaves no case to edit among the {n} valid records")
    return requests[:edit], requests[edit:edit + hold]


def cmd_eval(args: argparse.Namespace) -> int:
    make_checked_editor(args)
    if args.stop_on_collapse and not (args.protocol == "sequential" and args.ppl_docs):
        raise UsageError("--stop-on-collapse needs --protocol sequential and --ppl-docs")
    if args.protocol == "sequential":
        edited, held_out = split_held_out(_requests(args, None), args.limit, args.held_out)
        print(f"[kedit] editing {len(edited)} cases, holding out {len(held_out)} for TRR", file=sys.stderr)
    else:
        edited, held_out = _requests(args, args.limit), []
    _writable(args.out)
    from kedit_ray.datasets.load import dataset_of
    from kedit_ray.io import file_sha256
    from kedit_ray.spec import EvalSpec, ModelSpec, Resources

    spec = EvalSpec(ModelSpec.from_kw(args.model, **model_kw(args)), args.method,
                    editor_params(args), dataset_of(args.data[0], args.dataset),
                    " ".join(str(Path(d).resolve()) for d in args.data), " ".join(map(file_sha256, args.data)),
                    args.fluency, args.protocol, args.batch_size, args.checkpoints, [r.case_id for r in held_out],
                    ppl_docs=args.ppl_docs, collapse_factor=args.collapse_factor,
                    stop_on_collapse=args.stop_on_collapse, generate=args.generate,
                    checkpoint_sample=args.checkpoint_sample,
                    resources=Resources.from_args(args))
    if args.protocol == "single":
        from kedit_ray.distributed.driver import run_eval

        summary = run_eval(spec, edited, args.out, retry_errors=args.retry_errors)
    else:
        from kedit_ray.distributed.batch import run_protocol_eval

        summary = run_protocol_eval(spec, edited, args.out, held_out)
    print(json.dumps(summary, indent=2) if args.json else eval_ending(args.out, summary))
    if summary.get("cov") == "identity":
        print("[kedit] C = identity (--no-cov): ROME/MEMIT/AlphaEdit updates were not weighed by layer statistics",
              file=sys.stderr)
    return _outcome(args.out, summary)


def eval_ending(out: str, summary: dict) -> str:
    """What `kedit eval` ends with: `kedit report`'s table for the run (and per checkpoint), the counts, and where
    the results are."""
    from kedit_ray.eval.report import checkpoint_table, table

    tables = [table({out: summary})] + ([checkpoint_table({out: summary})] if summary.get("checkpoints") else [])
    counts = [f"{summary['cases']} of {summary['requested']} requested cases have results "
              f"({summary['rows']} rows, {summary['errors']} with an error)",
              "complete" if summary.get("complete") else "incomplete: the same command resumes the run"]
    if summary.get("held_out_cases"):
        counts.append(f"{summary['held_out_cases']} held-out cases for TRR")
    if summary.get("collapsed_count"):
        counts.append(f"{summary['collapsed_count']} rows flagged collapsed")
    if summary.get("stopped_at") is not None:
        counts.append(f"stopped at checkpoint {summary['stopped_at']} (--stop-on-collapse)")
    if summary.get("wall_seconds") is not None:
        workers = summary.get("workers", 1)
        counts.append(f"{summary['wall_seconds']:.1f} s on {workers} worker{'s' * (workers != 1)}")
    where = Path(out)
    return "\n\n".join(tables) + "\n\n" + "; ".join(counts) + "\n" + \
        f"results: {where / 'results'} (Parquet)\nsummary: {where / 'summary.json'} (--json prints it)\n" + \
        f"chart:   kedit report {out}"


def _writable(out: str) -> None:
    """--out can be made and written to (checked before any model loads)."""
    path = Path(out)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".kedit-write-check"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"--out {out}: cannot write there ({e.strerror or e})") from None


def _outcome(out: str, summary: dict) -> int:
    """0, or 1 with a one-line reason when every case of the run failed."""
    from kedit_ray.results import read_results

    if not summary.get("rows") or summary.get("errors", 0) < summary["rows"]:
        return 0
    errors = Counter(e for e in read_results(out, ["error"])["error"].to_pylist() if e)
    (message, n), = errors.most_common(1)
    print(f"kedit eval: error: every case failed ({summary['errors']} of {summary['rows']}); "
          f"{'e.g.' if len(errors) > 1 else 'all with'}: {message}", file=sys.stderr)
    return 1


def cmd_report(args: argparse.Namespace) -> int:
    from kedit_ray.eval.report import report

    print(report(args.dirs, args.png))
    return 0


def cmd_suite(args: argparse.Namespace) -> int:
    from kedit_ray.suite import run_suite

    return run_suite(args.file, args.out, ray_argv(args))


# ---------------------------------------------------------------- defaults

def cmd_defaults(args: argparse.Namespace) -> int:
    """The settings --method takes on --model and where each comes from: a flag, the user's or the package's
    defaults file, or the method's rule. By the model's name only: no weights are loaded."""
    from kedit_ray.defaults import GIVEN, PACKAGE_DIR, flatten
    from kedit_ray.editors import EDITORS

    editor, params = EDITORS[args.method]
    flags = flatten(editor_params(args))
    rows = {path: (value, "rule") for path, value in _field_defaults(params)}
    rows |= {path: (value, "flag") for path, value in flags.items()}
    measured = getattr(importlib.import_module(editor.__module__), "MEASURED", None)   # editors/<method>.py
    for path, (value, source) in (measured.settings(args.model, flags) if measured else {}).items():
        if source == GIVEN:
            source = "flag"
        elif source.endswith(".toml"):                                 # a defaults file
            source = f"{'package' if Path(source).parent == PACKAGE_DIR else 'user'} file {source}"
        rows[path] = (value, source)
    table = [("setting", "value", "source")]
    table += [(path, ",".join(map(str, v)) if isinstance(v, list) else str(v), src) for path, (v, src) in rows.items()]
    widths = [max(len(row[i]) for row in table) for i in range(2)]
    for path, value, source in table:
        print(f"{path:<{widths[0]}}  {value:<{widths[1]}}  {source}")
    return 0


def _field_defaults(params: type, prefix: str = "") -> list[tuple[str, object]]:
    """(field path, default) of a params dataclass, nested params (MEMIT's `values`) as dotted paths."""
    from dataclasses import MISSING, fields, is_dataclass

    out = []
    for f in fields(params):
        value = f.default if f.default_factory is MISSING else f.default_factory()
        if is_dataclass(value):
            out += _field_defaults(type(value), f"{prefix}{f.name}.")
        elif value is not MISSING:
            out.append((f"{prefix}{f.name}", value))
    return out


# ---------------------------------------------------------------- main

def build_parser() -> argparse.ArgumentParser:
    from kedit_ray.models.loading import DEFAULT_MODEL

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the traceback of an error")
    parser = argparse.ArgumentParser(prog="kedit", description=__doc__, formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=text.replace("%", "%%"), description=text, parents=[common],
                              formatter_class=HelpFormatter)           # help is %-formatted, a description not

    add_edit_args(command("edit", "edit one fact and show top predictions before and after"))
    add_edit_args(command("demo", "the Space Needle → Goa edit on the default model"), demo=True)
    add_eval_args(command("eval", "evaluate an editor on a dataset across Ray workers"))
    p = command("apply", "apply saved deltas to a model and write it as a Hugging Face directory")
    add_model_args(p)
    p.add_argument("--delta", action="append", required=True,
                   help="a delta file (`kedit edit --save`); repeat to apply several, in order")
    p.add_argument("--out", required=True, help="the directory to write (absent or empty)")
    p = command("report", "aggregate table and figure (95% bootstrap intervals) of eval runs")
    p.add_argument("dirs", nargs="+", help="eval --out directories")
    p.add_argument("--png", default=None, help="chart path (default: DIR/report.png of the first DIR)")
    p = command("suite", "run many evals from a TOML file on one pool of workers, then report them together")
    p.add_argument("file", help="the suite: a TOML file of [[run]] tables (docs/guide/suite.md)")
    p.add_argument("--out", required=True, help="directory: one `kedit eval --out` folder per run, suite.json, "
                                                "report.txt, report.md and the figures")
    add_ray_args(p, "suite")
    p = command("defaults", "the settings an editor takes on a model and where each comes from (a flag, the "
                            "user's or the package's defaults file, the method's rule); loads no weights")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="an embedded model, a directory, a .gguf file or a hub id, by name: its last path part "
                        "names its files, kedit_ray/defaults/NAME.toml and $KEDIT_HOME/defaults/NAME.toml (default: "
                        f"{DEFAULT_MODEL})")
    add_editor_args(p)
    for name, module in PLUGINS.items():
        mod = importlib.import_module(module)
        mod.add_arguments(command(name, (mod.__doc__ or name).strip().splitlines()[0]))
    return parser


PLUGINS = {"stats": "kedit_ray.stats.command", "trace": "kedit_ray.tracing.command", "train": "kedit_ray.train"}
COMMANDS = {"edit": cmd_edit, "demo": cmd_edit, "eval": cmd_eval, "report": cmd_report, "apply": cmd_apply,
            "defaults": cmd_defaults, "suite": cmd_suite}


def one_line(exc: BaseException) -> str:
    """An error as one line: a Ray task's remote cause rather than its wrapper, line breaks folded."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        exc = cause
    return " ".join(str(exc).split()) or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    import pyarrow as pa

    from kedit_ray.errors import PoolError

    args = build_parser().parse_args(argv)
    run = COMMANDS.get(args.command) or importlib.import_module(PLUGINS[args.command]).run
    try:
        return run(args)
    except (ValueError, OSError, pa.ArrowException, PoolError) as e:   # bad input, settings, files, a missing
        # model, workers that could not start or go on
        if args.debug:
            traceback.print_exc()
        print(f"kedit {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"kedit {args.command}: interrupted; what was finished is saved, and the same command resumes",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
