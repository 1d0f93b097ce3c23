"""The `kedit` command: edit, eval, report, stats, trace, train, demo."""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from kedit_ray.models.loading import DEFAULT_MODEL
from kedit_ray.spec import EvalSpec, ModelSpec, Resources

DEMO = dict(prompt="The {} is located in the city of", subject="Space Needle", target_new="Goa",
            target_true="Seattle", paraphrase=["The Space Needle can be found in the city of"],
            neighbor=["The Eiffel Tower is located in the city of"])


def add_model_args(p: argparse.ArgumentParser) -> None:
    from kedit_ray.models.arch import TEMPLATE_FLAGS

    p.add_argument("--model", default=DEFAULT_MODEL, help="gemma-3-270m (embedded), a hub id, a directory or a .gguf")
    p.add_argument("--device-map", default=None, help="accelerate device map: 'auto' or a JSON map")
    g = p.add_argument_group("architecture templates, for models the registry does not know ({} = layer index)")
    for field, flag in TEMPLATE_FLAGS.items():
        g.add_argument(flag, dest=f"tpl_{field}", default=None, metavar="TEMPLATE")


def add_editor_args(p: argparse.ArgumentParser) -> None:
    from kedit_ray.editors import EDITORS

    g = p.add_argument_group("editor (an option applies to the methods whose parameters have it)")
    g.add_argument("--method", default="rome", choices=sorted(EDITORS))
    g.add_argument("--layer", type=int, default=None, help="layer to edit (default: measured per model)")
    g.add_argument("--layers", type=_ints, default=None, help="MEMIT/AlphaEdit: layers to edit, e.g. 3,4,5,6")
    g.add_argument("--mom2-weight", type=float, default=None,
                   help="MEMIT/AlphaEdit: λ, the weight of C (the paper: 15000; gemma-3-270m: 200)")
    g.add_argument("--z-module", choices=["layer", "mlp_out"], default=None,
                   help="MEMIT/AlphaEdit: z is the residual leaving the last layer (the paper) or, one layer only, "
                        "its MLP output before any norm (ROME's v*; the default for gemma-3-270m)")
    g.add_argument("--nullspace-threshold", type=float, default=None,
                   help="AlphaEdit: eigenvalues of C below this span the preserved null space (2e-2)")
    g.add_argument("--eps-init", type=float, default=None, help="GRACE: ε_init, the radius of a new key")
    g.add_argument("--replacement", choices=["last", "all"], default=None,
                   help="GRACE: replace the wrapped layer's output at the last prompt token or at all of them")
    g.add_argument("--norm-constraint", type=float, default=None, help="FT-L: ε, the bound on ||ΔW||∞")
    g.add_argument("--editor-checkpoint", default=None, help="KE/MEND: the trained network (a `kedit train --out` DIR)")
    g.add_argument("--no-cov", action="store_true", help="use C = I instead of the layer statistics")
    g.add_argument("--stats-corpus", default=None, help="corpus for C (default: any cached stats for the layer)")
    g.add_argument("--stats-samples", type=int, default=None, help="documents of the corpus for C (10000)")
    g.add_argument("--stats-max-len", type=int, default=None, help="tokens per document for C (min(context, 1024))")
    g.add_argument("--no-compute-stats", action="store_true", help="fail instead of computing missing stats")
    g.add_argument("--v-steps", type=int, default=None,
                   help="max gradient steps for v* (MEMIT: z; GRACE: a codebook value; FT/FT-L: ΔW)")
    g.add_argument("--v-lr", type=float, default=None, help="Adam's learning rate for the same")
    g.add_argument("--v-clamp", type=float, default=None,
                   help="bound on ||δ|| in units of ||v0|| (default: measured per model, else the paper's 4)")


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


