#!/usr/bin/env python3
"""Sample from a language-model checkpoint: flags -> config, mesh, checkpoint, generate.

  python run.py                                   # the demo checkpoint in checkpoints/demo
  python run.py --checkpoint DIR --prompt "..."   # DIR holds ckpt-0/ and tokenizer.model
  python run.py --checkpoint DIR --config FILE --prompt-ids "5 6 7" --temperature 0 --json
  python run.py batch --input prompts.jsonl --output results.jsonl [--checkpoint DIR ...]
  python run.py serve [--port 8000] [--checkpoint DIR ...]   # OpenAI-compatible HTTP API

The entry point only: the flags are defined in runtime/cli.py, and runtime/app.py acts on them.
"""

from __future__ import annotations

import sys


def main(argv=None) -> int:
    from runtime.app import main as run_app
    from runtime.cli import parse_args
    return run_app(parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
