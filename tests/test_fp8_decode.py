"""bench/fp8_decode.py: its refusal without a GPU, issue 19's sizes, and its plumbing end to end at tiny sizes under the
Triton interpreter (both caches' outputs checked before they are timed, a planted wrong output stopping it, the CSV
and JSON it writes). The times are the GPU's to give."""
import csv
import json

import pytest
import torch

from bench_scripts import PLANTED, load, plant
import tunebench

script = load("fp8_decode")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_refuses_without_a_gpu_unless_small(capsys):
    assert script.main([]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_the_issue_sizes_and_the_small_ones():
    args = script.parse([])
    plain, fp8 = script.problems(args.batch, args.context, args.page, args.kv_dtype, **script.GEOMETRY)
    assert (plain.B, plain.Nk, plain.Hq, plain.Hkv, plain.D, plain.dtype, plain.page) == (16, 16384, 32, 8, 128,
                                                                                        "bfloat16", 16)
    assert plain.kv_dtype is None and fp8.kv_dtype == "float8_e4m3fn" and fp8.throughput(1.0) == plain.throughput(2.0)
    small = script.parse(["--small"])
    assert (small.batch, small.context, small.page) == (2, 40, 16)
    assert script.parse(["--small", "--batch", "3", "--kv-dtype", "e5m2"]).batch == 3


@pytest.mark.interpreter
@pytest.mark.parametrize("options", [[], ["--kv-dtype", "e5m2", "--per-tensor"]], ids=["e4m3 per head", "e5m2 tensor"])
def test_small_run_checks_times_and_writes_its_rows(tmp_path, options, capsys):
    assert script.main(["--small", "--out", str(tmp_path), *options]) == 0
    with (tmp_path / "fp8-decode.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == script.FIELDS and len(rows) == 2
    assert json.loads((tmp_path / "fp8-decode.json").read_text())[1]["cache"] == rows[1]["cache"]
    plain, fp8 = rows
    assert plain["cache"].startswith("fp16 cache") and "kv float8_e" not in plain["problem"]
    assert fp8["cache"].startswith(f"fp8 {'e5m2' if options else 'e4m3'}") and "kv float8_e" in fp8["dispatch"]
    for r in rows:
        assert 0 < float(r["check_ratio"]) <= 1 and float(r["check_err"]) <= float(r["check_allowed"])
        assert float(r["launch_ms"]) > 0 and float(r["launch_gbps"]) > 0
    assert float(plain["launch_vs_first"]) == 1.0
    assert float(fp8["launch_vs_first"]) == pytest.approx(float(fp8["launch_ms"]) / float(plain["launch_ms"]))
    if not torch.cuda.is_available():
        assert all(r["graph_status"] == script.SKIPPED and r["graph_ms"] == "" for r in rows)
    assert "(goal <= 0.55x)" in capsys.readouterr().out



@pytest.mark.interpreter
@pytest.mark.parametrize("how", PLANTED)
@pytest.mark.parametrize("cache", ["plain", "fp8"])
def test_a_wrong_output_stops_it_before_it_is_timed(monkeypatch, capsys, cache, how):
    real = tunebench.paged_attention

    def broken(q, k_cache, *args, **kw):
        out = real(q, k_cache, *args, **kw)
        return plant(how)(out) if (k_cache.dtype == q.dtype) == (cache == "plain") else out
    monkeypatch.setattr(tunebench, "paged_attention", broken)

    def never(fn):
        raise AssertionError("a wrong output was timed")
    monkeypatch.setattr(script, "wall_times", never)
    monkeypatch.setattr(script, "gpu_times", never)
    assert script.main(["--small"]) == 1
    err = capsys.readouterr().err
    assert "FAILED before timing" in err and ("fp8 cache" in err) == (cache == "fp8")
    assert ("NaN" if how == "nan" else "max error") in err
