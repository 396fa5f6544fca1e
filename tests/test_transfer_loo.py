"""bench/transfer_loo.py's --dispatch check on the interpreter: what the dispatcher runs and what variant="auto" runs,
each timed against DEFAULT in the same rounds. The times are the GPU's to give; here the rows' plumbing is checked."""
import pytest

from bench_scripts import load
from tunebench import cli
from tunebench.runtime import dispatch
from tunebench.shapes import suite

script = load("transfer_loo")
pytestmark = pytest.mark.interpreter


@pytest.fixture
def tuned_tiny(tmp_path, monkeypatch):
    db = str(tmp_path / "results.db")
    assert cli.main(["tune", "--interpret", "--suite", "tiny", "--trials", "2", "--db", db]) == 0
    monkeypatch.setenv("TUNEBENCH_DB", db)          # restored after the test; dispatch_check sets it
    yield db
    dispatch.reload()


def test_auto_is_timed_beside_flash_v2_shapes_only(tuned_tiny):
    rows = script.dispatch_check(tuned_tiny, "tiny", rounds=1, interpret=True)
    assert [r["shape"] for r in rows] == [p.label() for p in suite("tiny") if p.dtype != "bfloat16"]
    for row in rows:
        assert row["chosen_ms"] > 0 and row["default_ms"] > 0
        if row["shape"].startswith("flash_v2"):
            # No flash_v3 in the interpreter: auto runs flash_v2's dispatched config, timed once for both columns.
            assert row["auto_kernel"] == "flash_v2" and row["auto_ms"] == row["chosen_ms"]
            assert row["auto_vs_default"] == row["default_ms"] / row["auto_ms"] and "flash_v3" in row["auto_why"]
        else:
            assert row["auto_kernel"] == row["auto_ms"] == row["auto_vs_default"] == ""


def test_auto_runs_the_kernel_auto_kernel_picks(tuned_tiny, monkeypatch):
    # flash_v1 (it takes GQA too) stands in for a replacing kernel: its own dispatched config is timed.
    monkeypatch.setattr(dispatch, "auto_kernel", lambda q, k, v, causal: ("flash_v1", "picked for the test"))
    rows = [r for r in script.dispatch_check(tuned_tiny, "tiny", rounds=1, interpret=True)
            if r["shape"].startswith("flash_v2")]
    assert rows and all(r["auto_kernel"] == "flash_v1" and r["auto_why"] == "picked for the test" for r in rows)
    assert all(r["auto_ms"] > 0 and r["auto_ms"] != r["chosen_ms"] for r in rows)


def test_paged_decode_is_not_timed_beside_other_kernels():
    dense, paged = next(p for p in suite("tiny") if not p.paged), next(p for p in suite("tiny") if p.paged)
    with pytest.raises(ValueError, match="timed differently"):
        script.timed_runs([(dense, {}), (paged, {})], rounds=1, interpret=True)
