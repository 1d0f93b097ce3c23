"""Layer statistics C = E[k kᵀ]: one truncated pass for many layers, sharded, resumable, cached."""
from kedit_ray.stats.cache import ModelInfo, StatsError, default_cache
from kedit_ray.stats.compute import (DEFAULT_CORPUS, DEFAULT_SAMPLES, MissingStats, command_line, compute_stats,
                                     layer_stats, load_stats)

__all__ = ["ModelInfo", "StatsError", "default_cache", "DEFAULT_CORPUS", "DEFAULT_SAMPLES", "MissingStats",
           "command_line", "compute_stats", "layer_stats", "load_stats"]
