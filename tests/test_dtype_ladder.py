"""The self-consistency ladder, in every dtype, weight format and engine layout.

For each family (Grok-1 MoE: the trained demo; Llama, Mistral with its sliding window, Mixtral,
Mamba-2: the transformers fixtures; PaLM-style parallel blocks: random weights), each weight
format (float, int8 with one scale per output channel, int8 with 8 scale row blocks, int8 in
groups of 16 input rows with a tied table int8 too, int4 symmetric in groups of 16 and
asymmetric in groups of 32, tables float) and the
engine layouts (scanned or unrolled layers, weights transposed or not, one slot or several):

- the logits of every decode step, computed on the engine's own parameters and memory, equal the
  logits of a prefill of the same context within a tolerance derived from the dtype (a few ulps
  of the largest logit: `tolerance`);
- the engine's greedy tokens are the argmax of those logits;
- bf16 logits equal the float32 logits of the same weights within a bf16 tolerance, at
  positions whose routing is not a near-tie (see `bf16_agrees_with_float32`).

Multi-device layouts run in tests/sharded_ladder_run.py (8 simulated devices, a subprocess).
"""

from __future__ import annotations

import functools
import math

import jax
import numpy as np
import pytest

from conftest import ROOT, random_params, run_on_8_devices, single_device_mesh, tiny_config
from runtime.checkpoint.hf_config import read_hf_config
from runtime.checkpoint.load import load_params, quantized_int8
from runtime.paths import QUANTIZABLE
from runtime.config import load_config
from runtime.engine import Engine, build_engine
from runtime import layout as layouts
from runtime.layout import program_options
from runtime.paths import STACKED
from runtime.quant import QuantizedWeight8bit, dequantize, quantize
from runtime.quant4 import quantize_int4  # groups of at most N rows: quant4.groups_for
from runtime.request import Request

FIXTURES = ROOT / "tests" / "fixtures" / "hf"
DEMO = ROOT / "checkpoints" / "demo"
STEPS = 4  # decode steps compared per case

# Tolerances in units in the last place of the largest |logit| of the case, by activation dtype.
# Decode and prefill compute the same function in another order (memory and chunk attended
# separately, products over other row counts); measured worst cases are in BENCHMARKS.md.
DECODE_ULPS = {"float32": 64, "bfloat16": 3}
# Float32 activations over a 2-byte KV memory: both paths round the same keys, but a key whose
# float32 values differ in their last bits on the two paths can round to neighbouring bf16
# values (up to ~840 ulps in a logit, seen in tests/test_decode_attention.py). A prefill
# attending to its keys unrounded differs by 24,000-47,000 ulps on the bf16 cases below. A
# float16 key has 3 more mantissa bits, so the unrounded keys' error is ~8x less (780-6,700
# ulps), but one flip still moved a logit 770 ulps (mixtral below).
KV_ROUNDED_ULPS = {"bfloat16": 2048, "float16": 1024}
# bf16 against float32 of the same weights: every layer rounds its activations to bf16, so the
# error grows with depth; held to this many bf16 ulps of the largest logit.
BF16_VS_F32_ULPS = 8
MANTISSA_BITS = {"float32": 23, "bfloat16": 7}


def tolerance(dtype: str, magnitude: float, ulps: float) -> float:
    """`ulps` units in the last place of `magnitude` in `dtype`."""
    exponent = math.floor(math.log2(max(magnitude, 1e-30)))
    return ulps * 2.0 ** (exponent - MANTISSA_BITS[dtype])


# --- models and weight formats -------------------------------------------------------------------

def _demo():
    """The demo's first two trained layers (half the compile time of four; its logits keep
    their trained magnitudes)."""
    config = load_config(DEMO / "config.yaml")
    params = load_params(DEMO, config)
    layers = 2
    params = {module: {name: jax.tree.map(lambda a: a[:layers], leaf)
                       if module.startswith(STACKED) else leaf for name, leaf in leaves.items()}
              for module, leaves in params.items()}
    return config.replace(num_layers=layers), params


def _hf(name):
    def make():
        config = read_hf_config(FIXTURES / name)
        return config, load_params(FIXTURES / name, config)
    return make


