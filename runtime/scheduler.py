"""Continuous batching: requests join an engine's free slots between decode steps and leave it
as they finish (the loop behind Engine.generate, batch jobs and every caller of Engine.serve).

Shape glossary: B slots. Per-slot host state: last token [B], sampling settings
(sampling_state.RowSettings, arrays [B]).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Hashable, Iterable, Iterator, Optional

import jax
import numpy as np

from runtime.errors import RequestError
from runtime.request import Completion, Request
from runtime.sampling_state import Sampled, neutral_rows, set_row

Finished = tuple[Hashable, Completion]


@dataclasses.dataclass
class _Slot:
    key: Hashable
    request: Request
    output: list[int]
    fed: int  # prompt tokens in the slot's memory: the whole prompt once it decodes
    admitted: int  # admission order: chunked prompts are fed oldest first
    logprobs: Optional[list] = None  # per output token, when the request asks


class Scheduler:
    """Serves (key, request) pairs through `engine`'s slots, yielding (key, completion) as each
    finishes (run()). A free slot takes the next request at once; the others keep decoding.

    on_token(key, token) sees every generated token (EOS and stop_token_ids excluded);
    returning True ends that request with finish_reason "stop" (as a stop token id does, and
    EOS with "eos"). A request that cannot be served yields an "error"
    completion. When admit() turns False no new request starts; those in flight finish.
    on_step() runs once per iteration, before anything is decided (a server synchronises its
    processes' view of arrivals and cancellations there); on_logprob(key, entry) sees each
    output token's (logprob, top alternatives) before on_token, for requests that ask.

    One decode step runs ahead of the host: while step n runs, step n + 1 is dispatched from
    step n's tokens still on the device, and only then are step n's tokens read and accepted.
    The host's work per step (reading tokens, callbacks, the next step's inputs) then overlaps
    the device's instead of leaving it idle between steps. A row that finishes at step n has its
    token of step n + 1 dropped (and is left out of the steps after). No step runs ahead while a
    free slot could take a newcomer: admission waits for the tokens in flight.

    With engine.decode_steps k > 1, the same moments (no newcomer could start, no prompt
    chunk pending) run k steps in one dispatch instead (Engine.decode_block, without running
    ahead), whose tokens are then accepted step by step exactly as single steps' are: a row
    ended by the host (on_token, a stop string) drops its later tokens. A slot freed inside a
    block takes its newcomer after the block.

    A prompt longer than the engine's chunk_size is fed one chunk per decode step (the
    oldest such prompt first), so the rows already decoding keep streaming while it prefills;
    nothing runs ahead meanwhile.
    """

    def __init__(self, engine, requests: Iterable[tuple[Hashable, Request]],
                 on_token: Optional[Callable[[Hashable, int], Optional[bool]]] = None,
                 admit: Callable[[], bool] = lambda: True,
                 on_step: Callable[[], None] = lambda: None,
                 on_logprob: Optional[Callable[[Hashable, tuple], None]] = None):
        self.engine, self.on_token, self.may_admit = engine, on_token, admit
        self.on_step, self.on_logprob = on_step, on_logprob
        self.incoming = iter(requests)
        self.exhausted = False
        slots = engine.slots
        self.held: list[Optional[_Slot]] = [None] * slots
        self.last = np.zeros(slots, np.int32)
        self.settings = neutral_rows(slots)
        self.eos = frozenset(engine.config.eos_tokens)
        self.admissions = 0

    def holding(self) -> np.ndarray:
        """[B] bool: the slots serving a request."""
        return np.array([s is not None for s in self.held])

    def decoding(self) -> np.ndarray:
        """[B] bool: the slots whose whole prompt is in memory (they decode)."""
        return np.array([s is not None and s.fed == len(s.request.prompt_ids)
                         for s in self.held])

    def prefilling(self) -> list[int]:
        """The slots still being fed their prompt in chunks, oldest first."""
        slots = [i for i, s in enumerate(self.held)
                 if s is not None and s.fed < len(s.request.prompt_ids)]
        return sorted(slots, key=lambda i: self.held[i].admitted)

    def steps(self) -> np.ndarray:
        """[B] int32: the index of the token each row samples next (its PRNG key)."""
        return np.array([len(s.output) if s is not None else 0 for s in self.held], np.int32)

    def run(self) -> Iterator[Finished]:
        pending: Optional[tuple[Sampled, np.ndarray]] = None  # (a step's output on device, rows)
        while True:
            self.on_step()
            if pending is None:
                yield from self.fill_free_slots()
                yield from self.feed_chunk()
                active = self.decoding()
                if not active.any():
                    if not self.prefilling() and (self.exhausted or not self.may_admit()):
                        return
                    continue
                if self.engine.blocks_for(active) and self.settled():
                    yield from self.decode_block(active)
                    continue
                pending = (self._decode(self.last, active, self.steps()), active)
            sampled, rows = pending
            live = rows & self.decoding()  # the rows not finished before
            ahead = None
            if live.any() and self.settled() and not self.engine.blocks_for(live):
                # no newcomer could start now: the rows still decoding run one step ahead
                ahead = (self._decode(sampled.tokens, live, self.steps() + 1), live)
            sampled = jax.tree.map(np.asarray, sampled)
            for slot in np.flatnonzero(live):
                done = self.accept(int(slot), sampled, int(slot))
                if done is not None:
                    yield done
            pending = ahead

    def settled(self) -> bool:
        """Whether no newcomer could start and no prompt chunk waits: decode may run ahead."""
        return not self.prefilling() \
            and (self.exhausted or self.holding().all() or not self.may_admit())

    def decode_block(self, active: np.ndarray) -> Iterator[Finished]:
        """engine.decode_steps steps of the rows active [B] in one dispatch, their tokens
        accepted one step at a time (a row finished or ended by the host takes no more)."""
        held = list(self.held)
        rows = [s if a else None for s, a in zip(held, active)]
        stops = [sorted(self.eos | set(s.request.stop_token_ids)) if s else [] for s in rows]
        budgets = [self._tokens_left(s) if s else 0 for s in rows]
        logprobs = any(s is not None and s.logprobs is not None for s in rows)
        block = self.engine.decode_block(self.last, active, self.steps(), self.settings,
                                         stops, budgets, logprobs)
        for j in range(block.tokens.shape[1]):
            step = Sampled(*(a[:, j] for a in block))  # leaves [B, ...] as one step's
            for slot in np.flatnonzero(active):
                if self.held[slot] is held[slot]:  # not finished, not ended
                    done = self.accept(int(slot), step, int(slot))
                    if done is not None:
                        yield done

    def _decode(self, tokens, rows: np.ndarray, steps: np.ndarray) -> Sampled:
        logprobs = any(s.logprobs is not None for s, r in zip(self.held, rows) if r)
        return self.engine.decode_async(tokens, rows, steps, self.settings, logprobs)

    def _tokens_left(self, state: _Slot) -> int:
        """Tokens the request may still output: its max_new_tokens, and the cache's room."""
        used = len(state.output)
        return min(state.request.max_new_tokens - used,
                   self.engine.cache_length - len(state.request.prompt_ids) - used)

    def accept(self, slot: int, sampled: Sampled, row: int) -> Optional[Finished]:
        """Record the token sampled for `slot` (row `row` of `sampled`, host arrays); free the
        slot and return the result when finished."""
        state = self.held[slot]
        request, out = state.request, state.output
        token = int(sampled.tokens[row])
        reason = None
        if token in self.eos:
            reason = "eos"
        elif token in request.stop_token_ids:
            reason = "stop"
        else:
            out.append(token)
            if state.logprobs is not None:
                top = request.top_logprobs
                entry = (float(sampled.logprobs[row]), tuple(
                    (int(i), float(v)) for i, v in zip(sampled.top_ids[row, :top],
                                                       sampled.top_logprobs[row, :top])))
                state.logprobs.append(entry)
                if self.on_logprob is not None:
                    self.on_logprob(state.key, entry)
            if self.on_token is not None and self.on_token(state.key, token):
                reason = "stop"
            elif self._tokens_left(state) <= 0:
                reason = "length"
        if reason is None:
            self.last[slot] = token
            return None
        self.held[slot] = None
        return state.key, Completion(list(request.prompt_ids), out, reason,
                                     logprobs=state.logprobs)

    def feed_chunk(self) -> Iterator[Finished]:
        """The next chunk of the oldest prompt being prefilled in chunks; after its last one,
        accept its first token (yielding the request if that finishes it)."""
        waiting = self.prefilling()
        if not waiting:
            return
        slot = waiting[0]
        state = self.held[slot]
        state.fed, first = self.engine.prefill_chunk(slot, state.request, state.fed)
        if first is not None:
            done = self.accept(slot, first, 0)
            if done is not None:
                yield done

    def fill_free_slots(self) -> Iterator[Finished]:
        """Fill every free slot, prefilling the newcomers together; yields the requests that
        fail validation, or finish at their first token (freeing the slot again)."""
        while not self.exhausted and not self.holding().all() and self.may_admit():
            admitted: list[tuple[int, Request]] = []
            for slot in range(self.engine.slots):
                while self.held[slot] is None and not self.exhausted and self.may_admit():
                    rejected = self._admit_next(slot, admitted)
                    if rejected is not None:
                        yield rejected
            if not admitted:
                break
            first = self.engine.prefill_sampled(admitted)
            for row, (slot, _) in enumerate(admitted):
                done = self.accept(slot, first, row)
                if done is not None:
                    yield done

    def _admit_next(self, slot: int, admitted: list) -> Optional[Finished]:
        """The next request into `slot` (appended to `admitted`), or its error completion when
        it fails validation; marks the input exhausted at its end."""
        try:
            key, request = next(self.incoming)
        except StopIteration:
            self.exhausted = True
            return None
        engine = self.engine
        try:
            request.validate(engine.config.vocab_size, engine.cache_length,
                             label=f"request {key}")
        except RequestError as e:
            return key, Completion(list(request.prompt_ids), [], "error", str(e))
        chunk = engine.chunk_size
        chunked = bool(chunk) and len(request.prompt_ids) > chunk
        wants = request.logprobs or request.top_logprobs
        self.held[slot] = _Slot(key, request, [], 0 if chunked else len(request.prompt_ids),
                                self.admissions, [] if wants else None)
        self.admissions += 1
        set_row(self.settings, slot, request)
        if not chunked:  # prefilled with the other newcomers now; long prompts chunk by chunk
            admitted.append((slot, request))
        return None
