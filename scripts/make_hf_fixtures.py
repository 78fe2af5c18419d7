#!/usr/bin/env python3
"""Build the Hugging Face reference fixtures under tests/fixtures/hf/.

This script documents exactly how the committed fixtures were made.  It is NOT
run by the test suite and torch/transformers are NOT project requirements; the
tests only read the files it writes (config.json, model.safetensors,
expected.npz).

Made with: torch 2.13.0 (CPU wheel), transformers 5.23.0, safetensors 0.8.0.

    pip install torch==2.13.0 transformers==5.23.0 safetensors
    python scripts/make_hf_fixtures.py            # rewrites tests/fixtures/hf/*

Every family gets a tiny random float32 model (vocab 512, hidden 64, 2 layers)
built from a `transformers` config, saved with
`save_pretrained(dir, safe_serialization=True)`, plus `expected.npz`
(np.savez_compressed, plain numeric arrays only, no pickles):

    long_ids         int32   [1, T]   T = 300, ids uniform in [3, vocab)
    long_logits      float32 [1, T, V] model(long_ids, attention_mask=ones).logits,
                                       eval mode, use_cache=False
    prompt_i         int32   [L_i]    i = 0, 1, 2; L = 5, 11, 17; ids in [3, vocab)
    prompt_logits_i  float32 [L_i, V] model(prompt_i[None]).logits[0]
    greedy_i         int32   [40]     new tokens of model.generate(prompt_i[None],
                                       attention_mask=ones, do_sample=False,
                                       max_new_tokens=40, eos disabled, pad 0),
                                       each prompt generated alone (batch 1)
    greedy_margin_i  float32 [40]     top1 - top2 logit at each greedy step
                                       (tells a runtime test how close to a tie
                                       each step is)

Inputs come from torch.Generator().manual_seed(seed + 1000) (seeds: llama 1,
llama3 2, mistral 3, mixtral 4).  A draw that would make a fragile fixture is
rejected and the next draw taken: a greedy step with top1 - top2 < 2e-3, or
(Mixtral) any token/layer whose router top-2 set is decided by a gap (2nd - 3rd
router logit) < 1e-3.  Final check: an independent float64 numpy forward pass
(numpy_reference below, reading only config.json + model.safetensors) matches
every long_logits to ~2e-5, so the math written there is what HF computes.
Running the script twice gives byte-identical files.

Weights.  HF's default init (std 0.02, RMSNorm weights = 1) makes attention
almost uniform and hides RoPE / norm-weight / routing mistakes, so after
construction every parameter is overwritten, in `named_parameters()` order,
from the family's torch.manual_seed:
    RMSNorm weights:       1 + 0.2 * N(0, 1)
    embed_tokens:          0.3 * N(0, 1)   (small enough that a tied lm_head
                                            does not just repeat the last token)
    every other weight:    0.15 * N(0, 1)   (linear, router, experts, lm_head)
This gives attention scores and logits of O(1) spread, so the fixtures are
sensitive to rope theta / scaling, sliding window, GQA grouping, routing.

Generation never stops early: config.eos_token_id / bos_token_id are None,
generation_config.eos_token_id is None, and we do NOT pass min_new_tokens (its
logits processor would mask the eos logit and change greedy choices if an eos
were set).  Each greedy sequence is also re-derived with a cache-free argmax
loop (full forward of prompt + generated so far) and asserted identical.

Families (all attn_implementation="eager", dtype float32):
  llama               LlamaConfig, 8 q heads / 2 kv heads, head_dim 8,
                      rope_theta 50000, intermediate 96, eps 1e-5, untied,
                      max_position_embeddings 512
  llama3              as llama + llama3 rope scaling (factor 8, low 1, high 4,
                      original_max_position_embeddings 256), rope_theta 500000,
                      tie_word_embeddings=True.
                      Why 256 and not 64: head_dim 8 gives only 4 frequencies,
                      inv_freq = 500000^(-2i/8) = [1, 3.76e-2, 1.41e-3, 5.3e-5],
                      wavelengths 2*pi/inv_freq = [6.3, 167, 4443, 1.18e5].  With
                      original 256: high_freq_wavelen = 256/4 = 64 and
                      low_freq_wavelen = 256/1 = 256, so i=0 is kept (6.3 < 64),
                      i=1 is SMOOTHED (64 <= 167 <= 256) and i=2,3 are divided
                      by 8: all three branches of the llama3 formula are used.
                      With 64 (high 16, low 64) no wavelength falls in [16, 64]
                      and the smoothing branch would go untested.  The scaling is
                      static (applied at every position, whatever T is).
  mistral             MistralConfig, sliding_window 48, head_dim 16 with
                      hidden 64 and 8 q heads (head_dim != hidden/heads), 4 kv heads
  mixtral             MixtralConfig, 8 experts, top-2, 8 q / 2 kv heads,
                      intermediate 48 (not 96: with 96, 8 experts x 2 layers the
                      file would be ~1.5 MB and two Mixtral fixtures would push the
                      total towards the 8 MB budget), untied.
                      In memory transformers 5.x holds the experts FUSED
                      (mlp.experts.gate_up_proj [E, 2F, D], mlp.experts.down_proj
                      [E, D, F], router mlp.gate.weight [E, D]), but
                      save_pretrained reverts its conversion_mapping and WRITES THE
                      LEGACY PER-EXPERT NAMES (checked below; the script fails if
                      that changes):
                        model.layers.N.block_sparse_moe.gate.weight          [E, D]
                        model.layers.N.block_sparse_moe.experts.e.w1.weight  [F, D]  gate (silu)
                        model.layers.N.block_sparse_moe.experts.e.w3.weight  [F, D]  up
                        model.layers.N.block_sparse_moe.experts.e.w2.weight  [D, F]  down
  mixtral_fused       same model, same config.json and expected.npz (byte
                      copies); model.safetensors written by this script with
                      safetensors.torch.save_file(model.state_dict(),
                      metadata={"format": "pt"}), i.e. transformers 5.x's
                      in-memory fused names:
                        model.layers.N.mlp.gate.weight               [E, D]
                        model.layers.N.mlp.experts.gate_up_proj      [E, 2F, D]
                            gate_up_proj[e] = concat([w1_e, w3_e], dim 0)
                            (rows 0..F-1 = w1 = gate, rows F..2F-1 = w3 = up)
                        model.layers.N.mlp.experts.down_proj         [E, D, F]
                            down_proj[e] = w2_e
                      (exactly HF's own legacy->fused conversion_mapping for
                      mixtral: w1/w3 stacked on dim 0 then concatenated on dim 1;
                      w2 stacked on dim 0).  Asserted below tensor by tensor
                      against the per-expert file, and reloaded with
                      from_pretrained to give bit-identical logits.

Mistral sliding window (transformers 5.23 masking_utils.sliding_window_overlay:
`kv_idx > q_idx - sliding_window`, and'ed with causal `kv_idx <= q_idx`):
a query at position p attends to key positions k with  p - W < k <= p, i.e.
0 <= p - k < W = 48 (strictly less): W keys including itself.  Verified below
with a 1-layer copy: changing the token at position 100 changes logits at
positions 100..147 and leaves positions >= 148 bit-identical.  The same mask is
used by generate() (cache decoding) - checked by the cache-free argmax replay
since prompt + 40 new tokens (45..57) exceeds the window for the longer prompts.
"""
from __future__ import annotations

