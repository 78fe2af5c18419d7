"""The working set: transient bytes per device of the two jitted programs (prefill of one
chunk, or of a full S-token bucket without chunked prefill, and one decode step), by component. The plan adds the larger of the two to a
fixed allowance for the XLA runtime (plan.OVERHEAD_BYTES).

Shape glossary: L layers, B slots, S cache length, T largest prefill (a chunk, or S), K kv heads,
H head dim, N query heads, G = N / K, D model width, F ffn width, E experts, k selected experts,
V vocab, R scale row blocks; m, d, e: sizes of the mesh axes model, data, expert.

`working_set` (transformers) is a conservative estimate that counts every buffer XLA may keep
live at its full size (checked against XLA's own buffer assignment for the engine's programs on
the tiny model in tests/test_plan.py; layout padding on TPU tiles and allocator fragmentation
are left to the fixed overhead).

Let A = activation itemsize, T = S = cache_length (a prompt bucket is at most the cache
length), h = N / gcd(N, m) query heads per device (how XLA's partitioner splits the heads,
also when m exceeds K: checked on simulated 8/16/32-device meshes), Fm = F / m,
kv_split = the model split of the KV memory, Bd = B / d when d divides B, W = one layer's
weights on a device in the activation dtype, Wh = the output head's shard in the
activation dtype.

prefill (one prompt of T = S tokens; with chunked prefill, layout.PREFILL_CHUNK = C < S, one
chunk of T = C tokens over the Sm = memory_length(S) slots of its row's memory):
  bucket KV row   2 (k, v) x 2 (scan input + output) x L*T*K*H*A / kv_split
  row gather      2 (k, v) x Sm*K*H*A / kv_split  one layer's gather of the row's memory
                  (chunks only: each layer reads its own rows, the memory is not copied)
  attention       (4 + 4 + A) x h*T*(Sm + T)  one layer's float32 logits and exp, probs in A;
                  attended blockwise (layout.attention_block: T*(Sm + T) > 1024^2, blocks of
                  b = 256), (4 + 4 + A) x h*b*b + 2 x 4 x h*T*(H + 2): one block pair and the
                  running output, max and sum of every query
  ffn             3 x rows*Fm x 4 + 2 x rows*D x 4, rows = T*k (MoE) or T (dense)
  row blocks      the largest dense int8 weight's float32 partials rows*R*O*4 (past 4 MiB
                  and its float32 size: that dequantised copy instead), or rows*I*A +
                  2 x rows*O*4 for a weight [I, O] whose R scale blocks do not align with
                  its input shards (R % m != 0, e.g. Grok-1's R = 8 on m = 16 or 32): its
                  input is regathered, and the blocks' float32 partial products summed
  activations     6 x T*D x 4          residual stream, norms, projections
  layer weights   2 x W                a layer's slice and its converted copy
  output head     Wh                   the head converted to the activation dtype
  kernel scratch  8 x T x I            x as the CPU panel kernels prepare it, I the widest
                                       input of a weight in panels (else 0)
decode (every slot, one token):
  layer KV slices 2 x (KV memory / L)  one layer's keys/values, re-laid out for the
                  attention matmuls (the new token is scattered into the donated memory
                  in place after the layer scan: no copy of the whole memory)
  attention       (4 + 4 + A) x Bd*h*Sm  (Sm: a sliding window's ring, else S)
  ffn, row blocks as above with rows = B*k (MoE) or B (dense)
  layer weights   2 x W; output head Wh; kernel scratch 8 x B x I
  logits          4 x B*V x 4          float32 logits, sampling sort and softmax

Weights one CPU device's panel kernels read in place (LeafPlan.in_panels, panel_forms
.held_in_panels: quantised ones, and float32 ones under float32 activations) count in neither
W, Wh nor row blocks: no slice is copied or converted (the Llama-1B-like Q4_K_M engine's
programs: XLA's temp buffers 0.9 MiB a decode step and 60 MiB a 512-token chunk, where W and Wh
had counted 714 MiB). Under float32 activations there the decode attention kernel reads the
KV memory in place: no layer KV slices either.

Not counted (backend-specific, seen in XLA's CPU buffer assignment): the expert weights the
MoE layer gathers per tile of routed rows (at most 2 x E tiles; XLA:CPU materialises their
int8 -> float conversion) and bf16 to float32 copies (the whole KV memory in float32 during
decode). Plans for CPU hosts with bf16 activations or large MoE prefills underestimate.

`mamba2_working_set` (Mamba-2, mamba2.py) follows the same spirit (every buffer at full size,
a conservative estimate; not checked against XLA's buffer assignment). T = cache_length (the
largest prompt bucket), Q = min(chunk, T), hm = the model split of the heads (when it divides
them), X = 2I + 2GN + H projection widths, Bd = B / d when d divides B, W = one layer's
weights, Wh = the output head.

prefill (one prompt, a full T bucket):
  bucket state    2 x (scan input + output) the state of one row
  projections     2 x T*X*4 / hm          z, x, B, C, dt and their convolved copies
  chunk products  3 x T*Q*H*4 / hm        one layer's decays and weights within chunks
  chunk states    2 x (T/Q + 1)*H*P*N*4 / hm
  activations     6 x T*D*4
  layer weights   2 x W;  output head Wh
decode (every slot, one token):
  state copy      the state once more (the layer scan writes beside the donated one)
  layer state     2 x state / L
  projections     2 x Bd*X*4
  layer weights   2 x W; output head Wh; logits 4 x B*V*4
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Optional, Sequence

import numpy as np

from runtime import layout
from runtime.config import ModelConfig
from runtime.memory import kv_dtype, memory_layers, memory_length, memory_specs
from runtime.products import PARTIALS_MAX_BYTES

from runtime.planning.shards import LeafPlan, PaperMesh, is_ssm, ssm_state_device_bytes

F32 = 4  # bytes of a float32

Transients = dict[str, dict[str, int]]  # {"prefill": {component: bytes}, "decode": {...}}


def _per_data_shard(slots: int, d: int) -> int:
    """Bd: the slots of one data shard when d divides them, else all of them."""
    return slots // d if slots % d == 0 else slots


def _layer_and_head_bytes(config: ModelConfig, leaves: Sequence[LeafPlan], layers: str,
                          act: int) -> tuple[int, int]:
    """(W, Wh): one layer's weights (leaves under `layers`) and the output head (the embedding
    table when tied), per device in the activation dtype of itemsize `act`; weights the CPU
    panel kernels read in place (LeafPlan.in_panels) have no such copy."""
    layer_leaves = [x for x in leaves if layers in x.path and not x.in_panels]
    layer_weights = sum(x.elements_per_device for x in layer_leaves) // config.num_layers * act
    head = next((x for x in leaves if x.group == ("embeddings" if config.tie_embeddings
                                                  else "output head")), None)
    return layer_weights, (head.elements_per_device * act if head and not head.in_panels else 0)


def _kernel_scratch(leaves: Sequence[LeafPlan], rows: int) -> int:
    """What the panel kernels allocate beside XLA's buffers for `rows` x rows (cpu_panels.cc:
    x in three int8 digits or int8 codes, their scales and sums; 0 without panels): 8 bytes a
    row and input of the widest weight in panels, an upper bound."""
    widest = max((x.shape[-2] if x.group != "embeddings" else x.shape[-1]
                  for x in leaves if x.in_panels), default=0)
    return 8 * rows * widest


def _leaf_row_block_bytes(x: LeafPlan, rows: int, act: int) -> int:
    """Transients of one int8 weight's row-blocked product over `rows` rows (0 when R = 1)."""
    if not x.row_blocks or x.row_blocks == 1:
        return 0
    worst = 0
    inputs, outputs = x.shape[-2], x.shape[-1]
    if "/layers/" in x.path and "/moe/" not in x.path:
        # a dense layer weight's float32 partials [rows, R, O], or past PARTIALS_MAX_BYTES its
        # dequantised copy (products._row_blocked_product; O is taken whole: an upper bound)
        partials = rows * x.row_blocks * outputs * F32
        dequantised = inputs // x.input_split * outputs * F32
        worst = dequantised if partials > max(PARTIALS_MAX_BYTES, inputs * outputs * F32) \
            else partials
    if x.input_split > 1 and x.row_blocks % x.input_split:
        worst = max(worst, rows * inputs * act + 2 * rows * outputs * F32)
    return worst


