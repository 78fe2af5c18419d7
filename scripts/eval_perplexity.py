#!/usr/bin/env python3
"""Held-out perplexity of a checkpoint: exp(mean next-token negative log-likelihood).

  python scripts/eval_perplexity.py                       # checkpoints/demo on its heldout.txt
  python scripts/eval_perplexity.py checkpoints/demo --text FILE --max-windows 8
  python scripts/eval_perplexity.py --quantize int4 --group-size 64 --dequantize
  python scripts/eval_perplexity.py --kv-dtype float16    # keys and values rounded as stored
  python scripts/eval_perplexity.py --compare             # float, int8, int4 g32/g64/g128, KV

--quantize / --group-size / --int8-group-size are run.py's flags, applied by the same loader
functions; --dequantize first widens int8 weights stored in the checkpoint to float32 (the
demo ships int8 attention and expert weights, which --quantize int4 would otherwise keep), so
that int4 is measured against the float model it quantises. --compare prints one row per
setting: perplexity, top-1 agreement with the float model at every held-out position, and
greedy agreement over a few prompts.

The protocol (shared by scripts/train_demo.py and tests/test_demo_checkpoint.py): the text is a
list of documents separated by DOC_SEPARATOR; each is encoded as [BOS] ids [EOS] and the encodings
are concatenated into one stream. The stream is cut into windows of sequence_len tokens that
overlap by one token, so every token after the first is predicted exactly once, from the tokens
before it in its window. Only the model's own forward (runtime.models) is used, with the weights
as given: float32 arrays or int8 QuantizedWeight8bit exactly as the ckpt-0 reader returns them
(or as --quantize stores them).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DOC_SEPARATOR = "\n\f\n"  # between documents in heldout.txt (a form feed on its own line)


def split_documents(text: str) -> list[str]:
    return [doc for doc in text.split(DOC_SEPARATOR) if doc.strip()]


def encode_documents(tokenizer, docs, bos: int, eos: int) -> np.ndarray:
    """[BOS] doc [EOS] for every document, concatenated: int32 [N]."""
    ids = []
    for doc in docs:
        ids.append(bos)
        ids.extend(tokenizer.encode(doc))
        ids.append(eos)
    return np.asarray(ids, np.int32)


def windows(ids: np.ndarray, length: int, pad: int):
    """Windows [W, length] overlapping by one token, and the mask [W, length - 1] of the targets
    each window predicts (False at padding past the end of the stream)."""
    stride = length - 1
    count = max(1, math.ceil((len(ids) - 1) / stride))
    tokens = np.full((count, length), pad, np.int32)
    mask = np.zeros((count, length - 1), bool)
    for w in range(count):
        chunk = ids[w * stride: w * stride + length]
        tokens[w, :len(chunk)] = chunk
        mask[w, :len(chunk) - 1] = True
    return tokens, mask


def make_nll_fn(model):
    """jitted (params, tokens [B, T], mask [B, T-1]) -> (summed NLL, target count, top-1
    predictions [B, T-1])."""
    import jax
    import jax.numpy as jnp
    from runtime.memory import empty_kv

    c = model.config

    @jax.jit
    def nll(params, tokens, mask):
        batch, length = tokens.shape
        kv = empty_kv(c, batch, length, c.kv_dtype or jnp.float32)  # --kv-dtype: keys rounded
        positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32)[None], (batch, length))
        logits, _, _ = model.apply(params, tokens, kv, kv, positions)
        logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
        picked = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
        return -jnp.sum(jnp.where(mask, picked, 0.0)), jnp.sum(mask), jnp.argmax(logp, -1)

    return nll


def perplexity(model, params, ids: np.ndarray, batch: int = 8,
               max_windows: int | None = None) -> tuple[float, int]:
    """(perplexity, number of predicted tokens) of the stream `ids` under `params`."""
    ppl, count, _ = scored(model, params, ids, batch, max_windows)
    return ppl, count


def scored(model, params, ids: np.ndarray, batch: int = 8, max_windows: int | None = None):
    """(perplexity, predicted tokens, top-1 predictions at those positions [count])."""
    c = model.config
    tokens, mask = windows(ids, c.sequence_len, c.pad_token)
    if max_windows is not None:
        tokens, mask = tokens[:max_windows], mask[:max_windows]
    nll_fn = make_nll_fn(model)
    total, count, top = 0.0, 0, []
    for start in range(0, len(tokens), batch):
        t, m = tokens[start:start + batch], mask[start:start + batch]
        if len(t) < batch:  # pad the last batch with fully masked windows: one compiled shape
            t = np.concatenate([t, np.full((batch - len(t), t.shape[1]), c.pad_token, np.int32)])
            m = np.concatenate([m, np.zeros((batch - len(m), m.shape[1]), bool)])
        s, n, best = nll_fn(params, t, m)
        total += float(s)
        count += int(n)
        top.append(np.asarray(best)[m])
    return math.exp(total / count), count, np.concatenate(top)


def dequantized(params) -> dict:
    """The tree with every int8 weight widened to float32 (the float model it stands for)."""
    from runtime.quant import QuantizedWeight8bit, dequantize
    return {module: {name: dequantize(leaf) if isinstance(leaf, QuantizedWeight8bit) else leaf
                     for name, leaf in leaves.items()} for module, leaves in params.items()}


def quantized_params(directory: Path, config, quantize: str | None = None,
                     group_size: int = 32, int8_group_size: int = 64,
                     dequantize: bool = False) -> dict:
    """The checkpoint's parameters as run.py --quantize stores them (the loader's own
    functions); with `dequantize`, its int8 weights widened to float32 first."""
    from runtime.checkpoint.load import load_params, quantized_as
    if not dequantize:
        return load_params(directory, config, quantize, int8_group_size=int8_group_size,
                           group_size=group_size)
    floats = dequantized(load_params(directory, config))
    return {module: {name: quantized_as(quantize, f"{module}/{name}", leaf, config,
                                        int8_group_size, group_size)
                     for name, leaf in leaves.items()} for module, leaves in floats.items()}


def _opened(directory: Path, text_path: Path | None):
    """(config, tokenizer, held-out ids) of a checkpoint folder with config.yaml and
    tokenizer.model."""
    from runtime.config import load_config
    from runtime.tokenizer import Tokenizer
    config = load_config(Path(directory) / "config.yaml")
    tokenizer = Tokenizer(Path(directory) / "tokenizer.model")
    text = (text_path or Path(directory) / "heldout.txt").read_text(encoding="utf-8")
    ids = encode_documents(tokenizer, split_documents(text), config.bos_token, config.eos_token)
    return config, tokenizer, ids


def checkpoint_perplexity(directory: Path, text_path: Path | None = None, batch: int = 8,
                          max_windows: int | None = None, kv_dtype: str | None = None,
                          **quantize) -> tuple[float, int]:
    """Perplexity of the checkpoint in `directory` (with its config.yaml and tokenizer.model)
    on `text_path` (default: its heldout.txt), weights as the reader returns them, or as
    quantized_params' keyword arguments (quantize, group_size, ...) make them; every key and
    value rounded to kv_dtype first (None: float32), as decode reads them from such a memory."""
    from runtime.models import build_model
    config, _, ids = _opened(directory, text_path)
    params = quantized_params(Path(directory), config, **quantize)
    return perplexity(build_model(config.replace(kv_dtype=kv_dtype)), params, ids, batch=batch,
                      max_windows=max_windows)


PROMPTS = ("Return the", "If the argument is", "This module provides", "The file is",
           "Raise an exception if", "Return a new list of")


def greedy(model, params, prompts: list[list[int]], steps: int) -> np.ndarray:
    """Greedy continuations [P, steps] of `prompts` by full forwards over one padded window
    (no KV memory: the reference the engine's decode must equal)."""
    import jax
    import jax.numpy as jnp
    from runtime.memory import empty_kv

    c = model.config
    tokens = np.full((len(prompts), c.sequence_len), c.pad_token, np.int32)
    lengths = np.array([len(p) for p in prompts])
    for row, prompt in enumerate(prompts):
        tokens[row, :len(prompt)] = prompt

    @jax.jit
    def next_tokens(params, tokens, last):
        kv = empty_kv(c, tokens.shape[0], tokens.shape[1], c.kv_dtype or jnp.float32)
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        logits, _, _ = model.apply(params, tokens, kv, kv, positions)
        return jnp.argmax(logits[jnp.arange(tokens.shape[0]), last], -1)

    out = []
    for step in range(steps):
        chosen = np.asarray(next_tokens(params, tokens, lengths - 1 + step))
        tokens[np.arange(len(prompts)), lengths + step] = chosen
        out.append(chosen)
    return np.stack(out, axis=1)


SETTINGS = (("float (int8 dequantised)", dict(dequantize=True)),
            ("int8 as stored", dict()),
            ("int8 g64 (--quantize int8)", dict(quantize="int8", int8_group_size=64,
                                                dequantize=True)),
            ("int4 g32", dict(quantize="int4", group_size=32, dequantize=True)),
            ("int4 g64", dict(quantize="int4", group_size=64, dequantize=True)),
            ("int4 g128", dict(quantize="int4", group_size=128, dequantize=True)),
            ("int8 as stored, int8 activations", dict(int8_activations=True)),
            ("int8 g64, int8 activations", dict(quantize="int8", int8_group_size=64,
                                                dequantize=True, int8_activations=True)),
            ("int4 g32, int8 activations", dict(quantize="int4", group_size=32, dequantize=True,
                                                int8_activations=True)),
            ("int4 g64, int8 activations", dict(quantize="int4", group_size=64, dequantize=True,
                                                int8_activations=True)),
            ("int8 as stored, bf16 KV memory", dict(kv_dtype="bfloat16")),
            ("int8 as stored, f16 KV memory", dict(kv_dtype="float16")))


@contextlib.contextmanager
def int8_activations(enabled: bool):
    """run.py --int8-activations (layout.INT8_ACTIVATIONS) while the programs are traced."""
    from runtime import layout
    saved, layout.INT8_ACTIVATIONS = layout.INT8_ACTIVATIONS, enabled
    try:
        yield
    finally:
        layout.INT8_ACTIVATIONS = saved


def compare(directory: Path, text_path: Path | None, batch: int, max_windows: int | None,
            steps: int = 16) -> list[str]:
    """One row per SETTINGS entry: perplexity, top-1 agreement with the float model over the
    held-out positions, greedy agreement with it over PROMPTS (positions equal; prompts whose
    `steps` tokens are all equal)."""
    from runtime.models import build_model
    config, tokenizer, ids = _opened(directory, text_path)
    prompts = [tokenizer.encode(text) for text in PROMPTS]
    rows, reference = [], None
    for label, settings in SETTINGS:
        settings = dict(settings)
        model = build_model(config.replace(kv_dtype=settings.pop("kv_dtype", None)))
        with int8_activations(settings.pop("int8_activations", False)):
            params = quantized_params(Path(directory), config, **settings)
            ppl, count, top = scored(model, params, ids, batch, max_windows)
            tokens = greedy(model, params, prompts, steps)
        reference = reference or (top, tokens)
        rows.append(f"| {label} | {ppl:.3f} | {np.mean(top == reference[0]):.2%} | "
                    f"{np.mean(tokens == reference[1]):.1%} | "
                    f"{int(np.all(tokens == reference[1], axis=1).sum())}/{len(prompts)} |")
    return [f"held-out tokens: {count}; greedy: {len(prompts)} prompts x {steps} tokens",
            "| weights | perplexity | top-1 = float | greedy tokens = float | "
            "greedy prompts = float |", "| --- | --- | --- | --- | --- |"] + rows


def main(argv=None) -> int:
    from runtime.cli import group_size, int4_group_size
    from runtime.config import KV_DTYPES
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", type=Path, nargs="?", default=ROOT / "checkpoints" / "demo")
    p.add_argument("--text", type=Path, default=None,
                   help="documents separated by form-feed lines (default: heldout.txt in the "
                        "checkpoint folder)")
    p.add_argument("--max-windows", type=int, default=None)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--quantize", choices=("int8", "int4"), default=None, help="as run.py's")
    p.add_argument("--group-size", type=int4_group_size, default=32, help="as run.py's")
    p.add_argument("--int8-group-size", type=group_size, default=64, help="as run.py's")
    p.add_argument("--dequantize", action="store_true",
                   help="widen int8 weights stored in the checkpoint to float32 before "
                        "--quantize (the float model)")
    p.add_argument("--int8-activations", action="store_true", help="as run.py's")
    p.add_argument("--kv-dtype", choices=KV_DTYPES, default=None,
                   help="as run.py's: keys and values rounded to it (default float32)")
    p.add_argument("--compare", action="store_true",
                   help="a table of float, int8 and int4 (g32, g64, g128; with int8 "
                        "activations) weights")
    args = p.parse_args(argv)
    if args.compare:
        print("\n".join(compare(args.checkpoint, args.text, args.batch, args.max_windows)))
        return 0
    with int8_activations(args.int8_activations):
        ppl, count = checkpoint_perplexity(args.checkpoint, args.text, args.batch,
                                           args.max_windows, quantize=args.quantize,
                                           group_size=args.group_size,
                                           int8_group_size=args.int8_group_size,
                                           dequantize=args.dequantize, kv_dtype=args.kv_dtype)
    print(f"perplexity {ppl:.3f} over {count} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
