"""Hostile databases and inputs: results databases with rows that must not be trusted, or that cannot be used at all,
go through the dispatcher (TUNEBENCH_DB), which skips or refuses them with a message naming them and falls back,
never crashing; a corrupt file given to the CLI fails naming its path and is left as it was; CLI calls with bad
arguments exit non-zero with a message and write nothing. (tests/test_store.py checks the store's own refusals.)"""
import contextlib
import json
import os
import sqlite3
import warnings

import pytest
import torch

import tunebench
import tunebench.reference as ref
from tunebench import cli, registry
from tunebench.correctness import close_enough
from tunebench.runtime import dispatch, winners
from tunebench.device import DeviceIdentity
from tunebench.shapes import Problem
from tunebench.store import Store
from tunebench.tune.study import all_configs

DEVICE = DeviceIdentity.current(interpret=not torch.cuda.is_available())
QUERIED = (64, 100, 300, 5000, 40_000)


def problem(n: int) -> Problem:
    return Problem("flash_v2", 1, 2, 1, n, n, 32, "float16", causal=True)


def two_configs() -> tuple[dict, dict]:
    """Two configs of SPACE, neither DEFAULT, that keep admits for every problem queried here: the good winner's,
    and the one every hostile row carries (never to be chosen)."""
    module = registry.kernel_module("flash_v2")
    fine = [c for c in all_configs(module.SPACE) if c != module.DEFAULT
            and all(module.keep(c, problem(n)) is None for n in QUERIED)]
    return fine[0], fine[-1]


GOOD, BAD = two_configs()


# One hostile row per bucket of the family that the good winner (Nq 64) is in; three of them are buckets queried
# below, so a row not skipped would be chosen there: (what is wrong, SQL planting it, what the warning says).
HOSTILE = [
    ("unknown kernel", "UPDATE kernels SET name = 'evil_kernel' WHERE source_hash = 'evil'", "unknown kernel"),
    ("config outside SPACE", "UPDATE winners SET config_json = :bad_block WHERE id = :id",
     "BLOCK_M=48 is not in SPACE"),
    ("config with an extra key", "UPDATE winners SET config_json = :extra_key WHERE id = :id", "config outside SPACE"),
    ("config not JSON", "UPDATE winners SET config_json = '{\"BLOCK_M\": ' WHERE id = :id", "malformed row"),
    ("config not an object", "UPDATE winners SET config_json = '[16, 32]' WHERE id = :id", "not a JSON object"),
    ("time not a number", "UPDATE winners SET median_ms = 'fast' WHERE id = :id", "is not a positive time"),
    ("size out of range", "UPDATE problems SET D = 0 WHERE id = (SELECT problem_id FROM winners WHERE id = :id)",
     "D must be >= 1"),
    ("size not a number", "UPDATE problems SET Nq = 'many' WHERE id = (SELECT problem_id FROM winners WHERE id = :id)",
     "problem sizes must be integers"),
]


def plant_hostile_rows(path) -> None:
    store = Store(str(path))
    shash = registry.kernel_identity("flash_v2")
    store.upsert_winner(DEVICE, "flash_v2", shash, problem(64), GOOD, 1.0, 1.2)
    ids = []
    for i, (what, _, _) in enumerate(HOSTILE):
        bucket = problem(128 * 2 ** i)
        store.upsert_winner(DEVICE, "flash_v2", "evil" if what == "unknown kernel" else shash, bucket, BAD, 0.5, 2.0)
        ids.append(len(ids) + 2)
    store.close()
    params = {"bad_block": json.dumps(BAD | {"BLOCK_M": 48}), "extra_key": json.dumps(BAD | {"EVIL": 1})}
    assert GOOD != BAD and 48 not in registry.kernel_module("flash_v2").SPACE["BLOCK_M"]
    with sqlite3.connect(path) as c:
        for (_, sql, _), row_id in zip(HOSTILE, ids):
            c.execute(sql, {**params, "id": row_id})


