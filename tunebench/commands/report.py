"""`tunebench report [--db URL] [--out DIR]`: winners, speedups over DEFAULT, trial outcomes and tuning time."""
from __future__ import annotations

from pathlib import Path

from ..report import collect, format_report, plot_speedups
from ..store import Store


def report_command(args) -> int:
    """Prints the report; with --out, also writes report.md and speedups.png there."""
    store = Store(args.db, readonly=True)
    try:
        lines, totals = collect(store)
    finally:
        store.close()
    text = format_report(lines, totals, store.where)
    print(text, end="")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.md").write_text(text)
        png = plot_speedups(lines, out / "speedups.png")
        print(f"wrote {out / 'report.md'}" + (f" and {png}" if png else "; no speedup plot (matplotlib is not "
                                                                           "installed, or no speedups stored)"))
    return 0
