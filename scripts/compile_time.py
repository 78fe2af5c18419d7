#!/usr/bin/env python3
"""Compile time of the jitted decode step at two depths: with the layer scan it must not grow.

  python scripts/compile_time.py --layers 12 64
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402

from runtime.config import load_config  # noqa: E402
from runtime.engine import build_engine  # noqa: E402
from runtime.models import build_model  # noqa: E402
from runtime.sharding import make_mesh  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="tiny-test")
    p.add_argument("--layers", type=int, nargs="+", default=[12, 64])
    p.add_argument("--slots", type=int, default=4)
    args = p.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, config {args.config}")
    for layers in args.layers:
        config = load_config(args.config).replace(num_layers=layers)
        model = build_model(config)
        params = model.init(jax.random.PRNGKey(0))
        engine = build_engine(model.config, params, make_mesh({"model": 1}), slots=args.slots)
        start = time.perf_counter()
        args_decode = (engine.params, engine.memory) + tuple(
            jax.ShapeDtypeStruct((args.slots,), d) for d in
            ("int32", "bool", "int32", "int32", "float32", "int32", "float32"))
        engine._decode.lower(*args_decode).compile()
        decode_s = time.perf_counter() - start
        start = time.perf_counter()
        args_prefill = (engine.params, engine.memory, jax.ShapeDtypeStruct((1, 32), "int32")) + \
            tuple(jax.ShapeDtypeStruct((1,), d) for d in
                  ("int32", "int32", "int32", "float32", "int32", "float32"))
        engine._prefill.lower(*args_prefill).compile()
        prefill_s = time.perf_counter() - start
        print(f"layers={layers:3d}  decode compile {decode_s:6.2f} s  "
              f"prefill(32) compile {prefill_s:6.2f} s")


if __name__ == "__main__":
    main()
