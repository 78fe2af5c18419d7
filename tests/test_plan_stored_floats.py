"""The memory plan of a checkpoint stored in 2-byte floats (bf16 / f16 safetensors, F16 GGUF):
planned as stored where run.py keeps them (accelerators, the CPU's panel kernels), as float32
where its loader widens them, so a model that fits is not refused and one that does not is."""

import ml_dtypes
import numpy as np
import pytest

from conftest import ROOT, single_device_mesh
from gguf_helpers import write_model_gguf
from runtime import cli, cpu_kernels, layout
from runtime.app import open_model
from runtime.app_memory import planned_weight_format
from runtime.checkpoint.load import load_params_on_mesh
from runtime.checkpoint.safetensors_io import SafetensorsFile, save_safetensors
from runtime.cpu_kernels import panels_read_2_byte_floats
from runtime.layout import widen_floats_at_load
from runtime.planning import default_weight_format, make_plan

LLAMA = ROOT / "tests" / "fixtures" / "hf" / "llama"


def _hf_copy(tmp_path, dtype):
    """The Llama fixture with every tensor stored as `dtype`."""
    folder = tmp_path / np.dtype(dtype).name
    folder.mkdir()
    (folder / "config.json").write_bytes((LLAMA / "config.json").read_bytes())
    source = SafetensorsFile(LLAMA / "model.safetensors")
    save_safetensors({n: np.asarray(source.get(n)).astype(dtype) for n in source.keys()},
                     folder / "model.safetensors")
    return folder


@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float16])
def test_a_2_byte_hf_folder_plans_as_stored_unless_widened(tmp_path, dtype):
    folder = _hf_copy(tmp_path, dtype)
    assert default_weight_format("hf", None, folder) == "bfloat16"
    assert default_weight_format("hf", None, folder, floats_widened=True) == "float32"
    assert default_weight_format("hf", "int8", folder) == "int8"
    assert default_weight_format("hf", "int4", folder, floats_widened=True) == "int4"
    assert default_weight_format("hf", None, LLAMA) == "float32"  # float32 as stored


def test_an_f16_gguf_plans_as_float32_where_widened(tmp_path):
    path = tmp_path / "f16.gguf"
    write_model_gguf(LLAMA, path, "F16")
    assert default_weight_format("gguf", None, path) == "bfloat16"
    assert default_weight_format("gguf", None, path, floats_widened=True) == "float32"


def _loaded_bytes(folder, config) -> int:
    """Bytes of the tree run.py's loader makes of `folder` on this one CPU device."""
    params = load_params_on_mesh(folder, config, single_device_mesh(),
                                 widen_floats_to=widen_floats_at_load(config),
                                 keep_matmul_floats=panels_read_2_byte_floats(config))
    return sum(leaf.nbytes for leaves in params.values() for leaf in leaves.values())


@pytest.mark.parametrize("panels", [True, False])
def test_the_plan_holds_what_run_py_loads(tmp_path, monkeypatch, panels):
    """bf16 weights on one CPU device under float32 activations: kept 2-byte for the panel
    kernels (planned bfloat16), widened without them (planned float32); the plan's parameter
    bytes are the loaded tree's but for the norms (widened to float32 either way)."""
    if panels and not cpu_kernels.available():
        pytest.skip("the CPU kernels did not build here")  # CI builds them: a real run there
    monkeypatch.setattr(layout, "TILED_WEIGHTS", panels)
    folder = _hf_copy(tmp_path, ml_dtypes.bfloat16)
    args = cli.parse_args(["--checkpoint", str(folder)])
    opened = open_model(args)
    assert opened.config.dtype == "float32"
    fmt = planned_weight_format(args, opened)
    assert fmt == ("bfloat16" if panels else "float32")
    plan = make_plan(opened.config, {"data": 1, "model": 1}, fmt, slots=1, cache_length=32)
    loaded = _loaded_bytes(folder, opened.config)
    norms = 2 * (2 * opened.config.num_layers + 1) * opened.config.emb_size  # 2 bytes more each
    assert plan.param_bytes == loaded - (norms if panels else 0)
    if panels:  # the widened copy's plan would be nearly twice the bytes held
        widened = make_plan(opened.config, {"data": 1, "model": 1}, "float32", slots=1,
                            cache_length=32)
        assert widened.param_bytes > 1.9 * loaded
    here, elsewhere = planned_weight_format(args, opened), \
        planned_weight_format(args, opened, here=False)
    assert elsewhere == "bfloat16" and here == fmt  # another machine's accelerators keep bf16
