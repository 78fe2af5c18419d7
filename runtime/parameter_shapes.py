"""The parameter tree of a config as shapes, without allocating: what the readers, the memory
plan and the mesh choice ask before any weight is read."""

from __future__ import annotations

import functools

import jax

from runtime import program_cache
from runtime.config import ModelConfig
from runtime.models import build_model


@functools.lru_cache(maxsize=16)  # run.py and the checkpoint readers ask several times a run
def abstract_params(config: ModelConfig):
    """The parameter tree as ShapeDtypeStructs (float32 logical shapes), without allocating
    (traced from init, or read from the active program cache: run.py's later starts)."""
    def trace():
        return jax.eval_shape(build_model(config).init, jax.random.PRNGKey(0))
    cache = program_cache.active()
    return trace() if cache is None else cache.abstract_params(config, trace)