def _palm():
    config = tiny_config(num_layers=3, num_experts=0, num_selected_experts=0, activation="silu",
                         norm_type="layer", parallel_block=True, num_kv_heads=1,
                         sandwich_norms=False, attn_logit_cap=None, embedding_multiplier_scale=1.0,
                         output_multiplier_scale=1.0)
    return config, random_params(config, seed=30, scale=0.3)


FAMILIES = {"grok": _demo, "llama": _hf("llama"), "mistral": _hf("mistral"),
            "mixtral": _hf("mixtral"), "mamba2": _hf("mamba2"), "palm": _palm}


@functools.lru_cache(maxsize=None)
def _as_read(family: str):
    return FAMILIES[family]()


def _float(leaf):
    return dequantize(leaf) if isinstance(leaf, QuantizedWeight8bit) else np.asarray(leaf)


@functools.lru_cache(maxsize=None)
def weights(family: str, weight_format: str):
    """(config, params) of a family in a weight format: "float", "int8" (R = 1), "int8r8",
    "int8g16" (what --quantize int8 --int8-group-size 16 stores: a tied table int8 too),
    "int4g16" (symmetric int4 in groups of 16 rows) or "int4a32" (asymmetric, groups of at
    most 32 rows: quant4.groups_for); int4 for the QUANTIZABLE matmul weights, tables float."""
    config, params = _as_read(family)
    rows = {"float": None, "int8": 1, "int8r8": 8, "int8g16": None, "int4g16": None,
            "int4a32": None}[weight_format]
    int4 = {"int4g16": (16, True), "int4a32": (32, False)}.get(weight_format)

    def convert(path, leaf):
        if weight_format == "int8g16":
            return quantized_int8(path, _float(leaf).astype(np.float32), config, 16)
        if not QUANTIZABLE.search(path):
            return leaf
        dense = _float(leaf).astype(np.float32)
        if int4 is not None:
            return quantize_int4(dense, *int4)
        return dense if rows is None else quantize(dense, rows)

    return config, {module: {name: convert(f"{module}/{name}", leaf)
                             for name, leaf in leaves.items()}
                    for module, leaves in params.items()}


# --- probes ---------------------------------------------------------------------------------------

def prompt_for(config, seed: int = 0, length: int = 11) -> list[int]:
    if config.vocab_size == 4096:  # the demo: real text from its held-out split
        import sentencepiece
        sp = sentencepiece.SentencePieceProcessor(model_file=str(DEMO / "tokenizer.model"))
        return [1] + sp.encode((DEMO / "heldout.txt").read_text()[:300])[:length - 1]
    rng = np.random.default_rng(seed)
    return rng.integers(3, config.vocab_size, length).tolist()


def _options(engine: Engine, phase: str):
    """The XLA options of the engine's own `phase` program."""
    return program_options(engine.config, phase, engine.transposed is not None)


def prefill_logits(engine: Engine, contexts: list[list[int]], width=None) -> np.ndarray:
    """Logits [n, V] after each context, from one prefill over the engine's own parameters
    (padded to `width` tokens, default the longest context)."""
    model = engine.model
    length = width or max(len(c) for c in contexts)
    tokens = np.full((len(contexts), length), engine.config.pad_token, np.int32)
    for row, context in enumerate(contexts):
        tokens[row, :len(context)] = context
    lengths = np.array([len(c) for c in contexts], np.int32)
    options = _options(engine, "prefill")
    if model.prefill is not None:
        logits, _ = jax.jit(model.prefill, compiler_options=options)(engine.params, tokens,
                                                                     lengths)
    else:
        logits, _ = jax.jit(model.step, compiler_options=options)(
            engine.params, model.new_memory(*tokens.shape), tokens, lengths)
    return np.asarray(logits, np.float32)


def decode_logits(engine: Engine, prompts: list[list[int]], slot: int, steps: int):
    """Greedy decode of prompts[i] in slot i (all slots busy) on the engine's own memory and
    parameters; returns slot `slot`'s (tokens [steps + 1], logits [steps, V]): the first token
    from the engine's prefill, then `steps` decode steps."""
    first = engine.prefill_many([(i, Request(tuple(p))) for i, p in enumerate(prompts)])
    step = jax.jit(engine.model.step, compiler_options=_options(engine, "decode"))
    memory, last = engine.memory, np.array(first, np.int32)
    active = np.ones(len(prompts), np.int32)
    tokens, logits = [first[slot]], []
    for _ in range(steps):
        out, memory = step(engine.params, memory, last[:, None], active)
        out = np.asarray(out, np.float32)
        last = out.argmax(-1).astype(np.int32)
        tokens.append(int(last[slot]))
        logits.append(out[slot])
    engine.memory = memory
    return tokens, np.stack(logits)


