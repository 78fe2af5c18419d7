#!/usr/bin/env python3
"""Generate tests/fixtures/palm_aft/: a tiny random Palm (github SrijanSriv211/Palm, commit
89b0bf8) checkpoint and tokenizer in exactly the files Palm writes, and what torch computes.

  pip install torch regex      # fixture generation only, not runtime dependencies
  python scripts/make_palm_aft_fixtures.py

Palm itself is not imported: the model and the encoder are re-stated here from the facts of its
src/model.py and src/encoder.py (below), in torch, with the same state-dict names, so that
`torch.save` writes what Palm's train.py writes:

- s8.bin: torch.save({"model": state_dict, "optimizers": [AdamW state, SGD-momentum state (in
  place of Muon's momentum buffers)], "hyperparams": {vocab_size, block_size, n_layer, d_layer,
  n_head, n_embd, d_rank, d_qkv}, "device": "cpu", "stats": {"steps", "train": [0-d tensors],
  "eval", "val", "lr"}}), after two optimizer steps (so the optimizer state holds tensors);
- s8_compiled.bin: the same with every model key prefixed `_orig_mod.` (torch.compile's);
- s8_bf16.bin: the same weights stored in bfloat16;
- encoder.bin: pickle.dump({"pattern", "special", "vocab"}) as Encoder.save writes it (a BPE
  trained here on the Zen of Python: 256 bytes + 63 merges, then one special token: 320 ids);
- weights.npz: the float32 state dict (torch layout) for tests/reference_palm_numpy.py;
- expected.npz / expected.json: torch's logits of three prompts at every position, greedy
  continuations (32 tokens, argmax of a full recomputation per step: Palm's own generate() does
  not append the token when temperature is 0), the encoder's ids of sample texts by a literal
  re-statement of its merge loop, and run.py's expected ids and text.

Facts re-stated (Palm's model.py / encoder.py at 89b0bf8):
- norm = F.rms_norm over the last axis without weight (eps: float32's machine epsilon);
- CastedLinear(in, out, rank): w1 [rank, in], w2 [out, rank]; forward(x, act) = F.linear(x, w1),
  relu^2 if act, F.linear(., w2); without rank one w1 [out, in]; init uniform(+-sqrt(3) * 0.5 /
  sqrt(in)) for both;
- embed = Sequential(Embedding(V, rank), CastedLinear(rank, D)) then norm; unembed =
  CastedLinear(D, V, rank) after norm (no act);
- block: q, k, v = qkv(norm(x), act=True) viewed [B, T, 3N, H] and chunked in 3; per-head norm of
  q and k; rotary (H/4 frequencies (1/1024) ** linspace(0, 1, H/4), H/4 zeros; y1 = x1 cos + x2
  sin, y2 = -x1 sin + x2 cos); y = relu(q) * cumsum_t(sigmoid(k) v); u, g = c_proj(y) chunked
  in 2; x + u * silu(g); every block applied d_layer times in a row;
- encoder: GPT-4 split pattern (regex module), special tokens split out first (allowed "all"),
  each chunk's bytes merged leftmost-first, restarting from the left after each merge, with
  the inverse vocab {bytes: id} (last id wins); decode joins bytes, errors="replace".
"""

from __future__ import annotations

import codecs
import contextlib
import io
import json
import pickle
import sys
from pathlib import Path

import numpy as np
import regex
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "palm_aft"

