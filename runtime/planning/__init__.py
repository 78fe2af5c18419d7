"""Memory planning: the bytes each device will hold, computed before anything is loaded.

units.py        byte sizes: parse_bytes (flags), format_bytes (the table)
weights.py      weight formats and their abstract parameter trees
shards.py       the paper mesh, each device's shard of the parameters and the decode memory
panel_forms.py  a GGUF file's quantised weights at the bytes one CPU device's panels hold
working_set.py  the transients of the jitted programs (the shape glossary and formulas)
plan.py         Plan, make_plan, check_plan
report.py       the plan's table and notes
suggest.py      what would fit instead
targets.py      device capacity and preset machines (TARGETS)
"""

from runtime.planning.plan import OVERHEAD_BYTES, Plan, check_plan, make_plan
from runtime.planning.shards import (GROUPS, LeafPlan, PaperMesh, is_ssm, kv_device_bytes,
                                     kv_logical_bytes, shard_shape, ssm_state_device_bytes)
from runtime.planning.suggest import (MAX_MODEL_AXIS, Suggestion, largest_fitting, largest_slots,
                                      smallest_model_axis)
from runtime.planning.targets import TARGETS, Target, device_capacity, plan_for_target
from runtime.planning.units import GiB, format_bytes, parse_bytes
from runtime.planning.weights import (FLOAT_FORMATS, GROK_INT8_ROW_BLOCKS, WEIGHT_FORMATS,
                                      abstract_weights, default_weight_format, weight_format_of)
from runtime.planning.working_set import mamba2_working_set, working_set

__all__ = [
    "FLOAT_FORMATS", "GROK_INT8_ROW_BLOCKS", "GROUPS", "GiB", "LeafPlan", "MAX_MODEL_AXIS",
    "OVERHEAD_BYTES", "PaperMesh", "Plan", "Suggestion", "TARGETS", "Target", "WEIGHT_FORMATS",
    "abstract_weights", "check_plan", "default_weight_format", "device_capacity",
    "format_bytes", "is_ssm", "kv_device_bytes", "kv_logical_bytes", "largest_fitting",
    "largest_slots", "make_plan", "mamba2_working_set", "parse_bytes", "plan_for_target",
    "shard_shape", "smallest_model_axis", "ssm_state_device_bytes", "weight_format_of",
    "working_set",
]
