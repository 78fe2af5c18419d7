"""Independent float32 numpy reference of the Grok-1 model math.

A plain re-statement of /work/shared/spec/grok-1.md, section "Model math", used as a golden
reference in tests. It deliberately shares no code with the runtime under test (no jax).
Everything is computed in float32.
"""

import math

import numpy as np

F32 = np.float32


def rms_norm(x: np.ndarray, scale: np.ndarray, eps: float) -> np.ndarray:
    """x / sqrt(mean(x^2) + eps) * scale, over the last axis."""
    x = x.astype(F32)
    ms = np.mean(x * x, axis=-1, keepdims=True)
    return (x / np.sqrt(ms + F32(eps)) * scale.astype(F32)).astype(F32)


def rope(x: np.ndarray, positions: np.ndarray, base: float) -> np.ndarray:
    """Rotate-half (GPT-NeoX) RoPE. x: [..., T, N, H]; positions: [T]."""
    h = x.shape[-1]
    inv_freq = (1.0 / (F32(base) ** (np.arange(0, h, 2, dtype=F32) / F32(h)))).astype(F32)
    phase = positions.astype(F32)[:, None] * inv_freq[None, :]  # [T, H/2]
    phase = np.concatenate([phase, phase], axis=-1)[:, None, :]  # [T, 1, H]
    cos, sin = np.cos(phase).astype(F32), np.sin(phase).astype(F32)
    x1, x2 = x[..., : h // 2], x[..., h // 2 :]
    rotated = np.concatenate([-x2, x1], axis=-1)
    return (x * cos + rotated * sin).astype(F32)


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    x = x.astype(F32)
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return (e / np.sum(e, axis=axis, keepdims=True)).astype(F32)


def gelu_tanh(a: np.ndarray) -> np.ndarray:
    c = F32(math.sqrt(2.0 / math.pi))
    return (F32(0.5) * a * (F32(1.0) + np.tanh(c * (a + F32(0.044715) * a * a * a)))).astype(F32)


def attention(x: np.ndarray, layer: dict, config) -> np.ndarray:
    """x: [B, T, D] (already normed) -> [B, T, D]. Causal, positions 0..T-1."""
    b, t, _ = x.shape
    hd, nq, nkv = config.key_size, config.num_q_heads, config.num_kv_heads
    q = (x @ layer["query"]).reshape(b, t, nq, hd)
    k = (x @ layer["key"]).reshape(b, t, nkv, hd)
    v = (x @ layer["value"]).reshape(b, t, nkv, hd)
    positions = np.arange(t)
    q = rope(q, positions, config.rope_base)
    k = rope(k, positions, config.rope_base)
    group = nq // nkv
    kv_index = np.arange(nq) // group  # query head j -> kv head j // group
    k = k[:, :, kv_index, :]  # [B, T, Nq, H]
    v = v[:, :, kv_index, :]
    logits = np.einsum("bqnh,bknh->bnqk", q, k).astype(F32) * F32(config.attn_output_multiplier)
    cap = F32(config.attn_logit_cap)
    logits = cap * np.tanh(logits / cap)
    causal = np.tril(np.ones((t, t), dtype=bool))
    logits = np.where(causal[None, None], logits, F32(-1e30)).astype(F32)
    probs = softmax(logits, axis=-1)
    out = np.einsum("bnqk,bknh->bqnh", probs, v).astype(F32)
    return (out.reshape(b, t, nq * hd) @ layer["linear"]).astype(F32)


def expert(x: np.ndarray, layer: dict, e: int) -> np.ndarray:
    """One expert on one token vector x [D] -> [D]."""
    a = gelu_tanh(x @ layer["moe_linear"][e])
    return ((a * (x @ layer["moe_linear_v"][e])) @ layer["moe_linear_1"][e]).astype(F32)


def moe(x: np.ndarray, layer: dict, config) -> np.ndarray:
    """x: [B, T, D] (already normed) -> [B, T, D]. Plain loop over tokens and selected experts."""
    b, t, d = x.shape
    out = np.zeros((b, t, d), dtype=F32)
    for i in range(b):
        for j in range(t):
            tok = x[i, j].astype(F32)
            probs = softmax(tok @ layer["router"])  # over all experts
            order = np.argsort(-probs, kind="stable")  # descending, ties -> lower index first
            for e in order[: config.num_selected_experts]:
                out[i, j] += probs[e] * expert(tok, layer, int(e))  # raw prob, not renormalised
    return out


def forward(params: dict, config, tokens: np.ndarray) -> np.ndarray:
    """tokens int [B, T] (every row full length, positions 0..T-1) -> logits float32 [B, T, V]."""
    tokens = np.asarray(tokens)
    eps = config.norm_eps
    x = params["embeddings"][tokens].astype(F32) * F32(config.embedding_multiplier_scale)
    for layer in params["layers"]:
        h = x + rms_norm(attention(rms_norm(x, layer["rms_norm"], eps), layer, config),
                         layer["rms_norm_1"], eps)
        x = h + rms_norm(moe(rms_norm(h, layer["rms_norm_2"], eps), layer, config),
                         layer["rms_norm_3"], eps)
    x = rms_norm(x, params["final_norm"], eps)
    logits = (x @ params["embeddings"].T) * F32(config.output_multiplier_scale)
    return logits.astype(F32)


def greedy(params: dict, config, prompt: list[int], steps: int) -> list[int]:
    """Greedy continuation by full recomputation of forward() each step (no cache): returns
    `steps` new token ids (argmax of float32 logits of the last position; no stop at EOS)."""
    seq = list(prompt)
    new = []
    for _ in range(steps):
        logits = forward(params, config, np.array([seq], dtype=np.int64))
        nxt = int(np.argmax(logits[0, -1]))
        seq.append(nxt)
        new.append(nxt)
    return new


def random_params(config, rng: np.random.Generator, scale: float = 0.1) -> dict:
    """Random float32 params in the layout forward() expects (norm scales around 1)."""
    d, v, hd = config.emb_size, config.vocab_size, config.key_size
    nq, nkv, e, f = config.num_q_heads, config.num_kv_heads, config.num_experts, config.ffn_size

    def w(*shape):
        return (rng.standard_normal(shape) * scale).astype(F32)

    def norm():
        return (1.0 + rng.standard_normal(d) * scale).astype(F32)

    layers = []
    for _ in range(config.num_layers):
        layers.append({
            "query": w(d, nq * hd), "key": w(d, nkv * hd), "value": w(d, nkv * hd),
            "linear": w(nq * hd, d),
            "rms_norm": norm(), "rms_norm_1": norm(), "rms_norm_2": norm(), "rms_norm_3": norm(),
            "router": w(d, e), "moe_linear": w(e, d, f), "moe_linear_v": w(e, d, f),
            "moe_linear_1": w(e, f, d),
        })
    return {"embeddings": w(v, d), "final_norm": norm(), "layers": layers}
