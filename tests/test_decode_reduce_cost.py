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
FP8 = Problem("paged_attention", 2, 2, 1, 1, 64, 16, "float16", page=16, kv_dtype="float8_e4m3fn")
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
@pytest.mark.parametrize("problem", [UNIFORM, RAGGED, FP8], ids=["uniform", "ragged", "fp8"])
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


def headline_decode(which: str):
    """A decode problem of the headline suite as the script runs it, picked by what it is, not by its place (the
    suite grew fp8 rows)."""
    from tunebench.commands.bench import bench_problems
    pick = {"B64x4k": lambda p: (p.B, p.Nk, p.kv_dtype) == (64, 4096, None),
            "B1x32k": lambda p: (p.B, p.Nk, p.kv_dtype) == (1, 32768, None),
            "ragged": lambda p: isinstance(p, ragged.RaggedDecode),
            "fp8": lambda p: p.kv_dtype is not None}[which]
    return next(p for p in bench_problems("headline", None, ["paged_attention"]) if pick(p))


def test_the_gpu_tests_headline_shapes_are_four_different_decode_problems():
    picked = [headline_decode(w) for w in ("B64x4k", "B1x32k", "ragged", "fp8")]
    assert len({p.label() for p in picked}) == 4 and all(p.kernel == "paged_attention" for p in picked)


@pytest.mark.gpu
@pytest.mark.parametrize("which", ["B64x4k", "B1x32k", "ragged", "fp8"])
def test_reduce_cost_on_headline_decode_shapes(which):
    # Every variant is checked against float64 before it is timed (measure_shape); the times' relations are the
    # bench's to report (BENCHMARKS.md), not asserted here: 8 test processes share the GPU while this runs.
    problem = headline_decode(which)
    row = script.measure_shape(problem, device="cuda", graph=graph_bench, launches=gpu_bench)
    assert row["problem"] == problem.label() and row["no_split_graph_ms"] > 0 and row["no_split_launch_ms"] > 0
    if row["split_graph_ms"] is not None:
        assert row["split_launch_ms"] > 0 and row["decode_alone_ms"] > 0 and row["partitions"] >= 2
        assert row["split_gain"] == row["no_split_graph_ms"] / row["split_graph_ms"]
        if row["reduce_alone_ms"] is not None:
            assert row["reduce_alone_ms"] > 0 and row["reduce_share"] == row["reduce_alone_ms"] / row["split_graph_ms"]
