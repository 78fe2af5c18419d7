"""A batch job's default cache length (runtime/app_memory.py): the model's context when it fits,
else the longest that fits the slots (issue 20: 32 slots x 131,072 tokens were refused; with
chunked prefill they fit 8 x 80 GB, 64 do not)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from runtime.app_memory import fitting_cache_length
from runtime.config import load_config
from runtime.planning import make_plan, parse_bytes

# A float32 safetensors folder: the plan reads the stored dtype from its headers
LLAMA_FOLDER = Path(__file__).resolve().parent / "fixtures" / "hf" / "llama"


def _args(memory):
    return SimpleNamespace(device_memory=memory, quantize=None, int8_group_size=64)


def test_a_long_context_model_gets_the_longest_cache_that_fits():
    opened = SimpleNamespace(config=load_config("llama-3.1-8b"), kind="hf",
                             checkpoint=LLAMA_FOLDER)
    sizes = {"data": 1, "model": 8}
    length, why = fitting_cache_length(_args("80GB"), opened, sizes, 64)
    assert 1024 <= length < 131072 and "the longest that fits 64 slot(s)" in why
    fits = make_plan(opened.config, sizes, "float32", 64, length, parse_bytes("80GB"))
    assert fits.fits
    assert not make_plan(opened.config, sizes, "float32", 64, length + 1024,
                         parse_bytes("80GB")).fits


def test_the_models_context_when_it_fits_or_memory_is_unknown(monkeypatch):
    opened = SimpleNamespace(config=load_config("tiny-test"), kind="ckpt-0", checkpoint="tiny")
    assert fitting_cache_length(_args("80GB"), opened, {"model": 1}, 4) == \
        (64, "the model's context")
    import runtime.planning as planning
    monkeypatch.setattr(planning, "device_capacity", lambda: (None, "accelerator"))
    llama = SimpleNamespace(config=load_config("llama-3.1-8b"), kind="hf",
                            checkpoint=LLAMA_FOLDER)
    assert fitting_cache_length(_args(None), llama, {"model": 8}, 32) == \
        (131072, "the model's context")
