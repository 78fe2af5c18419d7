"""A Hugging Face checkpoint's generation_config.json: its end ids and its sampling defaults.

transformers stops at every id in `eos_token_id` (an int or a list) of config.json and of
generation_config.json, and samples with the latter's `do_sample`, `temperature`, `top_p`,
`top_k` and `max_new_tokens`; run.py takes those as its defaults where no flag is given.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

from runtime.errors import ConfigError

FILE = "generation_config.json"


def read_generation_config(directory: Path) -> dict:
    """The folder's generation_config.json as a dict ({} when there is none)."""
    path = Path(directory) / FILE
    if not path.is_file():
        return {}
    try:
        values = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e.msg} (line {e.lineno})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(values).__name__}")
    return values


def token_ids(value, field: str, source: str) -> list[int]:
    """An `eos_token_id`-style value (null, an id, or a list of ids) as a list of ids."""
    if value is None:
        return []
    ids = value if isinstance(value, list) else [value]
    for i in ids:
        if not isinstance(i, int) or isinstance(i, bool) or i < 0:
            raise ConfigError(f"{source}: {field} must be a token id or a list of them, "
                              f"got {value!r}")
    return ids


def eos_ids(hf: dict, generation: dict, source: str) -> list[int]:
    """Every end id, config.json's first, then generation_config.json's, without repeats."""
    ids = token_ids(hf.get("eos_token_id"), "eos_token_id", source)
    ids += token_ids(generation.get("eos_token_id"), "eos_token_id", f"{source} ({FILE})")
    return list(dict.fromkeys(ids))


def sampling_defaults(generation: dict, source: str = FILE) -> dict:
    """run.py defaults from generation_config.json: `max_new_tokens`, and the sampling settings
    as transformers applies them: `do_sample` false (its default) is greedy (temperature 0);
    with `do_sample` true, the file's `temperature`, `top_p` and `top_k` (those it sets)."""
    out: dict = {}
    tokens = generation.get("max_new_tokens")
    if tokens is not None:
        if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 1:
            raise ConfigError(f"{source}: max_new_tokens must be a positive integer, "
                              f"got {tokens!r}")
        out["max_new_tokens"] = tokens
    if not generation:
        return out
    if not generation.get("do_sample", False):
        out["temperature"] = 0.0
        return out
    for key, check in (("temperature", lambda v: v >= 0), ("top_p", lambda v: 0 < v <= 1)):
        value = generation.get(key)
        if value is None:
            continue
        if not isinstance(value, (int, float)) or isinstance(value, bool) \
                or not math.isfinite(value) or not check(value):
            raise ConfigError(f"{source}: invalid {key} {value!r}")
        out[key] = float(value)
    top_k: Optional[int] = generation.get("top_k")
    if top_k is not None:
        if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0:
            raise ConfigError(f"{source}: invalid top_k {top_k!r}")
        out["top_k"] = top_k
    return out
