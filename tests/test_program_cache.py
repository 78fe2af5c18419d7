"""Programs stored by one engine (one run.py) are loaded by the next instead of traced, give the
same tokens, and anything wrong with a stored file falls back to tracing."""

import shutil

import jax
import pytest

from conftest import random_params, single_device_mesh, tiny_config
from runtime import program_cache
from runtime.engine import build_engine
from runtime.parameter_shapes import abstract_params
from runtime.request import Request

REQUESTS = [Request((5, 6, 7), max_new_tokens=6), Request((9, 10), max_new_tokens=6)]


@pytest.fixture
def cache_dir(tmp_path):
    yield tmp_path / "programs"
    program_cache.activate(None)


def generate(config, params, unroll):
    engine = build_engine(config, params, single_device_mesh(), slots=2, cache_length=16,
                          unroll_layers=unroll)
    return [c.output_ids for c in engine.generate(REQUESTS)]


@pytest.mark.slow
@pytest.mark.parametrize("unroll", [False, True])  # stacked memory; a tuple of per-layer arrays
def test_programs_are_stored_then_loaded_with_the_same_tokens(cache_dir, unroll):
    config = tiny_config(num_layers=2)
    params = random_params(config, seed=2)
    want = generate(config, params, unroll)  # no cache

    first = program_cache.activate(cache_dir)
    assert generate(config, params, unroll) == want
    assert (first.exported, first.loaded) == (2, 0)  # prefill and decode, traced and stored

    second = program_cache.activate(cache_dir)  # as a new process would
    assert generate(config, params, unroll) == want
    assert (second.exported, second.loaded) == (0, 2)

    if not unroll:  # same shapes, another model: its own programs
        other = program_cache.activate(cache_dir)
        generate(config.replace(rope_base=500.0), params, unroll)
        assert (other.exported, other.loaded) == (2, 0)


@pytest.mark.slow
def test_a_damaged_program_file_is_traced_again_and_replaced(cache_dir, capsys):
    config = tiny_config(num_layers=2)
    params = random_params(config, seed=2)
    program_cache.activate(cache_dir)
    want = generate(config, params, False)
    for path in cache_dir.glob("program-*"):
        path.write_bytes(b"not a program")
    again = program_cache.activate(cache_dir)
    assert generate(config, params, False) == want
    assert "unreadable" in capsys.readouterr().err
    assert (again.exported, again.loaded) == (2, 0)
    repaired = program_cache.activate(cache_dir)
    assert generate(config, params, False) == want
    assert (repaired.exported, repaired.loaded) == (0, 2)


def test_abstract_params_are_read_back_without_tracing(cache_dir):
    config = tiny_config(num_layers=3)
    want = abstract_params(config)
    cache = program_cache.activate(cache_dir)
    assert cache.abstract_params(config, lambda: want) == want  # traced once, stored
    again = program_cache.activate(cache_dir)
    got = again.abstract_params(config, lambda: pytest.fail("traced again"))
    assert jax.tree.map(lambda a: (a.shape, a.dtype), got) == \
        jax.tree.map(lambda a: (a.shape, a.dtype), want)


def test_keys_follow_the_runtime_source(tmp_path, monkeypatch):
    copy = tmp_path / "runtime"
    shutil.copytree(program_cache.RUNTIME_DIR, copy,
                    ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(program_cache, "RUNTIME_DIR", copy)
    before = program_cache.source_digest()
    assert program_cache.source_digest() == before
    model = copy / "models" / "transformer.py"
    model.write_text(model.read_text() + "\n# changed\n")
    assert program_cache.source_digest() != before