def _row_block_bytes(leaves: Sequence[LeafPlan], tokens: int, k_sel: int, act: int) -> int:
    """The largest row-blocked product transient for `tokens` tokens (x k_sel for experts)."""
    return max((_leaf_row_block_bytes(x, tokens * k_sel if "/moe/" in x.path else tokens, act)
                for x in leaves if not x.in_panels), default=0)


@dataclasses.dataclass(frozen=True)
class _Terms:
    """The per-device quantities of a transformer both programs share."""
    act: int  # A
    k_sel: int  # k (1 for a dense ffn)
    attention: int  # (4 + 4 + A) x h: bytes per query row and key
    heads: int  # h
    ffn_dev: int  # Fm (F when m does not divide it)
    kv_split: int
    slots_dev: int  # Bd
    layer_weights: int  # W
    head_bytes: int  # Wh

    def ffn(self, config: ModelConfig, rows: int) -> int:
        return 3 * rows * self.ffn_dev * F32 + 2 * rows * config.emb_size * F32


def _transformer_terms(c: ModelConfig, sizes: Mapping[str, int], slots: int,
                       leaves: Sequence[LeafPlan]) -> _Terms:
    m, d = sizes.get("model", 1), sizes.get("data", 1)
    act = np.dtype(c.dtype).itemsize
    heads = c.num_q_heads // math.gcd(c.num_q_heads, m)
    kv_spec = memory_specs(c, slots, PaperMesh(sizes)).keys
    layer_weights, head_bytes = _layer_and_head_bytes(c, leaves, "/transformer/layers/", act)
    return _Terms(
        act=act, k_sel=c.num_selected_experts if c.is_moe else 1,
        attention=(2 * F32 + act) * heads, heads=heads,
        ffn_dev=c.ffn_size // m if c.ffn_size % m == 0 else c.ffn_size,
        kv_split=math.prod(sizes.get(n, 1) for n in (kv_spec[2], kv_spec[4]) if n is not None),
        slots_dev=_per_data_shard(slots, d), layer_weights=layer_weights, head_bytes=head_bytes)


