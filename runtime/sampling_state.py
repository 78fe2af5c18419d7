"""The sampler's per-row settings and per-slot token history, on the device.

Shape glossary: B slots, n rows of one call, V vocabulary, NB = MAX_LOGIT_BIAS, K =
MAX_TOP_LOGPROBS. History lives next to the model's memory (the engine donates both to every
step): which tokens each slot's prompt holds and how often each was generated (the penalties
read them) and the slot's logit bias, dense, so a step applies them with elementwise ops.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from runtime import layout
from runtime.sampling import penalized, row_keys, sample, token_logprobs

MAX_LOGIT_BIAS = 300  # entries per request (OpenAI's limit)
MAX_TOP_LOGPROBS = 20  # top_logprobs per token (OpenAI's limit); one compiled width


class RowSettings(NamedTuple):
    """Per-row sampling settings, arrays [n] (neutral values on padding rows)."""
    seed: np.ndarray  # int32
    choice: np.ndarray  # int32: which of the prompt's n samples (its PRNG stream)
    temperature: np.ndarray  # float32, 0 = greedy
    top_k: np.ndarray  # int32, 0 = off
    top_p: np.ndarray  # float32, 1 = off
    min_p: np.ndarray  # float32, 0 = off
    repetition: np.ndarray  # float32, 1 = off
    presence: np.ndarray  # float32, 0 = off
    frequency: np.ndarray  # float32, 0 = off
    biased: np.ndarray  # bool: the row has a logit bias


NEUTRAL = {"seed": 0, "choice": 0, "temperature": 0.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0,
           "repetition": 1.0, "presence": 0.0, "frequency": 0.0, "biased": False}
_DTYPES = {"seed": np.int32, "choice": np.int32, "top_k": np.int32, "biased": bool}


def neutral_rows(rows: int) -> RowSettings:
    return RowSettings(**{name: np.full(rows, value, _DTYPES.get(name, np.float32))
                          for name, value in NEUTRAL.items()})


def set_row(settings: RowSettings, row: int, request) -> None:
    """Write `request`'s settings (runtime.request.Request) into row `row` (host arrays)."""
    values = {"seed": request.seed, "choice": request.choice,
              "temperature": request.temperature, "top_k": request.top_k,
              "top_p": request.top_p, "min_p": request.min_p,
              "repetition": request.repetition_penalty, "presence": request.presence_penalty,
              "frequency": request.frequency_penalty, "biased": bool(request.logit_bias)}
    for name, value in values.items():
        getattr(settings, name)[row] = value


def bias_arrays(requests: Sequence, rows: int, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """Each request's logit_bias ((id, value) pairs) as ids [rows, NB] (padding: vocab, an id
    whose write is dropped) and values [rows, NB] f32."""
    ids = np.full((rows, MAX_LOGIT_BIAS), vocab, np.int32)
    values = np.zeros((rows, MAX_LOGIT_BIAS), np.float32)
    for row, request in enumerate(requests):
        for column, (token, value) in enumerate(request.logit_bias):
            ids[row, column], values[row, column] = token, value
    return ids, values


class History(NamedTuple):
    prompt_seen: jax.Array  # [B, V] bool: the token is in the slot's prompt
    output_counts: jax.Array  # [B, V] int32: times the slot generated the token
    bias: jax.Array  # [B, V] f32: the slot's logit bias


class Sampled(NamedTuple):
    tokens: jax.Array  # [n] int32
    logprobs: jax.Array  # [n] f32: each token's log-probability ([0] without logprobs)
    top_ids: jax.Array  # [n, K] int32 ([n, 0] without logprobs)
    top_logprobs: jax.Array  # [n, K] f32


def new_history(slots: int, vocab: int) -> History:
    return History(jnp.zeros((slots, vocab), bool), jnp.zeros((slots, vocab), jnp.int32),
                   jnp.zeros((slots, vocab), jnp.float32))


def reset_rows(history: History, slots, new, bias_ids, bias_values) -> History:
    """Rows slots [n] where new [n] start afresh: no prompt, no output, the given bias (ids and
    values [n, NB]). Out-of-range slots (padding rows) are dropped."""
    slots = jnp.where(new, slots, history.bias.shape[0])  # not new: out of range, untouched
    n, vocab = slots.shape[0], history.bias.shape[1]
    bias = jnp.zeros((n, vocab + 1), jnp.float32)  # column V takes the padding ids
    bias = bias.at[jnp.arange(n)[:, None], bias_ids].add(bias_values)[:, :vocab]
    return History(history.prompt_seen.at[slots].set(False, mode="drop"),
                   history.output_counts.at[slots].set(0, mode="drop"),
                   history.bias.at[slots].set(bias, mode="drop"))


def saw_prompt(history: History, slots, tokens, lengths) -> History:
    """Mark the first lengths [n] of tokens [n, T] as prompt tokens of rows slots [n]."""
    valid = jnp.arange(tokens.shape[1])[None, :] < lengths[:, None]
    rows = jnp.broadcast_to(slots[:, None], tokens.shape)
    rows = jnp.where(valid, rows, history.bias.shape[0])  # padding tokens: dropped
    return history._replace(prompt_seen=history.prompt_seen.at[rows, tokens].set(
        True, mode="drop"))


def counted(history: History, slots, tokens, weights) -> History:
    """weights [n] (1 or 0) more occurrences of tokens [n] in the outputs of slots [n]
    (out-of-range slots: dropped)."""
    return history._replace(output_counts=history.output_counts.at[slots, tokens].add(
        weights.astype(jnp.int32), mode="drop"))


def choose(logits, history: History, slots, settings: RowSettings, steps,
           logprobs: bool) -> Sampled:
    """The next token of rows [n] whose logits are [n, V] and whose history is that of slots
    [n]; log-probabilities only when `logprobs` (static)."""
    s = settings
    penalties = (s.repetition != 1) | (s.presence != 0) | (s.frequency != 0) | s.biased

    def processed(_):
        rows = jax.tree.map(lambda a: jnp.take(a, slots, axis=0, mode="clip"), history)
        return penalized(logits, rows.bias, rows.prompt_seen, rows.output_counts,
                         s.repetition, s.presence, s.frequency)

    if layout.greedy_batches_skip_the_sort():  # a branch is cheap here (not on GPUs)
        adjusted = jax.lax.cond(jnp.any(penalties), processed,
                                lambda _: logits.astype(jnp.float32), None)
    else:  # neutral settings leave the logits exactly as they are
        adjusted = processed(None)
    tokens = sample(adjusted, row_keys(s.seed, steps, s.choice), s.temperature, s.top_k,
                    s.top_p, s.min_p)
    if not logprobs:
        n = tokens.shape[0]
        return Sampled(tokens, jnp.zeros((n,), jnp.float32), jnp.zeros((n, 0), jnp.int32),
                       jnp.zeros((n, 0), jnp.float32))
    return Sampled(tokens, *token_logprobs(logits, tokens, MAX_TOP_LOGPROBS))
