"""bench/paged_prefill_probe.py: its refusal without a GPU, issue 20's sizes, and its plumbing end to end at tiny sizes
under the Triton interpreter (every output checked before it is timed, a planted wrong output stopping it, the CSV
and JSON it writes). The times are the GPU's to give."""
import csv
import json

import pytest
import torch

from bench_scripts import PLANTED, load, plant
import tunebench

script = load("paged_prefill_probe")

ONE_CHUNK = script.Setup(**dict(vars(script.SMALL), chunks=((5, 40),)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_refuses_without_a_gpu_unless_small(capsys):
    assert script.main([]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_the_issue_sizes_and_the_pairs_the_mask_keeps():
    s = script.ISSUE
    assert (s.Hq, s.Hkv, s.D, s.page, s.dtype) == (32, 8, 128, 16, torch.bfloat16)
    assert s.chunks[:2] == ((512, 4096), (2048, 8192)) and (s.decode_rows, s.decode_context) == (64, 4096)
    assert s.mixed_chunk == (2048, 8192)
    for n, ctx in ((5, 40), (16, 16), (1, 7), (512, 4096)):
        assert script.pairs(n, ctx) == int(torch.ones(n, ctx, dtype=torch.bool).tril(ctx - n).sum())


@pytest.mark.interpreter
def test_small_run_checks_times_and_writes_its_rows(tmp_path, monkeypatch, capsys):
    real, tables = tunebench.paged_attention, []

    def spy(q, k_cache, v_cache, block_tables, *args, **kw):
        tables.append(block_tables.shape)
        return real(q, k_cache, v_cache, block_tables, *args, **kw)
    monkeypatch.setattr(tunebench, "paged_attention", spy)
    assert script.main(["--small", "--out", str(tmp_path)]) == 0
    s = script.SMALL
    assert tables and set(tables) == {(s.decode_rows, -(-s.decode_context // s.page))}   # the decode rows' own table
    with (tmp_path / "paged-prefill.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == script.CHUNK_FIELDS and [(int(r["chunk"]), int(r["context"])) for r in rows] == list(
        s.chunks)
    for r in rows:
        assert 0 < float(r["check_ratio"]) <= 1 and float(r["tunebench_tflops"]) > 0
        assert r["tunebench paged_prefill status"] == r["tunebench flash_v2 (dense) status"] == "ok"
        assert 0 < float(r["tunebench flash_v2 (dense) check"]) <= 1
        if not torch.cuda.is_available():
            assert all(r[f"{p} status"] == script.SKIPPED and r[f"{p} TFLOP/s"] == "" for p in script.PROVIDERS[2:])
    with (tmp_path / "paged-prefill-mixed.csv").open() as f:
        mixed, = list(csv.DictReader(f))
    assert tuple(mixed) == script.MIXED_FIELDS and mixed["launches_status"] == "ok"
    assert float(mixed["speedup_launches"]) == pytest.approx(
        float(mixed["two_launches_ms_launches"]) / float(mixed["one_launch_ms_launches"]))
    assert 0 < float(mixed["check_ratio"]) <= 1 and 0 < float(mixed["two_launches_check_ratio"]) <= 1
    assert 0 < float(mixed["two_streams_check_ratio"]) <= 1
    assert float(mixed["two_streams_speedup_launches"]) == pytest.approx(
        float(mixed["two_launches_ms_launches"]) / float(mixed["two_streams_ms_launches"]))
    saved = json.loads((tmp_path / "paged-prefill.json").read_text())
    assert set(saved) == {"device", "dtype", "matmul_tflops", "timer", "chunks", "mixed"} and len(saved["chunks"]) == 2
    if not torch.cuda.is_available():
        assert mixed["graph_status"] == script.SKIPPED and saved["matmul_tflops"] is None
        assert "not a GPU time" in mixed["timer"]
    assert "matmul ceiling skipped: needs CUDA" in capsys.readouterr().out or torch.cuda.is_available()



def one_call_bench(fn, reps=1):
    from tunebench.tune.timing import Timing
    fn()
    return Timing(1.0, 1.0, 1.0)


@pytest.mark.interpreter
@pytest.mark.parametrize("how", PLANTED)
@pytest.mark.parametrize("target", ["paged_prefill", "flash_attention", "paged_attention"])
def test_a_wrong_output_stops_the_probe_before_it_is_timed(device, monkeypatch, target, how):
    """paged_prefill: goal 1's chunk; flash_attention: its dense peer; paged_attention: goal 2's two launches."""
    real, calls = getattr(tunebench, target), []

    def broken(*args, **kw):
        calls.append(1)
        out = real(*args, **kw)
        if target == "flash_attention":                  # [1, Hq, n, D]: planted in its packed view [n, Hq, D]
            return plant(how)(out[0].transpose(0, 1)).transpose(0, 1)[None]
        return plant(how)(out)
    monkeypatch.setattr(tunebench, target, broken)
    for name in ("wall_bench", "gpu_bench", "graph_bench"):
        monkeypatch.setattr(f"tunebench.tune.timing.{name}", one_call_bench)
    with pytest.raises(script.WrongOutput, match="NaN" if how == "nan" else "max error"):
        script.run(ONE_CHUNK, device)
    assert len(calls) == 1          # run once for its check, never by a timer


@pytest.mark.interpreter
def test_main_says_failed_and_exits_1(monkeypatch, capsys):
    monkeypatch.setattr(tunebench, "paged_prefill", lambda q, *a, **kw: torch.zeros_like(q))
    assert script.main(["--small"]) == 1
    assert "FAILED before timing: sequence 0" in capsys.readouterr().err


def test_a_wrong_or_failing_peer_is_reported_not_timed():
    def never(fn):
        raise AssertionError("a peer that failed its check was timed")

    def wrong(out):
        raise script.WrongOutput("max error 1 > allowed 0.001")

    def broken():
        raise RuntimeError("No available kernel.\nmore")
    assert script.measure_provider(lambda: 0, wrong, never, ours=False) == (
        None, None, "wrong output: WrongOutput: max error 1 > allowed 0.001")
    assert script.measure_provider(broken, wrong, never, ours=False)[2] == "failed: RuntimeError: No available kernel."
    assert script.measure_provider(lambda: 0, lambda out: 0.5, None, ours=False) == (None, 0.5, script.SKIPPED)
    with pytest.raises(script.WrongOutput):
        script.measure_provider(lambda: 0, wrong, never, ours=True)
