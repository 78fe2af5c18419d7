"""Every choice that depends on the platform, made here: the only module that asks which
backend this is (`platform()`). Each rule says why in a line or two; the measurements behind
them are in BENCHMARKS.md under the section named.

Two kinds of choice:
- the engine's layout (`Layout.choose`): layers unrolled or scanned, weights stored
  transposed, KV heads copied, XLA options per program; made once per engine from the
  platform, the config, the parameters and the mesh;
- kernel rules (the functions below `Layout`): asked while a product is traced, because they
  depend on its operands' shapes and dtypes as well as on the platform.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from runtime.config import DEFAULT_PREFILL_CHUNK, ModelConfig
from runtime.kv_heads import kv_head_copies, with_kv_head_copies
from runtime.quant import QuantizedWeight8bit, tileable
from runtime.quant4 import QuantizedWeight4bit, tileable4
from runtime.stacked_weights import experts_in_panels_unrolled, matmul_stacks, \
    stacked_layer_bytes


def platform() -> str:
    """"cpu", "gpu" or "tpu": the backend the programs of this process run on."""
    return jax.default_backend()


# --- the engine's layout ----------------------------------------------------------------------

# Layers unroll over per-layer buffers on the CPU and on GPUs from this many parameter bytes per
# layer (not where a CPU engine's scan reads its stacks in place: Layout.choose): XLA copies a
# scan's slice of each stacked weight before its matmul, while unrolling doubles compile time,
# which small models, whose layers sit in cache, do not win back. TPUs keep the scan (not
# measured there). The unrolled model keeps a KV memory array per layer (memory.py).
# (BENCHMARKS.md, "Unrolled layers instead of a scan")
UNROLL_MIN_LAYER_BYTES = 16 << 20

# XLA options for float32 programs on the CPU: matmuls off YNNPACK (XLA:CPU's default), onto
# XLA's own (Eigen) kernels, faster for decode's few-row products and dense prefill. Not MoE
# prefill (its expert tiles ran as fast or faster on YNNPACK); never bf16, which Eigen lacks.
# (BENCHMARKS.md, "Engine XLA options")
CPU_FLOAT32_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}

# XLA options for the decode program on GPUs: XLA's CUDA-graph command buffers off. A decode
# step's inputs are fresh buffers every call, so XLA updated its graph of ~800 kernels before
# every launch while the GPU sat idle. Prefill keeps the graphs (its kernels run long), and so
# does MoE decode (its expert switches run inside a graph). (BENCHMARKS.md, "Engine XLA options")
GPU_DECODE_OPTIONS = {"xla_gpu_enable_command_buffer": ""}

# XLA option for bf16 programs: every bf16 rounding the model writes happens. XLA's default lets
# a fusion keep an intermediate in float32 ("excess precision"): a decode step disagreed with the
# prefill of the same context by up to 6 bf16 ulps. With every rounding kept, programs of any
# shape compute the same bf16 function (tests/test_dtype_ladder).
BF16_OPTIONS = {"xla_allow_excess_precision": False}


def cpu_float32_options(config: ModelConfig, phase: str,
                        transposed: bool = False) -> Optional[dict]:
    """CPU_FLOAT32_OPTIONS for the engine's `phase` ("prefill" or "decode") program on the CPU
    under float32; None (XLA's defaults) elsewhere, for MoE prefill, and for the prefill of
    transposed weights (Eigen ran their several-row products slower)."""
    if platform() != "cpu" or config.dtype != "float32":
        return None
    if phase == "prefill" and (config.is_moe or transposed):
        return None
    return CPU_FLOAT32_OPTIONS


def program_options(config: ModelConfig, phase: str,
                    transposed: bool = False) -> Optional[dict]:
    """XLA options for the engine's `phase` program: cpu_float32_options on the CPU,
    GPU_DECODE_OPTIONS for a GPU's decode of a dense model, BF16_OPTIONS for bf16 activations
    (merged); None (XLA's defaults) otherwise."""
    if platform() == "gpu":
        options = GPU_DECODE_OPTIONS if phase == "decode" and not config.is_moe else None
    else:
        options = cpu_float32_options(config, phase, transposed)
    if config.dtype == "bfloat16":
        options = {**(options or {}), **BF16_OPTIONS}
    return options


def transposed_layout(config: ModelConfig, slots: int) -> Optional[str]:
    """Which of an unrolled engine's layer matmul weights it stores transposed [O, I]
    (BENCHMARKS.md, "Transposed weights for one-row products"): "float" on one CPU device with
    one slot under float32 activations (every decode product has a single row; int8 keeps its
    blocked [I, O] widening); "all" on GPUs, any batch; None elsewhere (several CPU slots;
    TPUs, not measured)."""
    backend = platform()
    if backend == "gpu":
        return "all"
    if slots == 1 and backend == "cpu" and jax.device_count() == 1 \
            and config.dtype == "float32":
        return "float"
    return None


def served_config(config: ModelConfig, model_axis: int) -> ModelConfig:
    """The config served on a mesh of `model_axis` model devices (KV heads copied: kv_heads)."""
    return with_kv_head_copies(config, kv_head_copies(config, model_axis))


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one engine stores its parameters and memory and compiles its programs."""
    unrolled: bool             # layers one by one over per-layer buffers (else a scan)
    transposed: Optional[str]  # "float", "all" or None: see transposed_layout
    kv_copies: int             # each KV head stored this many times (kv_heads.py)
    layer_views: bool = False  # scanned layers read their weights in place: layer_views_chosen
    tiled: Optional[str] = None  # "quantized", "all" or None: see tiled_chosen

    @classmethod
    def choose(cls, config: ModelConfig, params, model_axis: int, slots: int,
               unroll_layers: Optional[bool] = None,
               transpose_weights: Optional[bool] = None,
               kernels_built: bool = True) -> "Layout":
        """The layout for `config` with stacked `params` on a mesh whose model axis has
        `model_axis` devices. unroll_layers / transpose_weights force a choice (A/B, tests):
        True stores every layer matmul weight transposed, False none. kernels_built: whether
        the CPU kernels are there (cpu_kernels.available(), which the engine asks)."""
        tiled = tiled_chosen(config, params, slots, kernels_built)
        if unroll_layers is None:  # CPU, GPU: for layers whose slices a scan would copy are
            # big enough to be bandwidth-bound; stacks in panels the scan reads in place (layer
            # views), and scanned they ran as fast or faster (BENCHMARKS.md, "Big layers scanned");
            # experts of any size that go into panels only once split per layer
            in_place = tiled if LAYER_VIEWS_IN_SCAN else None
            layer_bytes = stacked_layer_bytes(params, config, in_place)
            unroll_layers = platform() in ("cpu", "gpu") and (
                layer_bytes >= UNROLL_MIN_LAYER_BYTES
                or experts_in_panels_unrolled(params, tiled))
        unroll_layers = unroll_layers and config.architecture == "transformer"
        transposed = transposed_layout(config, slots) if transpose_weights is None else \
            ("all" if transpose_weights else None)
        if tiled == "all" and transpose_weights is None:
            transposed = None  # float32 weights in panels, not transposed
        views = not unroll_layers and layer_views_chosen(
            config, params, slots, kernels_built, tiled)
        if not unroll_layers:  # scanned: float stacks transposed where the kernel reads rows
            several = 1 < slots <= KERNEL_MAX_ROWS
            transposed = "float" if views and several and tiled != "all" else None
        return cls(unrolled=bool(unroll_layers), transposed=transposed,
                   kv_copies=kv_head_copies(config, model_axis), layer_views=views, tiled=tiled)

    def options(self, config: ModelConfig, phase: str) -> Optional[dict]:
        """The XLA options of the engine's `phase` program (program_options)."""
        return program_options(config, phase, self.transposed is not None)


# --- choices made before an engine exists ------------------------------------------------------

def default_activation_dtype() -> str:
    """A Hugging Face checkpoint's activation dtype when no flag names one: bf16 on
    accelerators; float32 on the CPU, whose matmuls are fastest (and exact) in float32."""
    return "float32" if platform() == "cpu" else "bfloat16"


def widen_floats_at_load(config: ModelConfig):
    """np.float32 when float weights stored narrower should be widened at load: on the CPU
    under float32 activations. XLA:CPU's matmuls take one dtype, so it would otherwise widen
    every bf16 weight into a fresh temporary float32 copy on every step, all of them at once
    (BENCHMARKS.md, "bf16 checkpoint weights under float32 activations on the CPU"). Widened,
    they take twice their bytes; `--dtype bfloat16` keeps them (and the activations) bf16."""
    return np.float32 if platform() == "cpu" and config.dtype == "float32" else None


# --- kernel rules (asked while tracing a product) ---------------------------------------------

def row_block_dtype(dtype) -> jnp.dtype:
    """The dtype a row-blocked int8 product (R > 1: a batched dot over blocks) multiplies in:
    x's, but float32 for bf16 on the CPU (XLA:CPU fails batched bf16 dots)."""
    if platform() == "cpu" and dtype == jnp.bfloat16:
        return jnp.dtype(jnp.float32)
    return jnp.dtype(dtype)


# Row-blocked int8 weights up to this many float32 bytes are multiplied dequantised on the CPU.
DEQUANTISED_MAX_BYTES = 16 << 20


def row_blocks_dequantised(weight_size: int, rows: int) -> bool:
    """Whether a row-blocked int8 product (R > 1) of `rows` rows per weight multiplies the
    exactly dequantised weight in one dot instead of a batched dot over its row blocks: on the
    CPU from 2 rows, for weights of at most DEQUANTISED_MAX_BYTES in float32, where XLA:CPU's
    batched dot ran 1.4x slower at 4 rows and 1.8x at 16 (576 x 1536 in groups of 64;
    BENCHMARKS.md, "Group-wise int8: one dot on the CPU"). One row keeps the batched dot
    (within 8% there; the dequantised form lost in "Group-wise int8"). Larger weights on one
    device widen in blocks (widening_in_blocks)."""
    return platform() == "cpu" and rows > 1 and 4 * weight_size <= DEQUANTISED_MAX_BYTES


def widening_in_blocks() -> bool:
    """Whether int8 products widen their weight a block of rows at a time (CPU, one device).

    XLA:CPU widens an int8 weight into a temporary float32 copy before its matmul, and starts
    every such conversion early: all of a program's widened weights live at once, in an arena
    page-faulted in on every call. Widened a block at a time inside a loop, the temporary is
    one block, reused in cache (BENCHMARKS.md, "int8 widening on XLA:CPU"). Elsewhere (GPU,
    TPU) the conversion fuses into the matmul. With several devices the weight may be sharded
    along its rows, where slicing row blocks would gather it: plain matmul."""
    return platform() == "cpu" and jax.device_count() == 1


def decode_products_in_ffi_kernels() -> bool:
    """Whether few-row products with a 2-D int8 or float32 weight go through the FFI kernels of
    cpu_kernels.py (where they build): on the CPU with one device. They stream the weight once,
    1.4-4x faster than the blocked widening on the SmolLM shape (BENCHMARKS.md, "CPU
    kernels"); with several devices the weight is sharded, which a custom call would gather."""
    return platform() == "cpu" and jax.device_count() == 1


# Layer stacks of several quantised types (GGUF Q4_K_M: Q6_K in some layers, Q4_K in the others)
# kept as one stack per type (layer_types.py), each layer in its own bytes, rather than one int8
# stack (exact too, with mins, but the Q4_K layers at three times their bytes); engines whose
# scan slices a stack merge it. (BENCHMARKS.md, "Layers in their own types")
LAYER_TYPES_KEPT = True


def layer_types_kept() -> bool:
    """Whether the loader keeps a stack of several types as layer_types.LayersByType."""
    return LAYER_TYPES_KEPT


def head_row_scales() -> bool:
    """Whether the engine adds an int8 embedding table's scales one row per token
    (quant.with_row_scales) for the tied head's CPU kernel: where the decode products go
    through the kernels. Its [R, V] rows, 2 V bytes apart, are R streams per tile of output
    rows, read faster as [V, R] (BENCHMARKS.md, "int8 x int8 products", "The head's scales")."""
    return decode_products_in_ffi_kernels()


def single_bf16_row_doubled(x_shape, x_dtype, w_dtype) -> bool:
    """Whether a bf16 x bf16 product of a single row (x [..., I] with one row in all) is
    computed as two copies of the row: on the CPU. XLA:CPU gives bf16 products of two rows or
    more to its YNNPACK kernels, which read bf16; a lone row goes to a matrix-vector kernel
    behind a widening of the whole weight to a float32 temporary (BENCHMARKS.md, "bf16
    single-row products on the CPU"). Two rows read the weight once, in bf16, at no cost."""
    return (platform() == "cpu" and x_dtype == jnp.bfloat16 and w_dtype == jnp.bfloat16
            and math.prod(x_shape[:-1]) == 1)


# Attention over more (query, key) pairs than a 1024-token prompt has runs blockwise
# (models/blockwise.py) in blocks of ATTENTION_BLOCK queries and keys: memory O(T x block)
# instead of the dense path's [T, S] logits per head (a 16k prompt of an 8-head model: 17.9 GB
# resident, dense). Smaller products, and decode (one query per row), keep the dense path, one
# fused softmax (BENCHMARKS.md, "Long prompts").
BLOCKWISE_MIN_LENGTH = 1024
ATTENTION_BLOCK = 256
PREFILL_CHUNK = DEFAULT_PREFILL_CHUNK  # the engine's default (config.py says why)


def prefill_attention_in_kernel(queries: int, keys: int) -> bool:
    """Whether `queries` queries per row (a prompt or chunk) attend over their at most `keys`
    keys in the CPU kernel (cpu_kernels.prefill_attention_usable adds dtypes): on one CPU
    device, from PREFILL_KERNEL_MIN_PAIRS pairs; below, attention is a small part of the
    step and XLA's dense path ran as fast."""
    return PREFILL_ATTENTION_IN_KERNEL and queries > 1 \
        and queries * keys >= PREFILL_KERNEL_MIN_PAIRS and decode_products_in_ffi_kernels()


def attention_block(queries: int, keys: int):
    """The block size `queries` queries (per row) attend over `keys` keys in, or None for the
    dense path. Pure JAX on every platform; a fresh prompt on GPUs takes cuDNN's fused kernel
    instead (fused_prompt_attention). TPUs' Pallas splash attention is not wired (no TPU)."""
    if queries > 1 and queries * keys > BLOCKWISE_MIN_LENGTH ** 2:
        return ATTENTION_BLOCK
    return None


# A fresh prompt's attention (no memory before it, positions 0..T-1, so causal by index) on
# GPUs goes to cuDNN's fused flash attention through jax.nn.dot_product_attention, where its
# constraints hold: bf16/f16, head dims it takes, no logit soft cap (Grok-1's). FUSED_ATTENTION
# None switches it off (the bench's A/B); tests set "xla" to check the wiring on the CPU.
FUSED_ATTENTION: Optional[str] = "cudnn"
FUSED_ATTENTION_HEAD_DIMS = (64, 128, 256)


def fused_prompt_attention(config: ModelConfig, memory_keys: int, queries: int,
                           dtype) -> Optional[str]:
    """jax.nn.dot_product_attention's implementation for a fresh prompt of `queries` tokens
    (memory_keys 0: nothing before it), or None for this module's other paths. GPUs only,
    and only where the blockwise path would run (long prompts): short ones keep the dense path
    whose logits the decode step repeats bit for bit."""
    if FUSED_ATTENTION is None or memory_keys or attention_block(queries, queries) is None:
        return None
    if FUSED_ATTENTION == "cudnn" and (
            platform() != "gpu" or jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16)
            or config.key_size not in FUSED_ATTENTION_HEAD_DIMS):
        return None
    return FUSED_ATTENTION if config.attn_logit_cap is None else None


# Few-row products against int8 weights stored [O, I] on GPUs: the Pallas (Triton) kernel of
# pallas_gemv.py instead of XLA's, which streamed int8 at 1.5-1.8 TB/s on an H200 against the
# kernel's 2.2-3.2 TB/s: Llama-8B int8 decode 6.8 -> 5.0 ms/step (BENCHMARKS.md, "GPU").
# False: XLA's (the bench's A/B).
PALLAS_INT8_GEMV = True


# A scanned transformer's layers read their matmul weights where the CPU kernels take them: as
# views of the stacked weights (models/layer_scan.py), which the kernels read in place, where a
# plain scan has XLA copy each layer's slice out first: float32 stacks, and int8 ones stored in
# panels (below). False: hk.layer_stack everywhere (the A/B).
LAYER_VIEWS_IN_SCAN = True
# Decode rows the CPU kernels take (cpu_kernels.MAX_ROWS, which imports this module).
KERNEL_MAX_ROWS = 16
# Rows the panel kernel takes for weights in panels, prompts too (a default prefill chunk),
# and engines of up to PANEL_SLOTS slots store weights in panels: each panel read once, reused
# from cache by every row, where XLA copied the weight out of its panels or multiplied it
# row-major (32 slots 1.9-2.0x slower); past 512 rows XLA's GEMM is faster. MoE experts in
# panels: every expert's rows in one call (products.grouped_linears; False: expert_groups' tile
# loop, the A/B). (BENCHMARKS.md, "MoE prompts in one kernel call", "Many slots", "Many rows")
PANEL_MAX_ROWS = INT4_PANEL_MAX_ROWS = 512
PANEL_SLOTS = 128  # measured there; every kind of panel takes a step's rows
GROUPED_EXPERTS_IN_KERNEL = True
# It takes two tokens and more: a per-pair switch read an expert once per pair, twice when both
# chose it (BENCHMARKS.md, "Experts shared by a few tokens"). False: the switch up to E pairs.
GROUPED_EXPERTS_FROM_TWO_TOKENS = True
# Matmul weights stored in column panels for the CPU kernels (quant.TiledWeight), int8 and float32:
# a panel's product reads one contiguous stream, in place from a stack (row-major int8 stacks were
# copied out first), and several rows reuse each load; faster at 1 and 16 rows than the row-major
# and transposed layouts (BENCHMARKS.md, "Weights in reading order"). False: row-major (the A/B).
TILED_WEIGHTS = True
# The panel products of one x (a layer's query, key and value; gate and up) in one kernel call
# (products.linears): one handoff to the threads instead of three, and longer runs of panels
# (BENCHMARKS.md, "Products of one x in one call"). False: a call per product (the A/B).
PANEL_PRODUCTS_SHARE_A_CALL = True
# A scanned decode step's attention in the CPU kernel (cpu_attention.cc), over the stacked KV
# memory read in place: XLA copied each layer's memory out of its stack, then ran two small
# batched dots (BENCHMARKS.md, "Decode attention kernel"). False: XLA's attention (the A/B).
DECODE_ATTENTION_IN_KERNEL = True
# A prompt's or chunk's attention in the CPU kernel (cpu_prefill_attention.cc) from
# PREFILL_KERNEL_MIN_PAIRS (query, key) pairs per row and head: XLA ran blockwise.py's loop at a
# quarter of the matmul peak, the dense [T, S] softmax slower still (BENCHMARKS.md, "Prefill
# attention kernel"). False: XLA's paths (the A/B).
PREFILL_ATTENTION_IN_KERNEL = True
PREFILL_KERNEL_MIN_PAIRS = 256 * 256
# Batch-1 MoE decode over split experts: each routed pair's whole expert FFN in one switch
# (gate and up sharing a kernel call) instead of a switch per matmul (BENCHMARKS.md, "MoE decode
# against llama.cpp"). False: a switch per matmul (the A/B).
EXPERT_FFN_IN_ONE_SWITCH = True
# A tied int8 table holding int4 codes (a GGUF Q4_0 table) stored in int4 panels
# (quant4.TiledEmbedding4): the head reads half the bytes (BENCHMARKS.md, "int8
# activations"). False: the int8 table in panels (the A/B).
INT4_TABLE_IN_PANELS = True
# Panel weights' float32 scale tables that are GGUF K-quants' two-level form (Q4_K, Q6_K: an f16
# times 6- or 8-bit sub-scales) held so (super_scales.py): 1.25 bytes a group and column, not 4
# (BENCHMARKS.md, "Q4_K_M files on the CPU"); their int8 codes of six bits (Q6_K, Q5_K, Q5_0)
# packed (six_bit.py: 3/4 of the bytes, "Six-bit panels"). False: float32 tables; int8 (A/Bs).
SUPER_SCALED_TABLES = SIX_BIT_PANELS = True
# int4 and int8 weights multiply the activations rounded to int8 (int4: per group; int8: per
# int8_x_block; scale max|x| / 127), as llama.cpp's Q4_0 / Q8_0 paths do: the CPU panel kernel
# takes four products per lane (VNNI) where int4 was bound by conversions, and prompts outrun
# XLA's float32 GEMM (BENCHMARKS.md, "int8 activations"). An accuracy trade: opt-in (run.py).
INT8_ACTIVATIONS = False


def int8_x_block(inputs: int, blocks: int) -> int:
    """The inputs sharing a scale in x rounded for an int8 weight (cpu_panels.cc's int8_x_block):
    32 where its scale blocks are multiples of 32 (llama.cpp's Q8_0 x blocks), else a block."""
    per_block = inputs // blocks
    return 32 if per_block % 32 == 0 else per_block


def kernels_take_decode(config: ModelConfig, slots: int, kernels_built: bool,
                        cap: int = KERNEL_MAX_ROWS) -> bool:
    """Whether a transformer engine's decode products go through the CPU kernels: one CPU
    device, at most `cap` slots, the kernels built (cpu_kernels.available)."""
    return kernels_built and slots <= cap and config.architecture == "transformer" \
        and decode_products_in_ffi_kernels()


def tiled_chosen(config: ModelConfig, params, slots: int, kernels_built: bool) -> Optional[str]:
    """Which layer and head matmul weights an engine stores in panels (models/stored_weights
    .tile_weights) where its decode products go through the CPU kernels: "all" (quantised and
    float32) where a float32 layer weight is tileable under float32 activations, else
    "quantized" (int8 and int4) where a quantised one is (the float kernels take float32
    activations only); None elsewhere (TILED_WEIGHTS off too)."""
    if not (TILED_WEIGHTS and kernels_take_decode(config, slots, kernels_built, PANEL_SLOTS)):
        return None
    quantized = [isinstance(leaf, (QuantizedWeight8bit, QuantizedWeight4bit))
                 for leaf in matmul_stacks(params) if tileable(leaf) or tileable4(leaf)]
    if config.dtype == "float32" and not all(quantized):  # one entry per tileable weight
        return "all"
    return "quantized" if any(quantized) else None


def layer_views_chosen(config: ModelConfig, params, slots: int, kernels_built: bool,
                       tiled: Optional[str] = None) -> bool:
    """Whether a scanned engine uses layer_scan: where its decode products go through the CPU
    kernels, for float32 stacked matmul weights [L, I, O] under float32 activations, or weights
    stored `tiled` (tiled_chosen). Without panels, float stacks stay [L, I, O] for one slot
    (the row kernel: faster than transposed there) and are stored transposed [L, O, I] for
    several, which the float32 transposed kernel takes for up to 16 rows (BENCHMARKS.md,
    "Scanned layers read in place")."""
    cap = PANEL_SLOTS if tiled else KERNEL_MAX_ROWS
    if not (LAYER_VIEWS_IN_SCAN and kernels_take_decode(config, slots, kernels_built, cap)):
        return False
    stacks = [leaf for leaf in matmul_stacks(params) if np.ndim(leaf) == 3]
    return tiled is not None or (config.dtype == "float32" and any(
        getattr(leaf, "dtype", None) == np.float32 for leaf in stacks))


def int8_gemv_in_pallas() -> bool:
    """Whether products.py sends few-row int8 [O, I] products to pallas_gemv (GPUs only)."""
    return PALLAS_INT8_GEMV and platform() == "gpu"


def pallas_products_partitioned() -> bool:
    """Whether pallas_gemv's products go through pallas_sharded's partitioning rule: with
    several devices, where XLA would otherwise gather each sharded weight whole onto every
    device before the kernel."""
    return jax.device_count() > 1


def greedy_batches_skip_the_sort() -> bool:
    """Whether sample() branches around the vocabulary sort when no row samples: not on GPUs,
    where XLA:GPU waits for a conditional's predicate on the host mid-step, unable to dispatch
    the next step meanwhile (BENCHMARKS.md, "GPU conditionals in the sampler"); there the sort
    is always done, greedy rows taking the argmax through jnp.where."""
    return platform() != "gpu"


def decode_busy_rows_only() -> bool:
    """Whether a decode step with at most half its slots busy runs on those rows only (the
    chunk path's row gather): on the CPU, where idle rows cost their full share (BENCHMARKS.md,
    "Serving": 31 vs 2.1 ms per token for one busy slot of 32). Accelerators read the weights
    once whatever the rows, and the gather would add KV reads."""
    return platform() == "cpu"


def lapack_preload() -> bool:
    """Whether the program cache imports SciPy's LAPACK bindings in the background at start: on
    the CPU, where calling a deserialised program first registers LAPACK's kernels (slow;
    BENCHMARKS.md, "Program cache start-up")."""
    return platform() == "cpu"


# Decode steps per dispatch are capped: a stream receives its tokens a block at a time.
MAX_DECODE_STEPS = 64
# One-slot CPU steps reading 16-256 MB run as many a dispatch as read CPU_BLOCK_READ (~20 ms a
# block at 25 GB/s), 4 to 16 (BENCHMARKS.md, "Steps per dispatch by the bytes they read").
CPU_BLOCK_STEPS, CPU_BLOCK_BYTES, CPU_BLOCK_READ = (4, 16), (16e6, 256e6), 512e6


def decode_steps_per_dispatch(step_weight_bytes: float = 0.0, slots: int = 1) -> int:
    """Decode steps per dispatch when no newcomer waits (--decode-steps N chooses) for steps of
    `slots` rows reading `step_weight_bytes`. CPU: the host's dispatch takes a core from short
    steps. Accelerators 1: on an H200 steps dispatched one ahead beat k = 8 (BENCHMARKS.md)."""
    fewest, most = CPU_BLOCK_STEPS
    short = platform() == "cpu" and slots == 1 and \
        CPU_BLOCK_BYTES[0] <= step_weight_bytes <= CPU_BLOCK_BYTES[1]
    return int(min(most, max(fewest, CPU_BLOCK_READ // step_weight_bytes))) if short else 1
