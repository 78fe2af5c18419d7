"""The memory plan: the bytes each device will hold, computed before anything is loaded
(`make_plan`), and the refusal of a plan that does not fit (`check_plan`).

A plan needs no devices and no checkpoint: the parameter tree comes from
`weights.abstract_weights` (model.abstract_params with the storage dtypes of a weight format),
each device's shard of it and of the decode memory from the partition rules on a paper mesh
(shards.py).

Per device = parameters + KV memory + working set, where the working set is an estimate
(working_set.py): the larger of the transients of the two jitted programs (prefill of one
chunk, or of a full S-token bucket without chunked prefill, and one decode step) plus a fixed
allowance for the XLA runtime.

Mamba-2 and Palm configs (architectures "mamba2", "palm") are planned the same way with their
decode state (ssm_memory.py, models/palm.py: constant in the cache length) in place of KV memory
and their own working set (`working_set.mamba2_working_set`, `palm_working_set`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Optional

import jax

from runtime.config import ModelConfig
from runtime.errors import RuntimeInputError
from runtime.layout import served_config

from runtime.planning import report, suggest
from runtime.planning.shards import (GROUPS, check_mesh_sizes, kv_device_bytes, kv_logical_bytes,
                                     param_plan)
from runtime.planning.units import GiB, format_bytes
from runtime.planning.weights import cached_abstract_params, check_format
from runtime.planning.working_set import working_set

OVERHEAD_BYTES = 1 * GiB  # per device: XLA runtime, compiled programs, fragmentation, padding
# trees of this many bytes or more are prepared a module at a time (prepared_params.by_module):
# loading then peaks at the parameters as read plus the largest module's prepared copy
PREPARE_BY_MODULE_BYTES = 1 << 30


@dataclasses.dataclass(frozen=True)
class Plan:
    config: ModelConfig
    mesh_sizes: dict
    weight_format: str
    float_dtype: Optional[str]
    slots: int
    cache_length: int
    device_memory_bytes: Optional[int]
    device_kind: str
    overhead_bytes: int
    label: Optional[str]
    capacity_source: str
    leaves: tuple  # LeafPlan per parameter
    kv_bytes: int
    kv_logical_bytes: int
    transients: dict  # {"prefill": {component: bytes}, "decode": {...}}
    int8_group_size: Optional[int] = None  # of the int8 format (None: the loader's default)
    int4_group_size: Optional[int] = None  # of the int4 format (None: the loader's default)
    prefill_chunk: Optional[int] = None  # the engine's (None: layout.PREFILL_CHUNK; 0: off)
    stored_tables: Optional[tuple] = None  # weights planned as a checkpoint's types load them
    panel_bytes: Optional[tuple] = None  # ... and as one CPU device's panels hold them
    cpu_panels: bool = False  # one CPU device's panel kernels read the weights in place
    read_bytes: Optional[tuple] = None  # ... and as the loader reads them, before compacting

    @property
    def devices(self) -> int:
        return math.prod(self.mesh_sizes.values())

    @property
    def param_bytes(self) -> int:
        return sum(x.device_bytes for x in self.leaves)

    @property
    def param_logical_bytes(self) -> int:
        return sum(x.logical_bytes for x in self.leaves)

    @property
    def parameter_count(self) -> int:
        return sum(math.prod(x.shape) for x in jax.tree.leaves(cached_abstract_params(self.config)))

    def group_bytes(self) -> dict[str, tuple[int, int]]:
        """Group label -> (whole-model bytes, per-device bytes), in table order."""
        out = {}
        for label in [g for g, _ in GROUPS] + ["other"]:
            members = [x for x in self.leaves if x.group == label]
            if members:
                out[label] = (sum(x.logical_bytes for x in members),
                              sum(x.device_bytes for x in members))
        return out

    @property
    def prefill_bytes(self) -> int:
        return sum(self.transients["prefill"].values())

    @property
    def decode_bytes(self) -> int:
        return sum(self.transients["decode"].values())

    @property
    def working_bytes(self) -> int:
        return max(self.prefill_bytes, self.decode_bytes) + self.overhead_bytes

    @property
    def total_bytes(self) -> int:
        """Per device (every device holds the same shapes; this is also the maximum)."""
        return self.param_bytes + self.kv_bytes + self.working_bytes

    @property
    def loading_bytes(self) -> Optional[int]:
        """The loading peak on one CPU device whose panel kernels hold the weights (None
        elsewhere): the parameters as read (read_bytes: a GGUF file's K-quant tables float32,
        its codes unpacked) plus the copy the preparing program makes of the largest module
        (prepared_params.by_module; of all of them below PREPARE_BY_MODULE_BYTES), plus the
        overhead; the plan had counted none of it (BENCHMARKS.md, "Loading on every core",
        estimates against measured peaks)."""
        if not self.cpu_panels or self.devices != 1:
            return None
        read = dict(self.read_bytes or ())
        loaded = sum(read.get(x.path, x.device_bytes) for x in self.leaves)
        modules: dict = {}
        for x in self.leaves:
            module = x.path.rsplit("/", 1)[0]
            modules[module] = modules.get(module, 0) + x.device_bytes
        copy = max(modules.values(), default=0) if loaded >= PREPARE_BY_MODULE_BYTES \
            else self.param_bytes
        return loaded + copy + self.overhead_bytes

    @property
    def peak_bytes(self) -> int:
        """Per device: the larger of the running total and the loading peak."""
        return max(self.total_bytes, self.loading_bytes or 0)

    @property
    def headroom(self) -> Optional[int]:
        if self.device_memory_bytes is None:
            return None
        return self.device_memory_bytes - self.peak_bytes

    @property
    def fits(self) -> bool:
        """True when the total fits the capacity, or the capacity is unknown."""
        return self.headroom is None or self.headroom >= 0

    @property
    def inputs(self) -> dict:
        """The make_plan arguments of this plan (replan with changes: make_plan(**{...}))."""
        return dict(config=self.config, mesh_sizes=dict(self.mesh_sizes),
                    weight_format=self.weight_format, slots=self.slots,
                    cache_length=self.cache_length, device_memory_bytes=self.device_memory_bytes,
                    device_kind=self.device_kind, float_dtype=self.float_dtype,
                    overhead_bytes=self.overhead_bytes, label=self.label,
                    capacity_source=self.capacity_source, int8_group_size=self.int8_group_size,
                    int4_group_size=self.int4_group_size, prefill_chunk=self.prefill_chunk,
                    stored_tables=self.stored_tables, panel_bytes=self.panel_bytes,
                    cpu_panels=self.cpu_panels, read_bytes=self.read_bytes)

    def replan(self, **changes) -> "Plan":
        return make_plan(**{**self.inputs, **changes})

    def table(self) -> str:
        """The per-device table with its notes (report.py)."""
        return report.table(self)

    def suggested_changes(self) -> list[suggest.Suggestion]:
        """Computed alternatives that fit (each carries its make_plan changes); [] when this
        plan fits or the capacity is unknown (suggest.py)."""
        return suggest.suggested_changes(self)

    def suggestions(self) -> list[str]:
        return [s.text for s in self.suggested_changes()]


def _check_inputs(config: ModelConfig, slots, cache_length,
                  device_memory_bytes: Optional[int]) -> None:
    if not isinstance(slots, int) or slots < 1:
        raise RuntimeInputError(f"--slots {slots!r}: must be a positive integer")
    if not isinstance(cache_length, int) or not 1 <= cache_length <= config.sequence_len:
        raise RuntimeInputError(f"--cache-length {cache_length!r}: must be in [1, sequence_len "
                                f"{config.sequence_len}]")
    if device_memory_bytes is not None and device_memory_bytes < 1:
        raise RuntimeInputError(f"device memory {device_memory_bytes!r}: must be positive")


def make_plan(config: ModelConfig, mesh_sizes: Mapping[str, int], weight_format: str,
              slots: int, cache_length: Optional[int] = None,
              device_memory_bytes: Optional[int] = None, device_kind: str = "device", *,
              float_dtype: Optional[str] = None, overhead_bytes: int = OVERHEAD_BYTES,
              label: Optional[str] = None, capacity_source: Optional[str] = None,
              int8_group_size: Optional[int] = None,
              prefill_chunk: Optional[int] = None,
              int4_group_size: Optional[int] = None,
              stored_tables: Optional[tuple] = None,
              panel_bytes: Optional[tuple] = None, cpu_panels: bool = False,
              read_bytes: Optional[tuple] = None) -> Plan:
    """Bytes per device of `config` on a mesh of `mesh_sizes` (no devices needed), with
    parameters stored in `weight_format`, KV memory for `slots` x `cache_length` (default
    sequence_len), and a working-set estimate; `stored_tables`: weights planned as a GGUF
    file's own types load them (weights.abstract_weights); `panel_bytes`: their bytes where one
    CPU device's panel kernels hold them (panel_forms.panel_bytes), `read_bytes` as the
    loader reads them (the loading peak, Plan.loading_bytes); `cpu_panels`: those kernels will
    read the weights in place (no converted copies in the working set). Raises
    ShardingError when the partition rules cannot split a parameter over the mesh,
    RuntimeInputError for impossible inputs.
    """
    sizes = check_mesh_sizes(mesh_sizes)
    check_format(weight_format)
    cache_length = config.sequence_len if cache_length is None else cache_length
    _check_inputs(config, slots, cache_length, device_memory_bytes)
    leaves = param_plan(config, weight_format, float_dtype, tuple(sizes.items()),
                        int8_group_size, int4_group_size, stored_tables,
                        panel_bytes, cpu_panels)  # the rules hold
    # what the engine holds: KV heads copied when the model axis outnumbers them (the layout's
    # choice, the same function the engine's build takes it from)
    served = served_config(config, sizes.get("model", 1))
    if served is not config:
        leaves = param_plan(served, weight_format, float_dtype, tuple(sizes.items()),
                            int8_group_size, int4_group_size, stored_tables, panel_bytes,
                            cpu_panels)
    kv = kv_device_bytes(served, slots, cache_length, sizes)
    if capacity_source is None:
        capacity_source = "unknown" if device_memory_bytes is None else "given"
    return Plan(config=config, mesh_sizes=sizes, weight_format=weight_format,
                float_dtype=float_dtype, slots=slots, cache_length=cache_length,
                device_memory_bytes=device_memory_bytes, device_kind=device_kind,
                overhead_bytes=overhead_bytes, label=label, capacity_source=capacity_source,
                leaves=leaves, kv_bytes=kv,
                kv_logical_bytes=kv_logical_bytes(config, slots, cache_length),
                transients=working_set(served, sizes, slots, cache_length, leaves, kv,
                                       prefill_chunk,
                                       cpu_panels and math.prod(sizes.values()) == 1),
                int8_group_size=int8_group_size, prefill_chunk=prefill_chunk,
                int4_group_size=int4_group_size, stored_tables=stored_tables,
                panel_bytes=panel_bytes, cpu_panels=cpu_panels, read_bytes=read_bytes)


def check_plan(plan: Plan) -> Plan:
    """Refuse a plan that does not fit: RuntimeInputError with the table and suggestions."""
    if plan.fits:
        return plan
    lines = [f"this configuration needs {format_bytes(plan.peak_bytes)} per device but each "
             f"device has {format_bytes(plan.device_memory_bytes)} "
             f"(short by {format_bytes(-plan.headroom)}); nothing was loaded.", "",
             plan.table(), "", "what would fit:"]
    lines += [f"  - {s}" for s in plan.suggestions()] or ["  (nothing found)"]
    raise RuntimeInputError("\n".join(lines))
