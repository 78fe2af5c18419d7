#!/usr/bin/env python3
"""What int8 costs in accuracy, per scale layout: one scale per output channel against groups
of 32 / 64 / 128 input rows (--int8-group-size), the tied table int8 too (--quantize int8 does
both), on the demo checkpoint and the Hugging Face fixtures.

  python scripts/int8_groups_report.py [--prompts 8] [--new-tokens 48] [--json out.json]

Per model and layout, against the float32 weights of the same model (the demo ships int8 with
its own scales: its float32 model is those weights dequantised and dithered, see float_params):
  ppl      held-out perplexity (the demo's heldout.txt; eval_perplexity's protocol)
  agree    greedy agreement: tokens generated before the first one that differs from the
           float32 model's greedy continuation, averaged over prompts (and the minimum)
  logit    mean |logit - float32 logit| over the greedy path's positions
The fixtures have random weights: their perplexity means nothing and is not printed, but
agreement and logit error show the scheme's effect. Numbers go to BENCHMARKS.md ("Group-wise
int8").
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

LAYOUTS = {"per channel": 0, "groups of 128": 128, "groups of 64": 64, "groups of 32": 32}
FIXTURES = ("llama", "llama3", "mistral", "mixtral", "mamba2")


def float_params(params, seed: int = 0):
    """Float32 weights: float leaves as they are; an int8 leaf (the demo's, quantised before it
    shipped) dequantised and dithered, each value drawn uniformly within its rounding cell
    (+- half its scale). Dequantised alone, the weights would sit on the per-channel grid
    they were quantised to, and re-quantising them per channel would reproduce them exactly:
    a reference that favours the layout it came from. The dithered weights are as likely a
    float original as any, and every layout rounds them afresh."""
    from runtime.quant import QuantizedWeight8bit, dequantize
    rng = np.random.default_rng(seed)

    def dithered(leaf):
        step = np.repeat(np.asarray(leaf.scales, np.float32),
                         leaf.weight.shape[-2] // leaf.scales.shape[-2], axis=-2)
        return dequantize(leaf) + step * rng.uniform(-0.5, 0.5, step.shape).astype(np.float32)

    return {module: {name: dithered(leaf) if isinstance(leaf, QuantizedWeight8bit)
                     else np.asarray(leaf, np.float32) for name, leaf in leaves.items()}
            for module, leaves in params.items()}


def int8_params(config, params, group_size: int):
    """What --quantize int8 --int8-group-size N stores for these float weights."""
    from runtime.checkpoint.load import quantized_int8
    return {module: {name: quantized_int8(f"{module}/{name}", leaf, config, group_size)
                     for name, leaf in leaves.items()} for module, leaves in params.items()}


def make_last_logits_fn(model, length: int):
    """jitted (params, tokens [B, length], lengths [B]) -> float32 logits [B, V] after each row's
    first `lengths` tokens: the family's own prefill (or a step on new memory)."""
    import jax

    @jax.jit
    def logits(params, tokens, lengths):
        if model.prefill is not None:
            return model.prefill(params, tokens, lengths)[0]
        memory = model.new_memory(tokens.shape[0], length)
        return model.step(params, memory, tokens, lengths)[0]

    return logits


def greedy(logits_fn, params, prompts: np.ndarray, new_tokens: int):
    """Greedy continuations [B, new] and the logits [B, new, V] each token was chosen from
    (every step a prefill of the whole window: one compiled shape)."""
    batch, prompt_len = prompts.shape
    tokens = np.zeros((batch, prompt_len + new_tokens), np.int32)
    tokens[:, :prompt_len] = prompts
    chosen_from = []
    for step in range(new_tokens):
        lengths = np.full(batch, prompt_len + step, np.int32)
        logits = np.asarray(logits_fn(params, tokens, lengths), np.float32)
        chosen_from.append(logits)
        tokens[:, prompt_len + step] = logits.argmax(-1)
    return tokens[:, prompt_len:], np.stack(chosen_from, 1)


def agreement(reference: np.ndarray, other: np.ndarray) -> np.ndarray:
    """Per row, how many leading tokens equal the reference's."""
    differs = reference != other
    return np.where(differs.any(1), differs.argmax(1), reference.shape[1])


def teacher_forced_error(logits_fn, params, tokens, reference_logits, prompt_len) -> float:
    """Mean |logit - reference| along the reference's own greedy path."""
    batch, new_tokens = reference_logits.shape[:2]
    logits = np.stack([np.asarray(logits_fn(params, tokens, np.full(batch, prompt_len + i,
                                                                     np.int32)), np.float32)
                       for i in range(new_tokens)], 1)
    return float(np.abs(logits - reference_logits).mean())


def evaluate(name, config, params, prompts, new_tokens, heldout=None) -> list[dict]:
    from runtime.models import build_model
    import eval_perplexity

    model = build_model(config.replace(dtype="float32"))
    logits_fn = make_last_logits_fn(model, prompts.shape[1] + new_tokens)
    reference = params
    ref_tokens, ref_logits = greedy(logits_fn, reference, prompts, new_tokens)
    path = np.concatenate([prompts, ref_tokens], 1)
    rows = []
    for label, group in [("float32", None)] + list(LAYOUTS.items()):
        weights = reference if group is None else int8_params(config, reference, group)
        tokens, _ = greedy(logits_fn, weights, prompts, new_tokens)
        agree = agreement(ref_tokens, tokens)
        row = {"model": name, "layout": label, "agree_mean": float(agree.mean()),
               "agree_min": int(agree.min()),
               "logit_error": teacher_forced_error(logits_fn, weights, path, ref_logits,
                                                   prompts.shape[1])}
        if heldout is not None:
            row["perplexity"] = eval_perplexity.perplexity(model, weights, heldout)[0]
        rows.append(row)
        print(f"{name:8s} {label:14s} " + "  ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
            for k, v in row.items() if k not in ("model", "layout")), flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompts", type=int, default=24)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--models", default="demo," + ",".join(FIXTURES),
                   help="comma list: demo, fixture names, or Hugging Face model folders")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    import sentencepiece
    import eval_perplexity
    from runtime.checkpoint.hf_config import read_hf_config
    from runtime.checkpoint.load import load_params
    from runtime.config import load_config

    rows = []
    for name in args.models.split(","):
        if name == "demo":
            folder = ROOT / "checkpoints" / "demo"
            config = load_config(folder / "config.yaml")
            sp = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
            docs = eval_perplexity.split_documents((folder / "heldout.txt").read_text())
            heldout = eval_perplexity.encode_documents(sp, docs, config.bos_token,
                                                       config.eos_token)
            # prompts: the start of held-out documents
            prompts = np.stack([eval_perplexity.encode_documents(sp, [doc], config.bos_token,
                                                                 config.eos_token)
                                [:args.prompt_tokens] for doc in docs[:args.prompts]])
        else:  # a fixture's name, or any Hugging Face model folder
            folder = Path(name) if Path(name).is_dir() else ROOT / "tests" / "fixtures" / "hf" / name
            config = read_hf_config(folder)
            heldout = None
            prompts = np.random.default_rng(0).integers(
                3, config.vocab_size, (args.prompts, args.prompt_tokens)).astype(np.int32)
        params = float_params(load_params(folder, config))
        rows += evaluate(name, config, params, prompts, args.new_tokens, heldout)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
