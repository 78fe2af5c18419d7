"""The suite compiles with XLA:CPU's older fusion emitters (conftest.LEGACY_EMITTERS_FLAG), which
halve its compile time; run.py compiles with the MLIR fusion emitters. The two may round a
transcendental an ulp apart, and the cases whose tolerances are a few ulps (bf16 decode against
prefill, bf16 batch independence, a scanned multi-slot float32 engine, Mamba-2's scan and the
Palm family) are run again here in a pytest subprocess with the emitters run.py uses."""

import os
import subprocess
import sys

import pytest

from conftest import ROOT

LADDER = "tests/test_dtype_ladder.py::"
CASES = [LADDER + "test_bf16_prefill_logits_do_not_depend_on_the_batch",
         *(f"{LADDER}test_decode_logits_equal_prefill_logits[{case}]" for case in (
             "grok-int8r8-scan-1-bfloat16", "mamba2-int8r8-scan-1-bfloat16",
             "palm-float-transposed-3-bfloat16", "llama-int8g16-scan-3-float32"))]


@pytest.mark.slow
def test_delicate_cases_pass_with_the_fusion_emitters_run_py_uses():
    env = dict(os.environ, TESTS_XLA_FUSION_EMITTERS="1")  # the child's conftest drops the flag
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", *CASES],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert f"{len(CASES)} passed" in done.stdout.splitlines()[-1], done.stdout[-1000:]
