#!/usr/bin/env python3
"""What int4 (and int8) cost against the float model on the Hugging Face fixtures: random
weights, so a harsh case (nothing in them is redundant, and near-ties between logits abound).

  python scripts/int4_report.py [--models llama,mixtral,mistral] [--new-tokens 40]

Per fixture and format, against the float32 weights it quantises (float32 activations):
  top-1    teacher-forced over the fixture's long prompt (expected.npz long_ids, 300
           positions): share of positions whose argmax equals float's
  err      per position, the largest |logit - float logit| over float's largest |logit|:
           median and p99 over those positions (the README's int8 protocol, tests/test_hf.py)
  greedy   free-running greedy of --new-tokens tokens from the fixture's prompts (and
           --random-prompts more): share of tokens equal to float's at the same step, and
           of sequences identical to float's
Formats: what --quantize int8 / int4 store (the loader's quantized_as), int8 per channel, and
int4 g32 asymmetric (quant4.quantize_int4(symmetric=False): no flag makes it yet). Numbers
go to BENCHMARKS.md ("int4 on the HF fixtures").
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

FIXTURES = ROOT / "tests" / "fixtures" / "hf"
# label -> (quantize_to, int8 group size, int4 group size, int4 symmetric)
FORMATS = {"float32": (None, 64, 32, True),
           "int8 per channel": ("int8", 0, 32, True),
           "int8 g64": ("int8", 64, 32, True),
           "int4 g32": ("int4", 64, 32, True),
           "int4 g64": ("int4", 64, 64, True),
           "int4 g128": ("int4", 64, 128, True),
           "int4 g32 asym": ("int4", 64, 32, False)}


def quantized(config, floats: dict, fmt: tuple) -> dict:
    """The float tree as `fmt` stores it. The asymmetric form follows --quantize int4 in all
    but the matmul weights (the tied table stays int8), so only the weight scheme differs."""
    from runtime.checkpoint.load import quantized_as
    from runtime.paths import quantized_kind
    from runtime.quant4 import quantize_int4
    quantize_to, int8_group, int4_group, symmetric = fmt

    def leaf_as(path, leaf):
        if not symmetric and quantized_kind(path, config) == "weight":
            return quantize_int4(leaf, int4_group, symmetric=False)
        return quantized_as(quantize_to, path, leaf, config, int8_group, int4_group)

    return {module: {name: leaf_as(f"{module}/{name}", leaf) for name, leaf in leaves.items()}
            for module, leaves in floats.items()}


def make_forward(model):
    """jitted (params, ids [1, T]) -> float32 logits [T, V]: one prefill, every position."""
    import jax
    import jax.numpy as jnp
    from runtime.memory import empty_kv

    @jax.jit
    def forward(params, ids):
        kv = empty_kv(model.config, 1, ids.shape[1], jnp.float32)
        logits, _, _ = model.apply(params, ids, kv, kv, jnp.arange(ids.shape[1])[None])
        return logits[0].astype(jnp.float32)

    return forward


def prompts_of(folder: Path, config, extra: int, length: int = 16) -> list[list[int]]:
    """The fixture's own prompts (expected.npz prompt_i), then `extra` random ones: three
    prompts alone make the identical-sequence share too coarse to read."""
    want = np.load(folder / "expected.npz")
    own = [want[f"prompt_{i}"].tolist() for i in range(3)]
    rng = np.random.default_rng(0)
    return own + rng.integers(3, config.vocab_size, (extra, length)).tolist()


def compare(logits, reference, tokens, ref_tokens) -> dict:
    """The report's measures of one format against float (module docstring)."""
    errors = np.abs(logits - reference).max(-1) / np.abs(reference).max(-1)
    same = tokens == ref_tokens
    return {"top1": float(np.mean(logits.argmax(-1) == reference.argmax(-1))),
            "err_median": float(np.median(errors)), "err_p99": float(np.percentile(errors, 99)),
            "greedy_tokens": float(same.mean()), "greedy_sequences": int(same.all(1).sum()),
            "prompts": len(same)}


def evaluate(name: str, new_tokens: int, extra_prompts: int) -> list[dict]:
    import eval_perplexity
    from int8_groups_report import float_params
    from runtime.checkpoint.hf_config import read_hf_config
    from runtime.checkpoint.load import load_params
    from runtime.models import build_model

    folder = FIXTURES / name
    config = read_hf_config(folder).replace(dtype="float32")
    floats = float_params(load_params(folder, config))
    model = build_model(config)
    forward = make_forward(model)
    want = np.load(folder / "expected.npz")
    prompts = prompts_of(folder, config, extra_prompts)
    # greedy's full forwards span the model's window: the fixture's 512 took most of the time
    window = max(map(len, prompts)) + new_tokens
    greedy_model = build_model(config.replace(sequence_len=window))
    rows, reference = [], None
    for label, fmt in FORMATS.items():
        params = quantized(config, floats, fmt)
        logits = np.asarray(forward(params, want["long_ids"]))
        tokens = eval_perplexity.greedy(greedy_model, params, prompts, new_tokens)
        if reference is None:  # float32 first: the reference, itself checked against transformers
            reference = logits, tokens
            check_float(name, want, logits, tokens)
        row = {"model": name, "format": label, **compare(logits, reference[0], tokens,
                                                         reference[1])}
        rows.append(row)
        print(f"{name:8s} {label:16s} top-1 {row['top1']:.1%}  err median "
              f"{row['err_median']:.4f} p99 {row['err_p99']:.4f}  greedy tokens "
              f"{row['greedy_tokens']:.1%} sequences {row['greedy_sequences']}/{row['prompts']}",
              flush=True)
    return rows


def check_float(name: str, want, logits, tokens) -> None:
    """The float reference is the transformers model the fixture was made from (else every
    row measures a bug, not a format)."""
    error = np.abs(logits - want["long_logits"][0]).max() / np.abs(want["long_logits"]).max()
    greedy_equal = all(tokens[i, :len(want[f"greedy_{i}"])].tolist()
                       == want[f"greedy_{i}"][:tokens.shape[1]].tolist() for i in range(3))
    print(f"{name}: float32 vs transformers: logit error {error:.2e} of the largest, greedy "
          f"{'equal' if greedy_equal else 'DIFFERS'}", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="llama,mixtral,mistral",
                   help="comma list of fixture names (tests/fixtures/hf)")
    p.add_argument("--new-tokens", type=int, default=40, help="the fixtures' greedy length")
    p.add_argument("--random-prompts", type=int, default=13,
                   help="random 16-token prompts added to the fixture's three")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    rows = [row for name in args.models.split(",")
            for row in evaluate(name, args.new_tokens, args.random_prompts)]
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
