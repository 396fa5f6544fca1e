"""`tunebench show [--db URL] [--kernel NAME] [--json]`: the stored winners, grouped by device.

It lists rows as the store reads them and imports no kernel (nor Triton): whether a winner's config is in its
kernel's SPACE, or stale, is for `tunebench report` and the dispatcher to say.
"""
from __future__ import annotations

from ..report import device_label, winner_record
from ..store import Store, Winner
from ..text import format_config, format_speedup, print_json, table
from . import OK


def show_command(args) -> int:
    store = Store(args.db, readonly=True)
    try:
        with store.reading():
            winners = store.winners(kernel=args.kernel)
    finally:
        store.close()
    if args.json:
        print_json("show", {"db": store.where, "winners": [winner_record(w) for w in _sorted(winners)]})
        return OK
    if not winners:
        print(f"no winners in {store.where}")
        return OK
    for device, rows in _by_device(winners).items():
        print(device)
        print(table(["kernel", "problem (bucket)", "config", "median ms", "vs DEFAULT"],
                    [[w.kernel, w.problem.label(), format_config(w.config), f"{w.median_ms:.4f}",
                      format_speedup(w.speedup_vs_default)] for w in rows], indent="  "))
        print()
    return OK


def _sorted(winners: list[Winner]) -> list[Winner]:
    return sorted(winners, key=lambda w: (w.device, w.torch, w.triton, w.kernel, w.problem.label()))


def _by_device(winners: list[Winner]) -> dict[str, list[Winner]]:
    groups: dict[str, list[Winner]] = {}
    for w in _sorted(winners):
        groups.setdefault(device_label(w), []).append(w)
    return groups
