"""The worker side of a trial, in process: compile -> check -> time gives the right status for each planted fault,
restores inputs a kernel wrote into, and the timing helpers compute what do_bench would."""
import math
import pathlib
import sys

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent))  # fake_kernels

from fake_kernels import behaviours  # noqa: E402
from tunebench.registry import kernel_module  # noqa: E402
from tunebench.shapes import Problem  # noqa: E402
from tunebench.tune import timing  # noqa: E402
from tunebench.tune.worker import failure, run_trial, warmup_only  # noqa: E402
from tunebench.inputs import Workload  # noqa: E402

FAKE = Problem("fake_behaviours", 1, 2, 1, 24, 40, 16, "float32", causal=True)


@pytest.fixture(scope="module")
def workload():
    return Workload(FAKE, seed=0, device="cpu")


@pytest.mark.parametrize("mode, status, says", [
    ("ok", "ok", ""),
    ("wrong", "incorrect", "max error"),
    ("unwritten", "incorrect", "NaN"),
    ("mutate", "incorrect", "wrote into its inputs: k"),
    ("compile_error", "compile_error", "does not compile"),
    ("out_of_resources", "out_of_resources", "shared memory"),
])
def test_each_fault_gets_its_status(workload, mode, status, says):
    outcome = run_trial(workload, behaviours, {"MODE": mode, "X": 1}, timing.wall_bench)
    assert outcome.status == status, outcome
    assert says in outcome.message
    assert not outcome.fatal
    timed = outcome.median_ms is not None
    assert timed == (status == "ok")


def test_ok_trial_is_timed_and_checked(workload):
    outcome = run_trial(workload, behaviours, {"MODE": "ok", "X": 2}, timing.wall_bench)
    assert outcome.status == "ok"
    assert outcome.p20_ms <= outcome.median_ms <= outcome.p80_ms
    assert outcome.median_ms >= 2 * 0.9  # the config sleeps 2 ms per launch
    assert outcome.err_ratio <= 1
    assert outcome.throughput == pytest.approx(FAKE.flops / (outcome.median_ms * 1e-3) / 1e12)


def test_inputs_are_restored_after_a_kernel_writes_into_them(workload):
    k_before = workload.k.clone()
    assert run_trial(workload, behaviours, {"MODE": "mutate", "X": 1}, timing.wall_bench).status == "incorrect"
    assert torch.equal(workload.k, k_before)
    assert run_trial(workload, behaviours, {"MODE": "ok", "X": 1}, timing.wall_bench).status == "ok"


def test_a_real_kernel_passes(device):
    problem = Problem("flash_v2", 1, 2, 1, 40, 40, 16, "float16", causal=True)
    module = kernel_module("flash_v2")
    bench = timing.bench_for(interpret=device == "cpu")
    outcome = run_trial(Workload(problem, 0, device), module, module.DEFAULT, bench)
    assert outcome.status == "ok", outcome.message
    assert outcome.err_ratio <= 1


def test_cuda_faults_are_fatal_and_oom_is_out_of_resources():
    fault = failure(RuntimeError("CUDA error: an illegal memory access was encountered"), "compile_error", "x")
    assert (fault.status, fault.fatal) == ("crashed", True)
    oom = failure(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "compile_error", "x")
    assert (oom.status, oom.fatal) == ("out_of_resources", False)
    plain = failure(ValueError("BLOCK_M must be a power of two"), "compile_error", "first launch")
    assert (plain.status, plain.fatal) == ("compile_error", False)
    assert plain.message.startswith("first launch: ValueError")


def test_warmup_only_compiles_without_launching():
    from triton.runtime.jit import JITFunction

    def kernel(x, BLOCK):
        pass

    jit = JITFunction(kernel)
    calls = []
    jit.run = lambda *args, grid, warmup, **kwargs: calls.append((grid, warmup, args, kwargs))
    with warmup_only():
        jit[(4,)](1, BLOCK=16)
    jit[(4,)](1, BLOCK=16)
    assert calls == [((4,), True, (1,), {"BLOCK": 16}), ((4,), False, (1,), {"BLOCK": 16})]


def test_quantiles_match_torch():
    values = [3.0, 1.0, 4.0, 1.5, 9.0, 2.6]
    expected = torch.tensor(values).quantile(torch.tensor(timing.QUANTILES)).tolist()
    assert timing.quantiles(values, timing.QUANTILES) == pytest.approx(expected)


def test_interleaved_rotates_the_order_and_keeps_results_per_fn():
    order = []
    fns = [lambda i=i: order.append(i) for i in range(3)]
    fake_bench = lambda fn: (fn(), timing.Timing(float(order[-1]), 0.0, 0.0))[1]  # noqa: E731
    medians = timing.interleaved(fns, fake_bench, rounds=3)
    assert order == [0, 1, 2, 1, 2, 0, 2, 0, 1]
    assert medians == [[0.0] * 3, [1.0] * 3, [2.0] * 3]
    order.clear()  # the rounds shared among runners: the second part goes on with the rotation
    assert timing.interleaved(fns, fake_bench, rounds=1, first=2) == [[0.0], [1.0], [2.0]]
    assert order == [2, 0, 1]


