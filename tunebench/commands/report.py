"""`tunebench report [--db URL] [--out DIR] [--json]`: winners, speedups over DEFAULT, trial outcomes and tuning
time."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from ..report import collect, format_report, plot_speedups, report_record
from ..store import Store
from ..text import print_json
from . import OK

NO_MATPLOTLIB = "no speedup plot: matplotlib is not installed (pip install 'tunebench[plots]')"


def report_command(args) -> int:
    """Prints the report (or, with --json, its record); with --out, also writes report.md and speedups.png there."""
    store = Store(args.db, readonly=True)
    try:
        with store.reading():
            lines, totals = collect(store)
    finally:
        store.close()
    text = format_report(lines, totals, store.where)
    if args.json:
        print_json("report", report_record(lines, totals, store.where))
    else:
        print(text, end="")
    if args.out:
        _write(text, lines, Path(args.out), sys.stderr if args.json else sys.stdout)
    return OK


def _write(text: str, lines, out: Path, stream) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(text)
    if importlib.util.find_spec("matplotlib") is None:
        print(f"wrote {out / 'report.md'}; {NO_MATPLOTLIB}", file=stream)
        return
    png = plot_speedups(lines, out / "speedups.png")
    print(f"wrote {out / 'report.md'}" + (f" and {png}" if png else "; no speedup plot (no speedups stored)"),
          file=stream)
