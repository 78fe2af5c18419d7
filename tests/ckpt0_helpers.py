"""Helpers shared by the ckpt-0 tests: reference-style records, hostile and numpy-1 pickles,
and a mixed int8/float parameter tree."""

import dataclasses
import os
import pickletools

import numpy as np

from runtime.parameter_shapes import abstract_params
from runtime.quant import quantize

LAYERS = "language_model/transformer/layers/decoder_layer"
ROW_PARALLEL = ("multi_head_attention/linear", "moe/linear_1")  # 8 scale row blocks, as released


@dataclasses.dataclass
class QuantizedWeight8bit:
    """Stands in for the reference's class when a test writes a file the way the reference does."""
    weight: np.ndarray
    scales: np.ndarray


class RunsCommand:
    """Unpickling this with plain pickle would run a shell command."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def as_numpy1_pickle(data: bytes) -> bytes:
    """Rewrite a numpy-2 pickle to name numpy 1.x's `numpy.core.multiarray`, as released files do."""
    old, new = b"\x8c\x16numpy._core.multiarray", b"\x8c\x15numpy.core.multiarray"  # SHORT_BINUNICODE
    assert old in data
    # The FRAME header still counts the old length; optimize() re-reads the opcodes and re-frames.
    rewritten = pickletools.optimize(data.replace(old, new))
    strings = {arg for _, arg, _ in pickletools.genops(rewritten) if isinstance(arg, str)}
    assert "numpy.core.multiarray" in strings and "numpy._core.multiarray" not in strings
    return rewritten


def mixed_params(config, seed=0):
    """Every matmul weight but the router int8 (R = 8 for row-parallel ones), the rest float32.

    Random normal values on the model's own parameter tree (its init's eval_shape): the same
    tree as `build_model(config).init` gives, with random norm scales (init sets them all to 1)
    so that every file's content is distinct.
    """
    rng = np.random.default_rng(seed)
    out = {}
    for module, leaves in abstract_params(config).items():
        sub = module[len(LAYERS) + 1:] if module.startswith(LAYERS) else None
        out[module] = {}
        for name, spec in leaves.items():
            value = rng.normal(size=spec.shape).astype(np.float32)
            if name == "w" and sub != "router":
                value = quantize(value, 8 if sub in ROW_PARALLEL else 1)
            out[module][name] = value
    return out