def ladder(engine: Engine, prompts: list[list[int]], slot: int = 0):
    """(decode logits, prefill logits of the same contexts, tokens) for prompts[slot]."""
    tokens, decoded = decode_logits(engine, prompts, slot, STEPS)
    contexts = [prompts[slot] + tokens[:i + 1] for i in range(STEPS)]
    return decoded, prefill_logits(engine, contexts), tokens


def assert_decode_equals_prefill(decoded, prefilled, dtype: str, ulps: float = None):
    magnitude = float(np.abs(prefilled).max())
    limit = tolerance(dtype, magnitude, DECODE_ULPS[dtype] if ulps is None else ulps)
    worst = float(np.abs(decoded - prefilled).max())
    assert worst <= limit, (f"{dtype} decode differs from prefill by {worst:.4g} "
                            f"(limit {limit:.4g}, largest logit {magnitude:.3g})")


def assert_greedy_tokens(engine: Engine, prompts, slot: int, tokens, decoded, dtype: str):
    """The engine's own greedy tokens for prompts[slot] (its compiled programs, sampler
    included), generated beside the other prompts as the probe decoded them (and through the
    prefill program the probe compiled), are the argmax of the probed logits, except past a
    near-tie of the probe (top-2 within the tolerance)."""
    requests = [Request(tuple(prompt), max_new_tokens=len(tokens)) for prompt in prompts]
    got = engine.generate(requests)[slot].output_ids
    limit = tolerance(dtype, float(np.abs(decoded).max()), DECODE_ULPS[dtype])
    for i, (mine, theirs) in enumerate(zip(got, tokens)):
        if i > 0:
            top2 = np.sort(decoded[i - 1])[-2:]
            if top2[1] - top2[0] <= limit:
                return  # a near-tie: either pick is right, and the paths part here
        if theirs == engine.config.eos_token:
            return
        assert mine == theirs, f"greedy token {i}: engine {mine}, probe {theirs}"


# --- the ladder on one device ---------------------------------------------------------------------

# (unroll_layers, transpose_weights, slots[, tiled]): every layout a one-device engine can take.
# On the CPU the default tiles weights for the row kernel (layout.tiled_chosen: all of them for
# one float32 slot, int8 for several); "untiled-1" is a one-slot scan without it (row-major
# weights, the layout where the kernels do not build).
LAYOUTS = {"scan-1": (False, None, 1), "scan-3": (False, None, 3),
           "unrolled-1": (True, False, 1), "unrolled-3": (True, False, 3),
           "transposed-1": (True, True, 1), "transposed-3": (True, True, 3),
           "untiled-1": (False, None, 1, False)}
FORMATS = ("float", "int8", "int8r8", "int8g16", "int4g16", "int4a32")


# (family, weight format, layout, dtype). Grok-1 (the family) in its shipped format in
# bf16 through the three layer layouts, and in its other formats; every other family in bf16
# and float32, int8 and float, over the other layouts. Each case compiles four or five
# programs (the unrolled MoE ones 30-60 s on 2 cores), so the list covers each axis (every
# layout, format and dtype meets several families) rather than their product.
CASES = [
    ("grok", "int8r8", "scan-1", "bfloat16"), ("grok", "int8r8", "unrolled-3", "bfloat16"),
    ("grok", "int8r8", "transposed-1", "bfloat16"), ("grok", "float", "scan-3", "bfloat16"),
    ("grok", "int8", "scan-1", "float32"),
    ("llama", "float", "scan-1", "bfloat16"), ("llama", "int8r8", "unrolled-3", "bfloat16"),
    ("llama", "int8", "transposed-1", "float32"),
    ("mistral", "int8", "scan-3", "bfloat16"), ("mistral", "float", "unrolled-1", "float32"),
    ("mixtral", "int8r8", "scan-3", "bfloat16"),
    ("mamba2", "int8r8", "scan-1", "bfloat16"), ("mamba2", "float", "scan-3", "float32"),
    ("palm", "int8", "unrolled-1", "bfloat16"), ("palm", "float", "transposed-3", "bfloat16"),
    # group-wise int8 (many scale row blocks) with the tied table int8: grok, mamba2 tie theirs
    ("grok", "int8g16", "unrolled-1", "bfloat16"), ("llama", "int8g16", "transposed-1", "float32"),
    ("mamba2", "int8g16", "scan-1", "bfloat16"),
    # int4 (packed codes, float16 scales; asymmetric with mins), tables float
    ("grok", "int4g16", "scan-3", "bfloat16"), ("llama", "int4a32", "unrolled-1", "bfloat16"),
    ("mixtral", "int4g16", "transposed-1", "float32"), ("mamba2", "int4a32", "scan-1", "float32"),
    # float32 without tiled weights (the other float32 scan-1 cases tile every matmul weight);
    # int8 in groups tiled for three rows (the tied table not: float32 reads it transposed)
    ("llama", "int8", "untiled-1", "float32"), ("llama", "int8g16", "scan-3", "float32"),
]


