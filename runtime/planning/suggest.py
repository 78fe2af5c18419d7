"""What would fit instead: computed alternatives to a plan that does not fit (`suggested_changes`),
each with the make_plan changes that, replanned, fit: more devices on the model axis, int8
weights (int4 where int8 does not fit the same mesh), a shorter cache, fewer slots."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Optional

from runtime.errors import ShardingError
from runtime.sharding import format_mesh

from runtime.planning.shards import is_ssm
from runtime.planning.units import format_bytes
from runtime.planning.weights import FLOAT_FORMATS

if TYPE_CHECKING:
    from runtime.planning.plan import Plan

MAX_MODEL_AXIS = 4096


@dataclasses.dataclass(frozen=True)
class Suggestion:
    text: str
    changes: dict  # make_plan arguments that, replanned, fit (empty: advice only)


def _round_length(n: int) -> int:
    """A tidy cache length <= n: a multiple of 256 (or 16, for short ones) when possible."""
    for step in (256, 16):
        if n >= step:
            return n - n % step
    return n


def largest_fitting(fits, low: int, high: int) -> Optional[int]:
    """The largest n in [low, high] with fits(n), for fits monotone (True up to some n)."""
    if high < low or not fits(low):
        return None
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low


def largest_slots(plan: Plan) -> Optional[int]:
    """The largest slot count below the plan's that fits (same mesh, cache length). Memory grows
    with the slots except where a count the data axis divides shards its KV memory: searched
    over all counts and over multiples of the data size, the larger wins."""
    data = plan.mesh_sizes.get("data", 1)
    fits = lambda n: plan.replan(slots=n).fits  # noqa: E731
    found = [largest_fitting(fits, 1, plan.slots - 1)]
    if data > 1:
        multiple = largest_fitting(lambda j: fits(j * data), 1, (plan.slots - 1) // data)
        found.append(None if multiple is None else multiple * data)
    found = [n for n in found if n is not None]
    return max(found) if found else None


def smallest_model_axis(plan: Plan, limit: int = MAX_MODEL_AXIS) -> Optional[int]:
    """The smallest power-of-two model-axis size above the plan's, up to `limit`, that the
    partition rules can split the parameters over and that fits (other axes unchanged)."""
    size = plan.mesh_sizes.get("model", 1) * 2
    while size <= limit:
        try:
            candidate = plan.replan(mesh_sizes={**plan.mesh_sizes, "model": size})
        except ShardingError:
            candidate = None
        if candidate is not None and candidate.fits:
            return size
        size *= 2
    return None


def _floor(plan: Plan) -> list[Suggestion]:
    """Advice when even the smallest KV memory does not fit."""
    floor = plan.replan(slots=1, cache_length=1)
    if floor.fits:
        return []
    return [Suggestion(
        f"even 1 slot x cache length 1 needs {format_bytes(floor.total_bytes)} per device "
        f"({format_bytes(plan.param_bytes)} of {plan.weight_format} parameters): fewer "
        f"slots or a shorter cache cannot make this fit", {})]


def _model_axis(plan: Plan) -> list[Suggestion]:
    model = smallest_model_axis(plan)
    if model is None:
        return [Suggestion(
            f"no model-axis size from {plan.mesh_sizes.get('model', 1) * 2} to {MAX_MODEL_AXIS} "
            f"(powers of two the parameter shapes divide by) fits {plan.weight_format} weights",
            {})]
    wider = plan.replan(mesh_sizes={**plan.mesh_sizes, "model": model})
    return [Suggestion(
        f"more devices on the model axis: --mesh {format_mesh(wider.mesh_sizes)} "
        f"({wider.devices} devices) needs {format_bytes(wider.total_bytes)} per device",
        {"mesh_sizes": wider.mesh_sizes})]


def _int8(plan: Plan) -> list[Suggestion]:
    """int8 weights on the same mesh, else with the smallest model axis that fits them."""
    if plan.weight_format not in FLOAT_FORMATS:
        return []
    # --quantize int8 keeps the other parameters in the checkpoint's float dtype
    changes = {"weight_format": "int8", "float_dtype": plan.weight_format}
    int8 = plan.replan(**changes)
    if int8.fits:
        return [Suggestion(f"int8 weights (--quantize int8): {format_bytes(int8.total_bytes)} "
                           f"per device on the same mesh", changes)]
    model = smallest_model_axis(int8)
    if model is None:
        return []
    wider = int8.replan(mesh_sizes={**plan.mesh_sizes, "model": model})
    return [Suggestion(
        f"int8 weights (--quantize int8) with --mesh {format_mesh(wider.mesh_sizes)} "
        f"({wider.devices} devices): {format_bytes(wider.total_bytes)} per device",
        {**changes, "mesh_sizes": wider.mesh_sizes})]


def _int4(plan: Plan) -> list[Suggestion]:
    """int4 weights on the same mesh, when float or int8 ones do not fit it and int4 ones do."""
    if plan.weight_format not in FLOAT_FORMATS + ("int8",):
        return []
    rest = plan.weight_format if plan.weight_format in FLOAT_FORMATS else plan.float_dtype
    if plan.weight_format != "int8" and plan.replan(weight_format="int8", float_dtype=rest).fits:
        return []  # int8 is suggested: the smaller loss of accuracy
    changes = {"weight_format": "int4", "float_dtype": rest}
    int4 = plan.replan(**changes)
    if not int4.fits:
        return []
    return [Suggestion(f"int4 weights (--quantize int4): {format_bytes(int4.total_bytes)} per "
                       f"device on the same mesh", changes)]


def _cache_length(plan: Plan) -> list[Suggestion]:
    length = largest_fitting(lambda n: plan.replan(cache_length=n).fits, 1, plan.cache_length - 1)
    if length is None:
        return []
    length = _round_length(length)
    shorter = plan.replan(cache_length=length)
    what = "a shorter context" if is_ssm(plan.config) else "a shorter KV memory"
    return [Suggestion(
        f"{what}: --cache-length {length} (sequence_len is {plan.config.sequence_len}; prompt + "
        f"output must fit in it) needs {format_bytes(shorter.total_bytes)} per device",
        {"cache_length": length})]


def _slots(plan: Plan) -> list[Suggestion]:
    slots = largest_slots(plan)
    if slots is None:
        return []
    fewer = plan.replan(slots=slots)
    return [Suggestion(
        f"fewer slots: --slots {slots} needs {format_bytes(fewer.total_bytes)} per device",
        {"slots": slots})]


def suggested_changes(plan: Plan) -> list[Suggestion]:
    """Computed alternatives that fit (each carries its make_plan changes); [] when the plan
    fits or the capacity is unknown."""
    if plan.fits:
        return []
    return (_floor(plan) + _model_axis(plan) + _int8(plan) + _int4(plan) + _cache_length(plan)
            + _slots(plan))