def test_untrusted_rows_are_skipped_and_dispatch_falls_back(user_db, device):
    plant_hostile_rows(user_db)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        choices = {n: tunebench.explain(problem(n)) for n in QUERIED}
        q = torch.randn(1, 2, 100, 32).half().to(device)
        k, v = torch.randn(1, 1, 100, 32).half().to(device), torch.randn(1, 1, 100, 32).half().to(device)
        out = tunebench.flash_attention(q, k, v, causal=True)  # its own bucket's row is hostile
    messages = "\n".join(str(w.message) for w in caught)
    for what, _, says in HOSTILE:
        assert says in messages, (what, messages)
    assert messages.count("skipping winner") == len(HOSTILE)
    assert all(str(user_db) in str(w.message) for w in caught if "skipping" in str(w.message))
    assert "exact winner for bucket" in choices[64] and f"-> {GOOD}:" in choices[64]
    for n, why in choices.items():
        assert f"-> {BAD}:" not in why, why  # never a hostile row's config
        assert n == 64 or "DEFAULT: no exact winner" in why
    assert close_enough(out, ref.attention(q, k, v, True), ref.attention(q, k, v, True, dtype=q.dtype)).ok
    print(f"hostile rows: {len(HOSTILE)} kinds planted, {len(HOSTILE)} skipped with a warning, dispatch correct")


def execute(path, *statements: str) -> None:
    """Runs and commits the statements, and closes the connection: `with sqlite3.connect()` only commits, and the
    store's WAL mode then leaves the change in the -wal file until the connection is garbage-collected, which could
    rewrite the database file in the middle of a test that checks that reading it changes nothing."""
    with contextlib.closing(sqlite3.connect(path)) as c, c:
        for statement in statements:
            c.execute(statement)


def newer_schema(path):
    Store(str(path)).close()
    execute(path, "UPDATE schema_version SET version = 99")


def schema_not_a_number(path):
    Store(str(path)).close()
    execute(path, "UPDATE schema_version SET version = 'one'")


def date_not_a_date(path):
    store = Store(str(path))
    store.upsert_winner(DEVICE, "flash_v2", registry.kernel_identity("flash_v2"), problem(64), GOOD, 1.0, 1.2)
    store.close()
    execute(path, "UPDATE winners SET updated_at = 'yesterday'")


def corrupt(path):
    path.write_bytes(b"SQLite format 3\x00" + os.urandom(4096))


def foreign_tables(path):
    execute(path, "CREATE TABLE winners (id INTEGER PRIMARY KEY, payload BLOB)",
            "CREATE TABLE schema_version (id INTEGER PRIMARY KEY, version INTEGER, written_by TEXT)",
            "INSERT INTO schema_version VALUES (1, 1, 'not tunebench')")


UNUSABLE = {
    "newer schema version": (newer_schema, "schema version 99"),
    "schema version not a number": (schema_not_a_number, "not a number"),
    "a date that is not one": (date_not_a_date, "cannot be read"),
    "corrupt file": (corrupt, "not a readable SQLite database"),
    "foreign tables": (foreign_tables, "not a tunebench results database"),
    "missing file": (lambda path: None, "no results database at"),
}


@pytest.mark.parametrize("case", list(UNUSABLE))
def test_unusable_databases_are_refused_and_dispatch_runs_default(user_db, case):
    make, says = UNUSABLE[case]
    make(user_db)
    before = user_db.read_bytes() if user_db.exists() else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        why = tunebench.explain(problem(64))
    messages = [str(w.message) for w in caught]
    refusal = next(m for m in messages if "ignoring results database" in m)
    assert says in refusal and str(user_db) in refusal, refusal
    assert "DEFAULT" in why and any("tunebench tune" in m for m in messages)
    assert (user_db.read_bytes() if user_db.exists() else None) == before  # reading it changed nothing


def test_a_database_url_that_cannot_load_is_refused(monkeypatch):
    monkeypatch.setenv("TUNEBENCH_DB", "nosuchdialect://host/db")
    monkeypatch.setattr(winners, "packaged_db_path", lambda: None)
    dispatch.reload()
    try:
        with pytest.warns(UserWarning, match="ignoring results database: cannot use the results database URL "
                                             "nosuchdialect://host/db"):
            assert "DEFAULT" in tunebench.explain(problem(64))
    finally:
        dispatch.reload()


