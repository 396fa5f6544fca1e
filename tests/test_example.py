"""The end-to-end decode loop (examples/generate.py): paged generation through tunebench equals a dense SDPA
reference token for token, with the prompt's blocks shared across samples."""
import importlib.util
import pathlib
import sys

import pytest

_spec = importlib.util.spec_from_file_location(
    "generate", pathlib.Path(__file__).resolve().parents[1] / "examples" / "generate.py")
generate = sys.modules["generate"] = importlib.util.module_from_spec(_spec)   # dataclasses look it up
_spec.loader.exec_module(generate)


def _check(r, n):
    assert r["tokens"] == r["expected"]
    assert len({tuple(t) for t in r["tokens"]}) == n           # the samples diverged: copy-on-write ran
    s = r["stats"]
    assert s.saved_blocks > 0 and s.used_blocks < s.unshared_blocks


def test_small_model_on_this_device(device):
    _check(generate.run(generate.SMALL, prompt_len=37, n=4, steps=6, device=device, num_blocks=64), 4)


def test_fp8_cache_matches_the_reference_on_the_same_fp8_values(device):
    """--kv-dtype fp8: the paged run on an e4m3 cache equals the dense reference over the same quantised values, and
    the agreement with the unquantised cache's run is counted."""
    r = generate.run(generate.SMALL, prompt_len=37, n=2, steps=3, device=device, num_blocks=64, kv_dtype="fp8")
    _check(r, 2)
    assert r["agree"] == sum(a == b for x, y in zip(r["tokens"], r["baseline"]) for a, b in zip(x, y))
    assert r["baseline"][0][0] == r["tokens"][0][0]                # the first token comes from prefill, not the cache


@pytest.mark.gpu
def test_default_model_on_gpu():
    _check(generate.run(generate.ModelConfig(), prompt_len=200, n=4, steps=40, device="cuda", num_blocks=512), 4)


@pytest.mark.gpu
def test_default_model_with_an_fp8_cache_on_gpu():
    _check(generate.run(generate.ModelConfig(), prompt_len=200, n=4, steps=40, device="cuda", num_blocks=512,
                        kv_dtype="fp8"), 4)


@pytest.mark.interpreter
def test_record_then_tune_then_every_recorded_bucket_dispatches_its_exact_winner(tmp_path, monkeypatch, device):
    import tunebench
    from tunebench.cli import main
    from tunebench.registry import KERNELS
    from tunebench.runtime import dispatch, record, winners
    shapes, db = tmp_path / "shapes.json", tmp_path / "results.db"
    monkeypatch.setattr(winners, "packaged_db_path", lambda: None)
    monkeypatch.setenv("TUNEBENCH_DB", str(db))
    dispatch.reload()
    _check(generate.run(generate.SMALL, prompt_len=37, n=2, steps=3, device=device, num_blocks=64,
                        record=str(shapes)), 2)
    recorded = record.load(shapes, KERNELS)
    assert {p.kernel for p, _ in recorded} == {"flash_v2", "paged_attention"}
    assert all("exact winner" not in tunebench.explain(p) for p, _ in recorded)          # nothing tuned yet
    assert main(["tune", "--interpret", "--from-record", str(shapes), "--trials", "2", "--compile-workers", "0",
                 "--db", str(db)]) == 0
    dispatch.reload()
    for problem, _ in recorded:
        assert "exact winner" in tunebench.explain(problem), problem
    _check(generate.run(generate.SMALL, prompt_len=37, n=2, steps=3, device=device, num_blocks=64), 2)
    dispatch.reload()


def test_a_bad_record_tunes_nothing(tmp_path, capsys):
    from tunebench.cli import main
    (tmp_path / "bad.json").write_text('{"format": "tunebench-record", "version": 1, "entries": [{"problem": {')
    assert main(["tune", "--interpret", "--from-record", str(tmp_path / "bad.json"), "--db",
                 str(tmp_path / "r.db")]) == 2
    assert "bad.json" in capsys.readouterr().err and not (tmp_path / "r.db").exists()
