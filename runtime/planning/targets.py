"""Device capacity: what the devices report (`device_capacity`: `memory_stats()["bytes_limit"]`,
as GPUs and TPUs do; for CPU devices, which report none, the host memory available now, shared
by the process's CPU devices), or a preset machine to plan for without having it (`TARGETS`, `plan_for_target`). A capacity
may also come from the caller (`--device-memory 80GB`, see units.parse_bytes)."""

from __future__ import annotations

import dataclasses
import os
from typing import Optional, Sequence

import jax

from runtime.config import ModelConfig

from runtime.planning.plan import Plan, make_plan
from runtime.planning.units import GiB


def device_capacity(devices: Optional[Sequence] = None) -> tuple[Optional[int], str]:
    """(bytes_limit of the smallest device, or None when any reports none; the device kind).
    CPU devices report none: they get the host's available memory, split evenly among them
    (simulated devices share the one host), so a run that cannot fit is refused before it
    allocates (e.g. --slots 1000000 on the CPU)."""
    devices = list(jax.devices() if devices is None else devices)
    kind = getattr(devices[0], "device_kind", devices[0].platform) if devices else "device"
    limits = []
    for device in devices:
        try:
            stats = device.memory_stats()
        except Exception:  # noqa: BLE001 - backends without memory stats raise or return None
            stats = None
        if not stats or not stats.get("bytes_limit"):
            return _host_share(devices), kind
        limits.append(int(stats["bytes_limit"]))
    return (min(limits) if limits else None), kind


def _host_share(devices: Sequence) -> Optional[int]:
    """The host memory available now per CPU device of this process (None: not all devices
    are CPUs, or the host does not say)."""
    local = [d for d in devices if d.process_index == jax.process_index()]
    available = host_memory_available()
    if not local or available is None or any(d.platform != "cpu" for d in devices):
        return None
    return available // len(local)


def host_memory_available() -> Optional[int]:
    """Bytes the host can still give this process: MemAvailable of /proc/meminfo (Linux),
    else the physical memory; None when neither is known."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


@dataclasses.dataclass(frozen=True)
class Target:
    """A machine to plan for without having it."""
    name: str
    description: str
    mesh_sizes: dict
    device_memory_bytes: int
    device_kind: str
    note: str


TARGETS = {
    # CUDA leaves ~79.1 GiB of 80 GB; JAX takes 75 % unless XLA_PYTHON_CLIENT_MEM_FRACTION is
    # raised (e.g. .95): 80 * 10**9 bytes (74.5 GiB) stands in for the raised bytes_limit.
    "h100x8": Target("h100x8", "8 x NVIDIA H100 80GB", {"data": 1, "model": 8}, 80 * 10**9,
                     "NVIDIA H100 80GB", "80 * 10**9 bytes, below the ~79 GiB a GPU has; JAX "
                     "takes that much with XLA_PYTHON_CLIENT_MEM_FRACTION=.95"),
    "h100x4": Target("h100x4", "4 x NVIDIA H100 80GB", {"data": 1, "model": 4}, 80 * 10**9,
                     "NVIDIA H100 80GB", "80 * 10**9 bytes, as h100x8"),
    # all 32 chips on the model axis (the rules split Grok-1 by 32; its KV memory then splits
    # by head dim, gathered every decode step: the plan's note names expert=2,model=16).
    "v5e-32": Target("v5e-32", "TPU v5e-32", {"data": 1, "model": 32}, 16 * GiB,
                     "TPU v5 lite", "16 GiB HBM per chip"),
    "v5e-16": Target("v5e-16", "TPU v5e-16", {"data": 1, "model": 16}, 16 * GiB,
                     "TPU v5 lite", "16 GiB HBM per chip"),
}


def plan_for_target(config: ModelConfig, target: str | Target, weight_format: str, slots: int,
                    cache_length: Optional[int] = None, **kwargs) -> Plan:
    target = TARGETS[target] if isinstance(target, str) else target
    return make_plan(config, target.mesh_sizes, weight_format, slots, cache_length,
                     device_memory_bytes=target.device_memory_bytes,
                     device_kind=target.device_kind,
                     capacity_source=target.note, **kwargs)
