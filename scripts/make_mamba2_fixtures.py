#!/usr/bin/env python3
"""Build the Mamba-2 fixtures under tests/fixtures/hf/mamba2 and tests/fixtures/hf/mamba2_groups.

Documents exactly how the committed fixtures were made. NOT run by the test suite; torch and
transformers are not project requirements (the tests read only the files written here).

Made with: torch 2.13.0 (CPU wheel), transformers 5.23.0, safetensors 0.8.0.

    pip install torch==2.13.0 transformers==5.23.0 safetensors
    python scripts/make_mamba2_fixtures.py        # rewrites tests/fixtures/hf/mamba2*

Two tiny random float32 `Mamba2ForCausalLM` models (vocab 512, hidden 64, 2 layers, expand 2,
8 heads of head_dim 16 (I = 128), state 16, conv width 4, chunk_size 16, conv bias, no
in/out_proj bias, residual_in_fp32, default time_step_limit (0, inf)), each written with
`save_pretrained(dir, safe_serialization=True)` (config.json + model.safetensors) and an
`expected.npz` (np.savez_compressed, plain numeric arrays only):

    long_ids         int32   [1, 100]  ids uniform in [3, vocab): 100 tokens = 6 chunks of 16
                                       and a partial one
    long_logits      float32 [1, 100, V]
    prompt_i         int32   [L_i]     i = 0, 1, 2; L = 7, 23, 41 (one chunk or less, two
                                       chunks and a part, three chunks and a part)
    greedy_i         int32   [64]      64 greedy new tokens
    greedy_margin_i  float32 [64]      top1 - top2 logit at each greedy step

  mamba2          n_groups 1, tie_word_embeddings True (as the released state-spaces models).
                  Expected values are transformers' own: long_logits = model(long_ids,
                  use_cache=False).logits (the chunked torch path), greedy_i =
                  model.generate(prompt, do_sample=False, max_new_tokens=64) (chunked prefill
                  into the cache, then the one-token recurrent update), each re-derived by a
                  cache-free argmax loop and asserted identical.
  mamba2_groups   n_groups 2 (4 heads per group), untied lm_head. The weights and config are
                  transformers' (save_pretrained), but the EXPECTED VALUES COME FROM OUR OWN
                  NUMPY REFERENCE (tests/reference_mamba2_numpy.py, a token-by-token scan of
                  the recurrence), not from transformers: its gated RMSNorm must normalise each
                  group's I / G channels separately (mamba_ssm's RMSNormGated with group_size),
                  and transformers only normalised over the whole I until it gained
                  `group_size`, so its multi-group output is not the thing to trust. For the
                  record, this script also runs transformers 5.23 (which has group_size) on
                  it and prints the difference.

Weights (numpy generator seeded per fixture; reference_mamba2_numpy.random_weights), loaded
into the torch model with load_state_dict(strict=True): embeddings 0.3 N(0,1); in_proj and
out_proj and lm_head 0.15 N(0,1); conv1d weight 0.3 N(0,1), bias 0.1 N(0,1); norm weights
1 + 0.2 N(0,1); D 1 + 0.5 N(0,1); A_log = log U(1, 16); dt_bias = softplus^-1 of dt log-uniform
in [0.01, 0.5] (so some heads forget within a few tokens and others carry state across chunks).
HF's default init (D = 1, tiny dt, in_proj std 0.1) gives near-identical logits at every
position and hides chunking mistakes.

A prompt draw is rejected (the next one taken from the same generator) when a greedy step has
top1 - top2 < 2e-3. Generation never stops early: eos/bos ids are None. Float32 throughout;
transformers' Mamba2 runs its torch path on CPU (no mamba_ssm / causal_conv1d kernels).
Finally the numpy reference is compared with transformers on both fixtures (printed, and
asserted < 1e-4 relative for mamba2). Running the script twice gives byte-identical files.
"""
from __future__ import annotations

import json
import os
import shutil
import sys

import numpy as np
import torch
import transformers
from safetensors.numpy import load_file
from transformers import Mamba2Config, Mamba2ForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
import reference_mamba2_numpy as reference  # noqa: E402

torch.set_num_threads(1)  # shared machine; the models are tiny

ROOT = os.path.join(HERE, "..", "tests", "fixtures", "hf")
VOCAB = 512
T_LONG = 100
PROMPT_LENS = (7, 23, 41)
NEW_TOKENS = 64
MIN_GREEDY_MARGIN = 2e-3


def config(groups: int, tied: bool) -> Mamba2Config:
    return Mamba2Config(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, expand=2, num_heads=8,
        head_dim=16, state_size=16, n_groups=groups, conv_kernel=4, chunk_size=16,
        use_bias=False, use_conv_bias=True, layer_norm_epsilon=1e-5, residual_in_fp32=True,
        hidden_act="silu", time_step_limit=(0.0, float("inf")), tie_word_embeddings=tied,
        pad_token_id=0, bos_token_id=None, eos_token_id=None)


