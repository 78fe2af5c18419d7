"""The in-place KV write (runtime/cpu_kv_write.cc, cpu_kernels.write_kv) against numpy's own
assignment, in every memory dtype and both memory layouts, and its use by a decode step over a
bfloat16 memory (XLA:CPU's scatter widened it to float32: a copy of the whole memory)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import runtime.cpu_kernels as cpu_kernels
from runtime.models.attention import write_layer_rows, write_rows

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="no C++ compiler")


def _expected(memory, chunk, rows, slots):
    """numpy: memory [L, B, K, S, H] with chunk [L, n, T, K, H] at rows [n], slots [n, T]."""
    out = memory.copy()
    for i, row in enumerate(rows):
        for t, slot in enumerate(slots[i]):
            if 0 <= row < memory.shape[1] and 0 <= slot < memory.shape[3]:
                out[:, row, :, slot] = chunk[:, i, t]
    return out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("stacked", [True, False])
def test_write_kv_matches_numpy(dtype, stacked):
    rng = np.random.default_rng(3)
    layers = 3 if stacked else 1
    memory = rng.standard_normal((layers, 4, 2, 10, 8)).astype(np.float32)
    chunk = rng.standard_normal((layers, 3, 2, 2, 8)).astype(np.float32)
    rows = np.array([2, 0, 5], np.int32)  # row 5 is out of range: dropped
    slots = np.array([[3, 4], [9, 10], [0, 1]], np.int32)  # slot 10 too
    as_dtype = lambda a: jnp.asarray(a, dtype)  # noqa: E731
    if stacked:
        got = cpu_kernels.write_kv(as_dtype(memory), as_dtype(chunk), jnp.asarray(rows),
                                   jnp.asarray(slots))
    else:
        got = cpu_kernels.write_kv(as_dtype(memory[0]), as_dtype(chunk[0]), jnp.asarray(rows),
                                   jnp.asarray(slots))[None]
    rounded = lambda a: np.asarray(as_dtype(a).astype(jnp.float32))  # noqa: E731
    want = _expected(rounded(memory), rounded(chunk), rows, slots)
    assert got.dtype == jnp.dtype(dtype)
    np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32)), want)


def test_write_kv_refuses_bad_operands_in_one_line():
    memory = jnp.zeros((2, 3, 4, 8), jnp.bfloat16)
    with pytest.raises(Exception, match="write_kv: shapes must be") as error:
        cpu_kernels.write_kv(memory, jnp.zeros((1, 1, 2, 8), jnp.bfloat16),  # K 2, not 3
                             jnp.zeros((1,), jnp.int32), jnp.zeros((1, 1), jnp.int32))
    assert "\n" not in str(error.value).strip().splitlines()[-1]


def test_the_model_writes_match_the_scatter(monkeypatch):
    """write_rows (stacked and per layer) and write_layer_rows through the kernel equal the
    scatter they replace, padding of a chunk dropped; and a donated bf16 memory is written in
    place: the compiled program copies no memory-sized buffer."""
    rng = np.random.default_rng(5)
    memory = jnp.asarray(rng.standard_normal((3, 4, 2, 16, 8)), jnp.bfloat16)
    new = jnp.asarray(rng.standard_normal((3, 2, 5, 2, 8)), jnp.float32)
    starts, lengths = jnp.array([14, 2], jnp.int32), jnp.array([5, 3], jnp.int32)
    rows = jnp.array([3, 1], jnp.int32)
    results = {}
    for kernel in (True, False):
        monkeypatch.setattr(cpu_kernels, "write_kv_usable", lambda dtype, on=kernel: on)
        results[kernel] = (write_rows(memory, new, starts, lengths, rows),
                           write_rows(tuple(memory), new, starts, lengths, rows),
                           write_layer_rows(memory[1], new[1], starts, lengths))
    for got, want in zip(jax.tree.leaves(results[True]), jax.tree.leaves(results[False])):
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    monkeypatch.setattr(cpu_kernels, "write_kv_usable", lambda dtype: True)
    step = jax.jit(lambda m, n: write_rows(m, n, starts, lengths, rows), donate_argnums=0)
    program = step.lower(memory, new).compile().as_text()
    assert "runtime_write_kv" in program
    assert "f32[3,4,2,16,8]" not in program  # the scatter's widened memory
    assert not [line for line in program.splitlines()
                if " copy(" in line and "bf16[3,4,2,16,8]" in line]


@pytest.mark.parametrize("per_layer", [False, True])
def test_prompt_rows_written_into_slots_match_the_scatter(monkeypatch, per_layer):
    """write_kv_slots (a prefill's fresh rows into their slots, padding rows dropped, a ring
    keeping each row's last positions) through the kernel equals the scatter it replaces."""
    from runtime.memory import KVMemory, write_kv_slots
    rng = np.random.default_rng(7)
    stacked = jnp.asarray(rng.standard_normal((2, 4, 2, 6, 8)), jnp.bfloat16)
    memory = KVMemory(tuple(stacked) if per_layer else stacked,
                      tuple(-stacked) if per_layer else -stacked, jnp.zeros(4, jnp.int32))
    fresh = KVMemory(jnp.asarray(rng.standard_normal((2, 3, 2, 9, 8)), jnp.bfloat16),
                     jnp.asarray(rng.standard_normal((2, 3, 2, 9, 8)), jnp.bfloat16),
                     jnp.array([9, 4, 7], jnp.int32))  # 9 tokens into 6 slots: a ring
    slots = jnp.array([2, 0, 4], jnp.int32)  # slot 4 is out of range: a padding row
    results = {}
    for kernel in (True, False):
        monkeypatch.setattr(cpu_kernels, "write_kv_usable", lambda dtype, on=kernel: on)
        results[kernel] = write_kv_slots(memory, fresh, slots)
    for got, want in zip(jax.tree.leaves(results[True]), jax.tree.leaves(results[False])):
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
