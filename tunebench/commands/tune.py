"""`tunebench tune`: the problems the arguments select, tuned, and the summary printed."""
from __future__ import annotations

import sys
import time

from ..registry import register_modules, require_kernels
from ..shapes import select_problems
from ..tune.confirm import ProblemResult
from ..tune.options import TuneOptions
from ..tune.progress import summary
from ..tune.run import tune


def tune_command(args) -> int:
    register_modules(args.kernel_module)
    require_kernels(args.kernel)
    options = TuneOptions.from_args(args)
    recorded = None
    if args.from_record:
        from ..registry import KERNELS
        from ..runtime.record import load
        recorded = [problem for problem, _ in load(args.from_record, KERNELS)]   # RecordError: nothing is tuned
    problems = select_problems(args.kernel, args.suite, args.preset, args.interpret, recorded)
    results: list[ProblemResult] = []
    start = time.monotonic()
    try:
        tune(problems, options, results=results)
    finally:
        if results:
            print(summary(results, time.monotonic() - start, options.interpret))
    missing = [r for r in results if r.config is None]
    if missing:
        print(f"tunebench tune: {len(missing)} of {len(results)} problems have no winner (no config passed)",
              file=sys.stderr)
        return 1
    return 0
