"""bench/prune_stale.py: which kernel identities it calls stale, device kernels (flash_v3) included on a machine where
they cannot run, and what --apply removes."""
import sqlite3

from bench_scripts import load
from tunebench.registry import kernel_identity

script = load("prune_stale")


def _db(path, kernels):
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE kernels (id INTEGER PRIMARY KEY, name TEXT, source_hash TEXT)")
    for table in ("winners", "trials"):
        conn.execute(f"CREATE TABLE {table} (id INTEGER PRIMARY KEY, kernel_id INTEGER)")
    for i, (name, shash) in enumerate(kernels, start=1):
        conn.execute("INSERT INTO kernels VALUES (?, ?, ?)", (i, name, shash))
        conn.executemany("INSERT INTO winners (kernel_id) VALUES (?)", [(i,)] * 2)
        conn.executemany("INSERT INTO trials (kernel_id) VALUES (?)", [(i,)] * 3)
    conn.commit()
    return conn


KERNELS = [("flash_v3", kernel_identity("flash_v3")), ("flash_v3", "0" * 16),
           ("paged_attention", kernel_identity("paged_attention")), ("paged_attention", "1" * 16),
           ("someone_elses", "2" * 16)]


def test_stale_covers_device_kernels_and_spares_current_and_unknown(tmp_path):
    conn = _db(tmp_path / "r.db", KERNELS)
    assert script.stale_kernels(conn) == [(2, "flash_v3", "0" * 16), (4, "paged_attention", "1" * 16)]


def test_apply_removes_only_stale_rows(tmp_path, monkeypatch, capsys):
    path = tmp_path / "r.db"
    _db(path, KERNELS).close()
    monkeypatch.setattr("sys.argv", ["prune_stale.py", str(path), "--apply"])
    assert script.main() == 0
    conn = sqlite3.connect(path)
    assert [r[0] for r in conn.execute("SELECT id FROM kernels ORDER BY id")] == [1, 3, 5]
    for table, per_kernel in (("winners", 2), ("trials", 3)):
        kept = conn.execute(f"SELECT kernel_id, COUNT(*) FROM {table} GROUP BY kernel_id ORDER BY kernel_id")
        assert kept.fetchall() == [(1, per_kernel), (3, per_kernel), (5, per_kernel)]
    assert "flash_v3 identity 0000000000000000: 2 winners, 3 trials removed" in capsys.readouterr().out
