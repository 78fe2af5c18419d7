"""The shipped demo checkpoint (checkpoints/demo): it loads through the normal ckpt-0 reader, its
held-out perplexity is far below that of a uniform guess, and `python run.py` samples from it.

The run.py subprocess is started first and runs while the perplexity is computed in-process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "checkpoints" / "demo"
sys.path.insert(0, str(ROOT / "scripts"))

from eval_perplexity import encode_documents, perplexity, split_documents  # noqa: E402

WINDOWS = 6  # 6 windows of 256 tokens (1,530 predicted tokens): a few seconds on a CPU
MAX_BYTES = 25 * 1000 * 1000
INT8 = {"multi_head_attention/query": 1, "multi_head_attention/key": 1,
        "multi_head_attention/value": 1, "multi_head_attention/linear": 8,
        "moe/linear": 1, "moe/linear_v": 1, "moe/linear_1": 8}
LAYER = "language_model/transformer/layers/decoder_layer/"


@pytest.fixture(scope="module")
def run_py(tmp_path_factory):
    """`python run.py --max-new-tokens 16`, no other flags, from another working directory."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.Popen([sys.executable, str(ROOT / "run.py"), "--max-new-tokens", "16"],
                            cwd=tmp_path_factory.mktemp("cwd"), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


def test_files_and_size():
    for name in ("ckpt-0", "tokenizer.model", "config.yaml", "README.md", "heldout.txt",
                 "metrics.json"):
        assert (DEMO / name).exists(), name
    size = sum(p.stat().st_size for p in DEMO.rglob("*") if p.is_file())
    assert size <= MAX_BYTES, f"checkpoints/demo is {size} bytes"
    assert len((DEMO / "heldout.txt").read_bytes()) <= 100_000


def test_config_is_the_demo_preset():
    from runtime.config import load_config
    config = load_config(DEMO / "config.yaml")
    assert config == load_config("demo")
    assert config.num_experts == 8 and config.num_selected_experts == 2
    assert config.num_q_heads > config.num_kv_heads >= 2  # GQA


@pytest.mark.slow
def test_heldout_perplexity_is_low(run_py):
    from runtime.checkpoint.load import load_params
    from runtime.config import load_config
    from runtime.models import build_model
    from runtime.quant import QuantizedWeight8bit
    from runtime.tokenizer import Tokenizer

    config = load_config(DEMO / "config.yaml")
    tokenizer = Tokenizer(DEMO / "tokenizer.model")
    assert tokenizer.vocab_size == config.vocab_size
    params = load_params(DEMO, config, kind="ckpt-0")
    for module, row_blocks in INT8.items():  # int8 linears, as shipped
        leaf = params[LAYER + module]["w"]
        assert isinstance(leaf, QuantizedWeight8bit) and leaf.row_blocks == row_blocks, module
    assert not isinstance(params[LAYER + "router"]["w"], QuantizedWeight8bit)
    n_params = sum(int(np.prod(leaf.shape)) for leaves in params.values()
                   for leaf in leaves.values())
    assert 5_000_000 <= n_params <= 20_000_000, n_params

    docs = split_documents((DEMO / "heldout.txt").read_text(encoding="utf-8"))
    ids = encode_documents(tokenizer, docs, config.bos_token, config.eos_token)
    ppl, count = perplexity(build_model(config), params, ids, max_windows=WINDOWS)
    measured = json.loads((DEMO / "metrics.json").read_text())["perplexity_int8"]
    assert count >= 1000
    assert ppl < config.vocab_size / 20, ppl  # uniform guessing scores vocab_size
    assert ppl < 2 * measured, (ppl, measured)


@pytest.mark.slow
def test_run_py_without_arguments_samples_text(run_py):
    try:
        out, err = run_py.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        run_py.kill()
        out, err = run_py.communicate()
        pytest.fail(f"run.py timed out; stderr tail:\n{err[-2000:]}")
    assert run_py.returncode == 0, f"exit {run_py.returncode}; stderr:\n{err[-3000:]}"
    assert "Traceback" not in err
    lines = out.splitlines()
    assert lines[0].startswith("--- prompt 0:"), out
    assert lines[-1].startswith("[finish_reason:"), out
    text = "\n".join(lines[1:-1])
    assert sum(ch.isalpha() for ch in text) >= 10, out