def _engine(config, params, layout: str, dtype: str, mesh=None, kv_dtype=None) -> Engine:
    unroll, transpose, slots, *tiled = LAYOUTS[layout]
    saved = layouts.TILED_WEIGHTS
    layouts.TILED_WEIGHTS = tiled[0] if tiled else saved
    try:
        return build_engine(config.replace(dtype=dtype, kv_dtype=kv_dtype), params,
                            mesh or single_device_mesh(),
                            slots=slots, cache_length=48, unroll_layers=unroll,
                            transpose_weights=transpose)
    finally:
        layouts.TILED_WEIGHTS = saved


def check_case(family, weight_format, layout, dtype, mesh=None, kv_dtype=None) -> None:
    """One rung of the ladder (see the module docstring), on `mesh` (default: one device),
    the KV memory in kv_dtype (None: the activation dtype)."""
    config, params = weights(family, weight_format)
    engine = _engine(config, params, layout, dtype, mesh, kv_dtype)
    if hasattr(engine.memory, "keys"):  # a KV memory (Mamba-2 and Palm keep states)
        assert {a.dtype for a in jax.tree.leaves((engine.memory.keys, engine.memory.values))} \
            == {np.dtype(kv_dtype or dtype)}
    prompts = [prompt_for(config, seed) for seed in range(engine.slots)]
    slot = engine.slots - 1  # the last slot, behind busy ones when there are several
    decoded, prefilled, tokens = ladder(engine, prompts, slot)
    # keys rounded by the memory: 2 bytes under float32 activations (bf16 keys fit either)
    rounded_keys = dtype == "float32" and kv_dtype not in (None, "float32")
    assert_decode_equals_prefill(decoded, prefilled, dtype,
                                 KV_ROUNDED_ULPS[kv_dtype] if rounded_keys else None)
    assert_greedy_tokens(engine, prompts, slot, tokens, decoded, dtype)
    if dtype == "bfloat16" and (family, weight_format, layout) in BF16_VS_FLOAT32:
        contexts = [prompts[slot] + tokens[:i + 1] for i in range(STEPS)]
        assert_bf16_equals_float32(prefilled, float32_prefill_logits(config, params, contexts))


@pytest.mark.slow
@pytest.mark.parametrize("family,weight_format,layout,dtype", CASES)
def test_decode_logits_equal_prefill_logits(family, weight_format, layout, dtype):
    check_case(family, weight_format, layout, dtype)


# a KV memory apart from the activations (--kv-dtype): float32 activations over a 2-byte memory
# (a prompt's keys are rounded before its own attention reads them, as decode reads them from
# the memory), and bf16 activations over a float16 or float32 one (XLA's attention, no kernel)
KV_DTYPE_CASES = [("grok", "int8r8", "scan-3", "float32", "bfloat16"),
                  ("llama", "float", "scan-1", "float32", "float16"),
                  ("mistral", "int8", "unrolled-3", "float32", "bfloat16"),
                  ("mixtral", "int4g16", "transposed-1", "float32", "float16"),
                  ("llama", "int8", "untiled-1", "float32", "bfloat16"),
                  ("llama", "int8r8", "unrolled-3", "bfloat16", "float16"),
                  ("mistral", "float", "scan-3", "bfloat16", "float32")]


