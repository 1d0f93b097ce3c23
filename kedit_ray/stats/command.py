"""Precompute layer statistics C = E[k kᵀ] for several layers in one pass, sharded over Ray workers, cached.

    kedit stats --model gemma-3-270m --layers 3-7 --corpus ../shared/data/wiki.test.raw --samples 2000 --workers 2
"""
from __future__ import annotations

import argparse
import json

from kedit_ray.options import add_model_args, add_ray_args, layers, model_kw, positive
from kedit_ray.stats.compute import DEFAULT_CORPUS, DEFAULT_SAMPLES


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--layers", type=layers, required=True, help="e.g. 3,4,5 or 3-7")
    p.add_argument("--module", default="mlp_out", choices=["mlp_out", "mlp_in"],
                   help="whose inputs k: the MLP output projection (ROME's W) or its input projection")
    p.add_argument("--corpus", default=str(DEFAULT_CORPUS),
                   help="raw text (documents split by blank lines and WikiText headings), JSONL or Parquet with "
                        "'text' (.gz allowed for text and JSONL), or a directory of them (default: the WikiText-2 "
                        "test split shipped with kedit, which the editors use by default)")
    p.add_argument("--samples", type=positive, default=DEFAULT_SAMPLES, help="the first N documents")
    p.add_argument("--max-len", type=positive, default=None, help="tokens per document (default: min(context, 1024))")
    p.add_argument("--batch-tokens", type=positive, default=4096, help="padded tokens per forward pass")
    add_ray_args(p, "stats")
    p.add_argument("--shard-docs", type=positive, default=256, help="documents per shard (the unit of resumption)")
    p.add_argument("--stats-dtype", default="float32", choices=["float32", "float64"],
                   help="dtype C is stored in (the sums are float64)")
    p.add_argument("--cache", default=None, help="stats directory (default: $KEDIT_STATS_CACHE, else $KEDIT_HOME/stats)")
    p.add_argument("--recompute", action="store_true",
                   help="compute again a cached or partial file found damaged (default: an error naming it)")
    p.add_argument("--json", action="store_true", help='print {"files": [...]} on stdout')


def run(args: argparse.Namespace) -> int:
    from kedit_ray.models.loading import check_model
    from kedit_ray.stats import compute_stats, corpus

    corpus.corpus_files(args.corpus)   # the cheap checks first: the corpus, then the model
    check_model(args.model)
    infos = compute_stats(args.model, args.layers, args.module, args.corpus, args.samples, args.max_len,
                          args.batch_tokens, args.stats_dtype, args.cache, args.workers, args.shard_docs,
                          address=args.address, load_kw=model_kw(args), cpus_per_worker=args.cpus_per_worker,
                          gpus_per_worker=args.gpus_per_worker, recompute=args.recompute)
    if args.json:
        print(json.dumps({"files": [i["path"] for i in infos]}))
    else:
        for i in infos:
            print(f"layer {i['layer']} {i['module']}: {i['path']} ({i['count']:,} tokens, {i['documents']:,} documents"
                  f"{', cached' if i['cached'] else ''})")
    return 0
