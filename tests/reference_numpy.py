"""Independent float32 numpy reference of the Grok-1 model math and its family options.

A plain re-statement of /work/shared/spec/grok-1.md, section "Model math" (plus the Llama /
Mistral / Mixtral and PaLM-style options: parallel blocks, bias-free LayerNorm, QK-norm, ungated
and squared-ReLU FFNs, recursion over a shared layer list), used as a golden reference in tests.
Layer keys keep the Grok names (rms_norm, rms_norm_2, ...) whatever the norm kind. It deliberately shares no code with the runtime under test (no jax).
Everything is computed in float32; with kv_dtype bfloat16, keys and values are rounded to bf16
(ml_dtypes) after RoPE, as a bf16 KV memory holds them.
"""

import math

import ml_dtypes
import numpy as np

F32 = np.float32


def rms_norm(x: np.ndarray, scale: np.ndarray, eps: float) -> np.ndarray:
    """x / sqrt(mean(x^2) + eps) * scale, over the last axis."""
    x = x.astype(F32)
    ms = np.mean(x * x, axis=-1, keepdims=True)
    return (x / np.sqrt(ms + F32(eps)) * scale.astype(F32)).astype(F32)


def layer_norm(x: np.ndarray, scale: np.ndarray, eps: float) -> np.ndarray:
    """Bias-free LayerNorm: (x - mean) / sqrt(var + eps) * scale, over the last axis."""
    x = x.astype(F32)
    centred = x - np.mean(x, axis=-1, keepdims=True)
    var = np.mean(centred * centred, axis=-1, keepdims=True)
    return (centred / np.sqrt(var + F32(eps)) * scale.astype(F32)).astype(F32)


def normalize(x: np.ndarray, scale: np.ndarray, config) -> np.ndarray:
    kind = getattr(config, "norm_type", "rms")
    return (layer_norm if kind == "layer" else rms_norm)(x, scale, config.norm_eps)


def llama3_frequency(freq: float, config) -> float:
    """One RoPE frequency under Llama-3 scaling: long wavelengths slowed by `factor`, short ones
    kept, a linear blend in (original/high_freq_factor, original/low_freq_factor)."""
    wavelength = 2 * math.pi / freq
    original = config.rope_original_max_len
    low, high = config.rope_low_freq_factor, config.rope_high_freq_factor
    if wavelength < original / high:
        return freq
    if wavelength > original / low:
        return freq / config.rope_scaling_factor
    blend = (original / wavelength - low) / (high - low)
    return (1 - blend) * freq / config.rope_scaling_factor + blend * freq


def rope(x: np.ndarray, positions: np.ndarray, base: float, config=None) -> np.ndarray:
    """Rotate-half (GPT-NeoX) RoPE. x: [..., T, N, H]; positions: [T]."""
    h = x.shape[-1]
    inv_freq = (1.0 / (F32(base) ** (np.arange(0, h, 2, dtype=F32) / F32(h)))).astype(F32)
    if config is not None and getattr(config, "rope_scaling_factor", None) is not None:
        inv_freq = np.array([llama3_frequency(float(f), config) for f in inv_freq], dtype=F32)
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
    if getattr(config, "qk_norm", False):  # per head, before RoPE
        q = normalize(q, layer["query_norm"], config)
        k = normalize(k, layer["key_norm"], config)
    positions = np.arange(t)
    q = rope(q, positions, config.rope_base, config)
    k = rope(k, positions, config.rope_base, config)
    if getattr(config, "kv_dtype", None) == "bfloat16":  # keys and values as the memory holds them
        k, v = (a.astype(ml_dtypes.bfloat16).astype(F32) for a in (k, v))
    group = nq // nkv
    kv_index = np.arange(nq) // group  # query head j -> kv head j // group
    k = k[:, :, kv_index, :]  # [B, T, Nq, H]
    v = v[:, :, kv_index, :]
    logits = np.einsum("bqnh,bknh->bnqk", q, k).astype(F32) * F32(config.attn_output_multiplier)
    if getattr(config, "attn_logit_cap", None) is not None:
        cap = F32(config.attn_logit_cap)
        logits = cap * np.tanh(logits / cap)
    causal = np.tril(np.ones((t, t), dtype=bool))
    window = getattr(config, "sliding_window", None)
    if window is not None:  # query p sees keys p - window + 1 .. p
        causal &= np.triu(np.ones((t, t), dtype=bool), k=-(window - 1))
    logits = np.where(causal[None, None], logits, F32(-1e30)).astype(F32)
    probs = softmax(logits, axis=-1)
    out = np.einsum("bnqk,bknh->bqnh", probs, v).astype(F32)
    return (out.reshape(b, t, nq * hd) @ layer["linear"]).astype(F32)


def silu(a: np.ndarray) -> np.ndarray:
    return (a / (F32(1.0) + np.exp(-a))).astype(F32)


