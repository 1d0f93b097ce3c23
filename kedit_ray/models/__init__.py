from kedit_ray.models.arch import ARCHS, Arch, UnknownArchitecture, check_layer, detect_arch, num_layers
from kedit_ray.models.hooks import (StopForward, Trace, TraceDict, get_module, head_at, start_at_layer, token_grid,
                                    weight_of)
from kedit_ray.models.loading import LM, DEFAULT_MODEL, kedit_home, load

__all__ = ["ARCHS", "Arch", "UnknownArchitecture", "check_layer", "detect_arch", "num_layers", "StopForward",
           "Trace", "TraceDict", "get_module", "head_at", "start_at_layer", "token_grid", "weight_of", "LM",
           "DEFAULT_MODEL", "kedit_home", "load"]
