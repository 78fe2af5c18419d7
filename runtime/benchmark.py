"""Analytic costs of the engine's steps, for scripts/bench.py: bytes a decode step must read and
FLOPs a prefill must do. Pure functions of the config and the parameter tree (real arrays or
ShapeDtypeStructs, float, QuantizedWeight8bit or QuantizedWeight4bit), so they can be checked
without running anything.

Shape glossary (as in models/transformer.py): B batch rows, P prompt length, S cache length, D model width,
N query heads, K kv heads, H head dim, E experts, k experts per token, F ffn width, V vocab,
L layers (times the config's recursion steps where the stack is applied more than once).

What a decode step reads (the roofline a bandwidth-bound step cannot beat):
  * every weight of attention, norms, router and dense FFN once, in its stored dtype (int8 values
    or packed int4 codes, and their scales, for a quantised weight);
  * of the experts only those routed: a batch of B tokens each choosing k of E touches
    E * (1 - (1 - k/E)^B) distinct experts on average under uniform routing (k at B = 1);
  * B rows of the embedding table, and the whole output head (the table itself when tied);
  * the KV memory over the length the decode attends over: the whole cache length S of every row
    (masking what is not filled yet), or the window over the filled part an engine picks; that
    length is what it reads, not the filled length.
"""

from __future__ import annotations

import math
import re

import jax
import numpy as np

from runtime.config import ModelConfig
from runtime.paths import MATMUL_LEAF
from runtime.quant import QuantizedWeight8bit
from runtime.quant4 import QuantizedWeight4bit

EXPERTS = re.compile(r"/moe/")
LAYERS = re.compile(r"/transformer/layers/")
EMBEDDINGS = re.compile(r"/in_out_embed/embeddings$")
MATMUL_WEIGHT = re.compile(rf"/{MATMUL_LEAF.pattern}$")  # a path ending in a matmul leaf


def expected_distinct_experts(experts: int, selected: int, tokens: int) -> float:
    """Distinct experts hit by `tokens` tokens each routed to `selected` of `experts` (uniform
    routing; each expert is missed by one token with probability 1 - k/E)."""
    if experts == 0:
        return 0.0
    return experts * (1.0 - (1.0 - selected / experts) ** tokens)


def _leaves(params):
    """(path, logical shape, stored bytes) of every parameter; a quantised weight's bytes are
    its int8 values (int4: packed codes) plus its scales (and mins)."""
    flat = jax.tree_util.tree_flatten_with_path(
        params, is_leaf=lambda x: isinstance(x, (QuantizedWeight8bit, QuantizedWeight4bit)))[0]
    for keys, leaf in flat:
        path = "/".join(str(getattr(k, "key", k)) for k in keys if hasattr(k, "key"))
        parts = [leaf]
        if isinstance(leaf, QuantizedWeight8bit):
            parts = [p for p in (leaf.weight, leaf.scales, leaf.mins) if p is not None]
        elif isinstance(leaf, QuantizedWeight4bit):
            parts = [p for p in (leaf.packed, leaf.scales, leaf.mins) if p is not None]
        yield path, tuple(leaf.shape), sum(math.prod(p.shape) * np.dtype(p.dtype).itemsize
                                           for p in parts)


def _recursion(config: ModelConfig) -> int:
    return getattr(config, "recursion_steps", 1)  # the layer stack runs this many times a step


def weight_bytes_per_step(config: ModelConfig, params, batch: int,
                          all_experts: bool = False) -> dict[str, float]:
    """Bytes of weights one decode step of `batch` rows reads, by group (see the module doc);
    all_experts: as if every expert were read, whatever the routing."""
    fraction = 1.0 if all_experts else expected_distinct_experts(
        config.num_experts, config.num_selected_experts, batch) / max(config.num_experts, 1)
    groups = {"attention+norms": 0.0, "ffn": 0.0, "experts": 0.0, "embeddings": 0.0,
              "head": 0.0}
    for path, _, nbytes in _leaves(params):
        if EMBEDDINGS.search(path):
            row = nbytes / config.vocab_size
            groups["embeddings"] += batch * row
            if config.tie_embeddings:  # the head multiplies by the whole table
                groups["head"] += nbytes
        elif path.endswith("unembed/w"):
            groups["head"] += nbytes
        elif EXPERTS.search(path):
            groups["experts"] += nbytes * fraction * _recursion(config)
        elif re.search(r"/mlp/", path):
            groups["ffn"] += nbytes * _recursion(config)
        else:
            groups["attention+norms"] += nbytes * (_recursion(config) if LAYERS.search(path)
                                                   else 1)
    return groups


def memory_bytes_read(model, batch: int, length: int) -> int:
    """Bytes of the decode memory (KV, or a state-space model's state) of `batch` rows at cache
    length `length`: what the current decode step reads whole. Evaluated abstractly."""
    memory = jax.eval_shape(lambda: model.new_memory(batch, length))
    return int(sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize
                   for a in jax.tree.leaves(memory)  # not the int32 positions
                   if jax.numpy.issubdtype(a.dtype, jax.numpy.floating)))


def decode_bytes(model, params, batch: int, kv_length: int) -> dict[str, float]:
    """Analytic bytes one decode step reads: weight groups, `kv` (over the `kv_length` positions
    it attends over), `total`."""
    out = weight_bytes_per_step(model.config, params, batch)
    out["weights"] = sum(out.values())
    # for comparison: the weights a step reading every expert (the Grok-1 reference) reads
    every = weight_bytes_per_step(model.config, params, batch, all_experts=True)
    out["weights_all_experts"] = sum(every.values())
    out["kv"] = float(memory_bytes_read(model, batch, kv_length))
    out["total"] = out["weights"] + out["kv"]
    return out


def prefill_flops(config: ModelConfig, params, batch: int, length: int) -> float:
    """Useful FLOPs of prefilling `batch` prompts of `length` tokens: 2 x active matmul
    parameters per token, the output head for the last token of each row only (as the engine
    computes it), and causal attention (QK^T and PV over the length * (length + 1) / 2 visible
    pairs). Padding to the power-of-two bucket is not counted: it is overhead, not work."""
    fraction = config.num_selected_experts / max(config.num_experts, 1)
    per_token = 0.0  # matmul parameters each token multiplies by
    for path, shape, _ in _leaves(params):
        if not MATMUL_WEIGHT.search(path) or EMBEDDINGS.search(path) \
                or path.endswith("unembed/w"):
            continue  # norms (even stacked [L, D]), gathered embeddings, the head (below)
        count = math.prod(shape) * (fraction if EXPERTS.search(path) else 1.0)
        per_token += count * (_recursion(config) if LAYERS.search(path) else 1)
    matmuls = 2.0 * per_token * batch * length
    head = 2.0 * config.emb_size * config.vocab_size * batch
    layers = config.num_layers * _recursion(config)
    attention = 0.0
    if getattr(config, "architecture", "transformer") == "transformer":
        attention = 2 * 2.0 * config.num_q_heads * config.key_size * layers * batch \
            * length * (length + 1) / 2
    return matmuls + head + attention


def decode_flops(config: ModelConfig, params, batch: int, read_length: int) -> float:
    """Useful FLOPs of one decode step of `batch` rows: prefill_flops of one token per row, with
    attention over the `read_length` positions the step reads instead of the causal triangle."""
    one_token = prefill_flops(config, params, batch, 1)
    if getattr(config, "architecture", "transformer") != "transformer":
        return one_token
    layers = config.num_layers * _recursion(config)
    per_position = 2 * 2.0 * config.num_q_heads * config.key_size * layers * batch
    return one_token - per_position + per_position * read_length

