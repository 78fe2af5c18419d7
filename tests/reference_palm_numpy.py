"""An independent numpy re-statement of Palm (github SrijanSriv211/Palm, src/model.py at
89b0bf8), written from its description, not from runtime/models/palm.py: weights in torch's
layout and names (`weights.npz` of tests/fixtures/palm_aft, or `random_weights`), float64,
one sequence, the attention as the token-by-token recurrence it is.

hyper: Palm's hyperparams (vocab_size, n_layer, d_layer, n_head, n_embd, d_rank, d_qkv), plus
optionally "recursion" (our recursion_steps: the whole stack repeated; Palm itself has 1).
"""

from __future__ import annotations

import numpy as np

EPS = float(np.finfo(np.float32).eps)  # F.rms_norm's default for float32 inputs


def rms_norm(x):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + EPS)


def casted(x, w, name, act=False):
    """CastedLinear: F.linear with w1 [rank or out, in], then (relu^2 if act) w2 [out, rank]."""
    h = x @ w[name + ".w1"].T
    if name + ".w2" not in w:
        return h
    if act:
        h = np.maximum(h, 0.0) ** 2
    return h @ w[name + ".w2"].T


def rotary(x, start):
    """x [T, N, H] at positions start..start+T-1: H/4 frequencies then H/4 zeros."""
    quarter = x.shape[-1] // 4
    freqs = np.concatenate([(1 / 1024) ** np.linspace(0, 1, quarter), np.zeros(quarter)])
    theta = np.arange(start, start + x.shape[0])[:, None, None] * freqs  # [T, 1, H/2]
    x1, x2 = np.split(x, 2, axis=-1)
    return np.concatenate([x1 * np.cos(theta) + x2 * np.sin(theta),
                           -x1 * np.sin(theta) + x2 * np.cos(theta)], axis=-1)


def block(x, w, i, hyper, state, start):
    """One Attention On Detail block over x [T, D] continuing `state` [N, H] (the running sum
    of sigmoid(k) * v) -> (x, state after the last token)."""
    heads, d_head = hyper["n_head"], hyper["d_qkv"] // hyper["n_head"]
    qkv = casted(rms_norm(x), w, f"blocks.{i}.qkv", act=True).reshape(len(x), 3 * heads, d_head)
    q, k, v = qkv[:, :heads], qkv[:, heads:2 * heads], qkv[:, 2 * heads:]
    q, k = rotary(rms_norm(q), start), rotary(rms_norm(k), start)
    out = np.zeros_like(q)
    state = state.copy()
    for t in range(len(x)):  # the recurrence, one token at a time
        state = state + (1.0 / (1.0 + np.exp(-k[t]))) * v[t]
        out[t] = np.maximum(q[t], 0.0) * state
    proj = casted(out.reshape(len(x), -1), w, f"blocks.{i}.c_proj")
    u, g = np.split(proj, 2, axis=-1)
    return x + u * (g / (1.0 + np.exp(-g))), state


def application_order(hyper) -> list[int]:
    """Which block runs at each application: each block d_layer times in a row, the whole
    stack `recursion` times."""
    return [i for _ in range(hyper.get("recursion", 1)) for i in range(hyper["n_layer"])
            for _ in range(hyper["d_layer"])]


def forward(w, hyper, tokens, states=None, start=0):
    """Logits [T, V] of tokens after `states` (one [N, H] per application; None: a new
    sequence from position `start`), and the states after them."""
    w = {k: np.asarray(v, np.float64) for k, v in w.items()}
    order = application_order(hyper)
    heads, d_head = hyper["n_head"], hyper["d_qkv"] // hyper["n_head"]
    states = [np.zeros((heads, d_head)) for _ in order] if states is None else list(states)
    x = rms_norm(w["embed.0.weight"][np.asarray(tokens)] @ w["embed.1.w1"].T)
    for a, i in enumerate(order):
        x, states[a] = block(x, w, i, hyper, states[a], start)
    return casted(rms_norm(x), w, "unembed"), states


def greedy(w, hyper, prompt, steps: int) -> list[int]:
    """Argmax continuation by full recomputation."""
    ids = list(prompt)
    for _ in range(steps):
        ids.append(int(np.argmax(forward(w, hyper, ids)[0][-1])))
    return ids[len(prompt):]


def random_weights(hyper, seed: int = 0, scale: float = 1.0) -> dict:
    """A state dict of Palm's names and torch shapes, uniform as its CastedLinear init (times
    `scale`: at 1 each block changes its input only slightly)."""
    rng = np.random.default_rng(seed)
    v, d, r, q = hyper["vocab_size"], hyper["n_embd"], hyper["d_rank"], hyper["d_qkv"]

    def uniform(out, n_in):
        bound = scale * 3 ** 0.5 * 0.5 * n_in ** -0.5
        return rng.uniform(-bound, bound, (out, n_in)).astype(np.float32)

    w = {"embed.0.weight": rng.standard_normal((v, r)).astype(np.float32),
         "embed.1.w1": uniform(d, r), "unembed.w1": uniform(r, d), "unembed.w2": uniform(v, r)}
    for i in range(hyper["n_layer"]):
        w.update({f"blocks.{i}.qkv.w1": uniform(r, d), f"blocks.{i}.qkv.w2": uniform(3 * q, r),
                  f"blocks.{i}.c_proj.w1": uniform(r, q),
                  f"blocks.{i}.c_proj.w2": uniform(2 * d, r)})
    return w