import json
import os
import shutil
import sys

import numpy as np
import torch

import transformers
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
)

torch.set_num_threads(1)  # shared machine; the models are tiny

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "hf")
VOCAB = 512
T_LONG = 300
PROMPT_LENS = (5, 11, 17)
NEW_TOKENS = 40

COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    num_hidden_layers=2,
    rms_norm_eps=1e-5,
    max_position_embeddings=512,
    hidden_act="silu",
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=0,
)


def llama_config():
    return LlamaConfig(
        **COMMON,
        intermediate_size=96,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=8,
        rope_parameters={"rope_type": "default", "rope_theta": 50000.0},
        tie_word_embeddings=False,
    )


def llama3_config():
    return LlamaConfig(
        **COMMON,
        intermediate_size=96,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=8,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 256,
        },
        tie_word_embeddings=True,
    )


def mistral_config(sliding_window=48, layers=2):
    c = dict(COMMON, num_hidden_layers=layers)
    return MistralConfig(
        **c,
        intermediate_size=96,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=16,
        sliding_window=sliding_window,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False,
    )


def mixtral_config():
    return MixtralConfig(
        **COMMON,
        intermediate_size=48,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=8,
        num_local_experts=8,
        num_experts_per_tok=2,
        sliding_window=None,
        router_jitter_noise=0.0,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False,
    )


def build(cls, config, seed):
    torch.manual_seed(seed)
    model = cls._from_config(config, attn_implementation="eager", dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape))
            elif "embed_tokens" in name:
                p.copy_(0.3 * torch.randn(p.shape))
            else:
                p.copy_(0.15 * torch.randn(p.shape))
    model.generation_config.eos_token_id = None
    model.generation_config.bos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


