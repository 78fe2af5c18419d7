"""Generation requests and their results, with validation that names the bad field."""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from runtime.errors import RequestError

FINISH_REASONS = ("eos", "length", "stop", "error")


@dataclasses.dataclass(frozen=True)
class Request:
    prompt_ids: tuple[int, ...]
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy argmax
    top_p: float = 1.0  # 1 = off
    top_k: int = 0  # 0 = off
    seed: int = 0

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
