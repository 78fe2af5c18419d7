"""The plan as text: the per-device table `Plan.table` prints (parameter groups, KV memory or
SSM state, working set, total, capacity, verdict) with its notes: the working-set formulas
(working_set.py) and, when the KV memory splits by head dim, a mesh that splits it by heads."""

from __future__ import annotations

import textwrap
from typing import TYPE_CHECKING

from runtime.errors import ShardingError
from runtime.kv_heads import head_splitting_meshes, memory_split_by_heads
from runtime.memory import kv_dtype
from runtime.quant4 import DEFAULT_GROUP_SIZE
from runtime.sharding import format_mesh

from runtime.planning.shards import is_ssm, state_label
from runtime.planning.units import format_bytes
from runtime.planning.working_set import prefill_tokens
from runtime.planning.weights import FLOAT_FORMATS

if TYPE_CHECKING:
    from runtime.planning.plan import Plan

Row = tuple[str, str, str]  # label, whole model, per device

# The transformer working set in symbols (working_set.py's module docstring explains them).
FORMULAS = [
    "prefill = 4 x L*T*K*H*A / kv_split + att(T) + ffn(T*k) + rb(T*k) "
    "+ 6 x T*D x 4 + 2 x W + Wh + 8 x T*Ip (+ 2 x Sm*K*H*A / kv_split for a chunk over its "
    "row's Sm memory slots); att(T) = (8 + A) x h*T*(Sm + T), or beyond 1024^2 (query, key) pairs "
    "(blockwise attention in blocks of b = 256) (8 + A) x h*b*b + 8 x h*T*(H + 2)",
    "decode = KV + 2 x KV / L (0 where the CPU kernel reads it in place) + (8 + A) x B*h*S "
    "+ ffn(B*k) + rb(B*k) + 2 x W + Wh + 8 x B*Ip + 4 x B*V x 4",
    "ffn(r) = 3 x r*F/m x 4 + 2 x r*D x 4; rb(r) = r*I*A + 2 x r*O*4 for the largest "
    "int8 weight [I,O] whose R scale blocks straddle its shards (else 0); T = the "
    "prefill chunk (or S, the cache length); A = activation bytes; h = N / gcd(N, m) heads per device; W, Wh = one "
    "layer's weights, the output head, per device in the activation dtype, less those "
    "the CPU panel kernels read in place (for which rb is 0); Ip = the widest input of those "
    "(else 0)",
]


def _stored_text(plan: Plan) -> str:
    """The types a checkpoint's quantised weights load as: codes, tables, rows per scale."""
    short = {"float16": "f16", "bfloat16": "bf16"}
    kinds = sorted({entry[:4] for _, entry in plan.stored_tables}, key=str)
    return ", ".join(f"{fmt} + {short.get(dtype, dtype)} scales{' and mins' if mins else ''} "
                     f"per {rows}" for fmt, rows, dtype, mins in kinds)


def weights_text(plan: Plan) -> str:
    if plan.weight_format in FLOAT_FORMATS:
        return plan.weight_format
    rest = plan.float_dtype or "float32"
    if plan.stored_tables:
        held = "; held as this CPU's panel kernels hold them: K-quant tables super-scaled, " \
            "six-bit codes packed, a stack of several types one stack per type" \
            if plan.panel_bytes and plan.devices == 1 else ""
        return (f"{plan.weight_format} bulk, each weight as its file's type loads "
                f"({_stored_text(plan)} input rows{held}; other parameters {rest})")
    if plan.weight_format == "int4":
        groups = plan.int4_group_size or DEFAULT_GROUP_SIZE
        table = ", tied table int8 + bf16 scales" if plan.config.tie_embeddings else ""
        return (f"int4 (4-bit codes packed 2 per byte + f16 scales per <= {groups} input rows"
                f"{table}; other parameters {rest})")
    return f"{plan.weight_format} (int8 + bf16 scales; other parameters {rest})"


def _parameter_rows(plan: Plan) -> list[Row]:
    rows = [("parameters", "", "")]
    groups = plan.group_bytes()
    for label, (whole, device) in groups.items():
        rows.append((f"  {label}", format_bytes(whole), format_bytes(device)))
    if plan.config.tie_embeddings and "output head" not in groups:
        rows.append(("  output head", "tied to embeddings", ""))
    rows.append(("  all parameters", format_bytes(plan.param_logical_bytes),
                 format_bytes(plan.param_bytes)))
    return rows


