"""Independent float32 numpy reference of Mamba-2 (state-space duality), token by token.

A plain re-statement of the Mamba-2 block (Dao & Gu 2024, "Transformers are SSMs: Generalized
Models and Efficient Algorithms Through Structured State Space Duality", section 7 and its
listing; the mamba_ssm `Mamba2` module) as the recurrence it is:

  zxbcdt = in_proj h                                split [z | x | B | C | dt] = [I, I, GN, GN, H]
  xBC    = silu(causal depthwise conv1d over time of [x | B | C], width W, bias)
  dt     = clamp(softplus(dt + dt_bias), time_step_limit);  A = -exp(A_log)
  for head h (group g = h // (H / G)):
      state_h = exp(dt_h A_h) state_h + dt_h x_h B_g^T           [P, N]
      y_h     = state_h C_g + D_h x_h                            [P]
  y = RMSNorm per group of I / G contiguous channels of (y * silu(z)), times weight
      (norm_before_gate: RMSNorm(y) * silu(z))
  out = out_proj y;  block: h + out of RMSNorm(h);  final RMSNorm; lm_head (or tied embeddings)

It scans over time one token at a time (no chunking, no matrix form), so comparing it with the
runtime's chunked prefill checks the SSD algorithm, and it normalises per group, which
transformers' Mamba2 did not do before it gained `group_size` (its gated norm spanned the whole
I: equal only for n_groups == 1).

It reads the Hugging Face Mamba2ForCausalLM tensors by their own names and layout (fused
in_proj, conv1d [channels, 1, W]) and the config.json keys, so it shares neither code nor
parameter layout with the runtime (no jax). Everything is float32.
"""

from __future__ import annotations

import math

import numpy as np

F32 = np.float32


def silu(x):
    return (x / (F32(1) + np.exp(-x))).astype(F32)


def softplus(x):
    return np.logaddexp(F32(0), x).astype(F32)


def rms_norm(x, weight, eps):
    return (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + F32(eps)) * weight).astype(F32)


class Sizes:
    """The dimensions a config.json implies."""

    def __init__(self, cfg: dict):
        self.D = cfg["hidden_size"]
        self.H, self.P = cfg["num_heads"], cfg["head_dim"]
        self.I = self.H * self.P
        assert self.I == cfg.get("expand", 2) * self.D
        self.G, self.N = cfg.get("n_groups", 8), cfg.get("state_size", 128)
        self.W = cfg.get("conv_kernel", 4)
        self.L = cfg["num_hidden_layers"]
        self.V = cfg["vocab_size"]
        self.eps = cfg.get("layer_norm_epsilon", 1e-5)
        limit = cfg.get("time_step_limit") or (0.0, math.inf)
        # transformers 5 writes an infinite limit as {"__float__": "Infinity"}
        self.dt_min, self.dt_max = (float(v["__float__"] if isinstance(v, dict) else v)
                                    for v in limit)
        self.norm_before_gate = bool(cfg.get("norm_before_gate", False))
        self.tied = bool(cfg.get("tie_word_embeddings", False))


def new_state(cfg: dict) -> list:
    """Per layer: (the last W - 1 convolution inputs [W-1, I+2GN], SSM state [H, P, N])."""
    s = Sizes(cfg)
    return [(np.zeros((s.W - 1, s.I + 2 * s.G * s.N), F32), np.zeros((s.H, s.P, s.N), F32))
            for _ in range(s.L)]


