"""Jitted, sharded prefill and decode steps over KV memory slots, and the continuous-batching loop.

Shape glossary: B slots, T prompt bucket length, S cache length, V vocab, L layers.

`prefill` runs one prompt (padded to a power-of-two bucket, so few programs get compiled) into
one slot, leaving the other slots' memory untouched, and samples the slot's first token.
`prefill_chunk` feeds a long prompt to its slot one chunk at a time (the scheduler runs the
other slots' decode steps between chunks), sampling the first token after the last chunk.
`decode` advances every slot by one token and samples the next; inactive slots compute too (static
shapes) but their positions do not move, so they never disturb anything. Every step donates
the KV memory and the sampler's history (sampling_state.History: the penalties' token counts,
the logit bias) so both are updated in place, and samples on device: a step returns only the
token ids (and their log-probabilities when a row asks: a second compiled variant).
`decode_block` runs decode_steps such steps in one dispatch (multistep.py: stops decided on
the device), which the scheduler takes when no newcomer waits.
"""

from __future__ import annotations

from typing import Callable, Hashable, Iterable, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from runtime import cpu_kernels, layout as layouts, program_cache
from runtime.benchmark import weight_bytes_per_step
from runtime.errors import RequestError, RuntimeInputError
from runtime.layout import Layout, served_config
from runtime.memory import memory_length
from runtime.models import Model, build_model
from runtime.multistep import decode_loop, steps_taken, stop_arrays
from runtime.prepared_params import prepared_params
from runtime.request import Completion, Request
from runtime.sampling import token_logprobs
from runtime.sampling_state import (MAX_TOP_LOGPROBS, RowSettings, Sampled, bias_arrays, choose, counted,
                                    neutral_rows, new_history, reset_rows, saw_prompt, set_row)
from runtime.scheduler import Scheduler
from runtime.sharding import shardings

MIN_BUCKET = 16
# Decode attends over the filled part of the memory, rounded up to a power of two of at least
# this many positions (each window size is one more compiled program; below this, reading the
# whole memory costs less than compiling).
MIN_DECODE_WINDOW = 512
# Engines with fewer slots always step them all: each busy-row count is one more compiled
# program, and a few idle rows cost less than compiling
BUSY_ROWS_MIN_SLOTS = 8
MAX_SCORED_LOGITS = 2**28  # prompt logprobs: [T, V] float32 logits at once, 1 GiB

TokenCallback = Callable[[int, int], None]  # (request index, token id)


def _pow2(count: int) -> int:
    """Smallest power of two >= count: row counts of few compiled shapes."""
    rows = 1
    while rows < count:
        rows *= 2
    return rows


def _wants_logprobs(requests) -> bool:
    return any(r.logprobs or r.top_logprobs for r in requests)


def resolved_cache_length(config, cache_length: Optional[int]) -> int:
    """The KV memory length: as given, or the model's context length."""
    return config.sequence_len if cache_length is None else cache_length


def bucket_length(length: int, limit: int) -> int:
    """Smallest power of two >= length (at least MIN_BUCKET), capped at the cache length."""
    bucket = MIN_BUCKET
    while bucket < length:
        bucket *= 2
    return min(bucket, limit)


def build_engine(config, params, mesh: Mesh, slots: int = 1,
                 cache_length: Optional[int] = None, unroll_layers: Optional[bool] = None,
                 transpose_weights: Optional[bool] = None,
                 prefill_chunk: Optional[int] = None,
                 decode_steps: Optional[int] = None, consume_params: bool = False) -> "Engine":
    """An engine for `config` with stacked `params` (as readers and init produce them) on
    `mesh`: the layout chosen (layout.Layout.choose; unroll_layers and transpose_weights force
    its choices), the model built for it, the parameters placed and prepared for it.
    decode_steps: decode steps per dispatch (None: layout.decode_steps_per_dispatch).
    consume_params: `params` may be deleted as they are prepared (prepared_params)."""
    # (asked only where the kernels would run: elsewhere available() would build them)
    kernels_built = layouts.decode_products_in_ffi_kernels() and cpu_kernels.available()
    layout = Layout.choose(config, params, mesh.shape.get("model", 1), slots, unroll_layers,
                           transpose_weights, kernels_built=kernels_built)
    model = model_for(config, mesh, layout)
    params = prepared_params(model, params, mesh, layout, config.num_kv_heads, consume_params)
    return Engine(model, params, mesh, layout, slots, cache_length, prefill_chunk,
                  decode_steps)