def relu_squared(a: np.ndarray) -> np.ndarray:
    return (np.maximum(a, F32(0)) ** 2).astype(F32)


def activation(config):
    return {"silu": silu, "relu_squared": relu_squared}.get(
        getattr(config, "activation", "gelu_tanh"), gelu_tanh)


def ffn(x: np.ndarray, w_in, w_gate, w_out, act) -> np.ndarray:
    """act(x w_in) [* (x w_gate) when gated] @ w_out."""
    a = act(x @ w_in)
    if w_gate is not None:
        a = a * (x @ w_gate)
    return (a @ w_out).astype(F32)


def expert(x: np.ndarray, layer: dict, e: int, act=gelu_tanh) -> np.ndarray:
    """One expert on one token vector x [D] -> [D]."""
    gate = layer["moe_linear_v"][e] if "moe_linear_v" in layer else None
    return ffn(x, layer["moe_linear"][e], gate, layer["moe_linear_1"][e], act)


def dense_ffn(x: np.ndarray, layer: dict, config) -> np.ndarray:
    """Dense FFN on [B, T, D]."""
    return ffn(x, layer["mlp_linear"], layer.get("mlp_linear_v"), layer["mlp_linear_1"],
               activation(config))


def moe(x: np.ndarray, layer: dict, config) -> np.ndarray:
    """x: [B, T, D] (already normed) -> [B, T, D]. Plain loop over tokens and selected experts."""
    b, t, d = x.shape
    out = np.zeros((b, t, d), dtype=F32)
    for i in range(b):
        for j in range(t):
            tok = x[i, j].astype(F32)
            probs = softmax(tok @ layer["router"])  # over all experts
            order = np.argsort(-probs, kind="stable")  # descending, ties -> lower index first
            chosen = order[: config.num_selected_experts]
            gates = probs[chosen]  # raw probabilities (Grok-1) ...
            if getattr(config, "moe_renormalize", False):
                gates = gates / gates.sum()  # ... or renormalised over the chosen (Mixtral)
            for gate, e in zip(gates, chosen):
                out[i, j] += gate * expert(tok, layer, int(e), activation(config))
    return out


def forward(params: dict, config, tokens: np.ndarray) -> np.ndarray:
    """tokens int [B, T] (every row full length, positions 0..T-1) -> logits float32 [B, T, V]."""
    tokens = np.asarray(tokens)
    x = params["embeddings"][tokens].astype(F32) * F32(config.embedding_multiplier_scale)
    sandwich = getattr(config, "sandwich_norms", True)

    def feed_forward(normed, layer):
        f = moe(normed, layer, config) if config.num_experts else dense_ffn(normed, layer, config)
        return normalize(f, layer["rms_norm_3"], config) if sandwich else f

    # Recursion: the same list of layers applied recursion_steps times in sequence.
    for layer in params["layers"] * getattr(config, "recursion_steps", 1):
        normed = normalize(x, layer["rms_norm"], config)
        a = attention(normed, layer, config)
        a = normalize(a, layer["rms_norm_1"], config) if sandwich else a
        if getattr(config, "parallel_block", False):  # attention and FFN from the same input
            x = x + a + feed_forward(normed, layer)
        else:
            h = x + a
            x = h + feed_forward(normalize(h, layer["rms_norm_2"], config), layer)
    x = normalize(x, params["final_norm"], config)
    head = params["unembed"] if "unembed" in params else params["embeddings"].T
    logits = (x @ head) * F32(config.output_multiplier_scale)
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

    sandwich = getattr(config, "sandwich_norms", True)
    layers = []
    for _ in range(config.num_layers):
        layer = {"query": w(d, nq * hd), "key": w(d, nkv * hd), "value": w(d, nkv * hd),
                 "linear": w(nq * hd, d), "rms_norm": norm()}
        if not getattr(config, "parallel_block", False):
            layer.update(rms_norm_2=norm())
        if sandwich:
            layer.update(rms_norm_1=norm(), rms_norm_3=norm())
        if getattr(config, "qk_norm", False):
            layer.update(query_norm=norm()[:hd], key_norm=norm()[:hd])
        if e:
            layer.update(router=w(d, e), moe_linear=w(e, d, f), moe_linear_v=w(e, d, f),
                         moe_linear_1=w(e, f, d))
        else:
            layer.update(mlp_linear=w(d, f), mlp_linear_v=w(d, f), mlp_linear_1=w(f, d))
        if not getattr(config, "gated_ffn", True):
            layer.pop("moe_linear_v" if e else "mlp_linear_v")
        layers.append(layer)
    params = {"embeddings": w(v, d), "final_norm": norm(), "layers": layers}
    if not getattr(config, "tie_embeddings", True):
        params["unembed"] = w(d, v)
    return params
