"""bench/mixed_corun.py: its refusal without a GPU, the configs it pairs, and its plumbing at tiny sizes under the
Triton interpreter (every config checked before it is timed, a planted wrong output stopping it, what it writes). The
times are the GPU's to give."""
import csv
import json

import pytest
import torch

from bench_scripts import PLANTED, load, plant
from tunebench.registry import kernel_module

script = load("mixed_corun")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_refuses_without_a_gpu_unless_small(capsys):
    assert script.main([]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_the_issue_configs_are_in_space_and_fit_the_issue_batch():
    decode, chunk = script.problems(script.ISSUE)
    assert (decode.B, decode.Nk, chunk.Nq, chunk.Nk) == (64, 4096, 2048, 8192)
    for kernel, configs, problem in (("paged_prefill", script.CHUNK_CONFIGS, chunk),
                                     ("paged_attention", script.DECODE_CONFIGS, decode)):
        module = kernel_module(kernel)
        assert all(set(c) == set(module.SPACE) and all(c[k] in module.SPACE[k] for k in c) for c in configs)
        assert len({json.dumps(c) for c in configs}) == len(configs)
        assert script.admitted(kernel, configs, problem), kernel


@pytest.mark.interpreter
def test_small_run_checks_pairs_and_writes_them(tmp_path, capsys):
    assert script.main(["--small", "--out", str(tmp_path)]) == 0
    with open(tmp_path / "mixed-corun.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(script.SMALL_CHUNK_CONFIGS) * len(script.SMALL_DECODE_CONFIGS)
    assert {(r["chunk_config"], r["decode_config"]) for r in rows} == {
        (json.dumps(c), json.dumps(d)) for c in script.SMALL_CHUNK_CONFIGS for d in script.SMALL_DECODE_CONFIGS}
    assert all(float(r["two_streams_ms"]) > 0 and "not a GPU time" in r["timer"] for r in rows)
    summary = json.loads((tmp_path / "mixed-corun.json").read_text())
    assert summary["sequential_ms"] == pytest.approx(summary["best_chunk_alone_ms"] + summary["best_decode_alone_ms"])
    assert summary["best_pair"]["two_streams_ms"] == min(float(r["two_streams_ms"]) for r in rows)
    assert "goal >= 1.3x" in capsys.readouterr().out


@pytest.mark.interpreter
@pytest.mark.parametrize("kernel", ["paged_prefill", "paged_attention"])
@pytest.mark.parametrize("how", PLANTED)
def test_a_wrong_output_stops_it_before_timing(kernel, how, monkeypatch, capsys):
    module = kernel_module(kernel)
    real = module.launch
    monkeypatch.setattr(module, "launch", lambda *a, **kw: plant(how)(real(*a, **kw)))
    assert script.main(["--small"]) == 1
    assert "FAILED before timing" in capsys.readouterr().err