@pytest.mark.slow
@pytest.mark.parametrize("family,weight_format,layout,dtype,kv_dtype", KV_DTYPE_CASES)
def test_decode_logits_equal_prefill_logits_over_a_memory_of_its_own_dtype(
        family, weight_format, layout, dtype, kv_dtype):
    check_case(family, weight_format, layout, dtype, kv_dtype=kv_dtype)


@pytest.mark.slow
def test_the_ladder_on_8_devices():
    """The same rungs on 8 simulated devices (tests/sharded_ladder_run.py, a subprocess):
    Grok-1 and Llama in bf16 over model- and expert-split meshes, KV heads copied."""
    last = run_on_8_devices(ROOT / "tests" / "sharded_ladder_run.py", timeout=900)
    assert last == f"{len(SHARDED_CASES)} cases passed"


# (family, weight format, layout, dtype, mesh axes) run by tests/sharded_ladder_run.py
SHARDED_CASES = [("grok", "int8r8", "scan-3", "bfloat16", {"model": 8}),
                 ("grok", "int8r8", "unrolled-1", "bfloat16", {"expert": 2, "model": 4}),
                 ("llama", "int8", "transposed-3", "bfloat16", {"data": 2, "model": 4}),
                 # 43 scale blocks of 8 rows in moe/linear_1 [344, 256]: straddling 8 shards
                 ("grok", "int8g16", "scan-3", "bfloat16", {"model": 8}),
                 # int4 in groups of 16: moe/linear_1 has 43 groups of 8 rows (172 packed
                 # rows), neither a multiple of the 8 shards
                 ("grok", "int4g16", "scan-3", "bfloat16", {"model": 8})]


# one bf16 case per family also checked against float32 logits of the same weights
BF16_VS_FLOAT32 = {("grok", "int8r8", "scan-1"), ("grok", "float", "scan-3"),
                   ("llama", "float", "scan-1"), ("mistral", "int8", "scan-3"),
                   ("mixtral", "int8r8", "scan-3"), ("mamba2", "int8r8", "scan-1"),
                   ("palm", "int8", "unrolled-1"), ("grok", "int8g16", "unrolled-1")}


def float32_prefill_logits(config, params, contexts) -> np.ndarray:
    """The float32 model's logits after each context (the same weights, one plain prefill)."""
    engine = build_engine(config.replace(dtype="float32"), params, single_device_mesh(),
                          slots=1, cache_length=48, unroll_layers=False)
    return prefill_logits(engine, contexts)


def assert_bf16_equals_float32(bf16, float32):
    magnitude = float(np.abs(float32).max())
    limit = tolerance("bfloat16", magnitude, BF16_VS_F32_ULPS)
    worst = float(np.abs(bf16 - float32).max())
    assert worst <= limit, (f"bf16 logits differ from float32 by {worst:.4g} (limit {limit:.4g}, "
                            f"largest logit {magnitude:.3g})")


def test_bf16_prefill_logits_do_not_depend_on_the_batch():
    """A context's bf16 logits alone equal its logits inside a batch of other contexts (the
    demo, all four layers, every matmul weight int8 with 8 row blocks). Before the engine's
    bf16 programs kept every rounding (layout.BF16_OPTIONS), XLA kept intermediates in float32
    where each program's fusions allowed, and the two differed by 0.36 (5.8 ulps;
    scripts/bf16_consistency.py)."""
    config = load_config(DEMO / "config.yaml")
    params = {module: {name: quantize(_float(leaf).astype(np.float32), 8)
                       if QUANTIZABLE.search(f"{module}/{name}") else leaf
                       for name, leaf in leaves.items()}
              for module, leaves in load_params(DEMO, config).items()}  # all four layers
    engine = build_engine(config.replace(dtype="bfloat16"), params, single_device_mesh(),
                          slots=1, cache_length=64)
    text = prompt_for(config, length=60)
    contexts = [text[:n] for n in range(30, 60, 2)]
    batched = prefill_logits(engine, contexts)
    magnitude = float(np.abs(batched).max())
    width = max(len(c) for c in contexts)
    for row, context in enumerate(contexts):  # padded alike: only the other rows differ
        alone = prefill_logits(engine, [context], width)[0]
        worst = float(np.abs(alone - batched[row]).max())
        assert worst <= tolerance("bfloat16", magnitude, 1), \
            f"context {row}: alone and batched bf16 logits differ by {worst:.4g}"
