#!/usr/bin/env python3
"""Convert any supported checkpoint to the runtime's native format, optionally quantised once.

  python scripts/convert_checkpoint.py --checkpoint HF_DIR --output OUT_DIR --quantize int8
  python scripts/convert_checkpoint.py --checkpoint HF_DIR --output OUT_DIR --quantize int4 \
      --group-size 32
  python run.py --checkpoint OUT_DIR ...     # loads the int8 / int4 weights as stored

The output folder holds params.safetensors, config.yaml and the source's tokenizer files.
Parameters are read one at a time (host memory holds about one parameter and the output).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runtime.checkpoint.load import QUANTIZE_CHOICES, default_config, load_params  # noqa: E402
from runtime.checkpoint.native import write_native  # noqa: E402
from runtime.config import DEFAULT_INT8_GROUP_SIZE, load_config, save_config  # noqa: E402
from runtime.errors import RuntimeInputError  # noqa: E402
from runtime.cli import INT4_DEFAULT_GROUP_SIZE, group_size, int4_group_size  # noqa: E402

# copied beside the converted weights: the tokenizer, and the sampling defaults and end ids
SIDE_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "generation_config.json")


def _config(args):
    """--config, else as run.py: config.yaml beside the checkpoint, else its own, else grok-1."""
    if args.config:
        return load_config(args.config)
    beside = args.checkpoint / "config.yaml"
    if args.checkpoint.is_dir() and beside.is_file():
        return load_config(beside)
    return default_config(args.checkpoint) or load_config("grok-1")


def _layout(args) -> dict[str, str]:
    """The quantisation settings, for the record in the file's metadata (the scales' shapes
    carry the layout; int4 keeps the tied table in int8, grouped by --int8-group-size)."""
    if args.quantize is None:
        return {}
    layout = {"quantize": args.quantize, "int8_group_size": str(args.int8_group_size)}
    if args.quantize == "int4":
        layout["int4_group_size"] = str(args.group_size)
    return layout


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--config", default=None,
                   help="preset or file (default: config.yaml beside the checkpoint, else the "
                        "checkpoint's own config, else grok-1)")
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--quantize", choices=QUANTIZE_CHOICES, default=None)
    p.add_argument("--int8-group-size", type=group_size, default=DEFAULT_INT8_GROUP_SIZE,
                   metavar="N",
                   help="with --quantize int8: groups of at most N input rows per scale; 0 = one "
                        f"scale per output channel (default {DEFAULT_INT8_GROUP_SIZE})")
    p.add_argument("--group-size", type=int4_group_size, default=INT4_DEFAULT_GROUP_SIZE,
                   metavar="N",
                   help="with --quantize int4: groups of at most N input rows per f16 scale, N "
                        f"even (default {INT4_DEFAULT_GROUP_SIZE})")
    args = p.parse_args(argv)
    try:
        if args.output.exists() and any(args.output.iterdir()):
            raise RuntimeInputError(f"--output {args.output} exists and is not empty")
        config = _config(args)
        params = load_params(args.checkpoint, config, args.quantize, progress=sys.stderr.isatty(),
                             int8_group_size=args.int8_group_size, group_size=args.group_size)
        layout = _layout(args)
        path = write_native(params, args.output, config, layout)
        save_config(config, args.output / "config.yaml")
        for name in SIDE_FILES:
            for folder in (args.checkpoint, args.checkpoint.parent):
                if (folder / name).is_file():
                    shutil.copy2(folder / name, args.output / name)
                    break
    except RuntimeInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
