"""What the memory plan says about run.py's configuration: the plan for --plan, the mesh, the
refusal before loading, and the cache length a batch job can afford."""

from __future__ import annotations


def make_plan_for_flags(args, config, config_source, weight_format: str,
                        checkpoint_kind=None, checkpoint=None):
    """The plan for --plan-target's machine, else for --mesh (or the default mesh) over the
    devices here, with their memory (or --device-memory). checkpoint_kind: its format;
    checkpoint: its path (a GGUF file's tables: _quantized_layout)."""
    import math

    import jax

    from runtime.parameter_shapes import abstract_params
    from runtime.planning import device_capacity, make_plan, parse_bytes, plan_for_target
    from runtime.sharding import default_mesh_sizes, parse_mesh_flag

    slots = args.slots or 1
    cache_length = args.cache_length or config.sequence_len
    if args.plan_target:
        return plan_for_target(config, args.plan_target, weight_format, slots, cache_length,
                               label=str(config_source),
                               prefill_chunk=getattr(args, "prefill_chunk", None),
                               **_quantized_layout(args, config, checkpoint_kind, checkpoint))
    sizes = parse_mesh_flag(args.mesh) if args.mesh else \
        default_mesh_sizes(abstract_params(config), jax.device_count())
    capacity, kind = device_capacity(jax.devices()[:max(1, min(jax.device_count(),
                                                               math.prod(sizes.values())))])
    if args.device_memory:
        capacity = parse_bytes(args.device_memory)
    return make_plan(config, sizes, weight_format, slots, cache_length, capacity, kind,
                     label=str(config_source),
                     capacity_source="--device-memory" if args.device_memory else None,
                     prefill_chunk=getattr(args, "prefill_chunk", None),
                     **_quantized_layout(args, config, checkpoint_kind, checkpoint,
                                         (sizes, slots)))


# A GGUF file's quantised types come in blocks of 32 input rows (Q6_K, Q3_K, Q2_K: scales per
# 16: stored_tables says so where they load).
GGUF_GROUP_SIZE = 32


def _quantized_layout(args, config, kind=None, checkpoint=None, here=None) -> dict:
    """make_plan's int8_group_size, int4_group_size (--int8-group-size, --group-size; None: the
    loader's defaults), cpu_panels where `here` (mesh sizes, slots) is one CPU device whose
    panel kernels will read the weights in place (planning.panel_forms) and, for a GGUF file
    planned as stored, its weights as its own types load them (gguf_reader.stored_tables), in
    the panels' forms where they hold them."""
    from runtime.planning.panel_forms import panel_bytes, panels_here
    panels = here is not None and panels_here(config, *here)
    if kind != "gguf" or args.quantize is not None:
        return dict(int8_group_size=args.int8_group_size,
                    int4_group_size=getattr(args, "group_size", None), cpu_panels=panels)
    layout = dict(int8_group_size=GGUF_GROUP_SIZE, int4_group_size=GGUF_GROUP_SIZE,
                  cpu_panels=panels)
    if checkpoint is not None:
        from runtime.checkpoint.gguf_reader import stored_tables
        layout["stored_tables"] = stored_tables(checkpoint, config)
        if panels:
            layout["panel_bytes"] = panel_bytes(checkpoint, config)
            layout["read_bytes"] = panel_bytes(checkpoint, config, as_read=True)
    return layout


def planned_weight_format(args, opened, here: bool = True) -> str:
    """The weight format to plan the opened checkpoint in: planning.default_weight_format,
    its 2-byte floats widened where run.py's loader widens them on the devices here (CPU,
    float32 activations, outside the panel kernels: layout.widen_floats_at_load,
    cpu_kernels.panels_read_2_byte_floats); `here` False: another machine (--plan-target),
    whose accelerators keep them."""
    from runtime.cpu_kernels import panels_read_2_byte_floats
    from runtime.layout import widen_floats_at_load
    from runtime.planning import default_weight_format
    config = opened.config
    widened = here and widen_floats_at_load(config) is not None \
        and not panels_read_2_byte_floats(config)
    return default_weight_format(opened.kind, args.quantize, opened.checkpoint,
                                 floats_widened=widened)


def mesh_sizes(args, config) -> dict:
    import jax

    from runtime.parameter_shapes import abstract_params
    from runtime.sharding import default_mesh_sizes, parse_mesh_flag

    if args.mesh:
        return parse_mesh_flag(args.mesh)
    if jax.device_count() == 1:  # nothing to choose; skips tracing the model for its shapes
        return {"data": 1, "model": 1}
    return default_mesh_sizes(abstract_params(config), jax.device_count(), jax.process_count())


def check_memory(args, opened, sizes, slots, cache_length) -> None:
    """Refuse, before anything is read, a configuration the devices cannot hold (when they say
    how much memory they have, or --device-memory does)."""
    from runtime.planning import check_plan
    plan = _plan_for(args, opened, sizes, slots, cache_length)
    if plan is not None:
        check_plan(plan)


def _plan_for(args, opened, sizes, slots: int, cache_length: int):
    """The memory plan of the opened checkpoint on the devices here (None: their memory is
    unknown and no --device-memory says it)."""
    from runtime.planning import device_capacity, make_plan, parse_bytes
    capacity, kind = device_capacity()
    if args.device_memory:
        capacity = parse_bytes(args.device_memory)
    if capacity is None:
        return None
    weight_format = planned_weight_format(args, opened)
    return make_plan(opened.config, sizes, weight_format, slots, cache_length, capacity, kind,
                     label=str(opened.checkpoint),
                     prefill_chunk=getattr(args, "prefill_chunk", None),
                     **_quantized_layout(args, opened.config, opened.kind, opened.checkpoint,
                                         (sizes, slots)))


def fitting_cache_length(args, opened, sizes, slots: int) -> tuple[int, str]:
    """(cache length, why) for a batch job without --cache-length: the model's context when
    it fits the devices (or their memory is unknown), else the longest that fits `slots`
    slots, as the memory plan suggests it. A 128k-context model with 32 slots then runs at
    what fits instead of being refused."""
    config = opened.config
    context = (config.sequence_len, "the model's context")
    plan = _plan_for(args, opened, sizes, slots, config.sequence_len)
    if plan is None or plan.fits:
        return context
    lengths = [s.changes["cache_length"] for s in plan.suggested_changes()
               if set(s.changes) == {"cache_length"}]
    if not lengths:
        return context  # check_memory refuses it, with the other suggestions
    return max(lengths), (f"the longest that fits {slots} slot(s); the model's context is "
                          f"{config.sequence_len}")
