"""`tunebench show [--db URL] [--kernel NAME]`: the stored winners, grouped by device.

It lists rows as the store reads them and imports no kernel (nor Triton): whether a winner's config is in its
kernel's SPACE, or stale, is for `tunebench report` and the dispatcher to say.
"""
from __future__ import annotations

from ..report import device_label, format_config, format_speedup
from ..store import Store, Winner


def show_command(args) -> int:
    store = Store(args.db, readonly=True)
    try:
        winners = store.winners(kernel=args.kernel)
    finally:
        store.close()
    if not winners:
        print(f"no winners in {store.where}")
        return 0
    for device, rows in _by_device(winners).items():
        print(device)
        print(_table(["kernel", "problem (bucket)", "config", "median ms", "vs DEFAULT"],
                     [[w.kernel, w.problem.label(), format_config(w.config), f"{w.median_ms:.4f}",
                       format_speedup(w.speedup_vs_default)] for w in rows]))
        print()
    return 0


def _by_device(winners: list[Winner]) -> dict[str, list[Winner]]:
    groups: dict[str, list[Winner]] = {}
    for w in sorted(winners, key=lambda w: (w.device, w.torch, w.triton, w.kernel, w.problem.label())):
        groups.setdefault(device_label(w), []).append(w)
    return groups


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header] + rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join("  " + line for line in lines)
