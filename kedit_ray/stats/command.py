"""Precompute layer statistics C = E[k kᵀ] for several layers in one pass, sharded over Ray workers, cached.

    kedit stats --model gemma-3-270m --layers 3-7 --corpus ../shared/data/wiki.test.raw --samples 2000 --workers 2
"""
from __future__ import annotations

import argparse
import json
import sys

from kedit_ray.models.loading import DEFAULT_MODEL
from kedit_ray.spec import Resources


def parse_layers(text: str) -> list[int]:
    """"3,4,5", "3-7" or "1,3-5" → sorted layer indices."""
    layers: set[int] = set()
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            layers.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layers {text!r}: expected e.g. 3,4,5 or 3-7") from None
    if not layers:
        raise argparse.ArgumentTypeError(f"--layers {text!r} names no layer")
    return sorted(layers)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help="gemma-3-270m (embedded), a hub id, a directory or a .gguf")
    p.add_argument("--layers", type=parse_layers, required=True, help="e.g. 3,4,5 or 3-7")
    p.add_argument("--module", default="mlp_out", choices=["mlp_out", "mlp_in"],
                   help="whose inputs k: the MLP output projection (ROME's W, default) or its input projection")
    p.add_argument("--corpus", required=True,
                   help="raw text (documents split by blank lines and WikiText headings), JSONL or Parquet with "
                        "'text', or a directory of them")
    p.add_argument("--samples", type=int, default=100_000, help="the first N documents")
    p.add_argument("--max-len", type=int, default=None, help="tokens per document (default min(context, 1024))")
    p.add_argument("--batch-tokens", type=int, default=4096, help="padded tokens per forward pass")
    Resources.add_arguments(p)
    p.add_argument("--shard-docs", type=int, default=256, help="documents per shard (the unit of resumption)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"], help="stored dtype (sums are float64)")
    p.add_argument("--cache", default=None, help="stats directory (default $KEDIT_HOME/stats)")
    p.add_argument("--recompute", action="store_true",
                   help="compute again a cached or partial file found damaged (default: an error naming it)")
    p.add_argument("--json", action="store_true", help='print {"files": [...]} on stdout')


def run(args: argparse.Namespace) -> int:
    from kedit_ray.stats import compute_stats

    try:
        infos = compute_stats(args.model, args.layers, args.module, args.corpus, args.samples, args.max_len,
                              args.batch_tokens, args.dtype, args.cache, args.workers, args.shard_docs,
                              address=args.address, cpus_per_worker=args.cpus_per_worker,
                              gpus_per_worker=args.gpus_per_worker, recompute=args.recompute)
    except (ValueError, OSError, RuntimeError) as e:  # StatsError, CorpusError, a bad argument, a missing model, a
        # worker that could not start or a shard that took down two
        print(f"kedit stats: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"files": [i["path"] for i in infos]}))
    else:
        for i in infos:
            print(f"layer {i['layer']} {i['module']}: {i['path']} ({i['count']:,} tokens, {i['documents']:,} documents"
                  f"{', cached' if i['cached'] else ''})")
    return 0