# params field -> (argparse dest, flag); None values are left to the editor's defaults
EDITOR_OPTIONS = {"layer": ("layer", "--layer"), "layers": ("layers", "--layers"),
                  "mom2_update_weight": ("mom2_weight", "--mom2-weight"),
                  "z_module": ("z_module", "--z-module"),
                  "nullspace_threshold": ("nullspace_threshold", "--nullspace-threshold"),
                  "use_cov": ("no_cov", "--no-cov"), "stats_corpus": ("stats_corpus", "--stats-corpus"),
                  "stats_samples": ("stats_samples", "--stats-samples"),
                  "stats_max_len": ("stats_max_len", "--stats-max-len"),
                  "compute_stats": ("no_compute_stats", "--no-compute-stats"),
                  "eps_init": ("eps_init", "--eps-init"), "replacement": ("replacement", "--replacement"),
                  "norm_constraint": ("norm_constraint", "--norm-constraint"),
                  "editor_checkpoint": ("editor_checkpoint", "--editor-checkpoint")}


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
            sys.exit(f"kedit: {flag} does not apply to --method {args.method}")
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
        sys.exit(f"kedit: --v-steps/--v-lr/--v-clamp do not apply to --method {args.method}")
    return out


def templates(args: argparse.Namespace) -> dict[str, str]:
    return {k[4:]: v for k, v in vars(args).items() if k.startswith("tpl_") and v}


# ---------------------------------------------------------------- edit / demo

def cmd_edit(args: argparse.Namespace) -> int:
    import torch

    from kedit_ray.editors import make_editor
    from kedit_ray.models import load
    from kedit_ray.requests import EditRequest

    req = EditRequest(0, args.subject, args.prompt, args.target_new, args.target_true or "").validate("--prompt")
    print(f"[kedit] loading {args.model}", flush=True)
    lm = load(args.model, device_map=args.device_map, templates=templates(args))
    prompts = [("prompt", req.text)] + [("paraphrase", p) for p in args.paraphrase or []] + \
              [("neighbour", p) for p in args.neighbor or []]

    @torch.no_grad()
    def top(text: str) -> list[tuple[str, float]]:
        enc = lm.tok(text, return_tensors="pt").to(lm.input_device)
        probs = lm.model(**enc, logits_to_keep=1).logits[0, -1].float().softmax(-1)
        p, i = probs.topk(args.top_k)
        return [(lm.tok.decode(t), v) for v, t in zip(p.tolist(), i.tolist())]

    before = [top(t) for _, t in prompts]
    editor = make_editor(args.method, editor_params(args))
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
    if args.save:
        delta.save(args.save)
        print(f"\nsaved the delta to {args.save}")
    return 0


def add_edit_args(p: argparse.ArgumentParser, demo: bool = False) -> None:
    add_model_args(p)
    add_editor_args(p)
    d = DEMO if demo else {}
    p.add_argument("--prompt", default=d.get("prompt"), required=not demo, help="template with {} for the subject")
    p.add_argument("--subject", default=d.get("subject"), required=not demo)
    p.add_argument("--target-new", default=d.get("target_new"), required=not demo)
    p.add_argument("--target-true", default=d.get("target_true"))
    p.add_argument("--paraphrase", action="append", default=d.get("paraphrase"))
    p.add_argument("--neighbor", action="append", default=d.get("neighbor"))
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--save", default=None, help="write the delta as safetensors")


# ---------------------------------------------------------------- eval / report

def add_eval_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    add_editor_args(p)
    p.add_argument("--dataset", default="auto", choices=["auto", "counterfact", "zsre", "user"])
    p.add_argument("--data", required=True, help="requests file (JSON, JSONL or Parquet)")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--skip-invalid", action="store_true", help="report bad records and go on")
    Resources.add_arguments(p)
    p.add_argument("--out", required=True)
    p.add_argument("--fluency", action="store_true", help="also greedy-generate and score fluency (slow on CPU)")
    p.add_argument("--retry-errors", action="store_true", help="rerun the cases whose rows hold an error")
    g = p.add_argument_group("protocol")
    g.add_argument("--protocol", default="single", choices=["single", "batch", "sequential"],
                   help="single: edit, score, revert per case; batch: B edits at once, then score them; "
                        "sequential: batches applied one after another, scored at checkpoints")
    g.add_argument("--batch-size", type=int, default=1, help="B, edits per batch (batch and sequential)")
    g.add_argument("--checkpoints", type=_ints, default=None,
                   help="sequential: numbers of edits at which to score, e.g. 10,100,1000 (the end is always one)")
    g.add_argument("--held-out", type=int, default=100,
                   help="sequential: unrelated cases (the ones after the edited cases in --data) scored at each "
                        "checkpoint for TRR")


