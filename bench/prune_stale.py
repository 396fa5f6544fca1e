"""Removes from a results database the winners and trials of kernel identities that are no longer the code's
(registry.kernel_identity), so that a shipped results.db holds no stale rows: the dispatcher ignores them anyway,
and `tunebench show` lists them as stale.

    python3 bench/prune_stale.py results.db            # prints what it would remove
    python3 bench/prune_stale.py results.db --apply    # removes it (then VACUUMs)
"""
from __future__ import annotations

import argparse
import sqlite3


def stale_kernels(conn) -> list[tuple[int, str, str]]:
    from tunebench.registry import DEVICE_KERNELS, kernel_identity, known_kernels
    # Device kernels too (flash_v3): where they cannot run (this CPU) they are not registered, yet their identity is
    # the code's as everywhere, and their stale rows ship like any other's.
    known = set(known_kernels()) | set(DEVICE_KERNELS)
    rows = conn.execute("SELECT id, name, source_hash FROM kernels").fetchall()
    return [(i, name, h) for i, name, h in rows if name in known and h != kernel_identity(name)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("db", help="an SQLite results database file")
    parser.add_argument("--apply", action="store_true", help="remove the rows (default: only print them)")
    args = parser.parse_args()
    conn = sqlite3.connect(args.db)
    with conn:
        for kid, name, shash in stale_kernels(conn):
            counts = {t: conn.execute(f"SELECT COUNT(*) FROM {t} WHERE kernel_id = ?", (kid,)).fetchone()[0]
                      for t in ("winners", "trials")}
            print(f"{name} identity {shash}: {counts['winners']} winners, {counts['trials']} trials "
                  f"{'removed' if args.apply else 'stale (--apply removes them)'}")
            if args.apply:
                for table in ("winners", "trials"):
                    conn.execute(f"DELETE FROM {table} WHERE kernel_id = ?", (kid,))
                conn.execute("DELETE FROM kernels WHERE id = ?", (kid,))
    if args.apply:
        conn.execute("VACUUM")
    conn.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
