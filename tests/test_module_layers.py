"""The shape of runtime/ (issue 18's redesign), kept by tests: modules in layers, each importing
only from the layers below it (README's Layout lists them bottom-up); one module that asks
which backend this is; files and functions small enough to read."""

from __future__ import annotations

import ast
from pathlib import Path

RUNTIME = Path(__file__).resolve().parent.parent / "runtime"
# bottom-up; a package (models, checkpoint, planning) is one layer
LAYERS = ("errors config paths host_threads native_build host_copies super_scales six_bit quant int8_mins quant4 layer_types sharding kv_heads stacked_weights layout cpu_kernels pallas_gemv pallas_sharded int8_widening int4_widening "
          "products tables "
          "expert_groups memory ssm_memory models program_cache parameter_shapes benchmark "
          "checkpoint planning sampling sampling_state request request_fields scheduler multistep prepared_params "
          "engine weights_cache minbpe gguf_tokenizer tokenizer stop_strings chat_template openai_api distributed openai_batch "
          "batch server cli app_memory app_output app_engine app").split()
MAX_FILE_LINES = 460
MAX_FUNCTION_LINES = 60


def _modules():
    for path in sorted(RUNTIME.rglob("*.py")):
        parts = path.relative_to(RUNTIME).with_suffix("").parts
        if parts != ("__init__",):
            yield parts[0], path, ast.parse(path.read_text())


def _imported_layers(tree) -> set[str]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("runtime"):
            names = [node.module] if node.module != "runtime" else \
                [f"runtime.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("runtime.")]
        else:
            continue
        found |= {name.split(".")[1] for name in names if "." in name}
    return found


def test_every_module_has_a_layer_and_imports_only_downward():
    upward = []
    for layer, path, tree in _modules():
        assert layer in LAYERS, f"{path}: add {layer!r} to LAYERS (and to README's Layout)"
        for imported in _imported_layers(tree) - {layer}:
            assert imported in LAYERS, f"{path} imports unknown runtime.{imported}"
            if LAYERS.index(imported) > LAYERS.index(layer):
                upward.append(f"{path.relative_to(RUNTIME)} imports runtime.{imported}")
    assert not upward, upward


def test_only_layout_asks_which_backend_this_is():
    askers = [str(path.relative_to(RUNTIME)) for _, path, _ in _modules()
              if "default_backend" in path.read_text()]
    assert askers == ["layout.py"], askers


def test_files_and_functions_stay_small():
    long_files = [f"{path.relative_to(RUNTIME)}: {n}" for _, path, _ in _modules()
                  if (n := len(path.read_text().splitlines())) > MAX_FILE_LINES]
    long_functions = [f"{path.relative_to(RUNTIME)}:{node.lineno} {node.name}: "
                      f"{node.end_lineno - node.lineno + 1}"
                      for _, path, tree in _modules() for node in ast.walk(tree)
                      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                      and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long_files and not long_functions, long_files + long_functions