def cmd_eval(args: argparse.Namespace) -> int:
    from kedit_ray.datasets import load_requests
    from kedit_ray.distributed.driver import run_eval
    from kedit_ray.results import ConfigMismatch

    requests, problems = load_requests(args.data, args.dataset, args.limit, args.skip_invalid)
    for p in problems:
        print(f"[kedit] skipped: {p}", file=sys.stderr)
    if problems:
        print(f"[kedit] skipped {len(problems)} invalid records, kept {len(requests)}", file=sys.stderr)
    from kedit_ray.io import file_sha256

    spec = EvalSpec(ModelSpec(args.model, templates(args), device_map=args.device_map), args.method,
                    editor_params(args), args.dataset, str(Path(args.data).resolve()), file_sha256(args.data),
                    args.fluency, resources=Resources.from_args(args))
    try:
        if args.protocol == "single":
            summary = run_eval(spec, requests, args.out, retry_errors=args.retry_errors)
        else:
            summary = _eval_protocol(args, spec, requests)
    except ConfigMismatch as e:
        print(f"kedit eval: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


def _eval_protocol(args: argparse.Namespace, spec: EvalSpec, requests: list) -> dict:
    """batch / sequential: the held-out cases are the --held-out ones after the edited cases in --data."""
    from dataclasses import replace

    from kedit_ray.datasets import load_requests
    from kedit_ray.distributed.batch import run_protocol_eval

    if args.fluency:
        sys.exit("kedit: --fluency is only measured by the single protocol")
    held_out = []
    if args.protocol == "sequential" and args.held_out > 0:
        more, _ = load_requests(args.data, args.dataset, None if args.limit is None else args.limit + args.held_out,
                                args.skip_invalid)
        edited = {r.case_id for r in requests}
        held_out = [r for r in more if r.case_id not in edited][:args.held_out]
        if args.limit is None:   # every case would be edited: keep the last --held-out ones apart
            requests, held_out = requests[:-args.held_out] or requests, requests[-args.held_out:]
    spec = replace(spec, protocol=args.protocol, batch_size=args.batch_size, checkpoints=args.checkpoints,
                   held_out=[r.case_id for r in held_out])
    return run_protocol_eval(spec, requests, args.out, held_out)


def cmd_report(args: argparse.Namespace) -> int:
    from kedit_ray.eval.report import report

    print(report(args.dirs, args.png))
    return 0


# ---------------------------------------------------------------- main

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kedit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    add_edit_args(sub.add_parser("edit", help="edit one fact and show top predictions before and after"))
    add_edit_args(sub.add_parser("demo", help="the Space Needle → Goa edit on the default model"), demo=True)
    add_eval_args(sub.add_parser("eval", help="evaluate an editor on a dataset across Ray workers"))
    p = sub.add_parser("report", help="aggregate table and pre/post chart of eval runs")
    p.add_argument("dirs", nargs="+", help="eval --out directories")
    p.add_argument("--png", default=None, help="chart path (default: DIR/report.png of the first DIR)")
    for name, module in PLUGINS.items():
        mod = importlib.import_module(module)
        mod.add_arguments(sub.add_parser(name, help=(mod.__doc__ or name).strip().splitlines()[0]))
    return parser


PLUGINS = {"stats": "kedit_ray.stats.command", "trace": "kedit_ray.tracing.command", "train": "kedit_ray.train"}
COMMANDS = {"edit": cmd_edit, "demo": cmd_edit, "eval": cmd_eval, "report": cmd_report}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in COMMANDS:
        return COMMANDS[args.command](args)
    return importlib.import_module(PLUGINS[args.command]).run(args)


if __name__ == "__main__":
    sys.exit(main())
