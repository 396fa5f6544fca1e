"""Hostile results databases and servers (issue 16): a row that nests 200,000 brackets, a 20 MB config value, a device
name with terminal escape sequences, a file holding tables that are not tunebench's, a newer schema, a read-only
file, a --storage that cannot be used, and a PostgreSQL port that accepts and never answers.

What must hold: reading never raises into a user call (the row is skipped with one warning that names the file and
the row, cut short); printing escapes control characters; `tune` refuses before writing anything (the file's bytes
and mtime unchanged, no -wal, -shm or studies file beside it); a silent server fails within the connect timeout,
naming the host. (tests/test_reliability_inputs.py has the earlier hostile rows and unusable files.)"""
import contextlib
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import threading
import time
import warnings

import pytest
import torch

import tunebench
from tunebench import cli, registry
from tunebench.device import DeviceIdentity
from tunebench.runtime import dispatch
from tunebench.shapes import Problem
from tunebench.store import SCHEMA_VERSION, Store, StoreError, TrialResult
from tunebench.text import CLIP_CHARS, MAX_JSON_DEPTH, clip, json_depth, loads_bounded, printable

DEVICE = DeviceIdentity.current(interpret=not torch.cuda.is_available())
DEEP = "[" * 200_000 + "]" * 200_000                    # issue 16's row: a RecursionError on every call
DEEP_SHORT = "[" * 30_000 + "]" * 30_000                # under the size bound: refused for its depth
HUGE = json.dumps({"BLOCK_M": "x" * 20_000_000})
ESCAPES = "\x1b[2J\x1b]0;pwned\x07\x9b31m\u202eGPU"


def problem(n: int) -> Problem:
    return Problem("flash_v2", 1, 2, 1, n, n, 32, "float16", causal=True)


def execute(path, *statements, params=()) -> None:
    with contextlib.closing(sqlite3.connect(path)) as c, c:
        for statement in statements:
            c.execute(statement, params)


def plant(path, configs: dict[int, str], trial_config: str | None = None) -> None:
    """A DEFAULT winner per bucket n, then its config_json replaced by configs[n]; with trial_config, an ok trial
    of bucket 4096 whose config_json is that (the evidence an untuned bucket reads)."""
    module = registry.kernel_module("flash_v2")
    shash = registry.kernel_identity("flash_v2")
    with Store(str(path)) as store:
        for n in configs:
            store.upsert_winner(DEVICE, "flash_v2", shash, problem(n), dict(module.DEFAULT), 1.0, 1.1)
        if trial_config is not None:
            store.record_trial(DEVICE, "flash_v2", shash, problem(4096),
                               TrialResult(0, dict(module.DEFAULT), "ok", median_ms=1.0))
    with contextlib.closing(sqlite3.connect(path)) as c, c:
        for i, text in enumerate(configs.values()):
            c.execute("UPDATE winners SET config_json = ? WHERE id = ?", (text, i + 1))
        if trial_config is not None:
            c.execute("UPDATE trials SET config_json = ?", (trial_config,))