def mixer_token(w: dict, prefix: str, s: Sizes, h, conv, ssm):
    """One token through one layer's mixer. h [D]; conv [W-1, I+2GN]; ssm [H, P, N]."""
    projected = (w[prefix + "in_proj.weight"] @ h).astype(F32)
    z, xbc, dt = np.split(projected, [s.I, 2 * s.I + 2 * s.G * s.N])
    window = np.concatenate([conv, xbc[None]], axis=0)  # [W, I+2GN], oldest first
    kernel = w[prefix + "conv1d.weight"][:, 0, :]  # [I+2GN, W]: tap k multiplies window[k]
    mixed = np.sum(window.T * kernel, axis=1)
    if prefix + "conv1d.bias" in w:
        mixed = mixed + w[prefix + "conv1d.bias"]
    xbc = silu(mixed.astype(F32))
    x, b, c = np.split(xbc, [s.I, s.I + s.G * s.N])
    x, b, c = x.reshape(s.H, s.P), b.reshape(s.G, s.N), c.reshape(s.G, s.N)
    dt = np.clip(softplus(dt + w[prefix + "dt_bias"]), s.dt_min, s.dt_max).astype(F32)
    a = -np.exp(w[prefix + "A_log"]).astype(F32)
    ssm = ssm.copy()
    y = np.zeros((s.H, s.P), F32)
    for head in range(s.H):
        g = head // (s.H // s.G)
        ssm[head] = np.exp(dt[head] * a[head]) * ssm[head] + dt[head] * np.outer(x[head], b[g])
        y[head] = ssm[head] @ c[g] + w[prefix + "D"][head] * x[head]
    y = y.reshape(s.I)
    gate = silu(z)
    if not s.norm_before_gate:
        y = y * gate
    groups = y.reshape(s.G, s.I // s.G)
    normed = (groups / np.sqrt(np.mean(groups * groups, axis=-1, keepdims=True) + F32(s.eps)))
    y = normed.reshape(s.I) * w[prefix + "norm.weight"]
    if s.norm_before_gate:
        y = y * gate
    return (w[prefix + "out_proj.weight"] @ y.astype(F32)).astype(F32), window[1:], ssm


def embeddings(w: dict):
    return w["backbone.embeddings.weight"] if "backbone.embeddings.weight" in w \
        else w["backbone.embedding.weight"]


def token(w: dict, cfg: dict, token_id: int, state: list):
    """One token through the model: logits [V] and the new state (the input state is kept)."""
    s = Sizes(cfg)
    h = embeddings(w)[token_id].astype(F32)
    new = []
    for layer, (conv, ssm) in enumerate(state):
        prefix = f"backbone.layers.{layer}."
        normed = rms_norm(h, w[prefix + "norm.weight"], s.eps)
        out, conv, ssm = mixer_token(w, prefix + "mixer.", s, normed, conv, ssm)
        h = (h + out).astype(F32)
        new.append((conv, ssm))
    h = rms_norm(h, w["backbone.norm_f.weight"], s.eps)
    head = embeddings(w) if s.tied else w["lm_head.weight"]
    return (head @ h).astype(F32), new


def forward(w: dict, cfg: dict, ids, state=None):
    """Logits [T, V] of every position of ids, and the state after the last one."""
    state = new_state(cfg) if state is None else state
    rows = []
    for t in ids:
        logits, state = token(w, cfg, int(t), state)
        rows.append(logits)
    return np.stack(rows), state


def greedy(w: dict, cfg: dict, prompt, steps: int):
    """Greedy continuation (argmax of each step's logits); also returns each step's top1 - top2
    logit margin, to tell how close to a tie a step is."""
    logits, state = forward(w, cfg, prompt)
    last = logits[-1]
    out, margins = [], []
    for _ in range(steps):
        top = np.sort(last)[-2:]
        margins.append(float(top[1] - top[0]))
        nxt = int(np.argmax(last))
        out.append(nxt)
        last, state = token(w, cfg, nxt, state)
    return out, margins


def random_weights(cfg: dict, rng: np.random.Generator) -> dict:
    """Hugging Face-named float32 tensors for a config, drawn with O(1) spread everywhere
    (decays from fast to slow, gates and skips of both signs)."""
    s = Sizes(cfg)
    conv_dim = s.I + 2 * s.G * s.N

    def normal(*shape, scale):
        return (scale * rng.standard_normal(shape)).astype(F32)

    w = {"backbone.embeddings.weight": normal(s.V, s.D, scale=0.3),
         "backbone.norm_f.weight": (1 + normal(s.D, scale=0.2)).astype(F32)}
    if not s.tied:
        w["lm_head.weight"] = normal(s.V, s.D, scale=0.15)
    for layer in range(s.L):
        p = f"backbone.layers.{layer}."
        w[p + "norm.weight"] = (1 + normal(s.D, scale=0.2)).astype(F32)
        w[p + "mixer.in_proj.weight"] = normal(2 * s.I + 2 * s.G * s.N + s.H, s.D, scale=0.15)
        w[p + "mixer.conv1d.weight"] = normal(conv_dim, 1, s.W, scale=0.3)
        if cfg.get("use_conv_bias", True):
            w[p + "mixer.conv1d.bias"] = normal(conv_dim, scale=0.1)
        dt = np.exp(rng.uniform(np.log(0.01), np.log(0.5), s.H))
        w[p + "mixer.dt_bias"] = (dt + np.log(-np.expm1(-dt))).astype(F32)  # softplus^-1
        w[p + "mixer.A_log"] = np.log(rng.uniform(1, 16, s.H)).astype(F32)
        w[p + "mixer.D"] = (1 + normal(s.H, scale=0.5)).astype(F32)
        w[p + "mixer.norm.weight"] = (1 + normal(s.I, scale=0.2)).astype(F32)
        w[p + "mixer.out_proj.weight"] = normal(s.D, s.I, scale=0.15)
    return w
