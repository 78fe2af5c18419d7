"""pallas_sharded: the GPU int8 product on weights sharded over 8 simulated CPU devices (the
kernel in Pallas interpret mode; tests/sharded_pallas_run.py in a subprocess). Each device must
multiply its own shard: no gathered weight, one all-reduce for row-parallel products."""

import json
from pathlib import Path

import pytest

from conftest import run_on_8_devices

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def results():
    return json.loads(run_on_8_devices(HERE / "sharded_pallas_run.py", timeout=600))


# name: (global weight [O, I], the local weight the kernel multiplies, all-gathers, all-reduces)
EXPECTED = {
    "column": ([256, 512], [64, 512], 0, 0),  # O over model=4
    "column_bf16": ([512, 256], [64, 256], 0, 0),  # O over model=8
    "row_groups_split": ([128, 1024], [128, 256], 0, 1),  # I over 4, its 8 scale rows too
    "row_one_scale": ([64, 1024], [64, 128], 0, 1),  # I over 8, one scale row
    # 2 scale rows cannot split over 4 devices: I is kept whole (the weight gathered)
    "row_groups_whole": ([64, 512], [64, 512], 1, 0),
    "rows_split": ([256, 512], [64, 512], 0, 0),  # x's rows over data=2 as well
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_device_multiplies_its_own_shard(results, name):
    whole, local, gathers, reduces = EXPECTED[name]
    case = results[name]
    assert case["error"] < 1e-5, case  # against float64
    assert case["kernel_weights"] == [whole, local], case  # traced whole, then per device
    assert case["all-gather"] == gathers and case["all-reduce"] == reduces, case


@pytest.mark.slow
def test_engine_tokens_are_the_same_with_the_kernel_on_a_mesh(results):
    engine = results["engine"]
    assert engine["kernel=True"]["kernel_calls"] > 0 and engine["kernel=False"]["kernel_calls"] == 0
    assert engine["kernel=True"]["tokens"] == engine["kernel=False"]["tokens"]
