"""Causal tracing (ROME section 2): the maths in `trace`, files in `results`, figures in `plots`."""
from kedit_ray.tracing.trace import (KINDS, ROLES, FactTrace, Restore, TraceParams, noise_std, prepare,
                                     restored_prob_one, restored_probs, token_roles, trace_fact, trace_known)

__all__ = ["KINDS", "ROLES", "FactTrace", "Restore", "TraceParams", "noise_std", "prepare", "restored_prob_one",
           "restored_probs", "token_roles", "trace_fact", "trace_known"]
