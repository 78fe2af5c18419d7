"""Run by test_sharding.py in a subprocess with 8 simulated CPU devices (XLA_FLAGS set before
jax is imported): greedy tokens and logits for several meshes, printed as one JSON object."""

import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from conftest import LAYER, random_params, tiny_config  # noqa: E402
from runtime.engine import build_engine  # noqa: E402
from runtime.parameter_shapes import abstract_params  # noqa: E402
from runtime.models import build_model  # noqa: E402
from runtime.quant import quantize  # noqa: E402
from runtime.request import Request  # noqa: E402
from runtime.sampling_state import neutral_rows  # noqa: E402
from runtime.sharding import default_mesh_sizes, make_mesh, param_specs, shardings  # noqa: E402
from runtime.memory import empty_kv

MESHES = [{"model": 1}, {"model": 8}, {"data": 2, "model": 4}, {"expert": 2, "model": 4}]
PROMPTS = [(5, 6, 7), (40, 41, 42, 43, 44, 45), (9,), (200, 17, 4, 88, 31)]


def main():
    assert jax.device_count() == 8, jax.devices()
    config = tiny_config()
    params = random_params(config, seed=21)
    params[LAYER + "moe/linear_1"] = {"w": quantize(params[LAYER + "moe/linear_1"]["w"], 8)}
    params[LAYER + "multi_head_attention/query"] = {
        "w": quantize(params[LAYER + "multi_head_attention/query"]["w"], 1)}
    model = build_model(config)
    tokens = jnp.array([[3, 14, 15, 92, 65, 35, 89, 79], [2, 71, 82, 81, 82, 84, 59, 0]])
    out = {"default_mesh": default_mesh_sizes(abstract_params(config), 8)}
    for sizes in MESHES:
        mesh = make_mesh(sizes)
        placed = jax.device_put(params, shardings(param_specs(params, mesh), mesh))
        kv = empty_kv(config, 2, 8, jnp.float32)
        logits = jax.jit(model.apply)(placed, tokens, kv, kv, jnp.broadcast_to(jnp.arange(8),
                                                                              (2, 8)))[0]
        engine = build_engine(model.config, params, mesh, slots=4, cache_length=32)
        spread = len(engine.params[LAYER + "moe/linear"]["w"].sharding.device_set)
        results = engine.generate([Request(p, max_new_tokens=10) for p in PROMPTS])
        out[",".join(f"{k}={v}" for k, v in sizes.items())] = {
            "tokens": [r.output_ids for r in results], "logits": np.asarray(logits).tolist(),
            "devices_holding_moe": spread, "kv_heads": engine.config.num_kv_heads,
            "memory_spec": [str(a) for a in engine.memory.keys.sharding.spec],
            "memory_gathered": memory_gathered(engine)}
    out["transposed"] = transposed_results(model, params, {"expert": 2, "model": 4})
    out["llama"] = hf_results("llama", {"data": 2, "model": 4})
    out["mixtral"] = hf_results("mixtral", {"expert": 2, "model": 4})
    print(json.dumps(out))


def memory_gathered(engine) -> list:
    """Shapes of the all-gathers in the compiled decode step at least as large as one KV head's
    memory of all slots (B x S x H): XLA gathering the KV memory every step."""
    batch, size = engine.slots, engine.cache_length * engine.config.key_size
    zeros = np.zeros(batch, np.int32)
    text = engine._decode.lower(engine.params, engine.memory, engine.history, zeros,
                                np.ones(batch, bool), zeros, neutral_rows(batch),
                                None).compile().as_text()
    shapes = [[int(d) for d in dims.split(",")] for dims in
              re.findall(r"= \w+\[([\d,]+)\][^=\n]* all-gather\(", text)]
    return [s for s in shapes if np.prod(s) >= batch * size]


def transposed_results(model, params, sizes):
    """Unrolled layers with every matmul weight stored transposed (the GPU layout), int8 ones
    included: their shardings follow the transposition."""
    from runtime.quant import TransposedWeight

    engine = build_engine(model.config, params, make_mesh(sizes), slots=4, cache_length=32,
                          unroll_layers=True, transpose_weights=True)
    layer = "language_model/transformer/layer_0/"
    query = engine.params[layer + "multi_head_attention/query"]["w"]
    expert = engine.params[layer + "moe/linear_1"]["w_0"]
    assert isinstance(query, TransposedWeight) and isinstance(expert, TransposedWeight)
    results = engine.generate([Request(p, max_new_tokens=10) for p in PROMPTS])
    return {"tokens": [r.output_ids for r in results],
            "devices_holding_query": len(query.weight_t.sharding.device_set),
            "query_shards": [list(s.data.shape) for s in query.weight_t.addressable_shards[:1]]}


def hf_results(name, sizes):
    """The Hugging Face fixture, loaded straight onto each mesh (place_leaf per parameter)."""
    from runtime.checkpoint.hf_config import read_hf_config
    from runtime.checkpoint.load import load_params
    from runtime.sharding import place_leaf

    folder = Path(__file__).resolve().parent / "fixtures" / "hf" / name
    config = read_hf_config(folder)
    expected = np.load(folder / "expected.npz")
    prompts = [tuple(expected[f"prompt_{i}"].tolist()) for i in range(2)]
    mesh = make_mesh(sizes)
    params = load_params(folder, config, place=lambda p, leaf: place_leaf(p, leaf, mesh))
    embeddings = params["language_model/in_out_embed"]["embeddings"]
    spread = embeddings.shape[1] // embeddings.sharding.shard_shape(embeddings.shape)[1]
    engine = build_engine(config, params, mesh, slots=2, cache_length=48)
    tokens = [r.output_ids for r in engine.generate([Request(p, max_new_tokens=24)
                                                     for p in prompts])]
    return {"tokens": tokens, "embedding_split": spread,
            "expected": [expected[f"greedy_{i}"][:24].tolist() for i in range(2)]}


if __name__ == "__main__":
    main()
