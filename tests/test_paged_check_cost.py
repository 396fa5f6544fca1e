"""bench/paged_check_cost.py: its refusal without a GPU and its plumbing on a CPU (the three variants checked and
compared, one row from the interpreter's wall timer, the CSV and JSON). The times are the GPU's to give."""
import functools
import json

import pytest
import torch

from bench_scripts import load
from tunebench.kernels import paged_attention as pa
from tunebench.tune.timing import wall_bench

script = load("paged_check_cost")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_refuses_without_a_gpu(capsys):
    assert script.main([]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_default_shapes_are_the_issues():
    labels = [(p.B, p.Nk, p.Hq, p.Hkv, p.D, p.dtype, p.page) for p in script.problems(**script.GEOMETRY)]
    assert labels == [(B, n, 32, 8, 128, "bfloat16", 16) for B, n in ((1, 32768), (16, 16384), (64, 4096),
                                                                      (128, 1024))]
    assert script.parse_shapes("2x64,1x5") == ((2, 64), (1, 5))


@pytest.mark.interpreter
@pytest.mark.parametrize("config", [dict(pa.DEFAULT, BLOCK_N=16, PARTITION=32), dict(pa.DEFAULT, PARTITION=0)],
                         ids=["split", "one launch"])
def test_a_row_on_the_interpreter(device, tmp_path, config):
    problem, = script.problems(((2, 64),), Hq=4, Hkv=2, D=16, dtype="float16", page=16)
    timer = functools.partial(wall_bench, reps=1)
    row = script.measure_shape(problem, device=device, graph=timer, launches=timer, rounds=1, config=config)
    assert row["identical"] is True and row["config"] == str(config)
    assert row["mask_ratio"] == row["masked_graph_ms"] / row["unmasked_graph_ms"] > 0
    assert row["check_cost_us"] == pytest.approx((row["check_launch_ms"] - row["masked_launch_ms"]) * 1e3)
    assert "mask ratio" in script.format_rows([row])
    csv_path, json_path = script.write([row], tmp_path)
    assert json.loads(json_path.read_text()) == [row] and csv_path.read_text().startswith("problem,config,")


def test_a_broken_variant_fails_the_check(device, monkeypatch):
    """The reference check runs on every variant: one that writes garbage stops the bench before any timing."""
    problem, = script.problems(((1, 16),), Hq=4, Hkv=2, D=16, dtype="float16", page=16)
    real = script.variants

    def broken(module, inputs, config):
        calls = real(module, inputs, config)
        calls["unmasked"] = lambda: torch.zeros_like(inputs.q)
        return calls
    monkeypatch.setattr(script, "variants", broken)
    with pytest.raises(AssertionError, match="unmasked kernel disagrees"):
        script.measure_shape(problem, device=device, graph=wall_bench, launches=wall_bench, rounds=1,
                             config=dict(pa.DEFAULT))
