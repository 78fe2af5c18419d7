"""Generation requests and their results, with validation that names the bad field."""

from __future__ import annotations

import dataclasses
from typing import Optional

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
        """Raise RequestError naming the field when this request cannot be served."""
        if len(self.prompt_ids) == 0:
            raise RequestError(f"{label}: empty prompt")
        bad = [t for t in self.prompt_ids if not (isinstance(t, int) and 0 <= t < vocab_size)]
        if bad:
            raise RequestError(f"{label}: prompt token id {bad[0]!r} outside the vocabulary "
                               f"[0, {vocab_size})")
        if len(self.prompt_ids) >= context:
            raise RequestError(f"{label}: prompt of {len(self.prompt_ids)} tokens does not fit the "
                               f"context of {context} tokens (at least one must be left to "
                               f"generate)")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise RequestError(f"{label}: max_new_tokens must be >= 1, got {self.max_new_tokens!r}")
        if not self.temperature >= 0:
            raise RequestError(f"{label}: temperature must be >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise RequestError(f"{label}: top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise RequestError(f"{label}: top_k must be an integer >= 0, got {self.top_k!r}")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**31:
            raise RequestError(f"{label}: seed must be an integer in [0, 2^31), got {self.seed!r}")


@dataclasses.dataclass
class Completion:
    prompt_ids: list[int]
    output_ids: list[int]  # generated tokens, without the final EOS
    finish_reason: str  # one of FINISH_REASONS
    error: Optional[str] = None