@torch.no_grad()
def logits(model, ids):
    ids = torch.as_tensor(ids, dtype=torch.long)
    if ids.dim() == 1:
        ids = ids[None]
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    return out.logits.float()


@torch.no_grad()
def greedy(model, prompt):
    ids = torch.as_tensor(prompt, dtype=torch.long)[None]
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=NEW_TOKENS,
        eos_token_id=None,
        pad_token_id=0,
    )
    new = out[0, ids.shape[1]:]
    assert new.shape[0] == NEW_TOKENS, new.shape
    # Cache-free replay: argmax of a full forward at every step.
    seq = ids
    margins = []
    for t in range(NEW_TOKENS):
        last = logits(model, seq)[0, -1]
        top2 = torch.topk(last, 2).values
        margins.append(float(top2[0] - top2[1]))
        nxt = int(torch.argmax(last))
        assert nxt == int(new[t]), (t, nxt, int(new[t]))
        seq = torch.cat([seq, torch.tensor([[nxt]])], dim=1)
    return new.numpy().astype(np.int32), np.asarray(margins, np.float32)


MIN_GREEDY_MARGIN = 2e-3  # top1 - top2 logit at every greedy step
MIN_ROUTER_MARGIN = 1e-3  # Mixtral: 2nd - 3rd largest router logit, every token/layer


class RouterMargin:
    """Forward hooks on the Mixtral routers: smallest gap between the k-th and
    (k+1)-th router logit seen since reset().  The chosen expert set flips only
    when that gap is crossed, so a runtime with float32 rounding differences
    picks the same experts as long as it stays well above ~1e-5."""

    def __init__(self, model):
        self.value = float("inf")
        k = getattr(model.config, "num_experts_per_tok", None)
        if k is None:
            return
        for layer in model.model.layers:
            layer.mlp.gate.register_forward_hook(self._hook(k))

    def _hook(self, k):
        def hook(module, inputs, outputs):
            router_logits = outputs[0]
            top = torch.topk(router_logits.float(), k + 1, dim=-1).values
            self.value = min(self.value, float((top[:, k - 1] - top[:, k]).min()))
        return hook

    def reset(self):
        self.value = float("inf")


def make_expected(model, seed):
    """Inputs are drawn from a generator seeded with seed + 1000.  A draw is
    rejected (and the next one taken from the same generator) when it would
    make a fragile fixture: a greedy step whose top1 - top2 logit margin is
    below MIN_GREEDY_MARGIN, or (Mixtral) a token whose router top-k set is
    decided by a gap below MIN_ROUTER_MARGIN."""
    g = torch.Generator().manual_seed(seed + 1000)
    router = getattr(model, "_router_margin", None) or RouterMargin(model)
    model._router_margin = router
    arrays = {}
    for attempt in range(100):
        long_ids = torch.randint(3, VOCAB, (1, T_LONG), generator=g)
        router.reset()
        long_logits = logits(model, long_ids)
        if router.value >= MIN_ROUTER_MARGIN:
            break
    else:
        raise RuntimeError("no long sequence with a safe router margin")
    print(f"    long_ids: draw {attempt}, router margin {router.value:.3g}")
    arrays["long_ids"] = long_ids.numpy().astype(np.int32)
    arrays["long_logits"] = long_logits.numpy().astype(np.float32)
    for i, L in enumerate(PROMPT_LENS):
        for attempt in range(100):
            prompt = torch.randint(3, VOCAB, (L,), generator=g)
            router.reset()
            new, margins = greedy(model, prompt)  # replay covers prompt + 39 new tokens
            if margins.min() >= MIN_GREEDY_MARGIN and router.value >= MIN_ROUTER_MARGIN:
                break
        else:
            raise RuntimeError("no prompt with safe margins")
        print(f"    prompt_{i}: draw {attempt}, greedy margin {margins.min():.3g}, "
              f"router margin {router.value:.3g}, distinct new tokens {len(set(new.tolist()))}")
        arrays[f"prompt_{i}"] = prompt.numpy().astype(np.int32)
        arrays[f"prompt_logits_{i}"] = logits(model, prompt)[0].numpy().astype(np.float32)
        arrays[f"greedy_{i}"], arrays[f"greedy_margin_{i}"] = new, margins
    return arrays


