"""How close the fused prompt attention (layout.FUSED_ATTENTION: cuDNN through
jax.nn.dot_product_attention on GPUs) is to the pure-JAX blockwise path it replaces, on a small
random Llama-family model in bf16, against a float32 run of the same weights as the reference.

  python scripts/check_fused_attention.py [--length 4096] [--implementation cudnn]

Prints one JSON line: max |logit difference| of each bf16 path from the float32 reference.
On the CPU pass --implementation xla (cuDNN is a GPU kernel).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_runtime import model_config, random_params  # noqa: E402
from runtime import layout  # noqa: E402
from runtime.models import build_model  # noqa: E402

SHAPE = dict(architectures=["LlamaForCausalLM"], vocab_size=4096, hidden_size=1024,
             intermediate_size=2048, num_hidden_layers=2, num_attention_heads=8,
             num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-5,
             rope_theta=500000.0, tie_word_embeddings=False)


def prefill_logits(config, params, tokens, lengths, implementation):
    layout.FUSED_ATTENTION = implementation
    model = build_model(config)
    return np.asarray(jax.jit(model.prefill)(params, tokens, lengths)[0], np.float64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--implementation", default="cudnn")
    args = parser.parse_args()
    spec = {"hf_config": SHAPE, "weights": "float32"}
    reference_config = model_config(spec, args.length)
    params = random_params(reference_config, "float32", 0)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(3, SHAPE["vocab_size"], (2, args.length)), jnp.int32)
    lengths = jnp.asarray([args.length, args.length - 77], jnp.int32)
    reference = prefill_logits(reference_config, params, tokens, lengths, None)
    config = reference_config.replace(dtype="bfloat16")
    bf16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    out = {"length": args.length, "implementation": args.implementation,
           "backend": jax.default_backend(), "logit_scale": float(np.abs(reference).max())}
    for name, implementation in (("blockwise", None), ("fused", args.implementation)):
        logits = prefill_logits(config, bf16, tokens, lengths, implementation)
        out[f"{name}_max_abs_diff"] = float(np.abs(logits - reference).max())
        out[f"{name}_argmax_agree"] = float((logits.argmax(-1) == reference.argmax(-1)).mean())
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