def build(cfg: Mamba2Config, seed: int):
    model = Mamba2ForCausalLM(cfg).eval().to(torch.float32)
    weights = reference.random_weights(cfg.to_dict(), np.random.default_rng(seed))
    state = {k: torch.from_numpy(v) for k, v in weights.items()}
    if cfg.tie_word_embeddings:
        state["lm_head.weight"] = state["backbone.embeddings.weight"]
    model.load_state_dict(state, strict=True)
    if cfg.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.backbone.embeddings.weight.data_ptr()
    model.generation_config.eos_token_id = None
    model.generation_config.bos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


@torch.no_grad()
def hf_logits(model, ids):
    ids = torch.as_tensor(np.asarray(ids), dtype=torch.long).reshape(1, -1)
    return model(input_ids=ids, use_cache=False).logits[0].float().numpy()


@torch.no_grad()
def hf_greedy(model, prompt):
    ids = torch.as_tensor(np.asarray(prompt), dtype=torch.long)[None]
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=NEW_TOKENS, eos_token_id=None, pad_token_id=0)
    new = out[0, ids.shape[1]:].numpy().astype(np.int32)
    assert new.shape[0] == NEW_TOKENS, new.shape
    seq, margins = list(prompt), []  # cache-free replay: argmax of a full forward each step
    for t in range(NEW_TOKENS):
        last = hf_logits(model, seq)[-1]
        top = np.sort(last)[-2:]
        margins.append(float(top[1] - top[0]))
        assert int(np.argmax(last)) == int(new[t]), (t, int(np.argmax(last)), int(new[t]))
        seq.append(int(new[t]))
    return new, np.asarray(margins, np.float32)


def save(name: str, model) -> str:
    out = os.path.join(ROOT, name)
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    model.save_pretrained(out, safe_serialization=True)
    extra = os.path.join(out, "generation_config.json")
    if os.path.exists(extra):
        os.remove(extra)  # keep only config.json + model.safetensors
    return out


def make(name: str, groups: int, tied: bool, seed: int, source: str):
    """source: "hf" (transformers computes the expected values) or "numpy" (our reference)."""
    print(f"[{name}] n_groups {groups}, tied {tied}, expected values from {source}")
    model = build(config(groups, tied), seed)
    out = save(name, model)
    cfg = json.load(open(os.path.join(out, "config.json")))
    weights = load_file(os.path.join(out, "model.safetensors"))
    g = np.random.default_rng(seed + 1000)
    arrays = {}
    long_ids = g.integers(3, VOCAB, (1, T_LONG)).astype(np.int32)
    ref_long = reference.forward(weights, cfg, long_ids[0])[0]
    hf_long = hf_logits(model, long_ids[0])
    diff = float(np.abs(ref_long - hf_long).max() / np.abs(hf_long).max())
    print(f"  long logits: max |numpy - transformers| / max |logit| = {diff:.3g} "
          f"(max |logit| {np.abs(hf_long).max():.3g})")
    if source == "hf":
        assert diff < 1e-4, diff
    arrays["long_ids"] = long_ids
    arrays["long_logits"] = (hf_long if source == "hf" else ref_long)[None].astype(np.float32)
    for i, length in enumerate(PROMPT_LENS):
        for attempt in range(100):
            prompt = g.integers(3, VOCAB, length).astype(np.int32)
            if source == "hf":
                new, margins = hf_greedy(model, prompt.tolist())
            else:
                new, margins = reference.greedy(weights, cfg, prompt.tolist(), NEW_TOKENS)
                new, margins = np.asarray(new, np.int32), np.asarray(margins, np.float32)
            if margins.min() >= MIN_GREEDY_MARGIN:
                break
        else:
            raise RuntimeError("no prompt with safe greedy margins")
        other, _ = reference.greedy(weights, cfg, prompt.tolist(), NEW_TOKENS) \
            if source == "hf" else hf_greedy(model, prompt.tolist())
        agree = int(np.argmin(np.asarray(other) == new)) if (np.asarray(other) != new).any() \
            else NEW_TOKENS
        print(f"  prompt_{i} (length {length}): draw {attempt}, min margin {margins.min():.3g}, "
              f"distinct new tokens {len(set(new.tolist()))}, "
              f"{'numpy' if source == 'hf' else 'transformers'} agrees for {agree} tokens")
        if source == "hf":
            assert agree == NEW_TOKENS
        arrays[f"prompt_{i}"] = prompt
        arrays[f"greedy_{i}"] = new
        arrays[f"greedy_margin_{i}"] = margins
    np.savez_compressed(os.path.join(out, "expected.npz"), **arrays)
    back = Mamba2ForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert np.array_equal(hf_logits(back, long_ids[0]), hf_long), "save/load round trip"
    for f in sorted(os.listdir(out)):
        print(f"  {name}/{f} {os.path.getsize(os.path.join(out, f))} bytes")
        assert os.path.getsize(os.path.join(out, f)) < 2 * 1024 * 1024


def main():
    print("transformers", transformers.__version__, "torch", torch.__version__)
    make("mamba2", groups=1, tied=True, seed=11, source="hf")
    make("mamba2_groups", groups=2, tied=False, seed=12, source="numpy")


if __name__ == "__main__":
    sys.exit(main())
