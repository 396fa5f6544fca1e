"""bench/decode_reduce_cost.py: its refusal without a GPU, its choice of split configs, and its plumbing on a CPU
(the two recorded launches replayed alone give the call's own output; a row from the interpreter's wall timer). The
times themselves are the GPU's to give (the gpu test)."""
import functools
import math

import pytest
import torch

from bench_scripts import load
from tunebench.bench import ragged
from tunebench.bench.measure import build_inputs
from tunebench.registry import kernel_module
from tunebench.shapes import Problem
from tunebench.tune.timing import gpu_bench, graph_bench, wall_bench

script = load("decode_reduce_cost")

MODULE = kernel_module("paged_attention")
SPLIT = dict(MODULE.DEFAULT, BLOCK_N=16, PARTITION=32)             # several partitions on the small problems
# Small for the interpreter: 64 tokens addressed, so PARTITION 32 gives 2 partitions (a ragged sequence may use 1).
UNIFORM = Problem("paged_attention", 2, 2, 1, 1, 64, 16, "float16", page=16)
RAGGED = ragged.ragged_decode(B=3, Hq=2, Hkv=1, D=16, dtype="float16", page=16, mean=30, max_len=64, min_len=1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_refuses_without_a_gpu(capsys):
    assert script.main([]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_split_variants_split_the_context_or_say_why_not():
    config = dict(MODULE.DEFAULT, BLOCK_N=32, PARTITION=1024)
    split, whole, note = script.split_variants(MODULE, config, 4096)
    assert split == config and whole == dict(config, PARTITION=0) and note == "the dispatched config splits"
    split, whole, note = script.split_variants(MODULE, dict(config, PARTITION=0), 4096)
    assert split["PARTITION"] == MODULE.DEFAULT["PARTITION"] and whole["PARTITION"] == 0 and "does not split" in note
    split, _, note = script.split_variants(MODULE, dict(config, PARTITION=0), 300)      # DEFAULT's 512 would not
    assert split["PARTITION"] == 256 and split["PARTITION"] % split["BLOCK_N"] == 0
    split, _, note = script.split_variants(MODULE, config, 128)
    assert split is None and "no PARTITION of SPACE splits 128 tokens" in note


@pytest.mark.interpreter
@pytest.mark.parametrize("problem", [UNIFORM, RAGGED], ids=["uniform", "ragged"])
def test_the_recorded_launches_replayed_alone_give_the_calls_output(problem, device):
    inputs, reference = build_inputs(problem, device, 0)
    call = script.checked_call(MODULE, inputs, reference, SPLIT)
    with script.recording(MODULE) as log:
        expected = call().clone()
    assert [name for name, _ in log] == list(script.LAUNCHED)
    assert MODULE._paged_decode is not None and not isinstance(MODULE._paged_decode, script._Recorder)   # restored
    out = call().fill_(math.nan)                                          # the call's one preallocated output
    for _, replay in log:
        replay()
    assert torch.equal(out, expected) and reference.check(out).ok


@pytest.mark.interpreter
def test_a_row_holds_every_timing_of_a_split_config(device):
    once = functools.partial(wall_bench, reps=1)
    row = script.measure_shape(RAGGED, device=device, graph=once, launches=once, config=SPLIT)
    assert set(row) == set(script.FIELDS) and row["split_partition"] == 32 and row["partitions"] == 2
    for key in ("split_graph_ms", "split_launch_ms", "no_split_graph_ms", "no_split_launch_ms", "decode_alone_ms",
                "reduce_alone_ms", "reduce_share", "split_gain"):
        assert row[key] > 0, key
    assert row["reduce_share"] == row["reduce_alone_ms"] / row["split_graph_ms"]
    assert row["split_gain"] == row["no_split_graph_ms"] / row["split_graph_ms"]
    assert "ragged" in row["problem"] and script.format_rows([row]).count(RAGGED.label()) == 2


def test_a_wrong_config_is_refused_before_it_is_timed():
    inputs, reference = build_inputs(UNIFORM, "cpu", 0)
    inputs.q.neg_()                                                          # the reference is of the old q
    with pytest.raises(AssertionError, match="disagrees with the float64 reference"):
        script.checked_call(MODULE, inputs, reference, SPLIT)


@pytest.mark.gpu
@pytest.mark.parametrize("index", [0, 3, 4], ids=["B64x4k", "B1x32k", "ragged"])
def test_reduce_cost_on_headline_decode_shapes(index):
    from tunebench.commands.bench import bench_problems
    problem = bench_problems("headline", None, ["paged_attention"])[index]
    row = script.measure_shape(problem, device="cuda", graph=graph_bench, launches=gpu_bench)
    assert row["no_split_graph_ms"] > 0 and row["no_split_launch_ms"] > 0
    if row["split_graph_ms"] is not None:
        assert row["reduce_alone_ms"] > 0 and row["reduce_alone_ms"] < row["split_graph_ms"]
        assert row["decode_alone_ms"] < row["split_graph_ms"] * 1.1
        assert row["split_graph_ms"] <= row["split_launch_ms"] * 1.2
