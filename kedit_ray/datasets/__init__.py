"""Edit requests from CounterFact (both layouts), zsRE and user files; known facts for causal tracing."""
from .known import KnownFact, load_known
from .load import load_requests
from .registry import DATASETS, Dataset, register

__all__ = ["DATASETS", "Dataset", "KnownFact", "load_known", "load_requests", "register"]
