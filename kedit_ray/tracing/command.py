"""Causal tracing: where a fact lives, by token and layer, for hidden states, MLP and attention outputs.

    kedit trace --model gemma-3-270m --data ../shared/data/known_1000.json --limit 100 --workers 2 --out runs/trace
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kedit_ray.options import add_model_args, add_ray_args, model_kw, positive


def parse_kinds(text: str) -> tuple[str, ...]:
    from kedit_ray.tracing.trace import KINDS

    kinds = tuple(dict.fromkeys(k.strip() for k in text.split(",") if k.strip()))
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise argparse.ArgumentTypeError(f"--kind {text!r}: expected a comma-separated subset of {','.join(KINDS)}")
    return kinds


def parse_noise(text: str) -> str | float:
    if text == "auto":
        return text
    try:
        sigma = float(text)
    except ValueError:
        sigma = -1.0
    if not sigma >= 0:
        raise argparse.ArgumentTypeError(f"--noise {text!r}: expected 'auto' or a number ≥ 0")
    return sigma


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--data", required=True, help="known facts (the layout of known_1000.json) or any requests file")
    p.add_argument("--limit", type=positive, default=None, help="the first N facts (default: all)")
    add_ray_args(p, "trace")
    p.add_argument("--out", required=True, help="run directory: results/, summary.json, plots/")
    p.add_argument("--kind", type=parse_kinds, default="hidden,mlp,attn", help="states to restore: hidden,mlp,attn")
    p.add_argument("--window", type=positive, default=10, help="MLP / attention layers restored together")
    p.add_argument("--noise", type=parse_noise, default="auto",
                   help="σ of the noise on the subject embeddings: auto = 3 × their std over the prompts, or a number")
    p.add_argument("--samples", type=positive, default=10, help="noise samples averaged per fact")
    p.add_argument("--seed", type=int, default=1, help="seed of the noise (the same noise for every fact)")
    p.add_argument("--max-rows", type=positive, default=256, help="rows (restorations × samples) per forward pass")
    p.add_argument("--no-fact-plots", action="store_true", help="only the average heatmaps, not one per fact")
    p.add_argument("--suggest-layer", action="store_true",
                   help="print the layer to edit: the peak of the average MLP effect at the last subject token")


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from kedit_ray.datasets import load_known
    from kedit_ray.distributed.pool import Lost, open_pool
    from kedit_ray.distributed.trace import TraceWorker
    from kedit_ray.models.loading import check_model
    from kedit_ray.results import check_config
    from kedit_ray.spec import ModelSpec, Resources
    from kedit_ray.tracing import plots, results
    from kedit_ray.tracing.trace import TraceParams

    facts = load_known(args.data)
    check_model(args.model)
    out = Path(args.out)
    config = {"model": args.model, "data": str(Path(args.data).resolve()), "kinds": list(args.kind),
              "window": args.window, "noise": args.noise, "samples": args.samples, "seed": args.seed}
    check_config(out, config)
    selected = facts[:args.limit]
    done = results.finished(out)
    todo = [f for f in selected if f.id not in done]
    params = TraceParams(args.kind, args.window, args.samples, args.seed, args.max_rows)
    model = ModelSpec.from_kw(args.model, **model_kw(args))
    skipped, errors = results.read_skipped(out), {}
    with open_pool(TraceWorker, (model, params), Resources.from_args(args), size=max(1, len(todo))) as pool:
        # σ from every prompt of the file, so that it does not depend on --limit
        sigma = 3 * pool.call("noise_std", [f.prompt for f in facts]) if args.noise == "auto" else args.noise
        bar = tqdm(total=len(todo), unit="fact", desc="trace", file=sys.stderr)
        for fact, trace in pool.stream(todo, "trace", sigma):
            if isinstance(trace, Lost):
                errors[fact.id] = f"the fact {trace.message}"
                print(f"[kedit] fact {fact.id}: {errors[fact.id]}", file=sys.stderr)
            elif trace.error:
                errors[trace.fact] = trace.error
                print(f"[kedit] fact {trace.fact}: {trace.error}", file=sys.stderr)
            elif trace.skipped:
                skipped[trace.fact] = trace.skipped
                results.write_skipped(out, skipped)
            else:
                results.write_fact(out, trace, args.model)
                if not args.no_fact_plots:
                    plots.plot_fact(out / "plots", trace, args.model, args.window)
            bar.set_postfix(skipped=len(skipped), errors=len(errors), refresh=False)
            bar.update()
        bar.close()
    summary = results.summarize(out, config, sigma, len(selected), errors)
    print(f"traced {summary['traced']} facts, skipped {summary['skipped']} (the model answers otherwise), "
          f"{len(errors)} failed; σ = {sigma:.4g}")
    if summary["traced"]:
        paths = plots.plot_averages(out / "plots", summary) + [plots.plot_by_layer(out / "plots" / "by-layer.png",
                                                                                  summary)]
        print(f"TE mean {summary['te_mean']:.4f} (P {summary['p_mean']:.4f} → P* {summary['p_star_mean']:.4f})")
        print(f"summary: {out / 'summary.json'}; plots: {', '.join(map(str, paths))}")
    layer = summary["peak_mlp_layer_last_subject"]
    if args.suggest_layer:
        if layer is None:
            print("kedit trace: no MLP trace at a last subject token, so no layer to suggest", file=sys.stderr)
            return 1
        print(f"suggested layer: {layer} (peak average MLP indirect effect at the last subject token)")
    return 0
