"""The `kedit` command: edit, eval, report, stats, trace, train, demo.

Expected errors (bad input, bad settings, a missing model, damaged files) are printed as one line,
`kedit COMMAND: error: ...`, with exit status 2 (1 when a run went through but every case failed);
`--debug` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import traceback
from collections import Counter
from pathlib import Path

from kedit_ray.options import (HelpFormatter, UsageError, add_model_args, add_ray_args, count, ints, layers, model_kw,
                               positive, positive_float, templates)

DEMO = dict(prompt="The {} is located in the city of", subject="Space Needle", target_new="Goa",
            target_true="Seattle", paraphrase=["The Space Needle can be found in the city of"],
            neighbor=["The Eiffel Tower is located in the city of"])


def add_editor_args(p: argparse.ArgumentParser) -> None:
    from kedit_ray.editors import EDITORS

    g = p.add_argument_group("editor (an option applies to the methods whose parameters have it)")
    g.add_argument("--method", default="rome", choices=sorted(EDITORS), help="the editor")
    g.add_argument("--layer", type=int, default=None, help="layer to edit (default: measured per model)")
    g.add_argument("--layers", type=layers, default=None,
                   help="MEMIT/AlphaEdit/UltraEdit: layers to edit, e.g. 3,4,5,6 or 3-6 (default: measured per "
                        "model)")
    g.add_argument("--modules", type=lambda s: [m for m in s.split(",") if m], default=None,
                   help="UltraEdit: the projections edited in each layer, Arch fields (mlp_in, mlp_out) or templates "
                        "such as 'model.layers.{}.mlp.gate_proj', comma-separated (default: measured per model, else "
                        "mlp_in)")
    g.add_argument("--eta", type=positive_float, default=None,
                   help="UltraEdit: η, the step of the pseudo-values v = −η‖k̂‖²ĝ (default: measured per "
                        "model)")
    g.add_argument("--mom2-weight", type=float, default=None,
                   help="MEMIT/AlphaEdit: λ, the weight of C (default: measured per model, gemma-3-270m 200, "
                        "smollm2-135m 2000; else the paper's 15000)")
    g.add_argument("--z-module", choices=["layer", "mlp_out"], default=None,
                   help="MEMIT/AlphaEdit: z is the residual leaving the last layer (the paper) or, one layer only, "
                        "its MLP output before any norm (ROME's v*) (default: mlp_out for gemma-3-270m, else layer)")
    g.add_argument("--nullspace-threshold", type=float, default=None,
                   help="AlphaEdit: eigenvalues of C below this span the preserved null space (default: 2e-2)")
    g.add_argument("--eps-init", type=float, default=None,
                   help="GRACE: ε_init, the radius of a new key (default: measured per model; required for others)")
    g.add_argument("--replacement", choices=["last", "all"], default=None,
                   help="GRACE: replace the wrapped layer's output at the last prompt token or at all of them "
                        "(default: last)")
    g.add_argument("--norm-constraint", type=float, default=None,
                   help="FT-L: ε, the bound on ||ΔW||∞ (default: 5e-4)")
    g.add_argument("--editor-checkpoint", default=None,
                   help="KE/MEND: the trained network, a `kedit train --out` directory (required for ke, mend)")
    g.add_argument("--rome-original-key", dest="no_same_key", action="store_true",
                   help="ROME: divide by the bare prompt's key as ROME's original code does, not by the averaged k* "
                        "(r-ROME's fix, the default)")
    g.add_argument("--rome-keep-edits", dest="keep_edits", action="store_true", default=None,
                   help="ROME, sequential protocol: each update leaves the keys of the edits made before unchanged "
                        "(ΔW k_i = 0), so they stay edited")
    g.add_argument("--no-cov", action="store_true",
                   help="ROME/MEMIT/AlphaEdit: C = I instead of the layer statistics (results then say C = identity)")
    g.add_argument("--stats-corpus", default=None,
                   help="corpus for C (default: the WikiText-2 test split shipped with kedit; computed on first use "
                        "and cached, the same file `kedit stats` makes with its defaults)")
    g.add_argument("--stats-samples", type=positive, default=None,
                   help="documents of that corpus for C (default: 100000, i.e. all of the shipped corpus)")
    g.add_argument("--stats-max-len", type=positive, default=None,
                   help="tokens per document for C (default: min(model context, 1024))")
    g.add_argument("--no-compute-stats", action="store_true",
                   help="fail, naming the `kedit stats` command, instead of computing missing statistics")
    g.add_argument("--v-steps", type=positive, default=None,
                   help="max gradient steps for v* (MEMIT: z; GRACE: a codebook value; FT/FT-L: ΔW) "
                        "(default: the method's)")
    g.add_argument("--v-lr", type=float, default=None, help="Adam's learning rate for the same (default: the method's)")
    g.add_argument("--v-clamp", type=float, default=None,
                   help="bound on ||δ|| in units of ||v0|| (default: measured per model, else the paper's 4)")


# params field -> (argparse dest, flag); None values are left to the editor's defaults
EDITOR_OPTIONS = {"layer": ("layer", "--layer"), "layers": ("layers", "--layers"),
                  "mom2_update_weight": ("mom2_weight", "--mom2-weight"),
                  "z_module": ("z_module", "--z-module"),
                  "nullspace_threshold": ("nullspace_threshold", "--nullspace-threshold"),
                  "same_key": ("no_same_key", "--rome-original-key"),
                  "keep_edits": ("keep_edits", "--rome-keep-edits"),
                  "use_cov": ("no_cov", "--no-cov"), "stats_corpus": ("stats_corpus", "--stats-corpus"),
                  "stats_samples": ("stats_samples", "--stats-samples"),
                  "stats_max_len": ("stats_max_len", "--stats-max-len"),
                  "compute_stats": ("no_compute_stats", "--no-compute-stats"),
                  "eps_init": ("eps_init", "--eps-init"), "replacement": ("replacement", "--replacement"),
                  "norm_constraint": ("norm_constraint", "--norm-constraint"),
                  "editor_checkpoint": ("editor_checkpoint", "--editor-checkpoint"),
                  "modules": ("modules", "--modules"), "eta": ("eta", "--eta")}


def editor_params(args: argparse.Namespace) -> dict:
    """The method's parameters from the options given; an option the method does not have is an error."""
    from dataclasses import fields

    from kedit_ray.editors import EDITORS

    have = {f.name for f in fields(EDITORS[args.method][1])}
    out = {}
    for name, (dest, flag) in EDITOR_OPTIONS.items():
        value = getattr(args, dest)
        if dest.startswith("no_"):
            value = False if value else None
        if value is None:
            continue
        if name not in have:
            raise UsageError(f"{flag} does not apply to --method {args.method}")
        out[name] = value
    values = {k: v for k, v in (("steps", args.v_steps), ("lr", args.v_lr), ("clamp_norm", args.v_clamp))
              if v is not None}
    if not values:
        return out
    if "values" in have:                       # locate-then-edit: the v* / z optimisation
        out["values"] = values
    elif {"steps", "lr"} <= have and "clamp_norm" not in values:   # GRACE, FT: their own gradient steps
        out.update(values)
    else:
        raise UsageError(f"--v-steps/--v-lr/--v-clamp do not apply to --method {args.method}")
    return out


