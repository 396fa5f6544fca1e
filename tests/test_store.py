"""The results store: round trips, the faster-wins upsert (raced by processes), explicit non-finite floats, hostile
databases (newer schema, corrupt file, unknown kernels, configs outside SPACE) and `tunebench show`."""
import json
import math
import multiprocessing
import pathlib
import random
import sqlite3
import subprocess
import sys
import traceback
from datetime import datetime, timedelta, timezone

import pytest

from tunebench import cli, registry
from tunebench.device import DeviceIdentity
from tunebench.shapes import Problem, bucket, suite
from tunebench.store import STATUSES, Store, StoreError, StoreWarning, TrialResult, default_db_path, resolve_url
from tunebench.store.models import KernelModel, SchemaVersionModel

H100 = DeviceIdentity("NVIDIA H100 80GB HBM3", "9.0", 132, 85_000_000_000, "550.54.15", "2.13.0", "3.6.0", True)
H200 = DeviceIdentity("NVIDIA H200", "9.0", 132, 150_000_000_000, "550.54.15", "2.13.0", "3.6.0", True)
TINY = {p.kernel: p for p in reversed(suite("tiny"))}  # the first tiny problem of each kernel


def default(kernel: str) -> dict:
    return dict(registry.kernel_module(kernel).DEFAULT)


def other_config(kernel: str) -> dict:
    """A config from SPACE that differs from DEFAULT in its first key."""
    space, config = registry.kernel_module(kernel).SPACE, default(kernel)
    first = next(iter(space))
    config[first] = next(v for v in space[first] if v != config[first])
    return config


@pytest.fixture
def db(tmp_path):
    return tmp_path / "nested" / "results.db"


def test_trials_round_trip_and_counts(db):
    store = Store(str(db))
    problem = TINY["flash_v2"]
    start = datetime(2025, 1, 2, 3, 4, 5, 678_000, tzinfo=timezone.utc)
    trials = [TrialResult(i, other_config("flash_v2"), status, 0.5 + i, 0.4 + i, 0.6 + i, 10.0 * i, 0.25,
                          f"trial {i}", start, start + timedelta(seconds=i)) for i, status in enumerate(STATUSES)]
    for t in trials:
        store.record_trial(H100, "flash_v2", "hash1", problem, t)
    store.record_trial(H200, "flash_v2", "hash1", problem, TrialResult(0, default("flash_v2"), "ok", 9.0))
    assert store.trials(H100, "flash_v2", "hash1", problem) == trials
    retried = TrialResult(6, default("flash_v2"), "ok", 1.0, message="retried after a crash")
    store.record_trial(H100, "flash_v2", "hash1", problem, retried)
    assert store.trials(H100)[-1] == retried and len(store.trials(H100)) == len(STATUSES)
    counts = dict.fromkeys(STATUSES, 1) | {"crashed": 0, "ok": 2}
    assert store.trial_counts(H100, "flash_v2", "hash1", problem) == {s: n for s, n in counts.items() if n}
    assert store.trial_counts(device_name=H200.name) == {"ok": 1}
    assert store.trial_counts(kernel="flash_v1") == {} and store.trial_counts(H100, source_hash="other") == {}


def test_session_rolls_back_and_raises_store_error(db):
    store = Store(str(db))
    with pytest.raises(StoreError, match="CHECK constraint failed"):
        with store.session() as session:
            session.add(KernelModel(name="flash_v2", source_hash="rolled back"))
            session.add(SchemaVersionModel(id=2, version=1, written_by="a second version row"))
    with pytest.raises(KeyError):
        with store.session() as session:
            session.add(KernelModel(name="flash_v2", source_hash="rolled back too"))
            session.flush()
            raise KeyError("not a database error")
    with store.session(read_only=True) as session:
        assert session.query(KernelModel).count() == 0


def test_problems_are_stored_bucketed(db):
    store = Store(str(db))
    odd = Problem("flash_v2", 3, 2, 1, 50, 100, 32, "float16", causal=True)
    store.upsert_winner(H100, "flash_v2", "h", odd, default("flash_v2"), 1.0, 1.2)
    (winner,) = store.winners()
    assert winner.problem == bucket(odd) == Problem("flash_v2", 4, 2, 1, 64, 128, 32, "float16", causal=True)
    store.record_trial(H100, "flash_v2", "h", odd, TrialResult(0, default("flash_v2"), "ok", 1.0))
    assert store.trial_counts(problem=bucket(odd)) == {"ok": 1}


