#!/usr/bin/env python3
"""How far bf16 logits move with the program that computes them, with and without XLA's excess
precision (layout.BF16_OPTIONS), on the demo checkpoint with every matmul weight re-quantised to
int8 with `--row-blocks` scale row blocks (default 8; 0: the checkpoint as shipped, where only
the row-parallel weights have 8).

  python scripts/bf16_consistency.py [--row-blocks 8] [--contexts 15]

For growing prefixes of held-out text it prints, per compiler setting, the largest difference
between each context's bf16 prefill logits computed alone and inside a batch of all contexts
(the same function: any difference is where bf16 rounds), and both against float32 logits of
the same weights, in bf16 ulps of the largest logit. Numbers go to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def ulps(difference: float, magnitude: float) -> float:
    """difference in bf16 units in the last place of magnitude."""
    return difference / 2.0 ** (math.floor(math.log2(magnitude)) - 7)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--contexts", type=int, default=15)
    p.add_argument("--row-blocks", type=int, default=8)
    args = p.parse_args(argv)

    import jax
    import sentencepiece

    from runtime.checkpoint.load import load_params
    from runtime.paths import QUANTIZABLE
    from runtime.quant import QuantizedWeight8bit, dequantize, quantize
    from runtime.config import load_config
    from runtime.layout import BF16_OPTIONS
    from runtime.models import build_model

    demo = ROOT / "checkpoints" / "demo"
    config = load_config(demo / "config.yaml")
    params = load_params(demo, config)
    if args.row_blocks:
        params = {module: {name: quantize(dequantize(leaf) if isinstance(
            leaf, QuantizedWeight8bit) else leaf, args.row_blocks)
            if QUANTIZABLE.search(f"{module}/{name}") else leaf for name, leaf in leaves.items()}
            for module, leaves in params.items()}
    sp = sentencepiece.SentencePieceProcessor(model_file=str(demo / "tokenizer.model"))
    text = [1] + sp.encode((demo / "heldout.txt").read_text()[:2000])
    lengths = np.arange(30, 30 + 2 * args.contexts, 2, dtype=np.int32)
    tokens = np.zeros((len(lengths), int(lengths.max())), np.int32)
    for row, length in enumerate(lengths):
        tokens[row, :length] = text[:length]
    float32 = np.asarray(jax.jit(build_model(config).prefill)(params, tokens, lengths)[0])
    magnitude = float(np.abs(float32).max())
    bf16 = build_model(config.replace(dtype="bfloat16"))
    print(f"demo ({args.row_blocks or 'as shipped'} row blocks), {len(lengths)} contexts of {lengths.min()}-{lengths.max()} tokens, largest "
          f"logit {magnitude:.2f} (1 bf16 ulp = {ulps(1, magnitude) ** -1:.4f})")
    print("| XLA options | alone vs in a batch | batch vs float32 | alone vs float32 |")
    print("| --- | --- | --- | --- |")
    for name, options in (("default (excess precision)", None),
                          ("BF16_OPTIONS", BF16_OPTIONS)):
        prefill = jax.jit(bf16.prefill, compiler_options=options)
        batched = np.asarray(prefill(params, tokens, lengths)[0], np.float32)
        alone = np.stack([np.asarray(prefill(params, tokens[i:i + 1], lengths[i:i + 1])[0][0],
                                     np.float32) for i in range(len(lengths))])
        cells = [np.abs(batched - alone).max(), np.abs(batched - float32).max(),
                 np.abs(alone - float32).max()]
        print(f"| {name} | " + " | ".join(f"{c:.3f} ({ulps(c, magnitude):.1f} ulps)"
                                         for c in cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
