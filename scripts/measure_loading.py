#!/usr/bin/env python3
"""Measure host memory and read bandwidth while loading a multi-GB checkpoint onto a mesh.

  python scripts/measure_loading.py --make /tmp/big-ckpt --layers 6   # writes ~2.5 GB ckpt-0
  python scripts/measure_loading.py --load /tmp/big-ckpt --devices 8           # 1 process
  python scripts/launch_local.py --processes 2 --devices-per-process 4 -- \\
      python scripts/measure_loading.py --load /tmp/big-ckpt                   # 2 processes

Loading reports: bytes this process read, seconds, GB/s, the bytes its devices hold, and the
peak extra host memory (peak RSS minus the RSS before loading minus what the devices hold, since
CPU "devices" live in host memory too). --whole instead reads every parameter whole and places
it (the simple way), for comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

BIG = dict(vocab_size=8192, sequence_len=1024, emb_size=2048, key_size=128, num_q_heads=16,
           num_kv_heads=8, num_layers=6, widening_factor=6, num_experts=8,
           num_selected_experts=2, attn_output_multiplier=0.08838834764831845,
           embedding_multiplier_scale=45.254833995939045, output_multiplier_scale=0.5773502691896257,
           dtype="bfloat16")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def make(folder: Path, layers: int) -> None:
    import ml_dtypes
    import numpy as np

    from runtime.checkpoint.grok_ckpt import write_ckpt0
    from runtime.config import config_from_dict, save_config
    from runtime.parameter_shapes import abstract_params
    from runtime.quant import QuantizedWeight8bit

    config = config_from_dict(dict(BIG, num_layers=layers))
    rng = np.random.default_rng(0)
    params = {}
    for module, leaves in abstract_params(config).items():
        for name, leaf in leaves.items():
            if name == "w" and ("moe/" in module or "multi_head_attention" in module):
                rows = 8 if module.endswith(("linear_1", "attention/linear")) else 1
                scales = (*leaf.shape[:-2], rows, leaf.shape[-1])
                params.setdefault(module, {})[name] = QuantizedWeight8bit(
                    rng.integers(-127, 128, leaf.shape, dtype=np.int8),
                    (rng.random(scales, dtype=np.float32) * 0.01).astype(ml_dtypes.bfloat16))
            else:
                params.setdefault(module, {})[name] = rng.standard_normal(
                    leaf.shape, dtype=np.float32) * 0.02
    folder.mkdir(parents=True, exist_ok=True)
    write_ckpt0(params, folder, config)
    save_config(config, folder / "config.yaml")
    size = sum(p.stat().st_size for p in (folder / "ckpt-0").iterdir())
    print(f"wrote {size / 1e9:.2f} GB to {folder}")


def load(folder: Path, whole: bool) -> None:
    import jax

    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(os.environ["JAX_COORDINATOR_ADDRESS"],
                                   int(os.environ["JAX_NUM_PROCESSES"]),
                                   int(os.environ["JAX_PROCESS_ID"]))
    from runtime.checkpoint.lazy import BYTES_READ
    from runtime.checkpoint.load import load_params, load_params_on_mesh
    from runtime.config import load_config
    from runtime.sharding import make_mesh, place_leaf

    config = load_config(folder / "config.yaml")
    mesh = make_mesh({"model": jax.device_count()})
    before = rss_bytes()
    start = time.perf_counter()
    if whole:
        params = load_params(folder, config, place=lambda p, leaf: place_leaf(p, leaf, mesh))
        read = sum(f.stat().st_size for f in (folder / "ckpt-0").iterdir())
    else:
        params = load_params_on_mesh(folder, config, mesh)
        read = BYTES_READ.bytes
    jax.block_until_ready(params)
    seconds = time.perf_counter() - start
    held = sum(shard.data.nbytes for leaf in jax.tree.leaves(params)
               for shard in leaf.addressable_shards)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({
        "process": jax.process_index(), "processes": jax.process_count(),
        "devices": jax.device_count(), "method": "whole" if whole else "sliced",
        "read_GB": round(read / 1e9, 3), "seconds": round(seconds, 2),
        "read_GB_per_s": round(read / 1e9 / seconds, 2), "held_by_devices_GB": round(held / 1e9, 3),
        "rss_before_GB": round(before / 1e9, 3), "peak_rss_GB": round(peak / 1e9, 3),
        "peak_extra_GB": round((peak - before - held) / 1e9, 3)}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--make", type=Path)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--load", type=Path)
    p.add_argument("--devices", type=int, default=None,
                   help="simulated CPU devices for a 1-process load")
    p.add_argument("--whole", action="store_true")
    args = p.parse_args()
    if args.devices:
        os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
    if args.make:
        make(args.make, args.layers)
    if args.load:
        load(args.load, args.whole)


if __name__ == "__main__":
    main()
