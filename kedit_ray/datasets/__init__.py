"""Edit requests from CounterFact (both layouts), zsRE and user files; known facts for causal tracing."""
from .known import KnownFact, load_known
from .load import DATASETS, load_requests

__all__ = ["DATASETS", "KnownFact", "load_known", "load_requests"]
