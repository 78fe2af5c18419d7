"""Mamba-2 (state-space duality) language model in Haiku: the math, top to bottom.

Shape glossary (einsum letters and shape comments):
  B batch rows, T tokens of this call, D model width (emb_size), V vocab, L layers,
  H SSM heads, P head dim, I = H * P inner width, G groups, R = H / G heads per group
  (head h = g * R + r reads the B/C of group g), N state size, W convolution width,
  C convolution channels of one part (I for x, G * N for B and for C),
  Q chunk length, K chunks (T padded to K * Q), l / s output / source position in a chunk,
  z / k destination / source chunk.

Block:  x + Mixer(RMSNorm(x)), after the embedding; then a final RMSNorm and the head (the
embeddings transposed, or unembed/w). The mixer (Dao & Gu 2024, "Transformers are SSMs",
and the reference implementation mamba_ssm `Mamba2`):

  z, x, B, C, dt = h @ in_proj_{z,x,b,c,dt}           separate weights, so each shards cleanly
  x, B, C = silu(causal depthwise conv over time (width W, bias) of each)
  dt = clamp(softplus(dt + dt_bias), dt_min, dt_max);  A = -exp(a_log)           [H]
  state_t = exp(dt_t A) state_{t-1} + dt_t x_t (outer) B_t                       [H, P, N]
  y_t = state_t C_t + d x_t;  out = (RMSNorm per group of I / G channels(y * silu(z))) @ out_proj

A prompt (T > 1) runs the chunked SSD algorithm: within a chunk the recurrence is unrolled into
a masked (T x T "attention-like") product, between chunks the states are carried by a small
recurrence over chunk ends. Plain einsums and cumulative sums of static shape. A decode step
(T == 1) is the recurrence itself. Both start from, and return, the state kept in SSMMemory,
whose size does not depend on the context length.

Padding: rows are right-padded; a row consumes only its first `lengths[b]` tokens. Past them
dt is 0 (decay 1, input 0: the state is untouched) and the convolution history is taken from
the last W - 1 consumed inputs, so a padded row ends in exactly the state of its valid tokens;
a row with length 0 (an idle slot at decode) keeps its state bit for bit.

Weights are float32 arrays or QuantizedWeight8bit (in_proj_*, out_proj, unembed; see
quant.py): every matmul goes through products.linear. Activations are in `config.dtype`; the SSM
(state, decays, dt), the norms and the convolution accumulate in float32; the residual stream
is float32 when ssm_residual_in_fp32 (as in the reference).

Parameter paths (the one path language of partition rules, readers and error messages):
  language_model/in_out_embed/embeddings                         [V, D]
  language_model/rms_norm/scale                                  [D]      final norm
  language_model/unembed/w                                       [D, V]   untied head only
  language_model/mamba/layers/mamba_layer/rms_norm/scale         [L, D]
  language_model/mamba/layers/mamba_layer/mixer/<module>/<param>  [L, ...] stacked layers:
    in_proj_{z,x}/w [D, I], in_proj_{b,c}/w [D, G*N], in_proj_dt/w [D, H],
    conv_x/{w [W, I], b [I]}, conv_{b,c}/{w [W, G*N], b [G*N]} (b only with ssm_conv_bias),
    gated_rms_norm/scale [I], out_proj/w [I, D]
  language_model/mamba/layers/mamba_layer/mixer/{dt_bias, a_log, d}   [L, H]

Transformer fields of ModelConfig (key_size, heads, experts, multipliers, RoPE, soft cap, ...)
are not read here.
"""

from __future__ import annotations

import math

import haiku as hk
import jax
import jax.numpy as jnp

from runtime.config import ModelConfig
from runtime.models.layers import RMSNorm, embedding_table, matmul_weight, output_logits
from runtime.models.api import Model
from runtime.products import linear
from runtime.tables import embedding_rows
from runtime.ssm_memory import (SSMMemory, init_ssm_memory, read_ssm_slots, ssm_memory_specs,
                                write_ssm_slots)

F32 = jnp.float32


def _a_log_init(shape, dtype):
    """A = -exp(a_log) uniform in [-16, -1] (mamba_ssm's A_init_range)."""
    return jnp.log(jax.random.uniform(hk.next_rng_key(), shape, dtype, 1.0, 16.0))


def _dt_bias_init(shape, dtype):
    """softplus(dt_bias) log-uniform in [1e-3, 0.1]: the inverse softplus of such a dt."""
    dt = jnp.exp(jax.random.uniform(hk.next_rng_key(), shape, dtype, math.log(1e-3),
                                    math.log(0.1)))
    return dt + jnp.log(-jnp.expm1(-dt))