def _prefill_attention(c: ModelConfig, w: _Terms, t: int, keys: int) -> int:
    """One layer's attention temporaries for T queries over `keys` keys: the dense [T, keys]
    logits, or, where the layout attends blockwise, one block pair's plus the float32 running
    output and statistics of every query (models/blockwise.py)."""
    block = layout.attention_block(t, keys)
    if block is None:
        return w.attention * t * keys
    return w.attention * block * block + 2 * F32 * w.heads * t * (c.key_size + 2)


def prefill_tokens(cache_length: int, prefill_chunk: Optional[int] = None) -> int:
    """The largest prefill program's tokens: a whole prompt of the cache length, or one chunk
    (prefill_chunk None: layout.PREFILL_CHUNK; 0: whole prompts)."""
    chunk = layout.PREFILL_CHUNK if prefill_chunk is None else prefill_chunk
    return min(cache_length, chunk) if chunk else cache_length


def _prefill(c: ModelConfig, w: _Terms, cache_length: int, t: int,
             leaves: Sequence[LeafPlan]) -> dict[str, int]:
    # the largest prefill program (t tokens): a whole prompt, or with chunked prefill one chunk
    # over the memory its row holds (each layer gathers that row of its own memory)
    stored = memory_length(c, cache_length) if t < cache_length else 0
    # one layer's k (or v) per token, in the memory's dtype
    token = c.num_kv_heads * c.key_size * kv_dtype(c).itemsize // w.kv_split
    return {
        "bucket KV row": 2 * 2 * memory_layers(c) * token * t,
        "row gather": 2 * token * stored,
        "attention": _prefill_attention(c, w, t, stored + t),
        "ffn": w.ffn(c, t * w.k_sel),
        "row blocks": _row_block_bytes(leaves, t, w.k_sel, w.act),
        "activations": 6 * t * c.emb_size * F32,
        "layer weights": 2 * w.layer_weights,
        "output head": w.head_bytes,
        "kernel scratch": _kernel_scratch(leaves, t),
    }


def _decode(c: ModelConfig, w: _Terms, slots: int, s: int, leaves: Sequence[LeafPlan],
            kv_bytes: int, kv_in_place: bool = False) -> dict[str, int]:
    return {
        # The chunk is scattered into the donated memory in place; each layer's slice may be
        # re-laid out for the attention matmuls (not where the CPU kernel reads it in place).
        "layer KV slices": 0 if kv_in_place else 2 * kv_bytes // memory_layers(c),
        "attention": w.attention * w.slots_dev * s,
        "ffn": w.ffn(c, slots * w.k_sel),
        "row blocks": _row_block_bytes(leaves, slots, w.k_sel, w.act),
        "layer weights": 2 * w.layer_weights,
        "output head": w.head_bytes,
        "kernel scratch": _kernel_scratch(leaves, slots),
        "logits": 4 * slots * c.vocab_size * F32,
    }


def _kv_read_in_place(config: ModelConfig) -> bool:
    """Whether this CPU's decode attention kernel reads the KV memory in place (asked only
    where the plan is for this machine's one CPU device)."""
    from runtime import cpu_kernels
    return cpu_kernels.decode_attention_usable(1, kv_dtype(config), np.dtype(config.dtype))


