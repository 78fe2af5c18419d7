"""Placing a read parameter on CPU devices (checkpoint/lazy.py): a parameter read into a
host_empty buffer is held by one CPU device as it is (no copy); on a mesh of several devices
each device holds a copy of its own shard, never a view that would keep the whole block
alive; the values are the parameter's either way."""

import numpy as np
import pytest

from conftest import ROOT, run_on_8_devices, single_device_mesh
from runtime.checkpoint.lazy import HOST_ALIGNMENT, LazyParam, host_empty, normalize, place_lazy


@pytest.mark.parametrize("shape,dtype", [((7, 3), np.float32), ((0, 5), np.int8),
                                         ((3, 1, 130), np.uint8), ((), np.float16)])
def test_host_empty_is_aligned_and_shaped(shape, dtype):
    for _ in range(5):
        array = host_empty(shape, dtype)
        assert array.shape == shape and array.dtype == dtype and array.flags.c_contiguous
        assert array.ctypes.data % HOST_ALIGNMENT == 0 or not array.size


def _param(value: np.ndarray, blocks: list) -> LazyParam:
    def read(index):
        ranges = normalize(index, value.shape)
        out = host_empty(tuple(len(r) for r in ranges), value.dtype)
        out[...] = value[tuple(slice(r.start, r.stop) for r in ranges)]
        blocks.append(out)
        return out
    return LazyParam(value.shape, value.dtype, read)


def test_one_cpu_device_holds_the_read_block_itself():
    from jax.sharding import PartitionSpec
    value = np.arange(64 * 96, dtype=np.float32).reshape(64, 96)
    blocks = []
    placed = place_lazy(_param(value, blocks), PartitionSpec(), single_device_mesh())
    (block,) = blocks
    assert placed.addressable_data(0).unsafe_buffer_pointer() == block.ctypes.data
    np.testing.assert_array_equal(np.asarray(placed), value)


SHARDED = """
import sys
import numpy as np
sys.path[:0] = [{root!r}, {tests!r}]
from jax.sharding import PartitionSpec
from runtime.sharding import make_mesh
from test_lazy_placement import _param
from runtime.checkpoint.lazy import place_lazy
value = np.arange(64 * 96, dtype=np.float32).reshape(64, 96)
blocks = []
placed = place_lazy(_param(value, blocks), PartitionSpec("model", None),
                    make_mesh({{"data": 1, "model": 8}}))
(block,) = blocks
low, high = block.ctypes.data, block.ctypes.data + block.nbytes
inside = [low <= s.data.unsafe_buffer_pointer() < high for s in placed.addressable_shards]
assert not any(inside), inside
np.testing.assert_array_equal(np.asarray(placed), value)
# (and the prepared weights cache keeps one CPU device's engines only)
import jax
from runtime.weights_cache import eligible
assert not eligible(make_mesh({{"data": 1, "model": 8}}))
assert eligible(make_mesh({{"data": 1, "model": 1}}, devices=jax.devices()[:1]))
print("ok", len(placed.addressable_shards))
"""


def test_shards_on_several_cpu_devices_are_copies_of_their_own():
    code = SHARDED.format(root=str(ROOT), tests=str(ROOT / "tests"))
    assert run_on_8_devices("-c", code, timeout=300) == "ok 8"
