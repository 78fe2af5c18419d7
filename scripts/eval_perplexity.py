#!/usr/bin/env python3
"""Held-out perplexity of a checkpoint: exp(mean next-token negative log-likelihood).

  python scripts/eval_perplexity.py                       # checkpoints/demo on its heldout.txt
  python scripts/eval_perplexity.py checkpoints/demo --text FILE --max-windows 8

The protocol (shared by scripts/train_demo.py and tests/test_demo_checkpoint.py): the text is a
list of documents separated by DOC_SEPARATOR; each is encoded as [BOS] ids [EOS] and the encodings
are concatenated into one stream. The stream is cut into windows of sequence_len tokens that
overlap by one token, so every token after the first is predicted exactly once, from the tokens
before it in its window. Only the model's own forward (runtime.models) is used, with the weights
as given: float32 arrays or int8 QuantizedWeight8bit exactly as the ckpt-0 reader returns them.
"""

from __future__ import annotations

import argparse
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
    """jitted (params, tokens [B, T], mask [B, T-1]) -> (summed NLL, target count)."""
    import jax
    import jax.numpy as jnp
    from runtime.memory import empty_kv

    c = model.config

    @jax.jit
    def nll(params, tokens, mask):
        batch, length = tokens.shape
        kv = empty_kv(c, batch, length, jnp.float32)
        positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32)[None], (batch, length))
        logits, _, _ = model.apply(params, tokens, kv, kv, positions)
        logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
        picked = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
        return -jnp.sum(jnp.where(mask, picked, 0.0)), jnp.sum(mask)

    return nll


def perplexity(model, params, ids: np.ndarray, batch: int = 8,
               max_windows: int | None = None) -> tuple[float, int]:
    """(perplexity, number of predicted tokens) of the stream `ids` under `params`."""
    c = model.config
    tokens, mask = windows(ids, c.sequence_len, c.pad_token)
    if max_windows is not None:
        tokens, mask = tokens[:max_windows], mask[:max_windows]
    nll_fn = make_nll_fn(model)
    total, count = 0.0, 0
    for start in range(0, len(tokens), batch):
        t, m = tokens[start:start + batch], mask[start:start + batch]
        if len(t) < batch:  # pad the last batch with fully masked windows: one compiled shape
            t = np.concatenate([t, np.full((batch - len(t), t.shape[1]), c.pad_token, np.int32)])
            m = np.concatenate([m, np.zeros((batch - len(m), m.shape[1]), bool)])
        s, n = nll_fn(params, t, m)
        total += float(s)
        count += int(n)
    return math.exp(total / count), count


def checkpoint_perplexity(directory: Path, text_path: Path | None = None, batch: int = 8,
                          max_windows: int | None = None) -> tuple[float, int]:
    """Perplexity of the ckpt-0 checkpoint in `directory` (with its config.yaml and
    tokenizer.model) on `text_path` (default: its heldout.txt), weights as the reader returns."""
    from runtime.checkpoint.load import load_params
    from runtime.config import load_config
    from runtime.models import build_model
    from runtime.tokenizer import Tokenizer

    directory = Path(directory)
    config = load_config(directory / "config.yaml")
    tokenizer = Tokenizer(directory / "tokenizer.model")
    text = (text_path or directory / "heldout.txt").read_text(encoding="utf-8")
    ids = encode_documents(tokenizer, split_documents(text), config.bos_token, config.eos_token)
    params = load_params(directory, config, kind="ckpt-0")
    return perplexity(build_model(config), params, ids, batch=batch, max_windows=max_windows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", type=Path, nargs="?", default=ROOT / "checkpoints" / "demo")
    p.add_argument("--text", type=Path, default=None,
                   help="documents separated by form-feed lines (default: heldout.txt in the "
                        "checkpoint folder)")
    p.add_argument("--max-windows", type=int, default=None)
    p.add_argument("--batch", type=int, default=8)
    args = p.parse_args(argv)
    ppl, count = checkpoint_perplexity(args.checkpoint, args.text, args.batch, args.max_windows)
    print(f"perplexity {ppl:.3f} over {count} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
