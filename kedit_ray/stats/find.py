"""Find cached layer statistics for a model's layer without naming the corpus: editors use what exists."""
from __future__ import annotations

from pathlib import Path

import torch

from kedit_ray.models import LM
from kedit_ray.stats import cache as sc


def find_stats(lm: LM, layer: int, module: str = "mlp_out",
               cache: str | Path | None = None) -> tuple[torch.Tensor, dict] | None:
    """The cached C for (model, layer, module) with the most tokens behind it, checked like any stats file;
    None when there is none. A file that fails its checks raises StatsError (it is never used silently)."""
    from safetensors import safe_open

    folder = Path(cache or sc.default_cache()) / sc.model_slug(lm.name)
    best = None
    for path in folder.glob(f"*/{module}.L{layer:02d}.*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("fingerprint") != lm.fingerprint:
            continue  # another model saved under the same name: not ours to use
        if best is None or int(meta.get("count", 0)) > int(best[1].get("count", 0)):
            best = (path, meta)
    if best is None:
        return None
    path, meta = best
    key = sc.Key(meta["model"], module, meta["corpus"], meta["corpus_fingerprint"], "", int(meta["samples"]),
                 int(meta["max_len"]), meta["dtype"])
    return sc.load(path, key, layer, lm.fingerprint, sc.ModelInfo.of(lm).dims[module][layer])