def make_checked_editor(args: argparse.Namespace):
    """The editor the options describe, its settings checked for --model before any model is loaded; a setting
    error names its flag."""
    from kedit_ray.editors import make_editor
    from kedit_ray.errors import SettingError

    flags = {name: flag for name, (_, flag) in EDITOR_OPTIONS.items()}
    try:
        editor = make_editor(args.method, editor_params(args))
        if hasattr(editor, "check_settings"):
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
        if args.method == "grace":
            raise UsageError(f"--save-model: {export.GRACE_REFUSAL}")
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
    add_model_args(p)
    add_editor_args(p)
    p.add_argument("--dataset", default="auto", choices=["auto", "counterfact", "zsre", "user"],
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
    print(json.dumps(summary, indent=2))
    if summary.get("cov") == "identity":
        print("[kedit] C = identity (--no-cov): ROME/MEMIT/AlphaEdit updates were not weighed by layer statistics",
              file=sys.stderr)
    return _outcome(args.out, summary)


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


# ---------------------------------------------------------------- main

def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the traceback of an error")
    parser = argparse.ArgumentParser(prog="kedit", description=__doc__, formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=text, description=text, parents=[common], formatter_class=HelpFormatter)

    add_edit_args(command("edit", "edit one fact and show top predictions before and after"))
    add_edit_args(command("demo", "the Space Needle → Goa edit on the default model"), demo=True)
    add_eval_args(command("eval", "evaluate an editor on a dataset across Ray workers"))
    p = command("apply", "apply saved deltas to a model and write it as a Hugging Face directory")
    add_model_args(p)
    p.add_argument("--delta", action="append", required=True,
                   help="a delta file (`kedit edit --save`); repeat to apply several, in order")
    p.add_argument("--out", required=True, help="the directory to write (absent or empty)")
    p = command("report", "aggregate table and figure (95%% bootstrap intervals) of eval runs")
    p.add_argument("dirs", nargs="+", help="eval --out directories")
    p.add_argument("--png", default=None, help="chart path (default: DIR/report.png of the first DIR)")
    for name, module in PLUGINS.items():
        mod = importlib.import_module(module)
        mod.add_arguments(command(name, (mod.__doc__ or name).strip().splitlines()[0]))
    return parser


PLUGINS = {"stats": "kedit_ray.stats.command", "trace": "kedit_ray.tracing.command", "train": "kedit_ray.train"}
COMMANDS = {"edit": cmd_edit, "demo": cmd_edit, "eval": cmd_eval, "report": cmd_report, "apply": cmd_apply}


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
