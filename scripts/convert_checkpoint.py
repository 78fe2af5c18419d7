#!/usr/bin/env python3
"""Convert any supported checkpoint to the runtime's native format, optionally quantised once.

  python scripts/convert_checkpoint.py --checkpoint HF_DIR --output OUT_DIR --quantize int8
  python run.py --checkpoint OUT_DIR ...     # loads the int8 weights as stored, no re-quantising

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
from runtime.cli import group_size  # noqa: E402

# copied beside the converted weights: the tokenizer, and the sampling defaults and end ids
SIDE_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "generation_config.json")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--config", default=None,
                   help="preset or file (default: the checkpoint's own config, else grok-1)")
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--quantize", choices=QUANTIZE_CHOICES, default=None)
    p.add_argument("--int8-group-size", type=group_size, default=DEFAULT_INT8_GROUP_SIZE,
                   metavar="N",
                   help="with --quantize int8: groups of at most N input rows per scale; 0 = one "
                        f"scale per output channel (default {DEFAULT_INT8_GROUP_SIZE})")
    args = p.parse_args(argv)
    try:
        if args.output.exists() and any(args.output.iterdir()):
            raise RuntimeInputError(f"--output {args.output} exists and is not empty")
        config = load_config(args.config) if args.config else \
            default_config(args.checkpoint) or load_config("grok-1")
        params = load_params(args.checkpoint, config, args.quantize, progress=sys.stderr.isatty(),
                             int8_group_size=args.int8_group_size)
        layout = {"int8_group_size": str(args.int8_group_size)} if args.quantize else {}
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