def test_contenders_are_the_finalists_whose_rounds_overlap_the_leaders():
    # The leader by median; a finalist whose fastest round beats the leader's slowest is still in the running.
    assert timing.contenders([[4.83, 5.34, 5.12], [5.13, 5.16, 5.20], [5.71, 5.71, 5.86]]) == [0, 1]
    assert timing.contenders([[1.0, 1.0, 1.0], [1.01, 1.01, 1.01]]) == [0]       # close, but apart every round
    assert timing.contenders([[2.0, 2.1, 2.2], [1.0, 1.1, 1.2], [2.15, 2.3, 2.4]]) == [1]
    assert timing.contenders([[3.0], [3.0]]) == [0]  # a tie with no spread: nothing more to learn


def test_one_throughput_per_problem_kind():
    # Prefill counts matmul FLOPs; decode counts the K/V bytes it must read (the same figure the bench reports).
    dense = Problem("flash_v2", 2, 4, 4, 128, 128, 64)
    paged = Problem("paged_attention", 2, 4, 2, 1, 1000, 64, dtype="float16")
    assert dense.throughput(1.0) == pytest.approx(dense.flops / 1e-3 / 1e12)
    assert paged.throughput(2.0) == pytest.approx(2 * 2 * 2 * 1000 * 64 * 2 / 2e-3 / 1e9)
    assert (dense.unit, paged.unit) == ("TFLOP/s", "GB/s")
    assert dense.throughput(0.0) is None and dense.throughput(None) is None
    assert math.isfinite(dense.throughput(1e-6))


def test_a_worker_that_cannot_start_raises_its_own_error_and_the_fleet_stops_the_rest(monkeypatch):
    # The second process fails to start (forked or spawned): the caller must see that error (not an AssertionError
    # from closing a process that never started), and the process already started must be stopped.
    import multiprocessing.process

    from tunebench.tune.options import TuneOptions
    from tunebench.tune.pool import Fleet

    started = []
    real_start = multiprocessing.process.BaseProcess.start

    def start_once(process):
        if started:
            raise OSError("planted: cannot spawn")
        real_start(process)
        started.append(process)

    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", start_once)
    with pytest.raises(OSError, match="planted: cannot spawn"):
        with Fleet(TuneOptions(interpret=True, workers=2)):
            pass
    assert len(started) == 1
    started[0].join(10.0)
    assert not started[0].is_alive()


def test_a_worker_whose_parent_is_gone_exits_quietly():
    # The parent's end of the pipe is closed while the worker serves: the worker returns from worker_main without
    # a BrokenPipeError traceback.
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    err = ctx.SimpleQueue()
    process = ctx.Process(target=_serve_into_closed_pipe, args=(child, err))
    process.start()
    child.close()
    parent.close()  # gone before the worker says it is ready
    process.join(60.0)
    assert process.exitcode == 0
    assert err.get() == ""


def _serve_into_closed_pipe(conn, err):
    import contextlib
    import io

    from tunebench.tune.worker import worker_main
    captured = io.StringIO()
    with contextlib.redirect_stderr(captured):
        try:
            worker_main(conn, "compile", True, None, 1)
        except BaseException as e:  # noqa: BLE001 (the test reports what escaped)
            captured.write(f"{type(e).__name__}: {e}")
    err.put(captured.getvalue())


def test_a_trace_file_that_cannot_be_written_is_named(tmp_path, monkeypatch):
    from tunebench.tune import trace
    monkeypatch.setattr(trace, "_path", str(tmp_path / "no-such-folder" / "trace.jsonl"))
    monkeypatch.setattr(trace, "_file", None)
    with pytest.raises(RuntimeError, match="TUNEBENCH_TRACE names a file that cannot be written: .*no-such-folder"):
        trace.event("tune")


def _class(n: int) -> str:
    return "one" if n == 1 else "x16" if n % 16 == 0 else "other"


@pytest.mark.parametrize("B,Nk,page", [(1, 40, 8), (3, 100, 16), (13, 16, 16), (2, 1, 8)])
def test_a_compile_workers_paged_layout_specialises_like_the_run_workers(B, Nk, page):
    """What Triton specialises a launch on (dtype, 16-byte alignment, strides, sizes, an int's class) is the same
    for the compile worker's few-block cache as for the run worker's packed one; only the block count shrinks."""
    problem = Problem("paged_attention", B, 4, 2, 1, Nk, 16, "float16", page=page)
    run = Workload(problem, device="cpu", fill=True).args({})
    compiled = Workload(problem, device="cpu", fill=False).args({})
    assert len(run) == len(compiled)
    for i, (a, b) in enumerate(zip(run, compiled)):
        assert (a.dtype, a.stride(), a.data_ptr() % 16 == 0) == (b.dtype, b.stride(), b.data_ptr() % 16 == 0), i
        if i in (1, 2):   # the caches: fewer blocks of the same class
            assert a.shape[1:] == b.shape[1:] and _class(a.shape[0]) == _class(b.shape[0]), (a.shape, b.shape)
            assert b.shape[0] <= 17
        else:
            assert a.shape == b.shape, i
    assert torch.equal(run[4], compiled[4])   # context_lens decide the launch's partitions
