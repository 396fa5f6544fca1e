"""Schema 1 -> 2 (issue 19: problems are keyed by the paged cache's page size too): a version-1 file is migrated when
opened writable, read through a migrated in-memory copy when opened read-only, and its paged rows (tuned while the
page was a search dimension) are kept but never read."""
import sqlite3

import pytest

from tunebench.shapes import Problem
from tunebench.store import SCHEMA_VERSION, Store, TrialResult

from test_store import H100

DENSE = Problem("flash_v2", 2, 8, 2, 64, 64, 32, "float16", True)
PAGED = Problem("paged_attention", 2, 8, 2, 1, 64, 32, "float16", page=16)
V2_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1, "USE_TMA": False}
PAGED_CONFIG = {"BLOCK_N": 16, "PARTITION": 0, "num_warps": 2, "num_stages": 1}
# The problems table as schema 1 created it (tunebench at 46fac31); the other tables did not change.
V1_PROBLEMS = ('CREATE TABLE problems (id INTEGER NOT NULL, kernel VARCHAR(256) NOT NULL, "B" INTEGER NOT NULL, '
               '"Hq" INTEGER NOT NULL, "Hkv" INTEGER NOT NULL, "Nq" INTEGER NOT NULL, "Nk" INTEGER NOT NULL, '
               '"D" INTEGER NOT NULL, dtype VARCHAR(256) NOT NULL, causal BOOLEAN NOT NULL, PRIMARY KEY (id), '
               'UNIQUE (kernel, "B", "Hq", "Hkv", "Nq", "Nk", "D", dtype, causal))')
COLUMNS = 'id, kernel, "B", "Hq", "Hkv", "Nq", "Nk", "D", dtype, causal'


def version_1_file(path) -> None:
    """A database as schema 1 left it: a dense and a paged winner, each with a trial."""
    with Store(str(path)) as store:
        for problem, config in ((DENSE, V2_CONFIG), (PAGED, PAGED_CONFIG)):
            store.upsert_winner(H100, problem.kernel, "h", problem, config, 0.5, 1.2)
            store.record_trial(H100, problem.kernel, "h", problem, TrialResult(0, config, "ok", median_ms=0.5))
    c = sqlite3.connect(path, isolation_level=None)
    c.executescript(f"PRAGMA foreign_keys = OFF; BEGIN; CREATE TABLE p1 AS SELECT {COLUMNS} FROM problems; "
                    f"DROP TABLE problems; {V1_PROBLEMS}; INSERT INTO problems SELECT * FROM p1; DROP TABLE p1; "
                    f"UPDATE schema_version SET version = 1; COMMIT;")
    c.close()


def test_a_version_1_file_is_read_read_only_without_changing_it(tmp_path):
    path = tmp_path / "v1.db"
    version_1_file(path)
    before = path.read_bytes()
    with Store(str(path), readonly=True) as store:
        assert [w.problem.kernel for w in store.winners()] == ["flash_v2"]        # the paged row: page unknown
        assert [k for k, *_ in store.timings(H100.name)] == ["flash_v2"]
        assert store.trials(kernel="flash_v2")[0].config == V2_CONFIG
    assert path.read_bytes() == before


def test_a_version_1_file_opened_writable_is_migrated_in_place(tmp_path):
    path = tmp_path / "v1.db"
    version_1_file(path)
    with Store(str(path)) as store:
        (dense,) = store.winners()
        assert dense.problem == Problem("flash_v2", 2, 8, 2, 64, 64, 32, "float16", True) and dense.config == V2_CONFIG
        for page in (16, 32):                 # the same bucket at two page sizes: two rows, no unique-key clash
            assert store.upsert_winner(H100, "paged_attention", "h2", Problem(
                "paged_attention", 2, 8, 2, 1, 64, 32, "float16", page=page), PAGED_CONFIG, 0.25, 1.0)
        assert sorted(w.problem.page for w in store.winners(kernel="paged_attention")) == [16, 32]
        assert store.trial_counts(kernel="flash_v2") == {"ok": 1}
    c = sqlite3.connect(path)
    assert c.execute("SELECT version FROM schema_version").fetchone() == (SCHEMA_VERSION,)
    assert sorted(c.execute("SELECT kernel, page FROM problems").fetchall(), key=str) == sorted(
        [("flash_v2", 0), ("paged_attention", None), ("paged_attention", 16), ("paged_attention", 32)], key=str)
    assert c.execute("PRAGMA foreign_key_check").fetchall() == [] and c.execute("SELECT count(*) FROM trials").fetchone() == (2,)
    with Store(str(path)) as again:                   # a second open finds version 2 and migrates nothing
        assert len(again.winners()) == 3


@pytest.mark.parametrize("readonly", [True, False])
def test_a_version_0_file_is_refused(tmp_path, readonly):
    from tunebench.store import StoreError
    path = tmp_path / "v0.db"
    version_1_file(path)
    sqlite3.connect(path).execute("UPDATE schema_version SET version = 0").connection.commit()
    with pytest.raises(StoreError, match="schema version 0"):
        Store(str(path), readonly=readonly)