def test_upsert_keeps_the_faster_winner(db):
    store = Store(str(db))
    problem, slow, fast = TINY["flash_v1"], default("flash_v1"), other_config("flash_v1")
    assert store.upsert_winner(H100, "flash_v1", "h", problem, slow, 2.0, 1.0) is True
    assert store.upsert_winner(H100, "flash_v1", "h", problem, fast, 1.5, 1.33, 1.1) is True
    assert store.upsert_winner(H100, "flash_v1", "h", problem, slow, 3.0, 1.0) is False
    assert store.upsert_winner(H100, "flash_v1", "h", problem, slow, 1.5, 1.0) is False  # a tie keeps the first
    (winner,) = store.winners()
    assert (winner.config, winner.median_ms, winner.speedup_vs_default, winner.speedup_vs_peer) == \
           (fast, 1.5, 1.33, 1.1)
    # Each device, kernel hash and bucket has its own winner.
    assert store.upsert_winner(H200, "flash_v1", "h", problem, slow, 9.0, None) is True
    assert store.upsert_winner(H100, "flash_v1", "h2", problem, slow, 9.0, None) is True
    assert len(store.winners()) == 3 and len(store.winners(device_name=H200.name)) == 1
    with pytest.raises(ValueError, match="median_ms"):
        store.upsert_winner(H100, "flash_v1", "h", problem, slow, math.nan, 1.0)


def test_replace_stores_a_slower_winner_and_set_speedup_vs_peer_only_touches_its_config(db):
    store = Store(str(db))
    problem, slow, fast = TINY["flash_v1"], default("flash_v1"), other_config("flash_v1")
    assert store.upsert_winner(H100, "flash_v1", "h", problem, fast, 1.0, 1.5, 1.2) is True
    assert store.upsert_winner(H100, "flash_v1", "h", problem, slow, 3.0, 1.0, None, replace=True) is True
    (winner,) = store.winners()
    assert (winner.config, winner.median_ms, winner.speedup_vs_peer) == (slow, 3.0, None)
    # The head-to-head figure is set on the stored winner only while it is still that config; its time stays.
    assert store.set_speedup_vs_peer(H100, "flash_v1", "h", problem, fast, 0.9) is False
    assert store.set_speedup_vs_peer(H100, "flash_v1", "h", problem, slow, 0.8) is True
    (winner,) = store.winners()
    assert (winner.config, winner.median_ms, winner.speedup_vs_peer) == (slow, 3.0, 0.8)
    assert store.set_speedup_vs_peer(H200, "flash_v1", "h", problem, slow, 0.8) is False     # no winner there


def _race_upserts(url: str, config: dict, times: list[float], barrier, results) -> None:
    try:
        barrier.wait()
        store = Store(url)  # every process opens (and may create) the database at the same moment
        for ms in times:
            store.upsert_winner(H100, "flash_v2", "h", TINY["flash_v2"], config, ms, 1.0)
        results.put("ok")
    except BaseException:
        results.put(traceback.format_exc())


def test_concurrent_upserts_end_on_the_global_minimum(db):
    # forkserver, not spawn: `import tunebench` imports torch, and 8 spawned imports of it cost ~20 s on 2 cores. The
    # children are still fresh processes, each opening its own connection to a database none of them has created.
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["tunebench.store", "pytest"])
    rng = random.Random(7)
    times = [[rng.uniform(1.0, 100.0) for _ in range(20)] for _ in range(8)]
    barrier, results = ctx.Barrier(len(times)), ctx.Queue()
    args = (resolve_url(str(db)), default("flash_v2"))
    workers = [ctx.Process(target=_race_upserts, args=args + (t, barrier, results)) for t in times]
    for w in workers:
        w.start()
    outcomes = [results.get(timeout=120) for _ in workers]
    for w in workers:
        w.join(timeout=30)
    assert outcomes == ["ok"] * len(workers), "\n".join(o for o in outcomes if o != "ok")  # no "database is locked"
    (winner,) = Store(str(db), readonly=True).winners()
    assert winner.median_ms == min(map(min, times))


