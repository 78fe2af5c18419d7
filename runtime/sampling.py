"""Token sampling as pure functions of (logits, per-row keys, per-row settings).

One compiled step serves rows with different settings: temperature 0 means exact greedy argmax
(of the float32 logits, through jnp.where, no separate program), top_k 0, top_p 1 and min_p 0
mean off. Each row has its own key, derived from the request's seed, its choice index (the n
samples of one prompt) and the index of the token being sampled, so a request's samples do not
depend on its slot or on the other rows of the batch.

The definitions follow vLLM's sampler (v1): logit bias, then the penalties (repetition on
prompt and output tokens as in the CTRL paper and transformers; presence and frequency on
output tokens as OpenAI defines them), then greedy argmax or temperature, min_p, top-k, top-p.
Log-probabilities are those of the model's own distribution (vLLM's default "raw" logprobs:
before bias, penalties, temperature and filters).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from runtime import cpu_kernels, layout


def row_keys(seeds, steps, choices=None):
    """seeds [B] uint32/int32, steps [B] int32 (choices [B] int32: the sample's index among a
    prompt's n) -> one PRNG key per row for this token."""
    if choices is None:
        return jax.vmap(lambda s, t: jax.random.fold_in(jax.random.PRNGKey(s), t))(seeds, steps)
    return jax.vmap(lambda s, c, t: jax.random.fold_in(
        jax.random.fold_in(jax.random.PRNGKey(s), c), t))(seeds, choices, steps)


def penalized(logits, bias, prompt_seen, output_counts, repetition, presence, frequency):
    """logits [B, V] f32 + bias [B, V], then the penalties of rows [B] whose token history is
    prompt_seen [B, V] bool and output_counts [B, V] int32: repetition divides a seen token's
    positive logit (multiplies a negative one) by the penalty; presence subtracts a constant
    from every token generated so far; frequency subtracts per occurrence."""
    logits = logits.astype(jnp.float32) + bias
    seen = prompt_seen | (output_counts > 0)
    r = repetition[:, None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / r, logits * r), logits)
    counts = output_counts.astype(jnp.float32)
    return logits - frequency[:, None] * counts - presence[:, None] * (counts > 0)


def token_logprobs(logits, tokens, top: int):
    """logits [B, V], tokens [B] -> (logprob [B] f32 of each row's token, top ids [B, top] i32,
    top logprobs [B, top] f32): log-softmax of the float32 logits."""
    logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    chosen = jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
    values, ids = jax.lax.top_k(logprobs, top)
    return chosen, ids.astype(jnp.int32), values


def filter_logits(logits, temperature, top_k, top_p, min_p=None):
    """logits [B, V] f32 scaled by 1/temperature, with tokens outside top-k / top-p / min-p at
    -inf.

    top_p keeps the smallest set of most likely tokens whose probability reaches top_p (the
    token that crosses the threshold is kept); top_k keeps the k most likely (ties included);
    min_p keeps the tokens whose probability is at least min_p times the most likely one's.
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
    if min_p is not None:  # p >= min_p * p_max  <=>  s >= s_max + log(min_p)
        floor = ordered[:, :1] + jnp.log(min_p)[:, None]  # -inf for min_p 0
        keep &= scaled >= floor
    return jnp.where(keep, scaled, -jnp.inf)


def greedy_tokens(logits):
    """jnp.argmax(logits, axis=-1): the first maximum, or in a row with NaNs the first NaN; in
    the CPU kernel where it runs (BENCHMARKS.md, "Decode step overheads"), else as two plain
    reductions: XLA:CPU's argmax, one reduction over (value, index) pairs, is not vectorised
    ("Greedy sampling's argmax"), and there a NaN after a larger maximum loses to it (XLA:CPU's
    vector max drops NaNs). logits [B, V] float32 -> [B] int32."""
    if cpu_kernels.greedy_usable():
        return cpu_kernels.greedy_tokens(logits)
    top = jnp.max(logits, axis=-1, keepdims=True)  # NaN where a row has one
    index = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    at_top = (logits == top) | jnp.isnan(logits)
    return jnp.min(jnp.where(at_top, index, logits.shape[-1]), axis=-1).astype(jnp.int32)


def sample(logits, keys, temperature, top_k, top_p, min_p=None):
    """logits [B, V]; keys [B, 2]; temperature, top_p, min_p [B] f32; top_k [B] i32 ->
    tokens [B] i32."""
    logits = logits.astype(jnp.float32)
    greedy = greedy_tokens(logits)

    def draw(_):
        filtered = filter_logits(logits, temperature, top_k, top_p, min_p)
        drawn = jax.vmap(jax.random.categorical)(keys, filtered)
        return jnp.where(temperature > 0, drawn, greedy).astype(jnp.int32)

    if not layout.greedy_batches_skip_the_sort():
        return draw(None)
    # An all-greedy batch skips the sort over the vocabulary that filtering needs.
    return jax.lax.cond(jnp.any(temperature > 0), draw, lambda _: greedy, None)