def tensor_listing(path):
    with safe_open(path, "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def save_family(name, model, seed):
    out = os.path.join(ROOT, name)
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    model.save_pretrained(out, safe_serialization=True)
    for extra in ("generation_config.json",):
        p = os.path.join(out, extra)
        if os.path.exists(p):
            os.remove(p)  # keep only config.json + model.safetensors
    arrays = make_expected(model, seed)
    np.savez_compressed(os.path.join(out, "expected.npz"), **arrays)
    # Round trip: what was written reproduces the expected logits exactly.
    back = type(model).from_pretrained(out, attn_implementation="eager", dtype=torch.float32).eval()
    diff = (logits(back, arrays["long_ids"]) - torch.from_numpy(arrays["long_logits"])).abs().max()
    assert float(diff) == 0.0, (name, float(diff))
    return out, arrays


def max_diff(a, b):
    return float((a - b).abs().max())


def check_mistral_window(model):
    """1-layer copy of the mistral model: which key positions a query sees."""
    W = model.config.sliding_window
    one = MistralForCausalLM._from_config(
        mistral_config(sliding_window=W, layers=1), attn_implementation="eager", dtype=torch.float32
    ).eval()
    sd = {k: v for k, v in model.state_dict().items() if ".layers.1." not in k}
    one.load_state_dict(sd, strict=True)
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, VOCAB, (1, T_LONG), generator=g)
    alt = ids.clone()
    alt[0, 100] = 3 + (int(ids[0, 100]) - 3 + 1) % (VOCAB - 3)
    a, b = logits(one, ids)[0], logits(one, alt)[0]
    changed = [(a[p] - b[p]).abs().max().item() > 0 for p in range(T_LONG)]
    first_unchanged_after = next(p for p in range(100, T_LONG) if not changed[p])
    assert all(changed[100:100 + W]), "every query in [100, 100+W) must see key 100"
    assert not any(changed[100 + W:]), "no query at p >= 100+W may see key 100"
    assert not any(changed[:100]), "causal"
    print(f"  mistral window: key 100 seen by queries 100..{first_unchanged_after - 1}; "
          f"query p sees keys k with 0 <= p-k < {W}")


