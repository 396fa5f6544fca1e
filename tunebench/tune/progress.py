"""What a run shows: a line per problem on stderr as it is tuned (a tqdm bar on a terminal), and the summary at the
end (a table, or with `tune --json` a record)."""
from __future__ import annotations

import dataclasses
import statistics
import time
from typing import TYPE_CHECKING

from ..shapes import Problem
from ..text import format_config, format_counts, format_speedup, table
from .protocol import Outcome

if TYPE_CHECKING:
    from .confirm import ProblemResult


class Progress:
    """A line per problem on stderr: a tqdm bar on a terminal (tqdm comes with Optuna), one line per finished trial in
    a log."""

    def __init__(self, stream, index: int, total: int, problem: Problem, stage: str = ""):
        """``stage``: which pass of the run this is, before the count ("exchange": [exchange 2/5])."""
        self.stream, self.index, self.total, self.problem = stream, index, total, problem
        self.tag = f"[{stage + ' ' if stage else ''}{index + 1}/{total}]"
        self.tty = hasattr(stream, "isatty") and stream.isatty()
        self.budget = 0
        self.start = time.monotonic()
        self.late = False   # the next problem has started (Search.hand_off): trials say which problem they are of
        self.bar = None

    def begin(self, budget: int, evaluated: int, counts: dict) -> None:
        self.budget, self.start = budget, time.monotonic()
        resumed = f", {evaluated} done before" if evaluated else ""
        self._print(f"{self.tag} {self.problem.label()}: {budget} trials{resumed}")
        if self.tty:
            from tqdm import tqdm
            self.bar = tqdm(total=budget, initial=min(evaluated, budget), file=self.stream, leave=False,
                            desc=self.tag, unit="trial", dynamic_ncols=True)

    def trial(self, number: int, config: dict, outcome: Outcome, evaluated: int, counts: dict,
              best_ms: float | None) -> None:
        if self.bar is not None:
            if not self.late:  # the next problem's bar is the one to watch now
                self.bar.n = min(evaluated, self.budget)
                best = f", best {best_ms:.4f} ms" if best_ms is not None else ""
                self.bar.set_postfix_str(format_counts(counts) + best)     # refreshes the bar
            return
        ms = f" {outcome.median_ms:.4f} ms" if outcome.median_ms is not None else ""
        why = f" ({outcome.message[:120]})" if outcome.message and outcome.status != "ok" else ""
        of = f" of {self.tag}" if self.late else ""
        self._print(f"  #{number}{of} {outcome.status}{ms} {format_config(config)}{why}")

    def end(self, result: ProblemResult) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        done = (f"{format_config(result.config)} {result.median_ms:.4f} ms"
                if result.config is not None else "no winner")
        note = f" ({result.note})" if result.note else ""
        self._print(f"{self.tag} {self.problem.label()}: {done}{note} "
                    f"[{time.monotonic() - self.start:.0f} s]")

    def _print(self, line: str) -> None:
        if self.tty:                        # above the bars, which tqdm redraws below it
            from tqdm import tqdm
            tqdm.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)


def summary(results: list[ProblemResult], wall_s: float, interpret: bool) -> str:
    """The end-of-run table: each problem's winner, time, speedup over DEFAULT and trial counts, then notes."""
    header = ["problem", "winner config", "ms", "vs DEFAULT", "trials (distinct configs)", "wall s"]
    rows = [[r.problem.label(), format_config(r.config),
             "-" if r.median_ms is None else f"{r.median_ms:.4f}", format_speedup(r.speedup),
             format_counts(r.counts), f"{r.wall_s:.0f}"] for r in results]
    lines = table(header, rows, right=(2, 3, 5)).splitlines()
    notes = [f"  {r.problem.label()}: {r.note}" for r in results if r.note]
    speedups = [r.speedup for r in results if r.speedup is not None]
    tail = [f"{len(results)} problems in {wall_s:.0f} s"]
    if speedups:
        tail.append(f"speedup over DEFAULT: median {statistics.median(speedups):.2f}x, "
                    f"range {min(speedups):.2f}x-{max(speedups):.2f}x")
    if interpret:
        tail.append("cpu-interpreter: times are wall clock under the Triton interpreter, not a speed measurement")
    return "\n".join(lines + (["notes:"] + notes if notes else []) + tail)



def summary_record(results: list[ProblemResult], wall_s: float, interpret: bool) -> dict:
    """`tune --json`: the summary as plain values; "missing" counts the problems with no winner (exit code 1)."""
    return {"wall_s": wall_s, "interpret": interpret,
            "problems": [{"problem": dataclasses.asdict(r.problem), "bucket": r.problem.label(), "config": r.config,
                          "median_ms": r.median_ms, "default_ms": r.default_ms, "speedup": r.speedup,
                          "counts": r.counts, "wall_s": r.wall_s, "written": r.written, "note": r.note,
                          "speedup_vs_peer": r.speedup_vs_peer}
                         for r in results],
            "missing": sum(r.config is None for r in results)}