# The GPT-4 split pattern (tiktoken's cl100k_base), as Palm's encoder uses it.
GPT4_SPLIT_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}|"""
                      r""" ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+""")
SPECIAL = "<|endoftext|>"
MERGES = 63
HYPERPARAMS = dict(vocab_size=256 + MERGES + 1, block_size=64, n_layer=2, d_layer=2, n_head=4,
                   n_embd=32, d_rank=16, d_qkv=32)
PROMPTS = ["Beautiful is better than", "Errors should never pass",
           "<|endoftext|>Now is better than never. naïve café ☕ 1234"]
RUN_PROMPT = "Simple is better than"
GREEDY = 32
SEED = 1


# --- the encoder -----------------------------------------------------------------------------

def train_vocab(text: str) -> dict:
    """256 byte ids, then MERGES merges of the most frequent adjacent pair (the first seen on
    ties), counted over the pattern's chunks."""
    vocab = {i: bytes([i]) for i in range(256)}
    chunks = [list(c.encode()) for c in regex.findall(GPT4_SPLIT_PATTERN, text)]
    for new in range(256, 256 + MERGES):
        counts: dict = {}
        for ids in chunks:
            for pair in zip(ids, ids[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        pair = max(counts, key=counts.get)
        vocab[new] = vocab[pair[0]] + vocab[pair[1]]
        chunks = [merge(ids, pair, new) for ids in chunks]
    return vocab


def merge(ids, pair, new):
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
            out.append(new)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def encode(text: str, vocab: dict, special: dict) -> list[int]:
    """Literally as the encoder's loop: restart from the left after every merge."""
    inverse = {b: i for i, b in vocab.items()}
    parts = regex.split("(" + "|".join(regex.escape(s) for s in special) + ")", text)
    ids = []
    for part in parts:
        if part in special:
            ids.append(special[part])
            continue
        for chunk in regex.findall(GPT4_SPLIT_PATTERN, part):
            chunk_ids = list(chunk.encode("utf-8"))
            first = 0
            while first + 1 < len(chunk_ids):
                joined = vocab[chunk_ids[first]] + vocab[chunk_ids[first + 1]]
                if joined in inverse:
                    chunk_ids[first:first + 2] = [inverse[joined]]
                    first = 0
                else:
                    first += 1
            ids.extend(chunk_ids)
    return ids


def decode(ids, vocab: dict, special: dict) -> str:
    names = {i: s for s, i in special.items()}
    return b"".join(vocab[i] if i in vocab else names[i].encode() for i in ids).decode(
        "utf-8", errors="replace")


# --- the model -------------------------------------------------------------------------------

def rms(x):
    return F.rms_norm(x, (x.size(-1),))


class Factorized(nn.Module):
    """Palm's CastedLinear: full rank (w1 [out, in]) or w1 [rank, in] then w2 [out, rank]."""

    def __init__(self, n_in: int, n_out: int, rank: int | None = None):
        super().__init__()
        bound = 3 ** 0.5 * 0.5 * n_in ** -0.5
        first = n_out if rank is None else rank
        self.w1 = nn.Parameter(torch.empty(first, n_in).uniform_(-bound, bound))
        self.rank = rank
        if rank is not None:
            self.w2 = nn.Parameter(torch.empty(n_out, rank).uniform_(-bound, bound))

    def forward(self, x, act: bool = False):
        h = x @ self.w1.T
        if self.rank is None:
            return h
        return (torch.relu(h).square() if act else h) @ self.w2.T


def rotate(x):
    """x [B, T, N, H]: Palm's half-truncated rotary at positions 0..T-1."""
    quarter = x.size(-1) // 4
    freqs = (1 / 1024) ** torch.linspace(0, 1, steps=quarter, dtype=torch.float32)
    freqs = torch.cat([freqs, freqs.new_zeros(quarter)])
    theta = torch.arange(x.size(1), dtype=torch.float32)[:, None] * freqs  # [T, H/2]
    cos, sin = theta.cos()[None, :, None], theta.sin()[None, :, None]
    a, b = x.float().chunk(2, dim=-1)
    return torch.cat([a * cos + b * sin, b * cos - a * sin], dim=-1).type_as(x)


class Block(nn.Module):
    def __init__(self, h: dict):
        super().__init__()
        self.heads, self.dim = h["n_head"], h["d_qkv"] // h["n_head"]
        self.qkv = Factorized(h["n_embd"], 3 * h["d_qkv"], h["d_rank"])
        self.c_proj = Factorized(h["d_qkv"], 2 * h["n_embd"], h["d_rank"])

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv(rms(x), True).view(b, t, 3 * self.heads, self.dim).chunk(3, dim=2)
        q, k = rotate(rms(q)), rotate(rms(k))
        y = (torch.relu(q) * torch.cumsum(torch.sigmoid(k) * v, dim=1)).reshape(b, t, -1)
        u, g = self.c_proj(y).chunk(2, dim=-1)
        return x + u * F.silu(g)


class Palm(nn.Module):
    def __init__(self, h: dict):
        super().__init__()
        self.h = h
        self.embed = nn.Sequential(nn.Embedding(h["vocab_size"], h["d_rank"]),
                                   Factorized(h["d_rank"], h["n_embd"]))
        self.blocks = nn.ModuleList([Block(h) for _ in range(h["n_layer"])])
        self.unembed = Factorized(h["n_embd"], h["vocab_size"], h["d_rank"])

    def forward(self, idx):
        x = rms(self.embed(idx))
        for block in self.blocks:
            for _ in range(self.h["d_layer"]):
                x = block(x)
        return self.unembed(rms(x))


@torch.no_grad()
def greedy(model, ids: list[int], steps: int) -> tuple[list[int], float]:
    """(new ids, the smallest top-1 / top-2 logit gap met): argmax of a full recomputation."""
    idx, gap = torch.tensor([ids]), float("inf")
    for _ in range(steps):
        logits = model(idx)[0, -1]
        top = torch.topk(logits, 2).values
        gap = min(gap, float(top[0] - top[1]))
        idx = torch.cat([idx, logits.argmax().view(1, 1)], dim=1)
    return idx[0, len(ids):].tolist(), gap


def trained_state(model) -> list:
    """Two optimizer steps on a next-token loss, so the optimizers hold state tensors: AdamW
    over the embeddings, SGD with momentum (Muon's momentum buffers) over the blocks."""
    embed = [p for n, p in model.named_parameters() if "embed" in n]
    hidden = [p for n, p in model.named_parameters() if "embed" not in n]
    optimizers = [torch.optim.AdamW(embed, lr=1e-3), torch.optim.SGD(hidden, lr=1e-3,
                                                                       momentum=0.9)]
    data = torch.randint(0, model.h["vocab_size"], (2, 17))
    for _ in range(2):
        loss = F.cross_entropy(model(data[:, :-1]).flatten(0, 1), data[:, 1:].flatten())
        loss.backward()
        for o in optimizers:
            o.step()
            o.zero_grad(set_to_none=True)
    return optimizers


def checkpoint(model, optimizers, state) -> dict:
    return {"model": state, "optimizers": [o.state_dict() for o in optimizers],
            "hyperparams": dict(HYPERPARAMS), "device": "cpu",
            "stats": {"steps": 8, "train": [torch.tensor(5.75)], "eval": [5.8, 5.7],
                      "val": [torch.tensor(5.76)], "lr": [1e-3, 1e-3]}}


def main() -> int:
    torch.manual_seed(SEED)
    OUT.mkdir(parents=True, exist_ok=True)
    with contextlib.redirect_stdout(io.StringIO()):  # importing `this` prints the Zen
        import this
    text = codecs.decode(this.s, "rot13")
    vocab = train_vocab(text)
    special = {SPECIAL: len(vocab)}
    assert len(vocab) + len(special) == HYPERPARAMS["vocab_size"]
    with open(OUT / "encoder.bin", "wb") as f:
        pickle.dump({"pattern": GPT4_SPLIT_PATTERN, "special": special, "vocab": vocab}, f)

    model = Palm(HYPERPARAMS)
    optimizers = trained_state(model)
    model.eval()
    state = model.state_dict()
    torch.save(checkpoint(model, optimizers, state), OUT / "s8.bin")
    torch.save(checkpoint(model, optimizers, {"_orig_mod." + k: v for k, v in state.items()}),
               OUT / "s8_compiled.bin")
    torch.save(checkpoint(model, optimizers, {k: v.to(torch.bfloat16) for k, v in
                                              state.items()}), OUT / "s8_bf16.bin")
    np.savez(OUT / "weights.npz", **{k: v.numpy() for k, v in state.items()})

    expected, gaps = {}, []
    texts = PROMPTS + [RUN_PROMPT, text[:400]]
    prompt_ids = [encode(p, vocab, special) for p in PROMPTS]
    with torch.no_grad():
        for i, ids in enumerate(prompt_ids):
            expected[f"prompt_{i}"] = np.array(ids, np.int32)
            expected[f"logits_{i}"] = model(torch.tensor([ids]))[0].numpy()
            expected[f"greedy_{i}"], gap = greedy(model, ids, GREEDY)
            gaps.append(gap)
    run_ids = encode(RUN_PROMPT, vocab, special)
    run_out, gap = greedy(model, run_ids, GREEDY)
    gaps.append(gap)
    np.savez(OUT / "expected.npz", **{k: np.asarray(v) for k, v in expected.items()})
    (OUT / "expected.json").write_text(json.dumps({
        "hyperparams": HYPERPARAMS, "texts": texts,
        "ids": [encode(t, vocab, special) for t in texts],
        "decoded": [decode(encode(t, vocab, special), vocab, special) for t in texts],
        "run": {"prompt": RUN_PROMPT, "prompt_ids": run_ids, "output_ids": run_out,
                "text": decode(run_out, vocab, special)},
        "min_greedy_gap": min(gaps), "torch": torch.__version__}, indent=1) + "\n")
    print(f"wrote {OUT}: smallest top-2 logit gap on the greedy paths {min(gaps):.2e}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