def numpy_reference(d, ids):
    """Independent float64 numpy forward pass that reads only config.json and
    model.safetensors (either Mixtral layout).  It encodes the HF math facts the
    JAX runtime must match; main() asserts it reproduces long_logits."""
    from safetensors.numpy import load_file

    cfg = json.load(open(os.path.join(d, "config.json")))
    w = {k: v.astype(np.float64) for k, v in load_file(os.path.join(d, "model.safetensors")).items()}
    D, H, KV = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or D // H
    eps, win = cfg["rms_norm_eps"], cfg.get("sliding_window")
    rp = cfg["rope_parameters"]

    # RoPE inverse frequencies (default or llama3), rotate-half convention.
    inv = 1.0 / rp["rope_theta"] ** (np.arange(0, hd, 2) / hd)
    if rp["rope_type"] == "llama3":
        f, lo, hi, old = rp["factor"], rp["low_freq_factor"], rp["high_freq_factor"], rp["original_max_position_embeddings"]
        wl = 2 * np.pi / inv
        smooth = (old / wl - lo) / (hi - lo)
        inv = np.where(wl < old / hi, inv,
                       np.where(wl > old / lo, inv / f, (1 - smooth) * inv / f + smooth * inv))
    T = ids.shape[0]
    ang = np.arange(T)[:, None] * inv[None]               # [T, hd/2]
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))

    def rope(x):                                          # x [T, heads, hd]
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return x * cos[:, None] + np.concatenate([-x2, x1], -1) * sin[:, None]

    def rms(x, g):
        return g * (x / np.sqrt((x * x).mean(-1, keepdims=True) + eps))

    def silu(x):
        return x / (1 + np.exp(-x))

    q_pos, k_pos = np.arange(T)[:, None], np.arange(T)[None]
    allowed = k_pos <= q_pos
    if win is not None:
        allowed &= (q_pos - k_pos) < win

    x = w["model.embed_tokens.weight"][ids]
    for n in range(cfg["num_hidden_layers"]):
        pre = f"model.layers.{n}."
        h = rms(x, w[pre + "input_layernorm.weight"])
        q = rope((h @ w[pre + "self_attn.q_proj.weight"].T).reshape(T, H, hd))
        k = rope((h @ w[pre + "self_attn.k_proj.weight"].T).reshape(T, KV, hd))
        v = (h @ w[pre + "self_attn.v_proj.weight"].T).reshape(T, KV, hd)
        k, v = np.repeat(k, H // KV, axis=1), np.repeat(v, H // KV, axis=1)  # q head j uses kv head j // (H/KV)
        s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd)
        s = np.where(allowed[None], s, -np.inf)
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        o = np.einsum("hqk,khd->qhd", a, v).reshape(T, H * hd)
        x = x + o @ w[pre + "self_attn.o_proj.weight"].T
        h = rms(x, w[pre + "post_attention_layernorm.weight"])
        if "num_local_experts" in cfg:
            E, K, F = cfg["num_local_experts"], cfg["num_experts_per_tok"], cfg["intermediate_size"]
            if pre + "mlp.experts.gate_up_proj" in w:
                router = w[pre + "mlp.gate.weight"]
                gu, dn = w[pre + "mlp.experts.gate_up_proj"], w[pre + "mlp.experts.down_proj"]
                w1, w3, w2 = gu[:, :F], gu[:, F:], dn
            else:
                b = pre + "block_sparse_moe."
                router = w[b + "gate.weight"]
                w1 = np.stack([w[f"{b}experts.{e}.w1.weight"] for e in range(E)])
                w3 = np.stack([w[f"{b}experts.{e}.w3.weight"] for e in range(E)])
                w2 = np.stack([w[f"{b}experts.{e}.w2.weight"] for e in range(E)])
            logit = h @ router.T
            prob = np.exp(logit - logit.max(-1, keepdims=True))
            prob /= prob.sum(-1, keepdims=True)                 # softmax over ALL experts
            top = np.argsort(-prob, -1)[:, :K]                  # then top-k
            wt = np.take_along_axis(prob, top, -1)
            wt /= wt.sum(-1, keepdims=True)                     # then renormalise
            out = np.zeros_like(h)
            for t in range(T):
                for j in range(K):
                    e = top[t, j]
                    out[t] += wt[t, j] * (w2[e] @ (silu(w1[e] @ h[t]) * (w3[e] @ h[t])))
            x = x + out
        else:
            x = x + (silu(h @ w[pre + "mlp.gate_proj.weight"].T) * (h @ w[pre + "mlp.up_proj.weight"].T)) @ w[pre + "mlp.down_proj.weight"].T
    x = rms(x, w["model.norm.weight"])
    lm = w["lm_head.weight"] if "lm_head.weight" in w else w["model.embed_tokens.weight"]
    assert ("lm_head.weight" not in w) == cfg["tie_word_embeddings"]
    return x @ lm.T


