"""The problems a command runs: a suite, a model preset or a recording, filtered by kernel and dtype (tune and bench).

It lives apart from shapes.py because a kernel of the user's own may declare its problems (kernel_protocol SHAPES),
which needs the registry, and the registry's convention check needs shapes.py.
"""
from __future__ import annotations

import dataclasses
import sys

from ..registry import REPLACES, declared_problems, kernel_module, registered
from ..shapes import SUITES, Problem, bucket_key, preset_problems, suite


def select_problems(kernels: list[str] | None, suite_name: str | None, preset: str | None, interpret: bool = False,
                    record: list[Problem] | None = None, *, dtypes: list[str] | None = None,
                    default_suite: str = "default", per_bucket: bool = True) -> list[Problem]:
    """The problems a command runs: a suite (`default_suite`, or 'tiny' under --interpret), a model preset (fp16
    under --interpret, else bf16), or the buckets of a recording (runtime/record.py, most-called first), filtered by
    kernel and dtype. per_bucket (tune): one problem per bucket, as the store keeps one winner per bucket, and with no
    kernels named, the problems a kernel that replaces another where it runs (flash_v3 on Hopper) can take, as its
    own, so that variant="auto" has both kernels' winners to compare; else (bench) every distinct shape."""
    if sum(x is not None for x in (suite_name, preset, record)) > 1:
        raise ValueError("give one of --suite, --preset and --from-record")
    if record is not None:
        problems = list(record)
    elif preset:
        problems = preset_problems(preset, dtype="float16" if interpret else "bfloat16")
    else:
        name = suite_name or ("tiny" if interpret else default_suite)
        declared = declared_problems(kernels, name)
        problems = (suite(name) if name in SUITES or not declared else []) + declared
    if kernels:
        problems += replacement_problems(kernels, problems)
        problems = [p for p in problems if p.kernel in kernels]
    elif per_bucket:    # tune with no --kernel: each bucket for every kernel that can run it here (flash_v3 on Hopper)
        problems += replacement_problems([name for name in REPLACES if registered(name)], problems)
    if dtypes:
        problems = [p for p in problems if p.dtype in dtypes]
    if interpret:
        dropped = [p for p in problems if p.dtype == "bfloat16"]
        if dropped:
            print(f"tunebench: skipping {len(dropped)} bfloat16 problems: the Triton interpreter computes bf16 "
                  f"wrongly (tune them on a GPU)", file=sys.stderr)
        problems = [p for p in problems if p.dtype != "bfloat16"]
    if not problems:
        raise ValueError("no problems left after the --kernel / --dtype filters: check them against the suite or "
                         "preset")
    if not per_bucket:
        return list(dict.fromkeys(problems))
    by_bucket: dict[str, Problem] = {}
    for p in problems:
        by_bucket.setdefault(bucket_key(p), p)
    if len(by_bucket) < len(problems):
        print(f"tunebench: {len(problems) - len(by_bucket)} problems share a bucket with an earlier one and are "
              f"skipped (one winner is stored per bucket)", file=sys.stderr)
    return list(by_bucket.values())



def replacement_problems(kernels: list[str], problems: list[Problem]) -> list[Problem]:
    """For each named kernel that replaces another (registry.REPLACES), the other's problems it can run (its keep()
    admits its DEFAULT there), as its own."""
    out = []
    for name in kernels:
        if name not in REPLACES:
            continue
        module = kernel_module(name)
        twins = (dataclasses.replace(p, kernel=name) for p in problems if p.kernel == REPLACES[name])
        out += [p for p in twins if module.keep(dict(module.DEFAULT), p) is None]
    return out
