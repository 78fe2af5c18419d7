"""How a run gets its engine: the mesh, the memory check, the parameters (mapped from the
prepared weights cache, or read from the checkpoint and prepared), with their log lines."""

from __future__ import annotations

import sys
from typing import Optional

from runtime.cli import compilation_cache_dir


def load_engine(args, opened, slots: int, cache_length: Optional[int]):
    """Mesh from --mesh (or the default); each parameter read, placed on its devices; engine
    (or one CPU device's prepared weights mapped from an earlier start: weights_cache.py).
    cache_length None: what fits (app_memory.fitting_cache_length), said in the log line."""
    import jax

    from runtime import weights_cache
    from runtime.distributed import is_leader
    from runtime.errors import RuntimeInputError
    from runtime.engine import build_engine
    from runtime.memory import kv_dtype
    from runtime.app_memory import check_memory, fitting_cache_length, mesh_sizes
    from runtime.sharding import format_mesh, make_mesh

    config = opened.config
    if cache_length is not None and cache_length > config.sequence_len:
        raise RuntimeInputError(f"--cache-length {cache_length}: the model's context "
                                f"(sequence_len) is {config.sequence_len} tokens")
    sizes = mesh_sizes(args, config)
    why = ""
    if cache_length is None:
        cache_length, reason = fitting_cache_length(args, opened, sizes, slots)
        why = f" ({reason})"
    mesh = make_mesh(sizes)
    check_memory(args, opened, sizes, slots, cache_length)
    if is_leader():
        print(f"[run] {jax.process_count()} process(es), checkpoint {opened.checkpoint}, config "
              f"{opened.config_source}, mesh {format_mesh(sizes)} over {jax.device_count()} "
              f"{jax.devices()[0].platform} device(s), {slots} slot(s), "
              f"cache length {cache_length}{why}, KV memory {kv_dtype(config).name}",
              file=sys.stderr)
    if args.int8_activations and is_leader():
        print("[run] int4 products multiply activations rounded to int8 per group "
              "(--int8-activations)", file=sys.stderr)
    kept = weights_cache.entry_for(compilation_cache_dir(args), args, opened.checkpoint, config,
                                   mesh, slots)
    engine = None if kept is None else \
        kept.engine(slots, cache_length, args.prefill_chunk, args.decode_steps)
    if engine is not None:
        return engine
    engine = build_engine(config, loaded_params(args, opened, mesh), mesh, slots=slots,
                          cache_length=cache_length, prefill_chunk=args.prefill_chunk,
                          decode_steps=args.decode_steps, consume_params=True)
    if kept is not None:
        kept.store(engine)
    return engine


def loaded_params(args, opened, mesh):
    """The checkpoint's parameters read onto `mesh` (load_params_on_mesh), with the load line."""
    import time

    import jax

    from runtime.checkpoint.lazy import BYTES_READ
    from runtime.checkpoint.load import load_params_on_mesh
    from runtime.distributed import is_leader
    from runtime.layout import widen_floats_at_load
    from runtime.cpu_kernels import panels_read_2_byte_floats

    config = opened.config
    start = time.perf_counter()
    params = load_params_on_mesh(opened.checkpoint, config, mesh, args.quantize,
                                 progress=sys.stderr.isatty() and is_leader(),
                                 widen_floats_to=widen_floats_at_load(config),
                                 keep_matmul_floats=panels_read_2_byte_floats(config),
                                 int8_group_size=args.int8_group_size, kind=opened.kind,
                                 group_size=args.group_size)
    jax.block_until_ready(params)
    seconds = time.perf_counter() - start
    if BYTES_READ.bytes:  # every process reports what it read itself
        print(f"[load p{jax.process_index()}] read {BYTES_READ.bytes} bytes "
              f"({BYTES_READ.bytes / 1e9:.3f} GB) in "
              f"{seconds:.1f} s ({BYTES_READ.bytes / 1e9 / max(seconds, 1e-9):.2f} GB/s)",
              file=sys.stderr)
    return params
