"""Run by tests/test_layer_types.py on 8 simulated CPU devices (data 2 x model 4): a Q4_K_M-like
GGUF loaded onto the mesh keeps its mixed stacks one stack per type. Unrolled (KV heads copied:
2 stored over model 4), its logits are the float model's of the file's values; scanned (the
stacks merged on the mesh), those of the stacks merged by the reader, bit for bit, and the
float model's too (merged exactly). The Q5_K_M-like file of tests/test_int8_mins.py too.
Arguments: the tests folder, the GGUF file, the F32 file of its values."""

import sys

import jax
import numpy as np

sys.path.insert(0, sys.argv[1])
from test_dtype_ladder import prefill_logits, prompt_for  # noqa: E402

from runtime import layout  # noqa: E402
from runtime.checkpoint.load import default_config, load_params_on_mesh  # noqa: E402
from runtime.engine import build_engine  # noqa: E402
from runtime.layer_types import LayersByType  # noqa: E402
from runtime.quant import QuantizedWeight8bit  # noqa: E402
from runtime.sharding import make_mesh  # noqa: E402

LAYER = "language_model/transformer/layers/decoder_layer/"
path, floats = sys.argv[2], sys.argv[3]
assert jax.device_count() == 8
config = default_config(path)
mesh = make_mesh({"data": 2, "model": 4})
typed = load_params_on_mesh(path, config, mesh)
assert isinstance(typed[LAYER + "multi_head_attention/value"]["w"], LayersByType)
layout.LAYER_TYPES_KEPT = False
one_stack = load_params_on_mesh(path, config, mesh)
assert isinstance(one_stack[LAYER + "multi_head_attention/value"]["w"], QuantizedWeight8bit)
prompts = [prompt_for(config, seed) for seed in range(4)]


def logits(params, unroll: bool):
    engine = build_engine(config, params, mesh, slots=4, cache_length=40, unroll_layers=unroll)
    return prefill_logits(engine, prompts), engine


reference = logits(load_params_on_mesh(floats, config, mesh), True)[0]
unrolled, engine = logits(typed, True)
assert engine.layout.kv_copies == 2, engine.layout
error = float(np.abs(unrolled - reference).max() / np.abs(reference).max())
assert error < 1e-5, error
scanned, engine = logits(typed, False)
assert isinstance(engine.params[LAYER + "mlp/linear_1"]["w"], QuantizedWeight8bit)
np.testing.assert_array_equal(scanned, logits(one_stack, False)[0])
merged_error = float(np.abs(scanned - reference).max() / np.abs(reference).max())
assert merged_error < 1e-5, merged_error  # merged exactly (int4 layers' codes with mins)
print(f"ok {error:.2e} {merged_error:.2e}")
