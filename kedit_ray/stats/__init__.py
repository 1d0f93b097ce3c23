"""Layer statistics C = E[k kᵀ]: one truncated pass for many layers, sharded, resumable, cached."""
from kedit_ray.stats.cache import ModelInfo, StatsError, default_cache
from kedit_ray.stats.compute import MissingStats, command_line, compute_stats, layer_stats

__all__ = ["ModelInfo", "StatsError", "default_cache", "MissingStats", "command_line", "compute_stats", "layer_stats"]