def caught_messages(call) -> tuple[object, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = call()
    return value, [str(w.message) for w in caught]


# -- bounded JSON and escaped text


def test_json_is_bounded_in_size_and_depth_before_parsing():
    assert loads_bounded('{"a": [1, {"b": "[[[[{{{{"}]}') == {"a": [1, {"b": "[[[[{{{{"}]}
    assert json_depth('"[[["') == 0 and json_depth('[["\\"[", []]]') == 3
    nested = "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH
    assert json_depth(nested) == MAX_JSON_DEPTH and loads_bounded(nested) is not None
    start = time.process_time()
    for text, says in ((DEEP, "400000 characters long"), (DEEP_SHORT, "nests 30000 levels"),
                       ("[" * (MAX_JSON_DEPTH + 1), "nests 33 levels"), (HUGE, "20000015 characters long")):
        with pytest.raises(ValueError, match=says):
            loads_bounded(text, "config_json")
    assert time.process_time() - start < 2.0


def test_control_characters_are_escaped_and_long_values_cut():
    shown = printable(ESCAPES + "\nnext line")
    assert shown == "\\x1b[2J\\x1b]0;pwned\\x07\\x9b31m\\u202eGPU\\nnext line"
    assert shown.isprintable() and printable("NVIDIA H200 (9.0) µ") == "NVIDIA H200 (9.0) µ"
    cut = clip("x" * 20_000_000)
    assert cut.startswith("x" * CLIP_CHARS) and len(cut) < CLIP_CHARS + 40 and "20000000 characters" in cut


# -- reading a hostile database never raises into a user call


def test_deep_and_huge_rows_are_skipped_with_one_short_warning_each(user_db, device):
    default = json.dumps(registry.kernel_module("flash_v2").DEFAULT)
    plant(user_db, {64: DEEP, 128: '{"BLOCK_M": ' * 5_000, 256: HUGE, 512: default}, trial_config=DEEP_SHORT)
    execute(user_db, "UPDATE winners SET nonfinite = ? WHERE id = 4", params=("{" * 50_000,))
    q = torch.randn(1, 2, 64, 32, dtype=torch.float16, device=device)
    k = v = torch.randn(1, 1, 64, 32, dtype=torch.float16, device=device)

    def calls():
        return (tunebench.explain(problem(64)), tunebench.explain(problem(2048)),
                tunebench.flash_attention(q, k, v, causal=True), tunebench.tuned_paged_block_size(1, 32, "float16"))
    (why, why_untuned, out, page), messages = caught_messages(calls)
    skipped = [m for m in messages if "skipping" in m]
    assert len([m for m in skipped if "winner #" in m]) == 4, messages
    assert len([m for m in skipped if "a trial of flash_v2" in m]) == 1, messages
    assert all(str(user_db) in m and len(m) < len(str(user_db)) + 2 * CLIP_CHARS + 150 for m in skipped), skipped
    for says in ("400000 characters long", "nests 5000 levels", "20000015 characters", "nests 50000 levels",
                 "nests 30000 levels"):
        assert any(says in m for m in skipped), (says, skipped)
    assert "DEFAULT" in why and "DEFAULT" in why_untuned and page is None
    assert out.shape == q.shape and torch.isfinite(out).all()


def test_any_exception_reading_a_row_skips_only_that_row(tmp_path, monkeypatch):
    from tunebench.store import store as store_module
    path = tmp_path / "r.db"
    plant(path, {64: json.dumps(registry.kernel_module("flash_v2").DEFAULT),
                 128: json.dumps(registry.kernel_module("flash_v2").DEFAULT)})
    real = store_module._checked_winner

    def flaky(winner, *args):
        if winner.id == 1:
            raise MemoryError("a row too large to hold")
        return real(winner, *args)
    monkeypatch.setattr(store_module, "_checked_winner", flaky)
    with Store(str(path), readonly=True) as store:
        found, messages = caught_messages(store.winners)
    assert [w.problem.Nq for w in found] == [128]
    assert messages == [f"tunebench: skipping winner #1 in {path}: cannot be read (MemoryError: a row too large to "
                        f"hold)"]


def test_show_escapes_stored_strings_and_names_the_file_when_reading_fails(tmp_path, capsys, monkeypatch):
    path = tmp_path / "esc.db"
    plant(path, {64: json.dumps(registry.kernel_module("flash_v2").DEFAULT)})
    execute(path, "UPDATE devices SET name = ?, torch = ?", params=(ESCAPES, "2.13\x1b[31m"))
    assert cli.main(["show", "--db", str(path)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "\x9b" not in out and "\u202e" not in out
    assert "\\x1b[2J\\x1b]0;pwned\\x07\\x9b31m\\u202eGPU" in out and "torch 2.13\\x1b[31m" in out
    from sqlalchemy.orm import Session

    def deep(*args, **kwargs):
        raise RecursionError("maximum recursion depth exceeded")
    monkeypatch.setattr(Session, "execute", deep)
    for command in ("show", "report"):
        assert cli.main([command, "--db", str(path)]) == 2
        err = capsys.readouterr().err
        assert str(path) in err and "RecursionError" in err and "Traceback" not in err, err


def test_a_20_mb_config_given_to_check_is_not_echoed_whole(capsys):
    shape = json.dumps(dict(B=1, Hq=2, Hkv=1, Nq=8, Nk=8, D=16))
    assert cli.main(["check", "--kernel", "flash_v2", "--shape", shape, "--config", HUGE]) == 2
    err = capsys.readouterr().err
    assert "--config is not JSON that tunebench reads (--config is 20000015 characters long" in err
    assert len(err) < 3 * CLIP_CHARS + 200 and "Traceback" not in err, err[:1000]


# -- tune writes nothing before every check has passed


def snapshot(folder) -> dict:
    """Every file in the folder: (bytes, mtime_ns)."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


def foreign_file(path):
    execute(path, "CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)", "INSERT INTO users VALUES (1, 'ada')")


def foreign_beside_ours(path):
    Store(str(path)).close()
    execute(path, "PRAGMA journal_mode = DELETE", "CREATE TABLE users (id INTEGER PRIMARY KEY)")


def newer_schema(path):
    Store(str(path)).close()
    execute(path, "PRAGMA journal_mode = DELETE", "UPDATE schema_version SET version = 99")


REFUSED = {"foreign tables": (foreign_file, "holds tables that are not tunebench's ('users')"),
           "foreign beside ours": (foreign_beside_ours, "holds tables that are not tunebench's ('users')"),
           "newer schema": (newer_schema, f"schema version 99, newer than the {SCHEMA_VERSION}")}


@pytest.mark.parametrize("case", list(REFUSED))
def test_tune_refuses_a_file_that_is_not_its_own_without_touching_it(tmp_path, capsys, case):
    make, says = REFUSED[case]
    path = tmp_path / "results.db"
    make(path)
    before = snapshot(tmp_path)
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone() == ("delete",)
    time.sleep(0.01)                                          # an mtime written now would differ
    assert cli.main(["tune", "--interpret", "--suite", "tiny", "--trials", "1", "--db", str(path)]) == 2
    err = capsys.readouterr().err
    assert says in err and str(path) in err and "Traceback" not in err, err
    assert snapshot(tmp_path) == before                       # no WAL switch, no -wal/-shm, no studies file
    with pytest.raises(StoreError, match="not tunebench's|newer than"):
        Store(str(path))                                      # a writable Store refuses it the same way
    assert snapshot(tmp_path) == before


@contextlib.contextmanager
def unwritable(path):
    """The file made read-only: chmod for a user; for root, whom permissions do not stop, the immutable attribute."""
    if os.geteuid() != 0:
        path.chmod(0o444)
        yield
        path.chmod(0o644)
        return
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(path)]).returncode != 0:
        pytest.skip("running as root without chattr +i: a file cannot be made read-only to this process")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def test_tune_refuses_a_read_only_results_file_before_the_first_trial(tmp_path, capsys):
    path = tmp_path / "results.db"
    Store(str(path)).close()
    with unwritable(path):
        before = snapshot(tmp_path)
        start = time.monotonic()
        assert cli.main(["tune", "--interpret", "--suite", "tiny", "--trials", "1", "--db", str(path)]) == 2
        err = capsys.readouterr().err
        assert f"the results database {path} is read-only" in err and "Traceback" not in err, err
        assert snapshot(tmp_path) == before and time.monotonic() - start < 3.0   # no studies file, no -wal/-shm


class SilentServer:
    """A loopback port that accepts connections and never answers (a hung server, a black-holing proxy)."""

    def __init__(self):
        self.socket = socket.create_server(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        self.held: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        with contextlib.suppress(OSError):
            while True:
                self.held.append(self.socket.accept()[0])

    def close(self):
        self.socket.close()
        for s in self.held:
            s.close()


@pytest.fixture
def silent_port():
    pytest.importorskip("psycopg", reason="the PostgreSQL driver tunebench uses (pip install 'tunebench[postgres]')")
    server = SilentServer()
    yield server.port
    server.close()


def closed_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as s:
        return s.getsockname()[1]


def pg(port: int) -> str:
    return f"postgresql+psycopg://tb:secret@127.0.0.1:{port}/tb"


BAD_STORAGE = {
    "mysql without its driver": (lambda port: "mysql://tb:secret@127.0.0.1/tb", "--storage is not a database URL"),
    "refused PostgreSQL": (lambda port: pg(closed_port()), "cannot connect to the database server 127.0.0.1:"),
    "silent PostgreSQL": (pg, "no answer within 2 s (TUNEBENCH_CONNECT_TIMEOUT_S)"),
    "refused journal table": (lambda port: "journal:" + pg(closed_port()),
                              "cannot connect to the database server 127.0.0.1:"),
    "silent journal table": (lambda port: "journal:" + pg(port), "no answer within 2 s (TUNEBENCH_CONNECT_TIMEOUT_S)"),
    "journal table not on PostgreSQL": (lambda port: "journal:sqlite:///{db}", "keeps Optuna's journal in a PostgreSQL"),
    "the --db file": (lambda port: "sqlite:///{db}", "--storage and --db name the same SQLite file"),
}


@pytest.mark.parametrize("case", list(BAD_STORAGE))
def test_a_bad_storage_creates_nothing(tmp_path, capsys, monkeypatch, silent_port, case):
    monkeypatch.setenv("TUNEBENCH_CONNECT_TIMEOUT_S", "2")
    url, says = BAD_STORAGE[case]
    db = tmp_path / "results.db"
    start = time.monotonic()
    code = cli.main(["tune", "--interpret", "--suite", "tiny", "--trials", "1", "--db", str(db),
                     "--storage", url(silent_port).format(db=db)])
    err = capsys.readouterr().err
    assert code == 2 and says in err and "secret" not in err and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == [] and time.monotonic() - start < 15


def test_an_unresponsive_postgresql_fails_within_the_connect_timeout(user_db, monkeypatch, silent_port):
    """The default timeout (10 s): the dispatcher's first call, with TUNEBENCH_DB pointing at a silent server, warns
    naming the host and runs DEFAULT; then `show --db` with the timeout set to 2 s."""
    monkeypatch.setenv("TUNEBENCH_DB", pg(silent_port))
    dispatch.reload()
    start = time.monotonic()
    why, messages = caught_messages(lambda: tunebench.explain(problem(64)))
    took = time.monotonic() - start
    refusal = next(m for m in messages if "ignoring results database" in m)
    assert f"127.0.0.1:{silent_port}" in refusal and "no answer within 10 s" in refusal, refusal
    assert "secret" not in refusal and "DEFAULT" in why and 5 < took < 15, took
    monkeypatch.setenv("TUNEBENCH_CONNECT_TIMEOUT_S", "2")
    start = time.monotonic()
    with pytest.raises(StoreError, match=f"database server 127.0.0.1:{silent_port} .* no answer within 2 s"):
        Store(pg(silent_port), readonly=True)
    assert time.monotonic() - start < 6


@pytest.mark.parametrize("value", ["0", "-1", "nan", "soon"])
def test_the_connect_timeout_must_be_a_positive_number(monkeypatch, value):
    from tunebench.store.engine import connect_timeout_s
    monkeypatch.setenv("TUNEBENCH_CONNECT_TIMEOUT_S", value)
    with pytest.raises(ValueError, match="TUNEBENCH_CONNECT_TIMEOUT_S must be a number of seconds > 0"):
        connect_timeout_s()