def model_for(config, mesh: Mesh, layout: Layout) -> Model:
    """The model an engine of `layout` on `mesh` runs (its params prepared for it: build_engine,
    or kept from an earlier start: weights_cache)."""
    return build_model(served_config(config, mesh.shape.get("model", 1)),
                       unroll_layers=layout.unrolled, layer_views=layout.layer_views)


class Engine:
    def __init__(self, model: Model, params, mesh: Mesh, layout: Layout, slots: int = 1,
                 cache_length: Optional[int] = None, prefill_chunk: Optional[int] = None,
                 decode_steps: Optional[int] = None):
        """`model` built for `layout` and `params` placed and prepared for it (build_engine
        makes both); allocates the slots' memory and compiles nothing yet. prefill_chunk:
        prompts longer than this are fed in chunks of this many tokens (None: the layout's
        PREFILL_CHUNK; 0: whole prompts). decode_steps: decode steps the scheduler runs per
        dispatch when no newcomer waits (None: layout.decode_steps_per_dispatch)."""
        config = model.config
        self.model, self.config, self.params = model, config, params
        self.mesh, self.layout, self.slots = mesh, layout, slots
        self.transposed = layout.transposed
        self.cache_length = resolved_cache_length(config, cache_length)
        if not 1 <= self.cache_length <= config.sequence_len:
            raise RuntimeInputError(f"cache length {self.cache_length} must be in [1, "
                                    f"sequence_len {config.sequence_len}]")
        chunk = layouts.PREFILL_CHUNK if prefill_chunk is None else prefill_chunk
        if not 0 <= chunk < 2**31:
            raise RuntimeInputError(f"prefill chunk {chunk} must be >= 0 (0: whole prompts)")
        # chunks need the family's chunk_step; below MIN_BUCKET a chunk would be all padding
        self.chunk_size = max(chunk, MIN_BUCKET) if chunk and model.chunk_step else 0
        self.memory_length = memory_length(config, self.cache_length)
        memory_sharding = shardings(model.memory_specs(slots, mesh), mesh)
        self.memory = jax.jit(lambda: model.new_memory(slots, self.memory_length),
                              out_shardings=memory_sharding)()
        self._replicated = NamedSharding(mesh, PartitionSpec())
        self.history = jax.jit(lambda: new_history(slots, config.vocab_size),
                               out_shardings=self._replicated)()
        # static arguments: the window the memory is read through, whether to compute logprobs
        self._prefill = self._program("prefill", self._prefill_fn, memory_sharding, static=(10,))
        self._decode = self._program("decode", self._decode_fn, memory_sharding, static=(7, 8))
        self._chunk = self._program("prefill", self._chunk_fn, memory_sharding, static=(10, 11))
        # few busy slots: decode those rows only (layout.decode_busy_rows_only); not with
        # per-layer memory, whose full step writes before it reads (other rounding)
        self._decode_rows = self._program("decode", self._decode_rows_fn, memory_sharding,
                                          static=(8, 9)) \
            if model.chunk_step and layouts.decode_busy_rows_only() and not layout.unrolled \
            else None
        self.decode_steps = decode_steps if decode_steps is not None else \
            layouts.decode_steps_per_dispatch(
                sum(weight_bytes_per_step(config, params, slots).values()), slots)
        if not 1 <= self.decode_steps <= layouts.MAX_DECODE_STEPS:
            raise RuntimeInputError(f"decode steps {self.decode_steps} must be in [1, "
                                    f"{layouts.MAX_DECODE_STEPS}]")
        self._block = self._program("decode", self._block_fn, memory_sharding,
                                    static=(9, 10, 11))
        self._positions = np.zeros(slots, np.int64)  # host copy of memory.positions
        self._score = jax.jit(self._score_fn)

    def _program(self, phase: str, function, memory_sharding, static=()):
        """`function` jitted with the engine's shardings, its memory donated, the layout's XLA
        options; through the active program cache when there is one."""
        param_sharding = jax.tree.map(lambda a: a.sharding, self.params)
        replicated = self._replicated
        dynamic = function.__code__.co_argcount - 1 - len(static)  # less self
        inputs = (param_sharding, memory_sharding) + (replicated,) * (dynamic - 2)
        outputs = (replicated, memory_sharding, replicated)  # (Sampled, memory, history)
        options = self.layout.options(self.config, phase)

        def jit(options):
            return jax.jit(function, in_shardings=inputs, out_shardings=outputs,
                           donate_argnums=(1, 2), static_argnums=static,
                           compiler_options=options)

        cache = program_cache.active()
        if cache is None:
            return jit(options)
        # run.py: programs stored by an earlier run skip the tracing (traced inside the
        # exporting jit, which takes the options instead)
        identity = repr((self.config, self.layout, self.slots,
                         self.cache_length, function.__name__))
        structure = lambda dynamic: jax.tree.structure(  # noqa: E731
            (Sampled(0, 0, 0, 0), dynamic[1], dynamic[2]))
        return cache.wrap(phase, identity, jit(None), inputs, structure, donate_argnums=(1, 2),
                          static_argnums=static, compiler_options=options)

    # --- jitted steps -------------------------------------------------------------------------

    def _prefill_fn(self, params, memory, history, tokens, lengths, sources, slots, settings,
                    bias_ids, bias_values, logprobs=False):
        # tokens [u, T] distinct prompts, lengths [u]; rows [n]: sources (their prompt),
        # slots, settings; bias ids / values [n, NB]. Rows whose slot is out of range (>= B)
        # are padding: their writes are dropped. Each prompt is computed once and attends to
        # itself only (T x T, not T x S); its fresh memory goes into every slot sharing it.
        if self.model.prefill is not None:
            logits, fresh = self.model.prefill(params, tokens, lengths)  # [u, V]
        else:
            logits, fresh = self.model.step(params, self.model.new_memory(*tokens.shape), tokens,
                                            lengths)
        # fresh memory: rows on axis 1 of every array, axis 0 of positions (models/api.py)
        fresh = jax.tree.map(lambda a: a[:, sources] if a.ndim > 1 else a[sources], fresh)
        memory = self.model.write_slots(memory, fresh, slots)
        history = reset_rows(history, slots, jnp.ones_like(slots, bool), bias_ids, bias_values)
        history = saw_prompt(history, slots, tokens[sources], lengths[sources])
        first = choose(logits[sources], history, slots, settings, jnp.zeros_like(slots),
                       logprobs)
        return first, memory, counted(history, slots, first.tokens, jnp.ones_like(slots))

    def _chunk_fn(self, params, memory, history, tokens, lengths, slots, starts, settings,
                  bias_ids, bias_values, window=None, logprobs=False):
        # tokens [n, C] continuing their slots [n] from positions starts [n] (0: a new prompt);
        # window (static): the memory positions the chunks read (None: all)
        logits, memory = self.model.chunk_step(params, memory, tokens, lengths, slots, starts,
                                               window)
        history = reset_rows(history, slots, starts == 0, bias_ids, bias_values)
        history = saw_prompt(history, slots, tokens, lengths)
        first = choose(logits, history, slots, settings, jnp.zeros_like(slots), logprobs)
        return first, memory, counted(history, slots, first.tokens, jnp.ones_like(slots))

    def _decode_fn(self, params, memory, history, tokens, active, steps, settings, window=None,
                   logprobs=False):
        # tokens, steps [B] int32; active [B] bool; settings [B] (sampling_state.RowSettings).
        # Inactive rows consume zero tokens: their position (and recurrent state) stays put.
        lengths = active.astype(jnp.int32)
        if window is None:
            logits, memory = self.model.step(params, memory, tokens[:, None], lengths)
        else:
            logits, memory = self.model.windowed_step(params, memory, tokens[:, None], lengths,
                                                      window)  # [B, V]
        rows = jnp.arange(tokens.shape[0], dtype=jnp.int32)
        sampled = choose(logits, history, rows, settings, steps, logprobs)
        return sampled, memory, counted(history, rows, sampled.tokens, lengths)

    def _block_fn(self, params, memory, history, tokens, active, steps, settings, stops,
                  budgets, window=None, logprobs=False, k=1):
        # k decode steps (multistep.decode_loop); stops [B, NS], budgets [B] int32: a row
        # stops at a stop id or after `budgets` tokens
        step = lambda *args: self._decode_fn(*args, window, logprobs)  # noqa: E731
        return decode_loop(step, params, memory, history, tokens, active, steps, settings,
                           stops, budgets, k)

    def _decode_rows_fn(self, params, memory, history, tokens, slots, starts, steps, settings,
                        window=None, logprobs=False):
        # decode for the busy rows slots [n] only (padding: B, dropped), at positions
        # starts [n], through the chunk path; tokens, steps [B], settings [B] as _decode_fn's,
        # and so is the output (the other rows' tokens are 0)
        batch = tokens.shape[0]
        take = lambda a: jnp.take(a, slots, axis=0, mode="clip")  # noqa: E731
        lengths = (slots < batch).astype(jnp.int32)
        logits, memory = self.model.chunk_step(params, memory, take(tokens)[:, None], lengths,
                                               slots, starts, window)
        sampled = choose(logits, history, slots, jax.tree.map(take, settings), take(steps),
                         logprobs)
        full = jax.tree.map(lambda a: jnp.zeros((batch,) + a.shape[1:], a.dtype).at[slots].set(
            a, mode="drop"), sampled)
        return full, memory, counted(history, slots, sampled.tokens, lengths)

    # --- host-side steps ----------------------------------------------------------------------

    def prefill(self, slot: int, request: Request) -> int:
        """Write the prompt into `slot` and return its first sampled token."""
        return self.prefill_many([(slot, request)])[0]

    def prefill_many(self, admitted: Sequence[tuple[int, Request]]) -> list[int]:
        """Prompts into their slots in one call; returns each first sampled token."""
        return np.asarray(self.prefill_sampled(admitted).tokens).tolist()

    def prefill_sampled(self, admitted: Sequence[tuple[int, Request]]) -> Sampled:
        """Prompts into their slots in one call (rows padded to a power of two, prompts to the
        longest one's bucket, so few programs compile; a prompt admitted into several slots,
        as the n samples of one request are, is computed once); returns the first tokens
        (and their logprobs when a request asks), host arrays [len(admitted)]."""
        count = len(admitted)
        distinct: dict[tuple, int] = {}
        for _, request in admitted:
            distinct.setdefault(request.prompt_ids, len(distinct))
        bucket = bucket_length(max(map(len, distinct)), self.cache_length)
        tokens = np.full((_pow2(len(distinct)), bucket), self.config.pad_token, np.int32)
        lengths = np.ones(len(tokens), np.int32)
        for prompt, row in distinct.items():
            tokens[row, :len(prompt)], lengths[row] = prompt, len(prompt)
        rows = _pow2(count)
        sources = np.zeros(rows, np.int32)
        slots = np.full(rows, self.slots, np.int32)  # padding rows: out of range, dropped
        settings = neutral_rows(rows)
        for i, (slot, request) in enumerate(admitted):
            sources[i], slots[i] = distinct[request.prompt_ids], slot
            set_row(settings, i, request)
        requests = [r for _, r in admitted]
        first, self.memory, self.history = self._prefill(
            self.params, self.memory, self.history, tokens, lengths, sources, slots, settings,
            *bias_arrays(requests, rows, self.config.vocab_size), _wants_logprobs(requests))
        for slot, request in admitted:
            self._positions[slot] = len(request.prompt_ids)
        return jax.tree.map(lambda a: np.asarray(a)[:count], first)

    def prefill_chunk(self, slot: int, request: Request,
                      start: int) -> tuple[int, Optional[Sampled]]:
        """Feed the next chunk of `request`'s prompt (from token `start`, which its slot already
        holds: 0 for a newcomer) into `slot`. Returns the tokens now fed and, after the last
        chunk, the first sampled token (host arrays [1]; else None, without waiting for the
        device)."""
        prompt = request.prompt_ids
        end = min(len(prompt), start + self.chunk_size)
        bucket = bucket_length(end - start, self.chunk_size)
        tokens = np.full((1, bucket), self.config.pad_token, np.int32)
        tokens[0, :end - start] = prompt[start:end]
        window = None  # a ring: all of it
        if self.memory_length == self.cache_length:  # else the filled part, a power of two
            window = bucket_length(start + bucket, self.memory_length)
            window = None if window >= self.memory_length else window
        settings = neutral_rows(1)
        set_row(settings, 0, request)
        first, self.memory, self.history = self._chunk(
            self.params, self.memory, self.history, tokens, np.array([end - start], np.int32),
            np.array([slot], np.int32), np.array([start], np.int32), settings,
            *bias_arrays([request], 1, self.config.vocab_size), window,
            _wants_logprobs([request]))
        self._positions[slot] = end
        return end, (jax.tree.map(np.asarray, first) if end == len(prompt) else None)

    def prompt_logprobs(self, prompt_ids: Sequence[int], top: int = 0) -> list[tuple]:
        """Each prompt token's (log-probability given the tokens before it, its `top` most
        likely alternatives) for scoring (echo with logprobs); the first token has none
        (None, ()). Reads no memory: safe beside the decode loop on a single process."""
        if self.model.all_logits is None:
            raise RequestError("prompt log-probabilities are not supported for this model")
        bucket = bucket_length(len(prompt_ids), self.cache_length)
        if bucket * self.config.vocab_size > MAX_SCORED_LOGITS:
            raise RequestError(f"prompt log-probabilities of {len(prompt_ids)} tokens need "
                               f"their [T, V] logits at once: at most "
                               f"{MAX_SCORED_LOGITS // self.config.vocab_size} tokens")
        tokens = np.full((1, bucket), self.config.pad_token, np.int32)
        tokens[0, :len(prompt_ids)] = prompt_ids
        chosen, ids, values = jax.tree.map(np.asarray, self._score(self.params, tokens))
        return [(None, ())] + [(float(chosen[t]), tuple(
            (int(i), float(v)) for i, v in zip(ids[t, :top], values[t, :top])))
            for t in range(len(prompt_ids) - 1)]

    def _score_fn(self, params, tokens):
        # tokens [1, T] -> the logprob of token t + 1 at each position t, and the top ones
        logits = self.model.all_logits(params, tokens, None)[0]  # [T, V]
        return token_logprobs(logits, jnp.roll(tokens[0], -1), MAX_TOP_LOGPROBS)

    def decode(self, tokens, active, steps, settings: RowSettings) -> np.ndarray:
        """One token for every slot (arrays [B]); only active slots advance their position."""
        return np.asarray(self.decode_async(tokens, active, steps, settings).tokens)

    def decode_async(self, tokens, active, steps, settings: RowSettings,
                     logprobs: bool = False) -> Sampled:
        """decode() without waiting for the step: its tokens [B] stay on the device, so the
        host can dispatch the next step from them before it reads them (see serve)."""
        active = np.asarray(active, bool)
        if not isinstance(tokens, jax.Array):  # placed as a step's own tokens come out: one
            # argument signature for both (the program cache stores a program per signature)
            tokens = jax.device_put(np.asarray(tokens, np.int32), self._replicated)
        busy = np.flatnonzero(active)
        if self._decode_rows is not None and 0 < _pow2(len(busy)) <= self.slots // 2 \
                and self.slots >= BUSY_ROWS_MIN_SLOTS:
            slots = np.full(_pow2(len(busy)), self.slots, np.int32)  # padding: dropped
            starts = np.zeros(len(slots), np.int32)
            slots[:len(busy)], starts[:len(busy)] = busy, self._positions[busy]
            sampled, self.memory, self.history = self._decode_rows(
                self.params, self.memory, self.history, tokens, slots, starts,
                np.asarray(steps, np.int32), settings, self._decode_window(active),
                bool(logprobs))
            self._positions += active
            return sampled
        sampled, self.memory, self.history = self._decode(
            self.params, self.memory, self.history, tokens, active,
            np.asarray(steps, np.int32), settings, self._decode_window(active), bool(logprobs))
        self._positions += active
        return sampled

    def decode_block(self, tokens, active, steps, settings: RowSettings, stops, budgets,
                     logprobs: bool = False) -> Sampled:
        """self.decode_steps decode steps in one dispatch (multistep.py): rows active [B] stop
        at one of their stops (lists of ids: EOS, stop_token_ids) or after budgets [B] tokens.
        Waits for the block; returns its host arrays (tokens [B, k]; a finished row's later
        tokens are meaningless)."""
        active = np.asarray(active, bool)
        stops, budgets = stop_arrays(stops), np.asarray(budgets, np.int32)
        k = self.decode_steps
        sampled, self.memory, self.history = self._block(
            self.params, self.memory, self.history, np.asarray(tokens, np.int32), active,
            np.asarray(steps, np.int32), settings, stops, budgets,
            self._decode_window(active, k), bool(logprobs), k)
        sampled = jax.tree.map(np.asarray, sampled)
        self._positions += steps_taken(sampled.tokens, active, stops, budgets)
        return sampled

    def blocks_for(self, active) -> bool:
        """Whether decode_block serves these rows [B] as fast as single steps would: not when
        the busy-rows path would take a single step (the block steps every row)."""
        busy = int(np.count_nonzero(active))
        return self.decode_steps > 1 and not (
            self._decode_rows is not None and 0 < _pow2(busy) <= self.slots // 2
            and self.slots >= BUSY_ROWS_MIN_SLOTS)

    def _decode_window(self, active, steps: int = 1) -> Optional[int]:
        """Memory positions the next `steps` decode steps must read: every active row's filled
        part plus its new tokens, as a power of two >= MIN_DECODE_WINDOW; None for all of it."""
        if self.model.windowed_step is None or not active.any():
            return None
        window = MIN_DECODE_WINDOW
        while window < self._positions[active].max() + steps:
            window *= 2
        return window if window < self.memory_length else None

    # --- continuous batching ------------------------------------------------------------------

    def validate(self, requests: Sequence[Request]) -> None:
        for i, request in enumerate(requests):
            request.validate(self.config.vocab_size, self.cache_length, label=f"request {i}")

    def generate(self, requests: Sequence[Request],
                 on_token: Optional[TokenCallback] = None) -> list[Completion]:
        """All requests through the slots, results in request order; bad requests raise first."""
        self.validate(requests)
        results: list[Optional[Completion]] = [None] * len(requests)
        for index, completion in self.serve(enumerate(requests), on_token):
            results[index] = completion
        return results

    def serve(self, requests: Iterable[tuple[Hashable, Request]],
              on_token: Optional[Callable[[Hashable, int], Optional[bool]]] = None,
              admit: Callable[[], bool] = lambda: True) -> Iterator[tuple[Hashable, Completion]]:
        """Continuous batching over (key, request) pairs, yielding (key, completion) as each
        finishes: see scheduler.Scheduler."""
        return Scheduler(self, requests, on_token, admit).run()
