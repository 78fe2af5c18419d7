"""Run by test_dtype_ladder.py in a subprocess with 8 simulated CPU devices (XLA_FLAGS set before
jax is imported): the ladder's SHARDED_CASES (with an argument, only those whose weight format
starts with it: `sharded_ladder_run.py int4`); prints "N cases passed" last."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402

from test_dtype_ladder import SHARDED_CASES, check_case  # noqa: E402
from runtime.sharding import make_mesh  # noqa: E402


def main():
    assert jax.device_count() == 8, jax.devices()
    cases = [case for case in SHARDED_CASES if case[1].startswith("".join(sys.argv[1:2]))]
    for family, weight_format, layout, dtype, axes in cases:
        check_case(family, weight_format, layout, dtype, make_mesh(axes))
        print(f"passed: {family} {weight_format} {layout} {dtype} {axes}", flush=True)
    print(f"{len(cases)} cases passed")


if __name__ == "__main__":
    main()
