"""Run by test_mamba2.py in a subprocess with 8 simulated CPU devices (XLA_FLAGS set before jax
is imported): the Mamba-2 fixtures loaded straight onto sharded meshes (place_leaf per
parameter), their long-prompt logits and greedy tokens through the Engine (two prompts in two
slots), printed as one JSON line. The single-device values are the fixtures' expected ones."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import conftest  # noqa: E402,F401  (puts the repository root on sys.path)
from runtime.checkpoint.hf_config import read_hf_config  # noqa: E402
from runtime.checkpoint.load import load_params  # noqa: E402
from runtime.engine import build_engine  # noqa: E402
from runtime.parameter_shapes import abstract_params  # noqa: E402
from runtime.models import build_model  # noqa: E402
from runtime.request import Request  # noqa: E402
from runtime.sharding import default_mesh_sizes, make_mesh, place_leaf  # noqa: E402

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "hf"
RUNS = [("mamba2_groups", {"model": 8}), ("mamba2", {"data": 2, "model": 4})]
NEW_TOKENS = 24


def run(name, sizes):
    folder = FIXTURES / name
    config = read_hf_config(folder)
    expected = np.load(folder / "expected.npz")
    mesh = make_mesh(sizes)
    params = load_params(folder, config, place=lambda path, leaf: place_leaf(path, leaf, mesh))
    model = build_model(config)
    ids = expected["long_ids"]
    logits, _ = jax.jit(model.apply)(params, jnp.asarray(ids), model.new_memory(1, 0),
                                     jnp.array([ids.shape[1]]))
    x_proj = params["language_model/mamba/layers/mamba_layer/mixer/in_proj_x"]["w"]
    engine = build_engine(model.config, params, mesh, slots=2)
    state_split = engine.memory.ssm.shape[2] // engine.memory.ssm.sharding.shard_shape(
        engine.memory.ssm.shape)[2]
    prompts = [tuple(expected[f"prompt_{i}"].tolist()) for i in (0, 2)]
    results = engine.generate([Request(p, max_new_tokens=NEW_TOKENS) for p in prompts])
    error = np.abs(np.asarray(logits) - expected["long_logits"]).max()
    return {"tokens": [r.output_ids for r in results],
            "expected": [expected[f"greedy_{i}"][:NEW_TOKENS].tolist() for i in (0, 2)],
            "logit_error": float(error / np.abs(expected["long_logits"]).max()),
            "heads_split": x_proj.shape[-1] // x_proj.sharding.shard_shape(x_proj.shape)[-1],
            "state_heads_split": state_split}


def main():
    assert jax.device_count() == 8, jax.devices()
    out = {"default_mesh": default_mesh_sizes(
        abstract_params(read_hf_config(FIXTURES / "mamba2")), 8)}
    for name, sizes in RUNS:
        out[f"{name} {','.join(f'{k}={v}' for k, v in sizes.items())}"] = run(name, sizes)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
