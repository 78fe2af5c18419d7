"""Token sampling as pure functions of (logits, per-row keys, per-row settings).

One compiled step serves rows with different settings: temperature 0 means exact greedy argmax
(of the float32 logits, through jnp.where, no separate program), top_k 0 and top_p 1 mean off.
Each row has its own key, derived from the request's seed and the index of the token being
sampled, so a request's samples do not depend on its slot or on the other rows of the batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from runtime import layout


def row_keys(seeds, steps):
    """seeds [B] uint32/int32, steps [B] int32 -> one PRNG key per row for this token."""
    return jax.vmap(lambda s, t: jax.random.fold_in(jax.random.PRNGKey(s), t))(seeds, steps)


def filter_logits(logits, temperature, top_k, top_p):
    """logits [B, V] f32 scaled by 1/temperature, with tokens outside top-k / top-p at -inf.

    top_p keeps the smallest set of most likely tokens whose probability reaches top_p (the
    token that crosses the threshold is kept); top_k keeps the k most likely (ties included).
    """
    vocab = logits.shape[-1]
    safe_t = jnp.where(temperature > 0, temperature, 1.0)
    scaled = logits.astype(jnp.float32) / safe_t[:, None]  # float32: bf16 would merge near-ties
    ordered = jnp.sort(scaled, axis=-1)[:, ::-1]  # [B, V] descending

    k = jnp.where((top_k > 0) & (top_k < vocab), top_k, vocab)
    kth = jnp.take_along_axis(ordered, (k - 1)[:, None], axis=-1)  # [B, 1]

    probs = jax.nn.softmax(ordered, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly more likely tokens
    # top_p >= 1 keeps everything: float32 cumsum can reach 1.0 before the tail
    keep_sorted = (before < top_p[:, None]) | (top_p[:, None] >= 1.0)
    # the smallest logit still kept by top-p (the first token is always kept)
    cutoff = jnp.min(jnp.where(keep_sorted, ordered, jnp.inf), axis=-1, keepdims=True)

    keep = (scaled >= kth) & (scaled >= cutoff)
    return jnp.where(keep, scaled, -jnp.inf)


def sample(logits, keys, temperature, top_k, top_p):
    """logits [B, V]; keys [B, 2]; temperature, top_p [B] f32; top_k [B] i32 -> tokens [B] i32."""
    logits = logits.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw(_):
        filtered = filter_logits(logits, temperature, top_k, top_p)
        drawn = jax.vmap(jax.random.categorical)(keys, filtered)
        return jnp.where(temperature > 0, drawn, greedy).astype(jnp.int32)

    if not layout.greedy_batches_skip_the_sort():
        return draw(None)
    # An all-greedy batch skips the sort over the vocabulary that filtering needs.
    return jax.lax.cond(jnp.any(temperature > 0), draw, lambda _: greedy, None)