def _rows(plan: Plan) -> tuple[list[Row], str]:
    """The table's rows and its verdict."""
    c = plan.config
    rows = _parameter_rows(plan)
    memory = f"{state_label(c)} ({plan.slots} slot(s), any length)" if is_ssm(c) else \
        f"KV memory ({plan.slots} x {plan.cache_length}, {kv_dtype(c).name})"
    rows.append((memory, format_bytes(plan.kv_logical_bytes), format_bytes(plan.kv_bytes)))
    rows.append(("working set (estimate, [1])", "", format_bytes(plan.working_bytes)))
    rows.append(("total per device", "", format_bytes(plan.total_bytes)))
    if plan.loading_bytes is not None:
        rows.append(("loading peak (estimate, [2])", "", format_bytes(plan.loading_bytes)))
    rows.append(("device capacity", "", format_bytes(plan.device_memory_bytes)))
    if plan.device_memory_bytes is None:
        return rows, "not checked (capacity unknown)"
    rows.append(("headroom", "", format_bytes(plan.headroom)))
    return rows, "fits" if plan.fits else "DOES NOT FIT"


def _header(plan: Plan) -> list[str]:
    c = plan.config
    count = plan.parameter_count
    return [
        f"memory plan: {plan.label or 'model'}, " + (f"{count / 1e9:.2f}B parameters"
                                                    if count >= 10**8 else f"{count:,} parameters"),
        f"  mesh {format_mesh(plan.mesh_sizes)}: {plan.devices} x {plan.device_kind}, "
        f"capacity {format_bytes(plan.device_memory_bytes)} each ({plan.capacity_source})",
        f"  weights {weights_text(plan)}; activations {c.dtype}",
        f"  {plan.slots} slot(s) x cache length {plan.cache_length} "
        f"(sequence_len {c.sequence_len})",
    ]


def _parts(components: dict[str, int]) -> str:
    return ", ".join(f"{k} {format_bytes(v)}" for k, v in components.items() if v)


def _family(config) -> str:
    """The prefix of the working-set function of the config's family."""
    return {"mamba2": "mamba2_", "palm": "palm_"}.get(config.architecture, "")


def _notes(plan: Plan) -> list[str]:
    """Note [1]: how the working set was estimated, and its components."""
    ssm = is_ssm(plan.config)
    tokens = prefill_tokens(plan.cache_length, plan.prefill_chunk)
    what = "chunk" if tokens < plan.cache_length else "bucket"
    first = (f"[1] max(prefill of one {tokens}-token {what} "
             f"{format_bytes(plan.prefill_bytes)}, decode step {format_bytes(plan.decode_bytes)}) "
             f"+ {format_bytes(plan.overhead_bytes)} fixed XLA/runtime overhead; a conservative "
             f"estimate (runtime/planning/working_set.py {_family(plan.config)}working_set)"
             + (f": {state_label(plan.config)} instead of KV memory" if ssm else ":"))
    notes = [first] + ([] if ssm else FORMULAS) + [
        f"prefill: {_parts(plan.transients['prefill'])}",
        f"decode: {_parts(plan.transients['decode'])}",
    ]
    lines = []
    for i, note in enumerate(notes):
        lines += textwrap.wrap(note, width=100, initial_indent="" if i == 0 else "    ",
                               subsequent_indent="    ", break_on_hyphens=False)
    if plan.loading_bytes is not None:
        lines += textwrap.wrap(
            "[2] the parameters as the loader reads them (a GGUF file's K-quant tables in "
            "float32, its codes unpacked), plus the preparing program's copy of the largest "
            "module (of all of them under 1 GiB), plus the fixed overhead "
            "(runtime/planning/plan.py Plan.loading_bytes)", width=100,
            subsequent_indent="    ", break_on_hyphens=False)
    return lines


def kv_split_note(plan: Plan) -> list[str]:
    """A warning when the KV memory splits by head dim on this mesh, with the first mesh of
    the same devices that splits it by heads and fits (kv_heads.py)."""
    model = plan.mesh_sizes.get("model", 1)
    if memory_split_by_heads(plan.config, model):
        return []
    text = (f"note: {plan.config.num_q_heads} query heads over {plan.config.num_kv_heads} KV "
            f"heads do not split by heads over model={model}: the KV memory splits by head "
            f"dim, and XLA gathers each layer's KV memory onto every device at every decode "
            f"step")
    for sizes in head_splitting_meshes(plan.config, dict(plan.mesh_sizes)):
        try:
            other = plan.replan(mesh_sizes=sizes)
        except ShardingError:
            continue
        if other.device_memory_bytes is None or other.fits:
            text += (f"; --mesh {format_mesh(sizes)} splits it by heads "
                     f"({format_bytes(other.total_bytes)} per device)")
            break
    return textwrap.wrap(text, width=100, subsequent_indent="    ")


def table(plan: Plan) -> str:
    """The plan as a table with its notes."""
    rows, verdict = _rows(plan)
    width = max(len(r[0]) for r in rows) + 2
    lines = _header(plan) + ["", f"{'':<{width}}{'whole model':>18}{'per device':>14}"]
    lines += [f"{label:<{width}}{whole:>18}{device:>14}" for label, whole, device in rows]
    lines.append(f"=> {verdict}")
    lines += kv_split_note(plan)
    lines.append("")
    return "\n".join(lines + _notes(plan))