def working_set(config: ModelConfig, sizes: Mapping[str, int], slots: int, cache_length: int,
                leaves: Sequence[LeafPlan], kv_bytes: int,
                prefill_chunk: Optional[int] = None, cpu_panels: bool = False) -> Transients:
    """Transient bytes per device of the two jitted programs, by component: a conservative
    estimate (the module docstring gives the formulas; Mamba-2: `mamba2_working_set`).
    prefill_chunk: the engine's (None: layout.PREFILL_CHUNK; 0: whole prompts). cpu_panels:
    one CPU device's kernels (panel_forms.panels_here), whose decode attention reads the KV
    memory in place under float32 activations (cpu_kernels.decode_attention_usable)."""
    if is_ssm(config):
        family = palm_working_set if config.architecture == "palm" else mamba2_working_set
        transients = family(config, sizes, slots, prefill_tokens(cache_length, prefill_chunk),
                            leaves, kv_bytes)
    else:
        terms = _transformer_terms(config, sizes, slots, leaves)
        t = prefill_tokens(cache_length, prefill_chunk)
        transients = {"prefill": _prefill(config, terms, cache_length, t, leaves),
                      "decode": _decode(config, terms, slots, memory_length(config, cache_length),
                                        leaves, kv_bytes, cpu_panels and _kv_read_in_place(
                                            config))}
    # the sampler's per-slot history (sampling_state.History: prompt-seen bool, output counts
    # int32, logit bias f32, [B, V] each, replicated), held beside either program
    history = slots * config.vocab_size * (1 + 4 + 4)
    for phase in transients.values():
        phase["sampler history"] = history
    return transients


def mamba2_working_set(config: ModelConfig, sizes: Mapping[str, int], slots: int,
                       prefill_length: int, leaves: Sequence[LeafPlan],
                       state_bytes: int) -> Transients:
    """Transient bytes per device of Mamba-2's two jitted programs (mamba2.py), in the spirit of
    `working_set` (the module docstring gives the formulas); prefill_length: the largest
    prefill program's tokens (prefill_tokens)."""
    c = config
    m, d = sizes.get("model", 1), sizes.get("data", 1)
    act = np.dtype(c.dtype).itemsize
    t = prefill_length
    q = min(c.ssm_chunk_size, t)
    split = m if c.ssm_heads % m == 0 else 1
    inner, bc = c.ssm_heads * c.ssm_head_dim, c.ssm_groups * c.ssm_state_size
    widths = 2 * inner + 2 * bc + c.ssm_heads
    layer_weights, head_bytes = _layer_and_head_bytes(c, leaves, "/mamba/layers/", act)
    prefill = {
        "bucket state": 2 * ssm_state_device_bytes(c, 1, sizes),
        "projections": 2 * t * widths * F32 // split,
        "chunk products": 3 * t * q * c.ssm_heads * F32 // split,
        "chunk states": 2 * (-(-t // q) + 1) * inner * c.ssm_state_size * F32 // split,
        "activations": 6 * t * c.emb_size * F32,
        "layer weights": 2 * layer_weights,
        "output head": head_bytes,
    }
    decode = {
        "state copy": state_bytes,
        "layer state": 2 * state_bytes // c.num_layers,
        "projections": 2 * _per_data_shard(slots, d) * widths * F32,
        "layer weights": 2 * layer_weights,
        "output head": head_bytes,
        "logits": 4 * slots * c.vocab_size * F32,
    }
    return {"prefill": prefill, "decode": decode}


def palm_working_set(config: ModelConfig, sizes: Mapping[str, int], slots: int,
                     prefill_length: int, leaves: Sequence[LeafPlan],
                     state_bytes: int) -> Transients:
    """Transient bytes per device of Palm's two jitted programs (models/palm.py), in the spirit
    of `working_set`: every buffer at full size. T = prefill_length, Q = N * H split over the
    model axis when it divides the heads, R the rank, A block applications:
    prefill: 2 x one row's state; 6 x T*Q*4 (q, k, v, sigmoid(k) v, the running sums, y);
    3 x T*R*4 (the rank-R factors); 6 x T*D*4 (residual, norms, u, g); 2 x W; Wh.
    decode: the state once more and 2 x one application's; 6 x Bd*Q*4; 2 x W; Wh; logits."""
    c = config
    m, d = sizes.get("model", 1), sizes.get("data", 1)
    act = np.dtype(c.dtype).itemsize
    t = prefill_length
    split = m if c.num_q_heads % m == 0 else 1
    inner = c.num_q_heads * c.key_size
    layer_weights, head_bytes = _layer_and_head_bytes(c, leaves, "/palm/layers/", act)
    prefill = {
        "bucket state": 2 * ssm_state_device_bytes(c, 1, sizes),
        "projections": 6 * t * inner * F32 // split,
        "low-rank factors": 3 * t * c.low_rank * F32,
        "activations": 6 * t * c.emb_size * F32,
        "layer weights": 2 * layer_weights,
        "output head": head_bytes,
    }
    applications = c.recursion_steps * c.num_layers * c.block_repeats
    decode = {
        "state copy": state_bytes,
        "layer state": 2 * state_bytes // applications,
        "projections": 6 * _per_data_shard(slots, d) * inner * F32 // split,
        "layer weights": 2 * layer_weights,
        "output head": head_bytes,
        "logits": 4 * slots * c.vocab_size * F32,
    }
    return {"prefill": prefill, "decode": decode}
