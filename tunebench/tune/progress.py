"""What a run shows: a line per problem on stderr as it is tuned, and the summary table at the end."""
from __future__ import annotations

import statistics
import time
from typing import TYPE_CHECKING

from ..shapes import Problem
from .protocol import Outcome

if TYPE_CHECKING:
    from .confirm import ProblemResult


class Progress:
    """A line per problem on stderr: redrawn in place on a terminal, one line per finished trial in a log."""

    def __init__(self, stream, index: int, total: int, problem: Problem):
        self.stream, self.index, self.total, self.problem = stream, index, total, problem
        self.tty = hasattr(stream, "isatty") and stream.isatty()
        self.budget = 0
        self.start = time.monotonic()
        self.late = False   # the next problem has started (Search.hand_off): trials say which problem they are of

    def begin(self, budget: int, evaluated: int, counts: dict) -> None:
        self.budget, self.start = budget, time.monotonic()
        resumed = f", {evaluated} done before" if evaluated else ""
        self._print(f"[{self.index + 1}/{self.total}] {self.problem.label()}: {budget} trials{resumed}")

    def trial(self, number: int, config: dict, outcome: Outcome, evaluated: int, counts: dict,
              best_ms: float | None) -> None:
        if self.tty:
            if not self.late:  # the line being redrawn is the next problem's now
                self._redraw(evaluated, counts, best_ms)
            return
        ms = f" {outcome.median_ms:.4f} ms" if outcome.median_ms is not None else ""
        why = f" ({outcome.message[:120]})" if outcome.message and outcome.status != "ok" else ""
        of = f" of [{self.index + 1}/{self.total}]" if self.late else ""
        self._print(f"  #{number}{of} {outcome.status}{ms} {format_config(config)}{why}")

    def end(self, result: ProblemResult) -> None:
        if self.tty:
            self.stream.write("\r\x1b[K")
        done = (f"{format_config(result.config)} {result.median_ms:.4f} ms"
                if result.config is not None else "no winner")
        note = f" ({result.note})" if result.note else ""
        self._print(f"[{self.index + 1}/{self.total}] {self.problem.label()}: {done}{note} "
                    f"[{time.monotonic() - self.start:.0f} s]")

    def _redraw(self, evaluated: int, counts: dict, best_ms: float | None) -> None:
        width = 20
        filled = width * min(evaluated, self.budget) // max(self.budget, 1)
        best = f" best {best_ms:.4f} ms" if best_ms is not None else ""
        line = (f"[{self.index + 1}/{self.total}] {self.problem.label()} [{'#' * filled}{'.' * (width - filled)}] "
                f"{evaluated}/{self.budget} {format_counts(counts)}{best} {time.monotonic() - self.start:.0f}s")
        self.stream.write("\r\x1b[K" + line)
        self.stream.flush()

    def _print(self, line: str) -> None:
        print(line, file=self.stream, flush=True)


def format_config(config: dict | None) -> str:
    return "-" if config is None else " ".join(f"{k}={v}" for k, v in config.items())


def format_counts(counts: dict) -> str:
    from ..store import STATUSES
    return " ".join(f"{s} {counts[s]}" for s in STATUSES if counts.get(s))


def summary(results: list[ProblemResult], wall_s: float, interpret: bool) -> str:
    header = ["problem", "winner config", "ms", "vs DEFAULT", "trials (distinct configs)", "wall s"]
    rows = [[r.problem.label(), format_config(r.config),
             "-" if r.median_ms is None else f"{r.median_ms:.4f}",
             "-" if r.speedup is None else f"{r.speedup:.2f}x",
             format_counts(r.counts) or "-", f"{r.wall_s:.0f}"] for r in results]
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header] + rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    notes = [f"  {r.problem.label()}: {r.note}" for r in results if r.note]
    speedups = [r.speedup for r in results if r.speedup is not None]
    tail = [f"{len(results)} problems in {wall_s:.0f} s"]
    if speedups:
        tail.append(f"speedup over DEFAULT: median {statistics.median(speedups):.2f}x, "
                    f"range {min(speedups):.2f}x-{max(speedups):.2f}x")
    if interpret:
        tail.append("cpu-interpreter: times are wall clock under the Triton interpreter, not a speed measurement")
    return "\n".join(lines + (["notes:"] + notes if notes else []) + tail)

