"""Generation requests and their results, with validation that names the bad field."""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from runtime.errors import RequestError
from runtime.sampling_state import MAX_LOGIT_BIAS, MAX_TOP_LOGPROBS

FINISH_REASONS = ("eos", "length", "stop", "error")
MAX_CHOICES = 128  # n samples of one prompt (OpenAI's limit)
MAX_STOP_TOKEN_IDS = 1024


@dataclasses.dataclass(frozen=True)
class Request:
    prompt_ids: tuple[int, ...]
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy argmax
    top_p: float = 1.0  # 1 = off
    top_k: int = 0  # 0 = off
    seed: int = 0
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off; prompt and output tokens
    presence_penalty: float = 0.0  # output tokens
    frequency_penalty: float = 0.0  # output tokens, per occurrence
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    stop_token_ids: tuple[int, ...] = ()  # end the request (finish_reason "stop"), not output
    logprobs: bool = False  # each output token's log-probability (Completion.logprobs)
    top_logprobs: int = 0  # and this many most likely alternatives
    choice: int = 0  # which of a prompt's n samples: its own PRNG stream

    def validate(self, vocab_size: int, context: int, label: str = "request") -> None:
        """Raise RequestError naming the field when this request cannot be served. Every value
        must also fit what the engine turns it into (int32 ids, top_k, seed; finite float32
        temperature and top_p), so a request that passes cannot fail later."""
        if len(self.prompt_ids) == 0:
            raise RequestError(f"{label}: empty prompt")
        bad = [t for t in self.prompt_ids if not (_is_int(t) and 0 <= t < vocab_size)]
        if bad:
            raise RequestError(f"{label}: prompt token id {_short(bad[0])} outside the vocabulary "
                               f"[0, {vocab_size})")
        if len(self.prompt_ids) >= context:
            raise RequestError(f"{label}: prompt of {len(self.prompt_ids)} tokens does not fit the "
                               f"context of {context} tokens (at least one must be left to "
                               f"generate)")
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise RequestError(f"{label}: max_new_tokens must be an integer >= 1, got "
                               f"{_short(self.max_new_tokens)}")
        temperature = _float32(self.temperature)
        if temperature is None or not temperature >= 0:
            raise RequestError(f"{label}: temperature must be a finite number >= 0, got "
                               f"{_short(self.temperature)}")
        top_p = _float32(self.top_p)
        if top_p is None or not 0 < top_p <= 1:
            raise RequestError(f"{label}: top_p must be a number in (0, 1] (and above 0 in "
                               f"float32), got {_short(self.top_p)}")
        if not _is_int(self.top_k) or not 0 <= self.top_k < 2**31:
            raise RequestError(f"{label}: top_k must be an integer in [0, 2^31), got "
                               f"{_short(self.top_k)}")
        if not _is_int(self.seed) or not 0 <= self.seed < 2**31:
            raise RequestError(f"{label}: seed must be an integer in [0, 2^31), got "
                               f"{_short(self.seed)}")
        self._validate_controls(vocab_size, label)

    def _validate_controls(self, vocab_size: int, label: str) -> None:
        """The sampling controls beyond temperature / top-k / top-p (ranges as OpenAI's and
        vLLM's APIs accept them)."""
        _check_float(self.min_p, lambda v: 0 <= v <= 1, f"{label}: min_p", "in [0, 1]")
        _check_float(self.repetition_penalty, lambda v: 0 < v <= 100,
                     f"{label}: repetition_penalty", "in (0, 100] (1 = off)")
        for name in ("presence_penalty", "frequency_penalty"):
            _check_float(getattr(self, name), lambda v: -2 <= v <= 2, f"{label}: {name}",
                         "in [-2, 2]")
        if not isinstance(self.logit_bias, tuple) or len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise RequestError(f"{label}: logit_bias must map at most {MAX_LOGIT_BIAS} token ids "
                               f"to values")
        seen = set()
        for entry in self.logit_bias:
            token, value = entry if isinstance(entry, tuple) and len(entry) == 2 else (None, 0)
            if not (_is_int(token) and 0 <= token < vocab_size) or token in seen:
                raise RequestError(f"{label}: logit_bias token id {_short(token)} outside the "
                                   f"vocabulary [0, {vocab_size}) or repeated")
            seen.add(token)
            _check_float(value, lambda v: -100 <= v <= 100, f"{label}: logit_bias[{token}]",
                         "in [-100, 100]")
        if not isinstance(self.stop_token_ids, tuple) \
                or len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS \
                or not all(_is_int(t) and 0 <= t < vocab_size for t in self.stop_token_ids):
            raise RequestError(f"{label}: stop_token_ids must be at most {MAX_STOP_TOKEN_IDS} "
                               f"token ids in [0, {vocab_size})")
        if not isinstance(self.logprobs, (bool, np.bool_)):
            raise RequestError(f"{label}: logprobs must be true or false, got "
                               f"{_short(self.logprobs)}")
        if not _is_int(self.top_logprobs) or not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise RequestError(f"{label}: top_logprobs must be an integer in [0, "
                               f"{MAX_TOP_LOGPROBS}], got {_short(self.top_logprobs)}")
        if not _is_int(self.choice) or not 0 <= self.choice < MAX_CHOICES:
            raise RequestError(f"{label}: choice must be an integer in [0, {MAX_CHOICES})")


def _check_float(value, accept, name: str, wanted: str) -> None:
    narrowed = _float32(value)
    if narrowed is None or not accept(narrowed):
        raise RequestError(f"{name} must be a number {wanted}, got {_short(value)}")


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _float32(value) -> Optional[float]:
    """value as the float32 the sampler receives, or None when it is not a real number or is
    not finite there (a 400-digit number, inf, nan)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
        return None
    try:
        with np.errstate(over="ignore"):
            narrowed = np.float32(value)
    except (OverflowError, ValueError):
        return None
    return float(narrowed) if np.isfinite(narrowed) else None


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


@dataclasses.dataclass
class Completion:
    prompt_ids: list[int]
    output_ids: list[int]  # generated tokens, without the final EOS
    finish_reason: str  # one of FINISH_REASONS
    error: Optional[str] = None
    # with Request.logprobs: per output token (its logprob, ((id, logprob), ...) top_logprobs
    # alternatives, most likely first), float32 values as Python floats
    logprobs: Optional[list[tuple[float, tuple[tuple[int, float], ...]]]] = None


def request_to_json(request: Request) -> dict:
    """A Request as JSON (multi-host broadcasts of admissions); request_from_json inverts it."""
    return {field.name: getattr(request, field.name) for field in dataclasses.fields(request)}


def request_from_json(value: dict) -> Request:
    fields = dict(value)
    fields["prompt_ids"] = tuple(fields["prompt_ids"])
    fields["logit_bias"] = tuple(tuple(pair) for pair in fields.get("logit_bias", ()))
    fields["stop_token_ids"] = tuple(fields.get("stop_token_ids", ()))
    return Request(**fields)
