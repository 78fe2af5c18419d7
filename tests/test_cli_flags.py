"""Flags are checked as they are parsed, before JAX, a tokenizer or a checkpoint is touched: a bad
value is one line `error: argument --flag: ...` and exit status 2 (issue 19: --slots 0 spun
forever, --top-p 2 took 4 s to refuse, --temperature inf produced nonsense)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from runtime import cli

ROOT = Path(__file__).resolve().parent.parent


def refused(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        cli.parse_args(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("argv, flag", [
    (["--slots", "0"], "--slots"),
    (["--slots", "-1"], "--slots"),
    (["batch", "--input", "x", "--output", "y", "--slots", "0"], "--slots"),
    (["--cache-length", "0"], "--cache-length"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--max-new-tokens", "true"], "--max-new-tokens"),
    (["--temperature", "inf"], "--temperature"),
    (["--temperature", "nan"], "--temperature"),
    (["--temperature", "1e39"], "--temperature"),  # inf in float32
    (["--temperature", "-0.5"], "--temperature"),
    (["--temperature", "9" * 400], "--temperature"),
    (["--top-p", "2"], "--top-p"),
    (["--top-p", "0"], "--top-p"),
    (["--top-p", "1e-50"], "--top-p"),  # 0 in float32
    (["--top-k", str(2**40)], "--top-k"),
    (["--top-k", "-1"], "--top-k"),
    (["--seed", "-1"], "--seed"),
    (["--seed", str(2**31)], "--seed"),
    (["--num-processes", "0"], "--num-processes"),
    (["--process-id", "-2"], "--process-id"),
    (["--init-timeout", "0"], "--init-timeout"),
    (["--int8-group-size", "-3"], "--int8-group-size"),
    (["--prompt", "caf\udcc3"], "--prompt"),  # argv bytes that are not UTF-8
    (["--no-such-flag"], "--no-such-flag"),
])
def test_bad_flags_are_one_line_naming_the_flag(argv, flag, capsys):
    assert flag in refused(argv, capsys)


def test_good_flags_parse():
    args = cli.parse_args(["--slots", "3", "--top-p", "0.5", "--temperature", "0",
                           "--top-k", "40", "--seed", str(2**31 - 1), "--prompt", "café"])
    assert (args.slots, args.top_p, args.temperature, args.top_k) == (3, 0.5, 0.0, 40)
    assert args.prompts == [("text", "café")]


def test_flags_are_refused_before_jax_is_imported():
    code = ("import sys; from runtime import cli\n"
            "try:\n    cli.parse_args(['--top-p', '2'])\nexcept SystemExit:\n    pass\n"
            "print('jax' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert done.stdout.strip() == "False", done.stdout + done.stderr
    assert "error: argument --top-p" in done.stderr


NUMERIC = {"--slots": "slots", "--cache-length": "cache_length", "--temperature": "temperature",
           "--top-p": "top_p", "--top-k": "top_k", "--seed": "seed",
           "--max-new-tokens": "max_new_tokens"}


@given(flag=st.sampled_from(sorted(NUMERIC)),
       text=st.text(max_size=12) | st.integers(-2**70, 2**70).map(str)
       | st.floats().map(repr))
def test_fuzzed_flag_values_parse_into_range_or_are_refused(flag, text):
    try:
        args = cli.parse_args([flag, text])
    except SystemExit as e:
        assert e.code == 2
        return
    value = getattr(args, NUMERIC[flag])
    if flag in ("--temperature", "--top-p"):
        assert math.isfinite(float(np.float32(value))) and value >= 0
        assert flag == "--temperature" or 0 < np.float32(value) <= 1
    else:
        assert isinstance(value, int) and 0 <= value < 2**31
        assert flag in ("--top-k", "--seed") or value >= 1
