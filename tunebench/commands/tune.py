"""`tunebench tune`: the problems the arguments select, tuned, and the summary printed (a table, or with --json one
record on stdout; the per-problem progress goes to stderr either way)."""
from __future__ import annotations

import sys
import time

from ..registry import register_modules, require_kernels
from .problems import select_problems
from ..text import print_json
from ..tune.confirm import ProblemResult
from ..tune.options import TuneOptions
from ..tune.progress import summary, summary_record
from ..tune.run import tune
from . import FAILED, OK


def tune_command(args) -> int:
    register_modules(args.kernel_module)
    require_kernels(args.kernel)
    options = TuneOptions.from_args(args)
    recorded = None
    if args.from_record:
        from ..registry import known_kernels
        from ..runtime.record import load
        recorded = [problem for problem, _ in load(args.from_record, known_kernels())]   # RecordError: nothing is tuned
    problems = select_problems(args.kernel, args.suite, args.preset, args.interpret, recorded,
                               dtypes=args.dtype)
    results: list[ProblemResult] = []
    start = time.monotonic()
    try:
        tune(problems, options, results=results)
    finally:
        if results:
            _print_summary(results, time.monotonic() - start, options.interpret, args.json)
    missing = [r for r in results if r.config is None]
    if missing:
        print(f"tunebench tune: {len(missing)} of {len(results)} problems have no winner (no config passed)",
              file=sys.stderr)
        return FAILED
    return OK


def _print_summary(results: list[ProblemResult], wall_s: float, interpret: bool, as_json: bool) -> None:
    if as_json:
        print_json("tune", summary_record(results, wall_s, interpret))
    else:
        print(summary(results, wall_s, interpret))