def main():
    print("transformers", transformers.__version__, "torch", torch.__version__)
    report = {}

    # 1. llama
    m = build(LlamaForCausalLM, llama_config(), seed=1)
    out, arr = save_family("llama", m, seed=1)
    alt = llama_config()
    alt.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
    m2 = LlamaForCausalLM._from_config(alt, attn_implementation="eager").eval()
    m2.load_state_dict(m.state_dict())
    print("  llama: |logits(theta=1e4) - logits(theta=5e4)| max =",
          max_diff(logits(m2, arr["long_ids"]), torch.from_numpy(arr["long_logits"])))
    report["llama"] = out

    # 2. llama3
    m = build(LlamaForCausalLM, llama3_config(), seed=2)
    assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()
    out, arr = save_family("llama3", m, seed=2)
    alt = llama3_config()
    alt.rope_parameters = {"rope_type": "default", "rope_theta": 500000.0}
    m2 = LlamaForCausalLM._from_config(alt, attn_implementation="eager").eval()
    m2.load_state_dict(m.state_dict())
    d = (logits(m2, arr["long_ids"]) - torch.from_numpy(arr["long_logits"])).abs().amax(-1)[0]
    inv = m.model.rotary_emb.inv_freq.double()
    base = 1.0 / (500000.0 ** (torch.arange(0, 8, 2, dtype=torch.float64) / 8))
    print("  llama3 inv_freq", inv.tolist(), "unscaled", base.tolist(), "ratio", (base / inv).tolist())
    r = (base / inv).tolist()
    assert abs(r[0] - 1) < 1e-6 and 1.01 < r[1] < 7.99 and abs(r[2] - 8) < 1e-4 and abs(r[3] - 8) < 1e-4
    print("  llama3: |logits(no llama3 scaling) - expected| max = %.4g (positions < 8: %.3g)"
          % (float(d.max()), float(d[:8].max())))
    report["llama3"] = out

    # 3. mistral
    m = build(MistralForCausalLM, mistral_config(), seed=3)
    out, arr = save_family("mistral", m, seed=3)
    m2 = MistralForCausalLM._from_config(mistral_config(sliding_window=None), attn_implementation="eager").eval()
    m2.load_state_dict(m.state_dict())
    d = (logits(m2, arr["long_ids"]) - torch.from_numpy(arr["long_logits"])).abs().amax(-1)[0]
    print("  mistral: |logits(no window) - expected| max over p<48: %.3g, over p>=48: %.4g"
          % (float(d[:48].max()), float(d[48:].max())))
    assert float(d[:48].max()) == 0.0 and float(d[48:].max()) > 1e-2
    check_mistral_window(m)
    report["mistral"] = out

    # 4. mixtral: save_pretrained writes legacy per-expert names
    m = build(MixtralForCausalLM, mixtral_config(), seed=4)
    out, arr = save_family("mixtral", m, seed=4)
    names = tensor_listing(os.path.join(out, "model.safetensors"))
    assert "model.layers.0.block_sparse_moe.experts.0.w1.weight" in names, sorted(names)
    report["mixtral"] = out

    # 4b. mixtral_fused: the in-memory fused state dict, written as is
    fused = {k: v.detach().contiguous().clone() for k, v in m.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in fused, sorted(fused)
    F = m.config.intermediate_size
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        for n in range(m.config.num_hidden_layers):
            gu = fused[f"model.layers.{n}.mlp.experts.gate_up_proj"]
            dp = fused[f"model.layers.{n}.mlp.experts.down_proj"]
            pre = f"model.layers.{n}.block_sparse_moe"
            assert torch.equal(fused[f"model.layers.{n}.mlp.gate.weight"], f.get_tensor(f"{pre}.gate.weight"))
            for e in range(m.config.num_local_experts):
                assert torch.equal(gu[e, :F], f.get_tensor(f"{pre}.experts.{e}.w1.weight"))
                assert torch.equal(gu[e, F:], f.get_tensor(f"{pre}.experts.{e}.w3.weight"))
                assert torch.equal(dp[e], f.get_tensor(f"{pre}.experts.{e}.w2.weight"))
    out2 = os.path.join(ROOT, "mixtral_fused")
    shutil.rmtree(out2, ignore_errors=True)
    os.makedirs(out2)
    shutil.copyfile(os.path.join(out, "config.json"), os.path.join(out2, "config.json"))
    shutil.copyfile(os.path.join(out, "expected.npz"), os.path.join(out2, "expected.npz"))
    save_file(fused, os.path.join(out2, "model.safetensors"), metadata={"format": "pt"})
    back = MixtralForCausalLM.from_pretrained(out2, attn_implementation="eager", dtype=torch.float32).eval()
    diff = max_diff(logits(back, arr["long_ids"]), torch.from_numpy(arr["long_logits"]))
    assert diff == 0.0, diff
    print("  mixtral_fused: matches the per-expert file tensor by tensor; reloaded logits identical")
    report["mixtral_fused"] = out2

    print("\nindependent numpy float64 reference vs expected long_logits:")
    for name, d in report.items():
        with np.load(os.path.join(d, "expected.npz"), allow_pickle=False) as z:
            ref = numpy_reference(d, z["long_ids"][0].astype(np.int64))
            err = float(np.abs(ref - z["long_logits"][0]).max())
            scale = float(np.abs(z["long_logits"]).max())
        print(f"  {name}: max |numpy - HF| = {err:.3g} (max |logit| {scale:.3g})")
        assert err < 1e-3, (name, err)

    print("\nwritten tensors (name -> shape):")
    for name, d in report.items():
        print(f"[{name}]")
        for k, s in sorted(tensor_listing(os.path.join(d, "model.safetensors")).items()):
            print(f"  {k} {list(s)}")
    print("\nsizes (bytes):")
    total = 0
    for name, d in report.items():
        for f in sorted(os.listdir(d)):
            sz = os.path.getsize(os.path.join(d, f))
            total += sz
            print(f"  {name}/{f} {sz}")
    print("  total", total)
    for name, d in report.items():
        with np.load(os.path.join(d, "expected.npz"), allow_pickle=False) as z:
            mins = [float(z[f"greedy_margin_{i}"].min()) for i in range(len(PROMPT_LENS))]
        print(f"  {name}: min greedy top1-top2 margin per prompt {['%.3g' % x for x in mins]}")
    assert total < 8 * 1024 * 1024


if __name__ == "__main__":
    sys.exit(main())
