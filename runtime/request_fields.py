"""A request's sampling fields as people send them (the OpenAI API's names and types: server
bodies, batch records, run.py's flags) -> Request settings, with one validation for all three
and one-line errors naming the field (RequestError). Ranges are checked by Request.validate.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from runtime.errors import RequestError
from runtime.request import MAX_CHOICES, Request

MAX_STOP_STRINGS = 16
# field -> Request attribute, for the fields that are plain numbers
NUMBERS = {"max_tokens": "max_new_tokens", "max_new_tokens": "max_new_tokens",
           "temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
           "repetition_penalty": "repetition_penalty", "presence_penalty": "presence_penalty",
           "frequency_penalty": "frequency_penalty", "seed": "seed"}
INTEGERS = frozenset(("max_tokens", "max_new_tokens", "top_k", "seed"))
OTHERS = frozenset(("logit_bias", "stop", "stop_token_ids", "n", "logprobs", "top_logprobs",
                    "echo"))
SAMPLING_FIELDS = frozenset(NUMBERS) | OTHERS


@dataclasses.dataclass(frozen=True)
class Sampling:
    request: Request  # the settings (prompt_ids as the defaults had them)
    stop: tuple[str, ...] = ()  # stop strings: the caller's tokenizer checks them
    n: int = 1  # samples of the prompt (Request.choice 0..n-1)
    echo: bool = False  # completions: the prompt (and its logprobs) before the output


def parse_sampling(fields: dict, defaults: Request, chat: bool = False) -> Sampling:
    """The sampling fields present in `fields` over `defaults`. chat: OpenAI's chat form of
    logprobs (a boolean, with top_logprobs) instead of the completions form (an integer: that
    many alternatives per token)."""
    settings = {}
    for name, attribute in NUMBERS.items():
        if name in fields and fields[name] is not None:
            settings[attribute] = _number(name, fields[name], name in INTEGERS)
    if fields.get("logit_bias") is not None:
        settings["logit_bias"] = _logit_bias(fields["logit_bias"])
    if fields.get("stop_token_ids") is not None:
        ids = fields["stop_token_ids"]
        if not isinstance(ids, (list, tuple)) or not all(_is_int(t) for t in ids):
            raise RequestError("'stop_token_ids' must be a list of integer token ids")
        settings["stop_token_ids"] = tuple(ids)
    settings.update(_logprobs(fields, chat))
    request = dataclasses.replace(defaults, **settings)
    n = fields.get("n")
    n = 1 if n is None else _number("n", n, True)
    if not 1 <= n <= MAX_CHOICES:
        raise RequestError(f"'n' must be an integer in [1, {MAX_CHOICES}], got {n}")
    echo = fields.get("echo", False)
    if not isinstance(echo, bool):
        raise RequestError("'echo' must be true or false")
    return Sampling(request, _stop(fields.get("stop")), n, echo)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(name: str, value, integer: bool):
    if integer and not _is_int(value):
        raise RequestError(f"{name!r} must be an integer, got {_shown(value)}")
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise RequestError(f"{name!r} must be a number, got {_shown(value)}")
    return value


def _logit_bias(value) -> tuple:
    """{"token id": bias} (JSON keys are strings) -> ((id, bias), ...)."""
    if not isinstance(value, dict):
        raise RequestError("'logit_bias' must be an object mapping token ids to numbers")
    pairs = []
    for key, bias in value.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise RequestError(f"'logit_bias' key {_shown(key)} is not a token id") from None
        pairs.append((token, _number(f"logit_bias[{token}]", bias, False)))
    return tuple(pairs)


def _logprobs(fields: dict, chat: bool) -> dict:
    logprobs, top = fields.get("logprobs"), fields.get("top_logprobs")
    if logprobs is None:
        if top:
            raise RequestError("'top_logprobs' needs 'logprobs': true")
        return {}
    if chat or isinstance(logprobs, bool):
        if not isinstance(logprobs, bool):
            raise RequestError("'logprobs' must be true or false (chat completions)")
        top = 0 if top is None else _number("top_logprobs", top, True)
        if top and not logprobs:
            raise RequestError("'top_logprobs' needs 'logprobs': true")
        return {"logprobs": logprobs, "top_logprobs": top}
    # completions: an integer, that many alternatives per token (0: the chosen token's only)
    return {"logprobs": True, "top_logprobs": _number("logprobs", logprobs, True)}


def _stop(value) -> tuple[str, ...]:
    if value is None:
        return ()
    stop = (value,) if isinstance(value, str) else value
    if not isinstance(stop, (list, tuple)) or len(stop) > MAX_STOP_STRINGS \
            or not all(isinstance(s, str) and s and _valid_text(s) for s in stop):
        raise RequestError(f"'stop' must be a non-empty string or a list of at most "
                           f"{MAX_STOP_STRINGS} of them")
    return tuple(stop)


def _valid_text(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_known(fields: dict, allowed: frozenset, label: Optional[str] = None) -> None:
    """RequestError naming the unknown fields of `fields`."""
    unknown = sorted(set(fields) - allowed)
    if unknown:
        prefix = f"{label}: " if label else ""
        raise RequestError(f"{prefix}unknown field(s) {', '.join(map(repr, unknown))}; "
                           f"allowed: {', '.join(sorted(allowed))}")