# -- the CLI


@pytest.mark.parametrize("command", [["show"], ["report"], ["tune", "--interpret"]])
def test_a_corrupt_database_given_to_the_cli_fails_naming_it(tmp_path, capsys, command):
    path = tmp_path / "corrupt.db"
    corrupt(path)
    before = path.read_bytes()
    assert cli.main(command + ["--db", str(path)]) != 0
    err = capsys.readouterr().err
    assert str(path) in err and "not a readable SQLite database" in err, err
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["corrupt.db"]


BAD_ARGUMENTS = [
    (["tune", "--interpret", "--trials", "0"], "--trials must be >= 1"),
    (["tune", "--interpret", "--trials", "-1"], "--trials must be >= 1"),
    (["tune", "--interpret", "--trials", "two"], "invalid int value"),
    (["tune", "--interpret", "--timeout", "0"], "--timeout must be"),
    (["tune", "--interpret", "--timeout", "-5"], "--timeout must be"),
    (["tune", "--interpret", "--timeout", "nan"], "--timeout must be"),
    (["tune", "--interpret", "--timeout", "inf"], "--timeout must be"),
    (["tune", "--interpret", "--suite", "nope"], "unknown suite 'nope'"),
    (["tune", "--interpret", "--preset", "nope"], "unknown preset 'nope'"),
    (["tune", "--interpret", "--suite", "tiny", "--preset", "llama-3-8b"], "give one of --suite, --preset"),
    (["tune", "--interpret", "--sampler", "foo"], "invalid choice: 'foo'"),
    (["tune", "--interpret", "--kernel", "foo"], "unknown kernel 'foo'; registered: flash_v2, flash_v1"),
    (["check", "--kernel", "foo"], "unknown kernel 'foo'"),
    (["tune", "--interpret", "--kernel-module", "no_such_package.kernel"], "cannot import its module"),
    (["check", "--kernel-module", "json"], "does not follow the kernel convention"),
    (["check", "--kernel-module", "flash_v2=json"], "the name 'flash_v2' is taken"),
    (["check", "--kernel-module", "a|b=json"], "a kernel name is letters"),
    (["tune", "--interpret", "--workers", "0"], "--workers must be >= 1"),
    (["tune", "--interpret", "--compile-workers", "-1"], "--compile-workers must be >= 0"),
    (["tune", "--interpret", "--storage", "not a url"], "--storage is not a database URL"),
    (["tune", "--interpret", "--storage", "nosuchdialect://host/db"], "--storage is not a database URL"),
    (["tune", "--interpret", "--storage", "sqlite:////nonexistent-folder/studies.db"], "folder that does not exist"),
    (["tune", "--interpret", "--storage", "journal:sqlite:///studies.db"], "keeps Optuna's journal in a PostgreSQL"),
    (["tune", "--interpret", "--storage", "journal:not a url"], "keeps Optuna's journal in a PostgreSQL"),
    (["tune", "--interpret", "--storage", "journal:postgresql+nodriver://h/db"], "--storage is not a database URL"),
    (["kv-size", "--layers", "0", "--kv-heads", "8", "--head-dim", "128", "--context", "4096"], "layers"),
    (["kv-size", "--layers", "32", "--kv-heads", "0", "--head-dim", "128", "--context", "4096"], "kv_heads"),
    (["kv-size", "--layers", "32", "--kv-heads", "8", "--head-dim", "-1", "--context", "4096"], "head_dim"),
    (["kv-size", "--layers", "32", "--kv-heads", "8", "--head-dim", "128", "--context", "0"], "context"),
    (["kv-size", "--layers", "32", "--kv-heads", "8", "--head-dim", "128", "--context", "9", "--batch", "0"], "batch"),
    (["kv-size", "--layers", "32", "--kv-heads", "8", "--head-dim", "128", "--context", "9", "--memory", "-1"],
     "memory"),
    (["kv-size", "--layers", "32", "--kv-heads", "8", "--head-dim", "128", "--context", "9", "--memory", "nan"],
     "memory"),
    (["kv-size", "--layers", "32", "--kv-heads", "8", "--head-dim", "128", "--context", "9", "--memory", "1",
      "--block-size", "0"], "block_size"),
    (["check", "--shape", '{"B": 1}'], "give both"),
    (["check", "--kernel", "flash_v2", "--shape", "not json", "--config", "{}"], "--shape is not JSON"),
    (["check", "--kernel", "flash_v2", "--shape", "[1, 2]", "--config", "{}"], "--shape must be a JSON object"),
    (["check", "--kernel", "flash_v2", "--shape", '{"B": 1, "X": 2}', "--config", "{}"], "unknown fields ['X']"),
    (["check", "--kernel", "flash_v2", "--shape", json.dumps(dict(B=1, Hq=2, Hkv=1, Nq=8, Nk=8, D=16)),
      "--config", "[]"], "--config must be a JSON object"),
    (["check", "--kernel", "flash_v2", "--shape", json.dumps(dict(B="1", Hq=2, Hkv=1, Nq=8, Nk=8, D=16)),
      "--config", "{}"], "--shape field 'B' must be an integer, got '1'"),
    (["check", "--kernel", "flash_v2", "--shape", json.dumps(dict(B=1.5, Hq=2, Hkv=1, Nq=8, Nk=8, D=16)),
      "--config", "{}"], "--shape field 'B' must be an integer, got 1.5"),
    (["check", "--kernel", "flash_v2", "--shape", json.dumps(dict(B=True, Hq=2, Hkv=1, Nq=8, Nk=8, D=16)),
      "--config", "{}"], "--shape field 'B' must be an integer, got True"),
    (["check", "--kernel", "flash_v2", "--shape", json.dumps(dict(B=1, Hq=2, Hkv=1, Nq=8, Nk=8, D=16, causal="no")),
      "--config", "{}"], "--shape field 'causal' must be true or false, got 'no'"),
    (["check", "--kernel", "flash_v2", "--shape", json.dumps(dict(B=1, Hq=2, Hkv=1, Nq=8, Nk=8, D=16)),
      "--config", "{}"], "--config for flash_v2 lacks ['BLOCK_M', 'BLOCK_N', 'USE_TMA', 'num_stages', 'num_warps']; "
                         "flash_v2's SPACE is {'BLOCK_M': [16, 32, 64, 128, 256]"),
    (["check", "--kernel", "flash_v1", "--shape", json.dumps(dict(B=1, Hq=2, Hkv=1, Nq=8, Nk=8, D=16)),
      "--config", json.dumps({"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1, "EVIL": 1})],
     "--config for flash_v1 has unknown keys ['EVIL']"),
    (["check", "--kernel", "flash_v1", "--shape", json.dumps(dict(B=1, Hq=2, Hkv=1, Nq=8, Nk=8, D=16)),
      "--config", json.dumps({"BLOCK_M": 48, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1})],
     "BLOCK_M=48 is not in SPACE"),
    (["check", "--examples", "0"], "--examples must be >= 1"),
    (["check", "--examples", "-1"], "--examples must be >= 1"),
    (["show", "--kernel", "foo"], "invalid choice: 'foo'"),
    (["roofline", "--batch", "0", "--heads", "8", "--seq-q", "128", "--head-dim", "64"], "B must be >= 1"),
]


@pytest.mark.parametrize("argv, says", BAD_ARGUMENTS, ids=[" ".join(a) for a, _ in BAD_ARGUMENTS])
def test_bad_arguments_exit_non_zero_and_write_nothing(tmp_path, monkeypatch, capsys, argv, says):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TUNEBENCH_HOME", str(tmp_path / "home"))
    if argv[0] in ("tune", "show"):
        argv = argv + ["--db", str(tmp_path / "results.db")]
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    assert code not in (0, None) and "error" in err and says in err, (code, err)
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # no database, no studies, no folder

