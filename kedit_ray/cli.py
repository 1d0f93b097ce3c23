"""The `kedit` command: edit, eval, report, stats, trace, demo."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from kedit_ray.models.loading import DEFAULT_MODEL

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
    g = p.add_argument_group("editor")
    g.add_argument("--method", default="rome", choices=["rome"])
    g.add_argument("--layer", type=int, default=None, help="layer to edit (default: measured per model)")
    g.add_argument("--no-cov", action="store_true", help="use C = I instead of the layer statistics")
    g.add_argument("--stats-corpus", default=None, help="corpus for C (default: any cached stats for the layer)")
    g.add_argument("--stats-samples", type=int, default=10_000)
    g.add_argument("--no-compute-stats", action="store_true", help="fail instead of computing missing stats")
    g.add_argument("--v-steps", type=int, default=None, help="max gradient steps for v*")
    g.add_argument("--v-lr", type=float, default=None)


def editor_params(args: argparse.Namespace) -> dict:
    values = {k: v for k, v in (("steps", args.v_steps), ("lr", args.v_lr)) if v is not None}
    return {"layer": args.layer, "use_cov": not args.no_cov, "stats_corpus": args.stats_corpus,
            "stats_samples": args.stats_samples, "compute_stats": not args.no_compute_stats, "values": values}


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
    print(f"\nROME at layer {m['layer']} (C: {m['cov']}): {m['v_steps']} v* steps, "
          f"{m['key_s'] + m['value_s'] + m['solve_s']:.1f} s\n")
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
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--cpus-per-worker", type=float, default=1)
    p.add_argument("--gpus-per-worker", type=float, default=0)
    p.add_argument("--address", default=None, help="Ray cluster address (default: a local Ray on 127.0.0.1)")
    p.add_argument("--out", required=True)
    p.add_argument("--fluency", action="store_true", help="also greedy-generate and score fluency (slow on CPU)")
    p.add_argument("--retry-errors", action="store_true", help="rerun the cases whose rows hold an error")


def cmd_eval(args: argparse.Namespace) -> int:
    from kedit_ray.datasets import load_requests
    from kedit_ray.distributed.driver import run_eval
    from kedit_ray.distributed.sink import ConfigMismatch

    requests, problems = load_requests(args.data, args.dataset, args.limit, args.skip_invalid)
    for p in problems:
        print(f"[kedit] skipped: {p}", file=sys.stderr)
    if problems:
        print(f"[kedit] skipped {len(problems)} invalid records, kept {len(requests)}", file=sys.stderr)
    config = {"model": args.model, "method": args.method, "params": editor_params(args),
              "device_map": args.device_map, "fluency": args.fluency, "templates": templates(args),
              "data": str(Path(args.data).resolve()), "dataset": args.dataset}
    try:
        summary = run_eval(config, requests, args.out, args.workers, args.cpus_per_worker, args.gpus_per_worker,
                           address=args.address, retry_errors=args.retry_errors)
    except ConfigMismatch as e:
        print(f"kedit eval: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


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
    for name, module in (("stats", "kedit_ray.stats.command"), ("trace", "kedit_ray.tracing.command")):
        try:
            mod = __import__(module, fromlist=["add_arguments"])
        except ImportError:
            continue
        mod.add_arguments(sub.add_parser(name, help=(mod.__doc__ or name).strip().splitlines()[0]))
    return parser


COMMANDS = {"edit": cmd_edit, "demo": cmd_edit, "eval": cmd_eval, "report": cmd_report}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in COMMANDS:
        return COMMANDS[args.command](args)
    module = {"stats": "kedit_ray.stats.command", "trace": "kedit_ray.tracing.command"}[args.command]
    return __import__(module, fromlist=["run"]).run(args)


if __name__ == "__main__":
    sys.exit(main())