def segment_sums(v):
    """v [..., Q] -> [..., Q, Q]: out[..., l, s] = v[s+1] + ... + v[l] for l >= s, -inf above.

    Summed from masked copies of v (not as a difference of cumulative sums), so a long run of
    strong decay cannot cancel catastrophically; exp() of it is the decay from s to l.
    """
    q = v.shape[-1]
    below = jnp.tril(jnp.ones((q, q), bool), -1)
    sums = jnp.cumsum(jnp.where(below, v[..., :, None], 0.0), axis=-2)
    return jnp.where(jnp.tril(jnp.ones((q, q), bool)), sums, -jnp.inf)


def ssd_chunked(x, dt, a, b, c, state, chunk: int):
    """The SSD algorithm over T tokens in chunks of Q = min(chunk, T); all float32.

    x [B, T, G, R, P]; dt [B, T, G, R] (0 at padding); a [G, R]; b, c [B, T, G, N];
    state [B, G, R, P, N] before the first token. Returns y [B, T, G, R, P] (without the d
    skip) and the state after the last token.
    """
    batch, length = x.shape[:2]
    q = min(chunk, length)
    count = -(-length // q)
    pad = count * q - length  # padded tokens have dt = 0: decay 1, no input

    def chunks(t):  # [B, T, ...] -> [B, K, Q, ...]
        t = jnp.pad(t, [(0, 0), (0, pad)] + [(0, 0)] * (t.ndim - 2))
        return t.reshape(batch, count, q, *t.shape[2:])

    x, dt, b, c = chunks(x), chunks(dt), chunks(b), chunks(c)
    log_decay = dt * a  # [B, K, Q, G, R]
    cum = jnp.cumsum(log_decay, axis=2)  # [B, K, Q, G, R] decay from the chunk start

    # 1. Within each chunk: y_l = sum_{s <= l} (C_l . B_s) exp(sum a dt over (s, l]) dt_s x_s
    decay = jnp.exp(segment_sums(jnp.moveaxis(log_decay, 2, -1)))  # [B, K, G, R, Q(l), Q(s)]
    scores = jnp.einsum("bklgn,bksgn->bkgls", c, b)  # [B, K, G, Q, Q]
    weights = scores[:, :, :, None] * decay * jnp.moveaxis(dt, 2, -1)[..., None, :]
    y_diag = jnp.einsum("bkgrls,bksgrp->bklgrp", weights, x)  # [B, K, Q, G, R, P]

    # 2. Each chunk's own inputs carried to its end: its contribution to the next state
    to_end = jnp.exp(cum[:, :, -1:] - cum)  # [B, K, Q, G, R]
    own = jnp.einsum("bksgn,bksgr,bksgrp->bkgrpn", b, to_end * dt, x)  # [B, K, G, R, P, N]

    # 3. Between chunks: the state at each chunk start, from the initial state and the chunks
    #    before it (a recurrence over K + 1 chunk ends, written as one masked product)
    totals = jnp.pad(jnp.moveaxis(cum[:, :, -1], 1, -1), [(0, 0)] * 3 + [(1, 0)])  # [B,G,R,K+1]
    across = jnp.exp(segment_sums(totals))  # [B, G, R, K+1(z), K+1(k)]
    ends = jnp.concatenate([state[:, None], own], axis=1)  # [B, K+1, G, R, P, N]
    starts = jnp.einsum("bgrzk,bkgrpn->bzgrpn", across, ends)  # [B, K+1, G, R, P, N]
    starts, final = starts[:, :-1], starts[:, -1]

    # 4. Each chunk's start state read out at every position of the chunk
    y_off = jnp.einsum("bklgn,bkgrpn,bklgr->bklgrp", c, starts, jnp.exp(cum))

    y = (y_diag + y_off).reshape(batch, count * q, *x.shape[3:])[:, :length]
    return y, final  # [B, T, G, R, P], [B, G, R, P, N]


def ssd_step(x, dt, a, b, c, state):
    """One token of the recurrence; float32. x [B, G, R, P]; dt [B, G, R]; b, c [B, G, N]."""
    state = state * jnp.exp(dt * a)[..., None, None] \
        + jnp.einsum("bgr,bgrp,bgn->bgrpn", dt, x, b)  # [B, G, R, P, N]
    return jnp.einsum("bgrpn,bgn->bgrp", state, c), state


def causal_conv(c: ModelConfig, inputs, history, lengths, name: str):
    """Causal depthwise convolution over time, float32 accumulation, then SiLU.

    inputs [B, T, C]; history [B, W-1, C] (the inputs before these) -> outputs [B, T, C] and
    the new history: the last W - 1 inputs up to each row's lengths[b]-th token.
    """
    width, (_, length, channels) = c.ssm_conv_kernel, inputs.shape
    with hk.name_scope(name):
        w = hk.get_parameter("w", [width, channels], F32,
                             init=hk.initializers.TruncatedNormal(1.0 / math.sqrt(width)))
        bias = hk.get_parameter("b", [channels], F32, init=jnp.zeros) \
            if c.ssm_conv_bias else None
    padded = jnp.concatenate([history.astype(inputs.dtype), inputs], axis=1)  # [B, W-1+T, C]
    out = sum(padded[:, k:k + length].astype(F32) * w[k] for k in range(width))
    if bias is not None:
        out = out + bias
    keep = lengths[:, None] + jnp.arange(width - 1)  # [B, W-1]
    history = jnp.take_along_axis(padded, keep[:, :, None], axis=1)
    return jax.nn.silu(out).astype(inputs.dtype), history


def gated_rms_norm(c: ModelConfig, y, z):
    """RMSNorm over each group's I / G channels of y * silu(z) (mamba_ssm's RMSNormGated
    with group_size = I / G, norm_before_gate=False), or norm(y) * silu(z)."""
    with hk.name_scope("gated_rms_norm"):
        scale = hk.get_parameter("scale", [y.shape[-1]], F32,
                                 init=hk.initializers.Constant(1.0))
    gate = jax.nn.silu(z.astype(F32))
    if not c.ssm_norm_before_gate:
        y = y * gate
    grouped = y.reshape(*y.shape[:-1], c.ssm_groups, -1)  # [B, T, G, I/G]
    grouped = grouped * jax.lax.rsqrt(jnp.mean(jnp.square(grouped), axis=-1, keepdims=True)
                                      + c.norm_eps)
    y = grouped.reshape(y.shape) * scale
    return y * gate if c.ssm_norm_before_gate else y


class Mamba2Mixer(hk.Module):
    def __init__(self, config: ModelConfig, name: str = "mixer"):
        super().__init__(name=name)
        self.c = config

    def __call__(self, h, conv_x, conv_b, conv_c, state, lengths):
        # h [B, T, D] normalised input; conv_* [B, W-1, C]; state [B, H, P, N]; lengths [B]
        c = self.c
        batch, length, width = h.shape
        groups, per_group = c.ssm_groups, c.ssm_heads // c.ssm_groups
        heads, head_dim, size = c.ssm_heads, c.ssm_head_dim, c.ssm_state_size
        inner = heads * head_dim

        z = linear(h, matmul_weight("in_proj_z", [width, inner]))  # [B, T, I]
        x = linear(h, matmul_weight("in_proj_x", [width, inner]))  # [B, T, I]
        b = linear(h, matmul_weight("in_proj_b", [width, groups * size]))  # [B, T, G*N]
        cc = linear(h, matmul_weight("in_proj_c", [width, groups * size]))  # [B, T, G*N]
        dt = linear(h, matmul_weight("in_proj_dt", [width, heads]), out_dtype=F32)  # [B, T, H]

        x, conv_x = causal_conv(c, x, conv_x, lengths, "conv_x")
        b, conv_b = causal_conv(c, b, conv_b, lengths, "conv_b")
        cc, conv_c = causal_conv(c, cc, conv_c, lengths, "conv_c")

        dt_bias = hk.get_parameter("dt_bias", [heads], F32, init=_dt_bias_init)
        a_log = hk.get_parameter("a_log", [heads], F32, init=_a_log_init)
        d = hk.get_parameter("d", [heads], F32, init=jnp.ones)
        # The time-step limit holds at prefill and decode alike (the one-token kernels of
        # mamba_ssm and transformers skip it; with the default (0, inf) that is the same).
        dt = jnp.clip(jax.nn.softplus(dt + dt_bias), c.ssm_dt_min, c.ssm_dt_max)
        consumed = jnp.arange(length)[None, :] < lengths[:, None]  # [B, T]
        dt = jnp.where(consumed[..., None], dt, 0.0).reshape(batch, length, groups, per_group)
        a = -jnp.exp(a_log).reshape(groups, per_group)  # [G, R]

        xs = x.astype(F32).reshape(batch, length, groups, per_group, head_dim)
        bs = b.astype(F32).reshape(batch, length, groups, size)
        cs = cc.astype(F32).reshape(batch, length, groups, size)
        state = state.reshape(batch, groups, per_group, head_dim, size)
        if length == 1:  # decode: the recurrence itself
            y, state = ssd_step(xs[:, 0], dt[:, 0], a, bs[:, 0], cs[:, 0], state)
            y = y[:, None]
        else:
            y, state = ssd_chunked(xs, dt, a, bs, cs, state, c.ssm_chunk_size)
        y = y + d.reshape(groups, per_group)[:, :, None] * xs  # [B, T, G, R, P]
        y = gated_rms_norm(c, y.reshape(batch, length, inner), z)  # [B, T, I] float32
        out = linear(y.astype(h.dtype), matmul_weight("out_proj", [inner, width]))  # [B, T, D]
        return out, conv_x, conv_b, conv_c, state.reshape(batch, heads, head_dim, size)


class MambaLayer(hk.Module):
    def __init__(self, config: ModelConfig, name: str = "mamba_layer"):
        super().__init__(name=name)
        self.c = config

    def __call__(self, x, conv_x, conv_b, conv_c, state, lengths):
        normed = RMSNorm(self.c.norm_eps, name="rms_norm")(x).astype(self.c.dtype)
        out, conv_x, conv_b, conv_c, state = Mamba2Mixer(self.c)(normed, conv_x, conv_b, conv_c,
                                                                 state, lengths)
        return x + out.astype(x.dtype), conv_x, conv_b, conv_c, state


class Mamba(hk.Module):
    def __init__(self, config: ModelConfig, name: str = "mamba"):
        super().__init__(name=name)
        self.c = config

    def __call__(self, x, memory: SSMMemory, lengths):
        # x [B, T, D]; memory leaves [L, B, ...]
        def layer(x, conv_x, conv_b, conv_c, state):
            x, *new = MambaLayer(self.c)(x, conv_x, conv_b, conv_c, state, lengths)
            return x, tuple(new)

        stack = hk.layer_stack(self.c.num_layers, with_per_layer_inputs=True, name="layers")
        x, (conv_x, conv_b, conv_c, state) = stack(layer)(x, memory.conv_x, memory.conv_b,
                                                         memory.conv_c, memory.ssm)
        return x, SSMMemory(conv_x, conv_b, conv_c, state, memory.positions + lengths)


class LanguageModel(hk.Module):
    def __init__(self, config: ModelConfig, name: str = "language_model"):
        super().__init__(name=name)
        self.c = config

    def __call__(self, tokens, memory: SSMMemory, lengths, output_index=None):
        """tokens [B, T], of which each row consumes its first lengths [B] after its state.

        Returns float32 logits [B, T, V] (or [B, V] at output_index [B] only) and the memory
        advanced by lengths tokens.
        """
        c = self.c
        dtype = jnp.dtype(c.dtype)
        stream = F32 if c.ssm_residual_in_fp32 else dtype
        embeddings = embedding_table(c)
        x = embedding_rows(embeddings, tokens).astype(dtype).astype(stream)  # [B, T, D]
        x, memory = Mamba(c)(x, memory, lengths)
        x = RMSNorm(c.norm_eps, name="rms_norm")(x).astype(dtype)
        return output_logits(c, x, embeddings, output_index), memory


def build_mamba2(config: ModelConfig):
    """The Model (see models/api.py) of a Mamba-2 config: apply(params, tokens, memory, lengths,
    output_index=None) -> (logits, memory), and the family-neutral engine interface."""

    def forward(tokens, memory, lengths, output_index=None):
        return LanguageModel(config)(tokens, memory, lengths, output_index)

    transformed = hk.without_apply_rng(hk.transform(forward))

    @jax.jit
    def init(rng):
        # One token of one row: parameter shapes do not depend on it.
        return transformed.init(rng, jnp.zeros((1, 1), jnp.int32), init_ssm_memory(config, 1),
                                jnp.ones((1,), jnp.int32))

    def step(params, memory: SSMMemory, tokens, lengths):
        """Consume tokens [B, T] (the first lengths [B] of each row) after each row's state."""
        return transformed.apply(params, tokens, memory, lengths, jnp.maximum(lengths - 1, 0))

    def chunk_step(params, memory: SSMMemory, tokens, lengths, slots, starts, window=None):
        """A prompt chunk continuing the states of rows slots [n] (see models/api.py): the
        state is per row and constant in size, so the rows are gathered, zeroed where a new
        prompt starts (starts 0), stepped and put back."""
        del window  # no memory positions to window
        rows = read_ssm_slots(memory, slots)
        new = starts == 0
        rows = jax.tree.map(
            lambda a: jnp.where(new.reshape((1, -1) + (1,) * (a.ndim - 2)), 0, a)
            if a.ndim > 1 else jnp.where(new, 0, a), rows)
        logits, rows = step(params, rows, tokens, lengths)
        return logits, write_ssm_slots(memory, rows, slots)

    return Model(config, init, transformed.apply,
                 new_memory=lambda rows, length: init_ssm_memory(config, rows, length),
                 memory_specs=lambda rows, mesh: ssm_memory_specs(config, rows, mesh),
                 step=step, write_slots=write_ssm_slots, chunk_step=chunk_step,
                 all_logits=lambda params, tokens, lengths: transformed.apply(
                     params, tokens, init_ssm_memory(config, *tokens.shape),
                     jnp.full(tokens.shape[:1], tokens.shape[1], jnp.int32)
                     if lengths is None else lengths)[0])
