"""The parameter-path vocabulary: where each kind of parameter lives in the tree
({"module path": {"param": leaf}}, Haiku's names), for the model, the partition rules, the
checkpoint readers, quantisation and the memory plan alike."""

from __future__ import annotations

import re
from typing import Optional

ROOT = "language_model"
STACKED = f"{ROOT}/transformer/layers/decoder_layer/"  # stacked [L, ...] transformer layers
UNROLLED = f"{ROOT}/transformer/layer_"  # + "{i}/module": one unrolled layer's own params
MAMBA_STACKED = f"{ROOT}/mamba/layers/mamba_layer/"  # stacked [L, ...] Mamba-2 layers
PALM_STACKED = f"{ROOT}/palm/layers/aod_block/"  # stacked [L, ...] Palm blocks
EMBEDDINGS = (f"{ROOT}/in_out_embed", "embeddings")  # (module, param) of the table [V, D]
MATMUL_LEAF = re.compile(r"w(_\d+)?")  # a matmul weight `w`, or one expert's `w_<e>`

# Weights that --quantize int8 stores as int8 with group-wise scales (--quantize int4: as int4,
# quant4.py). The router (tiny, and routing is sensitive), norms and untied input embeddings
# (gathered, not multiplied) stay float; so do Mamba-2's depthwise convolutions (not matmuls)
# and its per-head dt_bias / a_log / d. A tied embedding table is the output head too: it
# becomes an int8 QuantizedEmbedding, under int4 as well (the head's errors reach every
# logit). Palm's factorized linears (models/palm.py) are all matmuls; its low-rank table
# [V, R] is gathered.
QUANTIZABLE = re.compile(r"/(multi_head_attention|mlp|moe)/[^/]+/w$|^language_model/unembed/w$"
                         r"|/mamba_layer/mixer/(in_proj_[a-z]+|out_proj)/w$"
                         r"|/aod_block/[^/]+/w$|^language_model/(embed_proj|unembed_in)/w$")


def quantized_kind(path: str, config) -> Optional[str]:
    """What --quantize makes of the float parameter at `path` of a model with `config`:
    "weight" (a matmul weight: QuantizedWeight8bit under int8, QuantizedWeight4bit under
    int4), "embedding" (the tied table, an int8 QuantizedEmbedding under both) or None (it
    stays float)."""
    if QUANTIZABLE.search(path):
        return "weight"
    if path == "/".join(EMBEDDINGS) and config.tie_embeddings:
        return "embedding"
    return None
