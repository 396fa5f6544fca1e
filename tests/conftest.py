"""Chooses the Hypothesis profile and, without a GPU, the Triton interpreter (it must be set before any kernel is
imported, because @triton.jit reads TRITON_INTERPRET when it decorates). Also the fixtures several files share: a
PostgreSQL server and a database per test (test_postgres.py, test_fleet_sim.py)."""
import os
import pathlib
import subprocess
import sys

import pytest
import torch

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import HealthCheck, Phase, settings  # noqa: E402

settings.register_profile(
    "cpu", max_examples=12, derandomize=True, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
# On a GPU each kernel's property test is split into SHARDS items of 200 / SHARDS examples, so that pytest-xdist
# (`-n 8`) compiles their configs on several CPU cores at once; 200 examples per kernel in all.
SHARDS = int(os.environ.get("TUNEBENCH_SHARDS", "8" if HAS_GPU else "1"))
settings.register_profile(
    "gpu", max_examples=max(1, 200 // SHARDS), derandomize=False, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
# A time-boxed device call that must name failures: the gpu profile without shrinking (a failing example is reported
# as drawn; shrinking compiles and runs many more configs, minutes on a GPU).
settings.register_profile("gpu-triage", settings.get_profile("gpu"),
                          phases=[Phase.explicit, Phase.reuse, Phase.generate])
PROFILE = os.environ.get("TUNEBENCH_PROFILE", "gpu" if HAS_GPU else "cpu")
settings.load_profile(PROFILE)

DEVICE = "cuda" if HAS_GPU else "cpu"


def _interpreter_broken() -> str | None:
    """Why the Triton interpreter cannot run here, or None. Triton 3.6's interpreter breaks under numpy >= 2.4
    (scalars arrive as 1-element arrays); GPU images ship numpy 2.5, so there the CPU gate's interpreter tests skip."""
    import numpy
    import triton
    np_ver = tuple(int(x) for x in numpy.__version__.split(".")[:2])
    tr_ver = tuple(int(x) for x in triton.__version__.split(".")[:2])
    if np_ver >= (2, 4) and tr_ver < (3, 9):
        return (f"the Triton {triton.__version__} interpreter breaks under numpy {numpy.__version__} (needs < 2.4); "
                f"the CPU gate (ci/constraints-cpu.txt) runs this test")
    return None


def pytest_collection_modifyitems(config, items):
    broken = _interpreter_broken()
    for item in items:
        if "gpu" in item.keywords and not HAS_GPU:
            item.add_marker(pytest.mark.skip(
                reason="needs a CUDA GPU: run `bash ci/test.sh` on a GPU machine (adds -m gpu)"))
        if "interpreter" in item.keywords and "gpu" not in item.keywords and broken:   # gpu tests run compiled
            item.add_marker(pytest.mark.skip(reason=broken))


def pytest_runtest_logreport(report):
    """With $TUNEBENCH_FAILURE_LOG=FILE, each failure's report is appended to FILE as it happens (under pytest-xdist,
    by the worker process that ran the test; the controller's copy, which xdist marks with `node`, is skipped).
    pytest prints them only once the session ends, and a device call cut by its time limit ends none: three H100
    calls on 2026-12-06 came back with dots and no message."""
    if report.failed and getattr(report, "node", None) is None:
        _log_failure(report.nodeid, report.when, report.longreprtext[-6000:])


def _log_failure(nodeid: str, when: str, text: str) -> None:
    path = os.environ.get("TUNEBENCH_FAILURE_LOG")
    if path:
        with open(path, "a") as f:
            f.write(f"=== {nodeid} ({when})\n{text}\n")


# A CUDA error of these kinds leaves the process's CUDA context unusable: every later GPU call in it fails too.
_STICKY_CUDA_ERRORS = ("illegal memory access", "device-side assert", "misaligned address", "unspecified launch failure",
                       "illegal instruction")


def pytest_runtest_teardown(item, nextitem):
    """On a GPU, after each test: a sticky CUDA error (one that poisons the context) ends this process, naming the
    test that left it, rather than failing every later test it runs. Under pytest-xdist the worker is replaced and
    the test reported as crashing it. The H100 run of 2026-12-06 failed tests of several files in the same workers
    after a paged prefill test failed in each, and passed them run alone."""
    if not HAS_GPU or not torch.cuda.is_initialized():
        return
    try:
        torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001 - only the sticky kinds below end the process
        if any(kind in str(e) for kind in _STICKY_CUDA_ERRORS):
            message = f"{item.nodeid} left a sticky CUDA error; this test process exits: {e}"
            _log_failure(item.nodeid, "teardown", message)
            print(message, file=sys.stderr, flush=True)
            os._exit(70)
        raise


@pytest.fixture(scope="session", autouse=True)
def bounds_checked():
    """Under the interpreter every kernel's loads and stores must address elements of its tensor arguments
    (tunebench.bounds): the interpreter itself reads stray host memory silently, where a GPU faults or reads a
    neighbour's data."""
    from tunebench.bounds import checked_if_interpreted
    with checked_if_interpreted():
        yield


# Session-scoped: @given tests use it, and Hypothesis rejects function-scoped fixtures (it never changes anyway).
@pytest.fixture(scope="session")
def device():
    return DEVICE


@pytest.fixture
def user_db(tmp_path, monkeypatch):
    """TUNEBENCH_DB set to a file under tmp_path, the packaged database out of the way; the dispatcher reloads."""
    from tunebench.runtime import dispatch, winners
    path = tmp_path / "user.db"
    monkeypatch.setenv("TUNEBENCH_DB", str(path))
    monkeypatch.setattr(winners, "packaged_db_path", lambda: None)
    dispatch.reload()
    yield path
    dispatch.reload()


# -- a PostgreSQL server, and a database per test
# The server: $TUNEBENCH_PG_URL if set (its user needs CREATEDB: each test gets a database of its own), else
# ci/postgres.sh starts one on loopback for the session, installing Debian's postgresql if it is missing. Where that
# cannot be done the tests skip, saying why; under CI (CI=true) they fail instead.

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _unavailable(reason: str):
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI must run the PostgreSQL tests, but: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def pg_server():
    try:
        import psycopg  # noqa: F401
    except ImportError:
        _unavailable("the psycopg driver is not installed (pip install -e '.[test]')")
    if os.environ.get("TUNEBENCH_PG_URL"):
        yield os.environ["TUNEBENCH_PG_URL"]
        return
    started = subprocess.run(["bash", str(ROOT / "ci" / "postgres.sh"), "start"], capture_output=True, text=True,
                             timeout=600)
    if started.returncode == 3:
        _unavailable(started.stderr.strip().splitlines()[-1])
    assert started.returncode == 0, f"ci/postgres.sh start failed:\n{started.stderr}"
    exports = dict(line.removeprefix("export ").split("=", 1) for line in started.stdout.splitlines()
                   if line.startswith("export "))
    try:
        yield exports["TUNEBENCH_PG_URL"]
    finally:
        subprocess.run(["bash", str(ROOT / "ci" / "postgres.sh"), "stop", exports["TUNEBENCH_PG_DATA"]], timeout=120)


@pytest.fixture
def pg_url(pg_server):
    """An empty database of the test's own on the server (dropped after it)."""
    from tunebench.tune.simulate import scratch_database
    with scratch_database(pg_server) as url:
        yield url


@pytest.fixture(params=["rdb", "journal"])
def pg_storage(pg_url, request):
    """Where the test's studies go in its database: Optuna's own tables (the URL itself), or Optuna's journal in a
    table (`--storage journal:URL`, tunebench.tune.journal_sql)."""
    from tunebench.tune.study import SQL_JOURNAL
    return pg_url if request.param == "rdb" else SQL_JOURNAL + pg_url
