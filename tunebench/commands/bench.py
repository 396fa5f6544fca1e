"""`tunebench bench`: selects problems and providers, measures the ceilings, then each problem in turn, writing the
outputs after every problem so that a cut-off run keeps what it measured."""
from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

from ..bench import ragged
from ..bench.measure import (FAILED, STICKY_CUDA_ERRORS, do_bench_timer, environment, graph_replay_timer,
                             measure_ceilings, run_problem)
from ..bench.plots import plot_roofline, plot_throughput
from ..bench.providers import select_providers
from ..bench.tables import format_ceilings, format_table, rows, summary, write_outputs
from ..shapes import PAGED_KERNELS, Problem
from ..shapes import PAGED_PREFILL_KERNELS
from .problems import select_problems

DEFAULT_SUITE = "headline"


def bench_problems(suite_name: str | None, preset: str | None, kernels: list[str] | None,
                   dtypes: list[str] | None = None) -> list[Problem]:
    """The suite's (or preset's) problems, filtered by kernel and dtype (commands/problems.py). Dense problems that
    differ only in kernel name are one prefill problem (every prefill provider runs on it). The headline suite also
    gets the bench's ragged decode batch (bench/ragged.py), after the uniform decode rows, under the same filters."""
    problems = select_problems(kernels, suite_name, preset, dtypes=dtypes, default_suite=DEFAULT_SUITE,
                               per_bucket=False)
    problems = [p for p in problems if p.kernel not in PAGED_PREFILL_KERNELS]     # no bench provider runs it yet
    if preset is None and (suite_name or DEFAULT_SUITE) == "headline":
        problems += [p for p in ragged.headline()
                     if (not kernels or p.kernel in kernels) and (not dtypes or p.dtype in dtypes)]
    return list(dict.fromkeys(p if p.kernel in PAGED_KERNELS else dataclasses.replace(p, kernel="flash_v2")
                              for p in problems))


def bench_command(args) -> int:
    for name in ("rounds", "rep_ms", "warmup_ms"):
        if not getattr(args, name) > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    problems = bench_problems(args.suite, args.preset, args.kernel, args.dtype)
    providers = select_providers(args.provider)
    import torch
    if not torch.cuda.is_available():
        raise RuntimeError("`tunebench bench` needs a CUDA GPU: it times kernels, and the Triton interpreter's times "
                           "say nothing about a GPU. Use `tunebench roofline` for the analysis without one.")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = environment()
    timer = do_bench_timer(args.warmup_ms, args.rep_ms)
    graph_timer = graph_replay_timer(args.rep_ms)
    _log(f"tunebench bench on {meta.get('device')} (torch {meta.get('torch')}, triton {meta.get('triton')}): "
         f"{len(problems)} problems, writing to {out_dir}")
    ceilings = measure_ceilings({p.dtype for p in problems}, timer=timer, copy_timer=graph_timer)
    print(format_ceilings(ceilings), flush=True)
    started = time.perf_counter()
    graph_phases = ("decode", "prefill") if args.graph_prefill else ("decode",)
    measurements, sticky = _measure_all(problems, providers, (timer, graph_timer), ceilings, meta, out_dir,
                                        args.rounds, graph_phases)
    _log(f"{len(measurements)} measurements in {time.perf_counter() - started:.0f} s")
    _finish(rows(measurements, ceilings), ceilings, out_dir)
    if sticky is not None:
        print(f"\nstopped early: {sticky.provider} left the CUDA context unusable ({sticky.note}); every later "
              f"launch in this process would fail. Rerun leaving it out (--provider ...).", file=sys.stderr)
        return 1
    return 0


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _measure_all(problems, providers, timers, ceilings, meta, out_dir: Path, rounds: int, graph_phases: tuple):
    """(measurements, the measurement that left the CUDA context unusable or None): problems in turn, each one's
    table printed and every output rewritten after it, stopping at a sticky CUDA error. timers: (launch by launch,
    graph replay); rounds: interleaved timing rounds per problem; graph_phases: the phases also graph-timed."""
    timer, graph_timer = timers
    measurements = []
    for i, problem in enumerate(problems, 1):
        t0 = time.perf_counter()
        _log(f"[{i}/{len(problems)}] {problem.label()}")
        measured = run_problem(problem, providers, timer=timer, graph_timer=graph_timer, log=_log, rounds=rounds,
                               graph_phases=graph_phases)
        measurements += measured
        _log(f"  ({time.perf_counter() - t0:.0f} s)")
        print("\n" + format_table(rows(measured, ceilings)), flush=True)
        write_outputs(measurements, ceilings, meta, out_dir)     # after every problem: a cut-off run keeps them
        sticky = next((m for m in measured if m.status == FAILED and any(
            s in m.note for s in STICKY_CUDA_ERRORS)), None)
        if sticky is not None:
            return measurements, sticky
    return measurements, None


def _finish(all_rows: list[dict], ceilings, out_dir: Path) -> None:
    """The plots, the list of what was written, and the summary of the goal ratios."""
    plots = plot_throughput(all_rows, out_dir)
    roof = plot_roofline(all_rows, ceilings, out_dir)
    if roof is not None:
        plots.append(roof)
    print(f"\nwrote {out_dir / 'bench.csv'}, {out_dir / 'bench.json'}, {out_dir / 'bench.md'}"
          + (f" and {len(plots)} plots" if plots
             else "; no plots (matplotlib is not installed: pip install 'tunebench[plots]')"))
    print("\n".join(["", "summary:"] + summary(all_rows)))