def test_non_finite_floats_are_stored_explicitly(db):
    store = Store(str(db))
    problem = TINY["paged_attention"]
    trial = TrialResult(0, default("paged_attention"), "incorrect", math.inf, -math.inf, 2.0, math.nan, math.inf)
    store.record_trial(H100, "paged_attention", "h", problem, trial)
    store.upsert_winner(H100, "paged_attention", "h", problem, default("paged_attention"), 1.0, math.inf, math.nan)
    (back,) = store.trials()
    assert (back.median_ms, back.p20_ms, back.p80_ms, back.err_ratio) == (math.inf, -math.inf, 2.0, math.inf)
    assert math.isnan(back.throughput)
    (winner,) = store.winners()
    assert winner.speedup_vs_default == math.inf and math.isnan(winner.speedup_vs_peer)
    raw = sqlite3.connect(db).execute("SELECT median_ms, throughput, nonfinite FROM trials").fetchone()
    assert raw[:2] == (None, None)
    assert json.loads(raw[2]) == {"median_ms": "inf", "p20_ms": "-inf", "throughput": "nan", "err_ratio": "inf"}


@pytest.mark.parametrize("readonly", [False, True])
def test_newer_schema_version_is_refused(db, readonly):
    Store(str(db)).close()
    with sqlite3.connect(db) as c:
        c.execute("UPDATE schema_version SET version = 99")
    with pytest.raises(StoreError, match=r"schema version 99.*upgrade tunebench") as e:
        Store(str(db), readonly=readonly)
    assert str(db) in str(e.value)


@pytest.mark.parametrize("readonly", [False, True])
def test_corrupt_file_is_refused_naming_the_path(tmp_path, readonly):
    path = tmp_path / "results.db"
    junk = b"definitely not an SQLite database\n" * 200
    path.write_bytes(junk)
    with pytest.raises(StoreError, match="not a readable SQLite database") as e:
        Store(str(path), readonly=readonly)
    assert str(path) in str(e.value)
    assert path.read_bytes() == junk


def test_readonly_creates_nothing_and_writes_nothing(tmp_path):
    missing = tmp_path / "absent" / "results.db"
    with pytest.raises(StoreError, match="no results database at") as e:
        Store(str(missing), readonly=True)
    assert str(missing) in str(e.value) and not missing.parent.exists()
    Store(str(tmp_path / "r.db")).close()
    store = Store(str(tmp_path / "r.db"), readonly=True)
    with pytest.raises(StoreError, match="read-only"):
        store.upsert_winner(H100, "flash_v2", "h", TINY["flash_v2"], default("flash_v2"), 1.0, 1.0)


def test_a_foreign_trials_table_is_refused(tmp_path):
    path = tmp_path / "optuna.db"
    with sqlite3.connect(path) as c:  # Optuna's RDB storage has its own `trials` table
        c.execute("CREATE TABLE trials (trial_id INTEGER PRIMARY KEY, study_id INTEGER)")
    with pytest.raises(StoreError, match="table 'trials' without columns"):
        Store(str(path))


def test_untrusted_rows_are_skipped_with_a_warning(db):
    store = Store(str(db))
    for kernel in ("flash_v2", "flash_v1", "paged_attention"):
        store.upsert_winner(H100, kernel, "h", TINY[kernel], default(kernel), 1.0, 1.5)
    store.upsert_winner(H100, "flash_v2", "to-rename", TINY["flash_v2"], default("flash_v2"), 1.0, 1.5)
    with sqlite3.connect(db) as c:
        c.execute("UPDATE kernels SET name = 'evil_kernel' WHERE source_hash = 'to-rename'")
        bad_block = json.dumps(default("flash_v1") | {"BLOCK_M": 48})
        c.execute("UPDATE winners SET config_json = ? WHERE kernel_id = "
                  "(SELECT id FROM kernels WHERE name = 'flash_v1')", (bad_block,))
        bool_as_int = json.dumps(default("flash_v2") | {"USE_TMA": 0})  # 0 == False, but not the type SPACE has
        c.execute("UPDATE winners SET config_json = ? WHERE kernel_id = "
                  "(SELECT id FROM kernels WHERE name = 'flash_v2')", (bool_as_int,))
    with pytest.warns(StoreWarning) as caught:
        winners = Store(str(db), readonly=True).winners(check_config=registry.checked_config)
    assert [w.kernel for w in winners] == ["paged_attention"]
    messages = "\n".join(str(w.message) for w in caught)
    assert "'evil_kernel'" in messages and "unknown kernel" in messages
    assert "BLOCK_M=48 is not in SPACE" in messages and "USE_TMA=0 has the wrong type" in messages
    # Without the kernels, the store lists what it can check alone: SPACE is its caller's to check.
    with pytest.warns(StoreWarning, match="unknown kernel"):
        listed = Store(str(db), readonly=True).winners()
    assert sorted(w.kernel for w in listed) == ["flash_v1", "flash_v2", "paged_attention"]


