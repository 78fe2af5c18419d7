"""Run by test_pallas_sharded.py in a subprocess with 8 simulated CPU devices: the GPU int8
product (pallas_gemv, in Pallas interpret mode) on sharded weights, through pallas_sharded's
partitioning rule. Prints one JSON object: per case the error against float64 and the
collectives of the compiled program; for an engine, its tokens with and without the kernel."""

import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from conftest import random_params, tiny_config  # noqa: E402
from runtime import layout, pallas_gemv, pallas_sharded, products  # noqa: E402
from runtime.engine import build_engine  # noqa: E402
from runtime.paths import MATMUL_LEAF  # noqa: E402
from runtime.quant import TransposedWeight, quantize  # noqa: E402
from runtime.request import Request  # noqa: E402
from runtime.sharding import make_mesh  # noqa: E402

# name: (mesh, rows, O, I, R, weight spec, x dtype)
CASES = {
    "column": ({"data": 2, "model": 4}, 2, 256, 512, 8, ("model", None), np.float32),
    "column_bf16": ({"model": 8}, 1, 512, 256, 1, ("model", None), ml_dtypes.bfloat16),
    "row_groups_split": ({"data": 2, "model": 4}, 3, 128, 1024, 8, (None, "model"), np.float32),
    "row_one_scale": ({"model": 8}, 1, 64, 1024, 1, (None, "model"), ml_dtypes.bfloat16),
    "row_groups_whole": ({"data": 2, "model": 4}, 2, 64, 512, 2, (None, "model"), np.float32),
    "rows_split": ({"data": 2, "model": 4}, 4, 256, 512, 4, ("model", None), np.float32),
}
KERNEL_CALLS = []


def counted_kernel(*args, **kwargs):
    KERNEL_CALLS.append(args[1].shape)  # the (local) weight shape
    return ORIGINAL_KERNEL(*args, **kwargs)


ORIGINAL_KERNEL = pallas_gemv.int8_gemv


def collectives(text: str) -> dict:
    return {op: len(re.findall(rf" {op}(-start)?\(", text)) for op in ("all-gather", "all-reduce")}


def product_case(sizes, rows, out, inp, groups, weight_spec, x_dtype):
    rng = np.random.default_rng(out + inp + groups)
    weight_t = rng.integers(-127, 128, (out, inp), dtype=np.int8)
    scales = (rng.uniform(0.5, 2.0, (groups, out)) / 127).astype(np.float32)
    x = rng.standard_normal((rows, inp)).astype(np.float32).astype(x_dtype)
    want = np.asarray(x, np.float64) @ (weight_t.astype(np.float64)
                                        * np.repeat(scales, inp // groups, axis=0).T).T
    mesh = make_mesh(sizes)
    rows_spec = "data" if weight_spec[0] == "model" and rows % 2 == 0 and "data" in sizes else None
    place = lambda a, *spec: jax.device_put(a, NamedSharding(mesh, PartitionSpec(*spec)))  # noqa
    w = TransposedWeight(place(weight_t, *weight_spec), place(scales, None, weight_spec[0]))
    product = jax.jit(lambda x, w: products.linear(x, w, out_dtype=jnp.float32))
    xs = place(x, rows_spec, None)
    del KERNEL_CALLS[:]
    y = np.asarray(product(xs, w), np.float64)
    text = product.lower(xs, w).compile().as_text()
    return {"error": float(np.max(np.abs(y - want)) / np.max(np.abs(want))),
            "kernel_weights": [list(s) for s in KERNEL_CALLS], **collectives(text)}


def engine_case():
    """A tiny model with every layer matmul weight and the untied head int8, the GPU layout
    (unrolled, transposed) on data=2 x model=4 (KV heads copied), with and without the
    kernel."""
    config = tiny_config(emb_size=64, key_size=16, num_layers=2, tie_embeddings=False)
    params = random_params(config, seed=5)
    params["language_model/unembed"] = {"w": quantize(params["language_model/unembed"]["w"], 2)}
    for module, leaves in params.items():
        for name, leaf in list(leaves.items()):
            if MATMUL_LEAF.fullmatch(name) and "router" not in module and leaf.ndim >= 3:
                leaves[name] = quantize(leaf, 1 if "query" in module else 4)
    prompts = [(5, 6, 7), (40, 41, 42, 43, 44, 45), (9,), (200, 17, 4, 88, 31)]
    out = {}
    for kernel in (False, True):
        layout.int8_gemv_in_pallas = lambda kernel=kernel: kernel
        del KERNEL_CALLS[:]
        engine = build_engine(config, params, make_mesh({"data": 2, "model": 4}), slots=4,
                              cache_length=32, unroll_layers=True, transpose_weights=True)
        results = engine.generate([Request(p, max_new_tokens=8) for p in prompts])
        out[f"kernel={kernel}"] = {"tokens": [r.output_ids for r in results],
                                   "kernel_calls": len(KERNEL_CALLS)}
    return out


def main():
    assert jax.device_count() == 8, jax.devices()
    pallas_sharded.INTERPRET = True
    pallas_gemv.int8_gemv = counted_kernel
    layout.int8_gemv_in_pallas = lambda: True
    out = {name: product_case(*case) for name, case in CASES.items()}
    out["engine"] = engine_case()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
