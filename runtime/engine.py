"""Jitted, sharded prefill and decode steps over KV memory slots, and the continuous-batching loop.

Shape glossary: B slots, T prompt bucket length, S cache length, V vocab, L layers.

`prefill` runs one prompt (padded to a power-of-two bucket, so few programs get compiled) into
one slot, leaving the other slots' memory untouched, and samples the slot's first token.
`decode` advances every slot by one token and samples the next; inactive slots compute too (static
shapes) but their positions do not move, so they never disturb anything. Both donate the KV
memory so it is updated in place, and sample on device: a step returns only the token ids.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Hashable, Iterable, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from runtime import program_cache
from runtime.errors import RequestError
from runtime.kv_heads import copy_kv_heads, kv_head_copies, with_kv_head_copies
from runtime.paths import STACKED
from runtime.models import Model, build_model
from runtime.models.transformer import transpose_layer_weights
from runtime.request import Completion, Request
from runtime.sampling import row_keys, sample
from runtime.sharding import param_specs, shardings

MIN_BUCKET = 16
# Decode attends over the filled part of the memory, rounded up to a power of two of at least
# this many positions (each window size is one more compiled program; below this, reading the
# whole memory costs less than compiling).
MIN_DECODE_WINDOW = 512

TokenCallback = Callable[[int, int], None]  # (request index, token id)
# Layers unroll over per-layer buffers on the CPU and on GPUs from this many parameter bytes per
# layer: XLA copies a scan's slice of each stacked weight before its matmul, while unrolling
# doubles compile time, which small models, whose layers sit in cache, do not win back. TPUs
# keep the scan (not measured there). (BENCHMARKS.md, "Unrolled layers instead of a scan")
# The unrolled model also keeps one KV memory array per layer, each written in place before its
# layer reads it (see memory.py).
UNROLL_MIN_LAYER_BYTES = 16 << 20
# XLA options for float32 programs on the CPU: matmuls off YNNPACK (XLA:CPU's default), onto
# XLA's own (Eigen) kernels, faster for decode's few-row products and dense prefill. Not MoE
# prefill (its expert tiles ran as fast or faster on YNNPACK); never bf16, which Eigen lacks.
# (BENCHMARKS.md, "Engine XLA options")
CPU_FLOAT32_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


def cpu_float32_options(config, phase: str, transposed: bool = False) -> Optional[dict]:
    """The XLA options for the engine's `phase` ("prefill" or "decode") program: see
    CPU_FLOAT32_OPTIONS; None (XLA's defaults) elsewhere, and for the prefill of transposed
    weights (transposed_layout: Eigen ran their several-row products slower; BENCHMARKS.md,
    "Engine XLA options")."""
    if jax.default_backend() != "cpu" or config.dtype != "float32":
        return None
    if phase == "prefill" and (config.is_moe or transposed):
        return None
    return CPU_FLOAT32_OPTIONS


# XLA options for the decode program on GPUs: XLA's CUDA-graph command buffers off. A decode
# step's inputs are fresh buffers every call, so XLA updated its graph of ~800 kernels before
# every launch, holding the host while the GPU sat idle. Launched one by one, kernels queue
# while earlier ones run. Prefill keeps the graphs: its kernels run long. So does MoE decode:
# its batch-1 products switch to the routed expert's weights, and inside a graph those switches
# run on the device (conditional nodes); outside one, XLA:GPU reads each branch index on the
# host. (BENCHMARKS.md, "Engine XLA options")
GPU_DECODE_OPTIONS = {"xla_gpu_enable_command_buffer": ""}


# XLA option for bf16 programs: every bf16 rounding the model writes happens. XLA's default lets
# a fusion keep an intermediate in float32 instead ("excess precision"), so where bf16 rounds
# depended on how each program fused: on the demo checkpoint (int8, 8 scale row blocks) a
# context's bf16 prefill logits moved by up to 0.36 (6 bf16 ulps) with the other prompts of the
# batch, and a decode step disagreed with the prefill of the same context as much. With every
# rounding kept, programs of any shape compute the same bf16 function (tests/test_dtype_ladder).
BF16_OPTIONS = {"xla_allow_excess_precision": False}


def program_options(config, phase: str, transposed: bool = False) -> Optional[dict]:
    """XLA options for the engine's `phase` program: cpu_float32_options on the CPU,
    GPU_DECODE_OPTIONS for a GPU's decode of a dense model, BF16_OPTIONS for bf16 activations
    (merged); None (XLA's defaults) otherwise."""
    if jax.default_backend() == "gpu":
        options = GPU_DECODE_OPTIONS if phase == "decode" and not config.is_moe else None
    else:
        options = cpu_float32_options(config, phase, transposed)
    if config.dtype == "bfloat16":
        options = {**(options or {}), **BF16_OPTIONS}
    return options


def transposed_layout(config, slots: int) -> Optional[str]:
    """Which of an unrolled engine's layer matmul weights it stores transposed [O, I]
    (model.transpose_layer_weights; BENCHMARKS.md, "Transposed weights for one-row products"):
    - "float" on a single CPU device with one slot under float32 activations: every decode
      product there has a single row (int8 weights keep their blocked [I, O] widening);
    - "all" on GPUs, float and int8, any batch;
    - None elsewhere (several CPU slots; TPUs, not measured)."""
    backend = jax.default_backend()
    if backend == "gpu":
        return "all"
    if slots == 1 and backend == "cpu" and jax.device_count() == 1 \
            and config.dtype == "float32":
        return "float"
    return None


def stacked_layer_bytes(params, config) -> float:
    """Parameter bytes of one layer of the stacked layer parameters (STACKED)."""
    leaves = [leaf for module, tree in params.items() if module.startswith(STACKED)
              for leaf in jax.tree.leaves(tree)]
    return sum(leaf.nbytes for leaf in leaves) / config.num_layers


def resolved_cache_length(config, cache_length: Optional[int]) -> int:
    """The KV memory length: as given, or the model's context length."""
    return config.sequence_len if cache_length is None else cache_length


def bucket_length(length: int, limit: int) -> int:
    """Smallest power of two >= length (at least MIN_BUCKET), capped at the cache length."""
    bucket = MIN_BUCKET
    while bucket < length:
        bucket *= 2
    return min(bucket, limit)


class Engine:
    def __init__(self, model: Model, params, mesh: Mesh, slots: int = 1,
                 cache_length: Optional[int] = None, unroll_layers: Optional[bool] = None,
                 transpose_weights: Optional[bool] = None):
        config = model.config
        if unroll_layers is None:  # CPU, GPU: for layers big enough to be bandwidth-bound
            layer_bytes = stacked_layer_bytes(params, config)
            unroll_layers = jax.default_backend() in ("cpu", "gpu") \
                and layer_bytes >= UNROLL_MIN_LAYER_BYTES
        unroll_layers = unroll_layers and config.architecture == "transformer"
        # fewer KV heads than model-axis devices: each stored several times (see kv_heads.py)
        kv_copies = kv_head_copies(config, mesh.shape.get("model", 1))
        stored_kv_heads = config.num_kv_heads  # as the parameters hold them
        config = with_kv_head_copies(config, kv_copies)
        if unroll_layers or kv_copies > 1:
            model = build_model(config, unroll_layers=unroll_layers)
        self.model = model
        self.config = config
        self.mesh = mesh
        self.slots = slots
        self.cache_length = resolved_cache_length(config, cache_length)
        if not 1 <= self.cache_length <= config.sequence_len:
            raise ValueError(f"cache length {self.cache_length} must be in [1, sequence_len "
                             f"{config.sequence_len}]")

        self.params = jax.device_put(params, shardings(param_specs(params, mesh), mesh))
        if kv_copies > 1:
            self.params = copy_kv_heads(self.params, stored_kv_heads, kv_copies, mesh)
        # few-row products read transposed weights faster (one CPU slot; GPUs). An explicit
        # transpose_weights=True stores them all transposed, False none (A/B, tests).
        layout = transposed_layout(config, slots) if transpose_weights is None else \
            ("all" if transpose_weights else None)
        self.transposed = layout if unroll_layers else None
        if unroll_layers:  # one buffer per layer, each keeping its stacked parent's sharding
            prepare = model.prepare_params
            if self.transposed:
                prepare = lambda params: transpose_layer_weights(  # noqa: E731
                    model.prepare_params(params), quantized=self.transposed == "all")
            self.params = jax.jit(prepare)(self.params)
        param_sharding = jax.tree.map(lambda a: a.sharding, self.params)
        memory_sharding = shardings(model.memory_specs(slots, mesh), mesh)
        self.memory = jax.jit(lambda: model.new_memory(slots, self.cache_length),
                              out_shardings=memory_sharding)()
        replicated = self._replicated = NamedSharding(mesh, PartitionSpec())

        inputs = (param_sharding, memory_sharding) + (replicated,) * 7
        cache = program_cache.active()
        identity = repr((config, unroll_layers, self.transposed, slots, self.cache_length))

        def program(phase, function, static=()):
            options = program_options(config, phase, self.transposed is not None)

            def jit(options):
                return jax.jit(function, in_shardings=inputs,
                               out_shardings=(replicated, memory_sharding), donate_argnums=(1,),
                               static_argnums=static, compiler_options=options)

            if cache is None:
                return jit(options)
            # run.py: programs stored by an earlier run skip the tracing (traced inside the
            # exporting jit, which takes the options instead)
            outputs = lambda dynamic: jax.tree.structure((0, dynamic[1]))  # noqa: E731
            return cache.wrap(phase, identity, jit(None), inputs, outputs, donate_argnums=(1,),
                              static_argnums=static, compiler_options=options)

        self._prefill = program("prefill", self._prefill_fn)
        self._decode = program("decode", self._decode_fn, static=(9,))  # 9: window
        self._positions = np.zeros(slots, np.int64)  # host copy of memory.positions

    # --- jitted steps -------------------------------------------------------------------------

    def _prefill_fn(self, params, memory, tokens, lengths, slots, seeds, temperature, top_k,
                    top_p):
        # tokens [n, T]; lengths, slots, seeds, top_k [n] int32; temperature, top_p [n] f32.
        # Rows whose slot is out of range (>= B) are padding: their writes are dropped.
        # Each prompt attends to itself only (T x T, not T x S); its fresh memory then goes
        # into its slot.
        if self.model.prefill is not None:
            logits, fresh = self.model.prefill(params, tokens, lengths)  # [n, V]
        else:
            logits, fresh = self.model.step(params, self.model.new_memory(*tokens.shape), tokens,
                                            lengths)
        memory = self.model.write_slots(memory, fresh, slots)
        first = sample(logits, row_keys(seeds, jnp.zeros_like(seeds)), temperature, top_k, top_p)
        return first, memory

    def _decode_fn(self, params, memory, tokens, active, seeds, steps, temperature, top_k,
                   top_p, window=None):
        # tokens, seeds, steps, top_k [B] int32; active [B] bool; temperature, top_p [B] f32.
        # Inactive rows consume zero tokens: their position (and recurrent state) stays put.
        lengths = active.astype(jnp.int32)
        if window is None:
            logits, memory = self.model.step(params, memory, tokens[:, None], lengths)
        else:
            logits, memory = self.model.windowed_step(params, memory, tokens[:, None], lengths,
                                                      window)  # [B, V]
        next_tokens = sample(logits, row_keys(seeds, steps), temperature, top_k, top_p)
        return next_tokens, memory

    # --- host-side steps ----------------------------------------------------------------------

    def prefill(self, slot: int, request: Request) -> int:
        """Write the prompt into `slot` and return its first sampled token."""
        return self.prefill_many([(slot, request)])[0]

    def prefill_many(self, admitted: Sequence[tuple[int, Request]]) -> list[int]:
        """Prompts into their slots in one call (rows padded to a power of two, prompts to the
        longest one's bucket, so few programs compile); returns each first sampled token."""
        count = len(admitted)
        rows = 1
        while rows < count:
            rows *= 2
        bucket = bucket_length(max(len(r.prompt_ids) for _, r in admitted), self.cache_length)
        tokens = np.full((rows, bucket), self.config.pad_token, np.int32)
        lengths = np.ones(rows, np.int32)
        slots = np.full(rows, self.slots, np.int32)  # padding rows: out of range, dropped
        seeds, top_k = np.zeros(rows, np.int32), np.zeros(rows, np.int32)
        temperature, top_p = np.zeros(rows, np.float32), np.ones(rows, np.float32)
        for i, (slot, request) in enumerate(admitted):
            tokens[i, :len(request.prompt_ids)] = request.prompt_ids
            lengths[i], slots[i], seeds[i] = len(request.prompt_ids), slot, request.seed
            temperature[i], top_k[i], top_p[i] = request.temperature, request.top_k, request.top_p
        first, self.memory = self._prefill(self.params, self.memory, tokens, lengths, slots,
                                           seeds, temperature, top_k, top_p)
        for slot, request in admitted:
            self._positions[slot] = len(request.prompt_ids)
        return np.asarray(first)[:count].tolist()

    def decode(self, tokens, active, seeds, steps, temperature, top_k, top_p) -> np.ndarray:
        """One token for every slot (arrays [B]); only active slots advance their position."""
        return np.asarray(self.decode_async(tokens, active, seeds, steps, temperature, top_k,
                                            top_p))

    def decode_async(self, tokens, active, seeds, steps, temperature, top_k,
                     top_p) -> jax.Array:
        """decode() without waiting for the step: its tokens [B] stay on the device, so the
        host can dispatch the next step from them before it reads them (see serve)."""
        active = np.asarray(active, bool)
        if not isinstance(tokens, jax.Array):  # placed as a step's own tokens come out: one
            # argument signature for both (the program cache stores a program per signature)
            tokens = jax.device_put(np.asarray(tokens, np.int32), self._replicated)
        next_tokens, self.memory = self._decode(
            self.params, self.memory, tokens, active,
            np.asarray(seeds, np.int32), np.asarray(steps, np.int32),
            np.asarray(temperature, np.float32), np.asarray(top_k, np.int32),
            np.asarray(top_p, np.float32), self._decode_window(active))
        self._positions += active
        return next_tokens

    def _decode_window(self, active) -> Optional[int]:
        """Memory positions the next decode step must read: every active row's filled part
        plus its new token, as a power of two >= MIN_DECODE_WINDOW; None for all of it."""
        if self.model.windowed_step is None or not active.any():
            return None
        window = MIN_DECODE_WINDOW
        while window < self._positions[active].max() + 1:
            window *= 2
        return window if window < self.cache_length else None

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
        finishes. A free slot takes the next request at once; the others keep decoding.

        on_token(key, token) sees every generated token (EOS excluded); returning True ends that
        request with finish_reason "stop". A request that cannot be served yields an "error"
        completion. When admit() turns False no new request starts; those in flight finish.
        """
        incoming = iter(requests)
        exhausted = False
        held: list[Optional[_Slot]] = [None] * self.slots
        last = np.zeros(self.slots, np.int32)
        seeds = np.zeros(self.slots, np.int32)
        temperature = np.zeros(self.slots, np.float32)
        top_k = np.zeros(self.slots, np.int32)
        top_p = np.ones(self.slots, np.float32)
        eos = frozenset(self.config.eos_tokens)

        def accept(slot: int, token: int) -> Optional[tuple[Hashable, Completion]]:
            """Record a sampled token; free the slot and return the result when finished."""
            state = held[slot]
            request, out = state.request, state.output
            reason = None
            if token in eos:
                reason = "eos"
            else:
                out.append(token)
                if on_token is not None and on_token(state.key, token):
                    reason = "stop"
                elif len(out) >= request.max_new_tokens \
                        or len(request.prompt_ids) + len(out) >= self.cache_length:
                    reason = "length"
            if reason is None:
                last[slot] = token
                return None
            held[slot] = None
            return state.key, Completion(list(request.prompt_ids), out, reason)

        # One decode step runs ahead of the host: while step n runs, step n + 1 is dispatched
        # from step n's tokens still on the device, and only then are step n's tokens read and
        # accepted. The host's work per step (reading tokens, callbacks, the next step's
        # inputs) then overlaps the device's instead of leaving it idle between steps. A row
        # that finishes at step n has its token of step n + 1 dropped (and is left out of the
        # steps after). No step runs ahead while a free slot could take a newcomer: admission
        # waits for the tokens in flight.
        pending: Optional[tuple[jax.Array, np.ndarray]] = None  # (tokens [B] on device, rows)

        def holding() -> np.ndarray:  # [B] bool: the slots serving a request
            return np.array([s is not None for s in held])

        def steps() -> np.ndarray:  # index of the token each row samples next (its PRNG key)
            return np.array([len(s.output) if s is not None else 0 for s in held], np.int32)

        def fill_free_slots() -> Iterator[tuple[Hashable, Completion]]:
            """Fill every free slot, prefilling the newcomers together; yields the requests
            that fail validation, or finish at their first token (freeing the slot again)."""
            nonlocal exhausted
            while not exhausted and not holding().all() and admit():
                admitted = []
                for slot in range(self.slots):
                    while held[slot] is None and not exhausted and admit():
                        try:
                            key, request = next(incoming)
                        except StopIteration:
                            exhausted = True
                            break
                        try:
                            request.validate(self.config.vocab_size, self.cache_length,
                                             label=f"request {key}")
                        except RequestError as e:
                            yield key, Completion(list(request.prompt_ids), [], "error", str(e))
                            continue
                        held[slot] = _Slot(key, request, [])
                        seeds[slot], temperature[slot] = request.seed, request.temperature
                        top_k[slot], top_p[slot] = request.top_k, request.top_p
                        admitted.append((slot, request))
                if not admitted:
                    break
                for (slot, _), token in zip(admitted, self.prefill_many(admitted)):
                    done = accept(slot, token)
                    if done is not None:
                        yield done

        while True:
            if pending is None:
                yield from fill_free_slots()
                active = holding()
                if not active.any():
                    if exhausted or not admit():
                        return
                    continue
                pending = (self.decode_async(last, active, seeds, steps(), temperature, top_k,
                                             top_p), active)
            tokens, rows = pending
            live = rows & holding()  # the rows not finished before
            ahead = None
            if live.any() and (exhausted or holding().all()):
                # no newcomer could start now: the rows still decoding run one step ahead
                ahead = (self.decode_async(tokens, live, seeds, steps() + 1, temperature,
                                           top_k, top_p), live)
            tokens = np.asarray(tokens)
            for slot in np.flatnonzero(live):
                done = accept(int(slot), int(tokens[slot]))
                if done is not None:
                    yield done
            pending = ahead


@dataclasses.dataclass
class _Slot:
    key: Hashable
    request: Request
    output: list[int]
