"""BOS and the other special tokens are added as the tokenizer itself adds them: a text's ids
equal transformers' `AutoTokenizer.from_pretrained(folder)(text).input_ids` (fixtures made by
scripts/make_tokenizer_fixtures.py with transformers), through run.py too."""

import json
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT
from runtime.tokenizer import find_tokenizer, load_tokenizer, sentencepiece_adds_bos

FIXTURES = ROOT / "tests" / "fixtures" / "tokenizers"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())
CASES = sorted(EXPECTED["ids"])


@pytest.mark.parametrize("case", CASES)
def test_tokenizer_json_ids_equal_transformers(case):
    tokenizer = load_tokenizer(find_tokenizer(FIXTURES / case))
    got = [tokenizer.encode(text) for text in EXPECTED["texts"]]
    assert got == EXPECTED["ids"][case]


def test_fixtures_cover_both_kinds():
    """One fixture adds no BOS (byte-level BPE), another a BOS template: the test can fail
    both ways (a runtime that always or never adds BOS)."""
    first = {case: EXPECTED["ids"][case][0][0] for case in CASES}
    assert first["no_bos_template"] != first["bos_template"] == 0


def test_a_folder_with_both_files_reads_tokenizer_json(tmp_path):
    """transformers reads tokenizer.json when a folder also has tokenizer.model."""
    shutil.copy(FIXTURES / "bos_template" / "tokenizer.json", tmp_path)
    shutil.copy(ROOT / "checkpoints" / "demo" / "tokenizer.model", tmp_path)
    assert find_tokenizer(tmp_path) == tmp_path / "tokenizer.json"


def test_sentencepiece_bos_follows_tokenizer_config(tmp_path):
    assert sentencepiece_adds_bos(tmp_path)  # LlamaTokenizer's default
    (tmp_path / "tokenizer_config.json").write_text('{"add_bos_token": false}')
    assert not sentencepiece_adds_bos(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"add_bos_token": true}')
    assert sentencepiece_adds_bos(tmp_path)


@pytest.mark.slow
def test_run_py_prompt_ids_equal_transformers(tmp_path):
    """An HF checkpoint whose tokenizer.json adds no BOS: run.py's prompt_ids are transformers'
    ids (before this fix run.py prepended config.json's bos_token_id)."""
    folder = tmp_path / "model"
    shutil.copytree(ROOT / "tests" / "fixtures" / "hf" / "llama", folder)
    config = json.loads((folder / "config.json").read_text())
    config["bos_token_id"] = 0
    (folder / "config.json").write_text(json.dumps(config))
    for case in ("no_bos_template", "bos_template"):
        shutil.copy(FIXTURES / case / "tokenizer.json", folder)
        text = EXPECTED["texts"][0]
        out = subprocess.run([sys.executable, str(ROOT / "run.py"), "--checkpoint", str(folder),
                              "--prompt", text, "--max-new-tokens", "1", "--temperature", "0",
                              "--json"], capture_output=True, text=True, cwd=ROOT)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["prompt_ids"] == EXPECTED["ids"][case][0]