@pytest.mark.parametrize("config_json", ['{"BLOCK_M": NaN}', '{"BLOCK_M": [16]}', '{"BLOCK_M": {"a": 1}}'])
def test_configs_that_are_not_json_scalars_are_skipped_without_the_kernels(db, config_json):
    store = Store(str(db))
    store.upsert_winner(H100, "flash_v2", "h", TINY["flash_v2"], default("flash_v2"), 1.0, 1.5)
    with sqlite3.connect(db) as c:
        c.execute("UPDATE winners SET config_json = ?", (config_json,))
    with pytest.warns(StoreWarning, match="config values must be finite numbers, booleans or strings"):
        assert Store(str(db), readonly=True).winners() == []


def test_show_imports_no_kernel_nor_triton(db):
    """`tunebench show` lists rows without loading the kernels: Triton's import is the slow part of a CLI call."""
    store = Store(str(db))
    store.upsert_winner(H100, "flash_v2", "h", TINY["flash_v2"], other_config("flash_v2"), 0.125, 1.5)
    store.close()
    code = ("import sys; from tunebench import cli; rc = cli.main(['show', '--db', sys.argv[1]]); "
            "print(rc, sorted(m for m in sys.modules if m.split('.')[0] == 'triton' or "
            "m.startswith('tunebench.kernels') or m.startswith('torch')))")
    out = subprocess.run([sys.executable, "-c", code, str(db)], capture_output=True, text=True, check=True).stdout
    assert H100.name in out and TINY["flash_v2"].label() in out
    assert out.strip().splitlines()[-1] == "0 []"


def test_show_prints_winners_by_device(db, capsys):
    store = Store(str(db))
    store.upsert_winner(H100, "flash_v2", "h", TINY["flash_v2"], other_config("flash_v2"), 0.125, 1.5)
    store.upsert_winner(H200, "paged_attention", "h", TINY["paged_attention"], default("paged_attention"), 0.25,
                        None)
    assert cli.main(["show", "--db", str(db)]) == 0
    out = capsys.readouterr().out
    assert out.index(H100.name) < out.index(TINY["flash_v2"].label()) < out.index(H200.name)
    assert "BLOCK_M=16 BLOCK_N=64" in out and "0.1250" in out and "1.50x" in out
    assert bucket(TINY["paged_attention"]).label() in out and "page16" in out and "BLOCK_N=32" in out
    assert cli.main(["show", "--db", str(db), "--kernel", "flash_v1"]) == 0
    assert capsys.readouterr().out.strip() == f"no winners in {db}"


def test_the_shipped_winners_are_listed_and_none_is_stale(capsys):
    """results.db ships H100 and H200 winners: `tunebench show` lists them, and each one's kernel identity is the
    kernel's current one, so the dispatcher uses them (an edit to a jit body or SPACE must re-tune them)."""
    from tunebench.report import collect
    shipped = pathlib.Path(registry.__file__).parent / "results.db"
    assert cli.main(["show", "--db", str(shipped)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("NVIDIA H100") and "\nNVIDIA H200 " in out
    with Store(str(shipped), readonly=True) as store:
        lines, _ = collect(store)
    assert {x.winner.device for x in lines} == {"NVIDIA H100 80GB HBM3", "NVIDIA H200"}
    assert [x.winner.problem.label() for x in lines if x.stale] == []


def test_show_on_a_missing_database_fails_naming_it(tmp_path, capsys):
    assert cli.main(["show", "--db", str(tmp_path / "none.db")]) == 2
    assert str(tmp_path / "none.db") in capsys.readouterr().err


def test_database_locations(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEBENCH_HOME", str(tmp_path / "home"))
    assert default_db_path() == tmp_path / "home" / "results.db"
    monkeypatch.delenv("TUNEBENCH_HOME")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_db_path() == tmp_path / "xdg" / "tunebench" / "results.db"
    assert resolve_url(None) == f"sqlite:///{tmp_path}/xdg/tunebench/results.db"
    monkeypatch.chdir(tmp_path)
    assert resolve_url("rel.db") == f"sqlite:///{tmp_path}/rel.db"
    assert resolve_url("postgresql://u@host/db") == "postgresql://u@host/db"
    Store().close()  # the default database and its folder are created on first use
    assert (tmp_path / "xdg" / "tunebench" / "results.db").is_file()


def test_device_identity(monkeypatch):
    cpu = DeviceIdentity.current(interpret=True)
    assert (cpu.name, cpu.capability, cpu.is_speed_measurement) == ("cpu-interpreter", "cpu", False)
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="no GPU: use --interpret or run on a GPU"):
        DeviceIdentity.current()
