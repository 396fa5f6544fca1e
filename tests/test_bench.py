"""`tunebench bench` and `tunebench report` on a CPU: formatting on synthetic measurements, the measuring harness with
fake and real (CPU-capable) providers, the CLI's errors, and the report over a small temporary database."""
import csv
import json
import math
from datetime import datetime, timedelta, timezone

import pytest
import torch
from hypothesis import example, given, settings, strategies as st

from tunebench.bench import measure, plots, providers, ragged, tables
from tunebench.bench.measure import FAILED, GRAPH, LAUNCHES, OK, SKIPPED, WRONG, Ceilings, Measurement, run_problem
from tunebench.bench.providers import Provider, Runner, Skip
from tunebench.bench.tables import rows
from tunebench.commands import bench as command
from tunebench.cli import main
from tunebench.inputs import Inputs, check_windows
from tunebench.shapes import PAGES, Problem

PREFILL = Problem("flash_v2", 4, 16, 16, 4096, 4096, 128, "float16", causal=True)
PREFILL_SMALL = Problem("flash_v2", 1, 2, 2, 32, 32, 16, "float32")
DECODE = Problem("paged_attention", 64, 32, 8, 1, 4096, 128, "bfloat16")
CEILINGS = Ceilings(3.0e12, {"float16": 700e12, "bfloat16": 750e12})


def _ms_at(problem, tflops):
    return problem.flops / (tflops * 1e12) * 1e3


def _synthetic():
    return [
        Measurement(PREFILL, "tunebench-v2", False, OK, _ms_at(PREFILL, 420), note="tuned"),
        Measurement(PREFILL, "sdpa-cudnn", True, OK, _ms_at(PREFILL, 560)),
        Measurement(PREFILL, "sdpa-flash", True, OK, _ms_at(PREFILL, 280)),
        Measurement(PREFILL, "tunebench-v1", False, OK, _ms_at(PREFILL, 84)),
        Measurement(PREFILL, "sdpa-efficient", True, WRONG, err_ratio=7.5, note="max error 0.3 > allowed 0.04"),
        Measurement(PREFILL, "flex", True, SKIPPED, note="FlexAttention failed"),
        # Graph-timed decode, launch by launch beside it: tunebench's second (reduce) launch costs it more launch by
        # launch, so its ratio against the peer differs between the two figures; the graph one is reported.
        Measurement(DECODE, "tunebench-paged", False, OK, DECODE.kv_bytes / 2.7e12 * 1e3, timed_by=GRAPH,
                    launch_ms=DECODE.kv_bytes / 2.0e12 * 1e3),
        Measurement(DECODE, "sdpa-dense-flash", True, OK, DECODE.kv_bytes / 2.4e12 * 1e3, timed_by=GRAPH,
                    launch_ms=DECODE.kv_bytes / 2.3e12 * 1e3),
        Measurement(DECODE, "gather-sdpa", True, FAILED, note="RuntimeError: boom"),
    ]


def _row(rs, problem, provider):
    return next(r for r in rs if r["problem"] == problem.label() and r["provider"] == provider)


def test_rows_compute_throughput_ratio_to_best_peer_and_percent_of_ceiling():
    rs = rows(_synthetic(), CEILINGS)
    v2 = _row(rs, PREFILL, "tunebench-v2")
    assert v2["throughput"] == pytest.approx(420) and v2["unit"] == "TFLOP/s"
    assert v2["best_peer"] == "sdpa-cudnn"                          # tunebench's own rows are never the peer
    assert v2["vs_best_peer"] == pytest.approx(0.75)
    assert v2["pct_of_ceiling"] == pytest.approx(60)                # of the fp16 matmul rate
    assert _row(rs, PREFILL, "sdpa-flash")["vs_best_peer"] == pytest.approx(0.5)
    wrong = _row(rs, PREFILL, "sdpa-efficient")
    assert wrong["throughput"] is None and wrong["vs_best_peer"] is None and wrong["err_ratio"] == 7.5
    paged = _row(rs, DECODE, "tunebench-paged")
    assert paged["unit"] == "GB/s" and paged["throughput"] == pytest.approx(2700)
    assert paged["pct_of_ceiling"] == pytest.approx(90)             # of the copy bandwidth
    assert paged["vs_best_peer"] == pytest.approx(2.7 / 2.4)
    assert paged["intensity"] == pytest.approx(DECODE.flops / DECODE.min_bytes)


def test_best_peer_ignores_tunebench_and_untimed_rows():
    ms = _synthetic()
    assert tables.best_peer([m for m in ms if m.problem == PREFILL]).provider == "sdpa-cudnn"
    assert tables.best_peer([m for m in ms if m.provider.startswith("tunebench")]) is None
    rs = rows([m for m in ms if m.provider in ("tunebench-v2", "flex")], CEILINGS)
    assert all(r["vs_best_peer"] is None and r["best_peer"] is None for r in rs)


def test_table_orders_by_throughput_and_shows_why_a_provider_was_not_timed():
    table = tables.format_table([r for r in rows(_synthetic(), CEILINGS) if r["phase"] == "prefill"])
    lines = table.splitlines()
    assert PREFILL.label() in lines[0] and "700 float16 matmul TFLOP/s" in lines[0]
    assert set(lines[2].replace(" ", "")) == {"-"}                 # the rule under the header (text.table)
    order = [line.split()[0] for line in lines[3:9]]
    assert order[:4] == ["sdpa-cudnn", "tunebench-v2", "sdpa-flash", "tunebench-v1"]
    assert "0.75x" in lines[4] and "max error 0.3" in table and "FlexAttention failed" in table
    assert lines[-1] == "  best peer: sdpa-cudnn"


def test_summary_states_the_goal_ratios():
    text = "\n".join(tables.summary(rows(_synthetic(), CEILINGS)))
    assert "tunebench-v2 420 TFLOP/s = 0.75x cuDNN (goal >= 1.0), 1.50x FlashAttention-2 (goal >= 1.7)" in text
    assert "tunebench-auto" not in text                                 # not in this run: no line for it
    auto = Measurement(PREFILL, "tunebench-auto", False, OK, _ms_at(PREFILL, 588))
    text = "\n".join(tables.summary(rows(_synthetic() + [auto], CEILINGS)))
    assert "tunebench-auto 588 TFLOP/s = 1.05x cuDNN (goal >= 1.0), 2.10x FlashAttention-2 (goal >= 1.7)" in text
    assert "v2/v1" in text and "5.00x" in text
    assert "2700 GB/s graph-timed (2000 launch by launch) = 90% of copy bandwidth (goal >= 90%" in text
    assert "1.12x best peer sdpa-dense-flash (goal >= 1.0)" in text


def test_csv_and_json_hold_every_row_with_missing_values_empty(tmp_path):
    rs = rows(_synthetic(), CEILINGS)
    rs[0]["err_ratio"] = math.nan
    tables.write_csv(rs, tmp_path / "b.csv")
    tables.write_json(rs, CEILINGS, {"device": "test"}, tmp_path / "b.json")
    with open(tmp_path / "b.csv") as f:
        read = list(csv.DictReader(f))
    assert len(read) == len(rs) and read[0]["provider"] == "tunebench-v2"
    assert float(read[0]["throughput"]) == pytest.approx(420)
    assert _row(read, PREFILL, "flex")["median_ms"] == ""
    paged = _row(read, DECODE, "tunebench-paged")                  # decode: both timings, the graph one is the figure
    assert paged["timed_by"] == "graph" and float(paged["graph_ms"]) == pytest.approx(float(paged["median_ms"]))
    assert float(paged["launch_ms"]) == pytest.approx(DECODE.kv_bytes / 2.0e12 * 1e3)
    assert float(paged["launch_vs_graph"]) == pytest.approx(2.7 / 2.0)
    assert float(paged["kv_tokens"]) == DECODE.B * DECODE.Nk and paged["ragged"] == ""
    doc = json.loads((tmp_path / "b.json").read_text())
    assert doc["meta"] == {"device": "test"} and doc["ceilings"]["copy_bytes_per_s"] == 3.0e12
    assert len(doc["rows"]) == len(rs) and doc["rows"][0]["err_ratio"] is None


@pytest.mark.parametrize("option, value", [("--rounds", "0"), ("--rep-ms", "-1"), ("--warmup-ms", "0")])
def test_bench_refuses_timing_options_that_time_nothing(tmp_path, capsys, option, value):
    assert main(["bench", option, value, "--out", str(tmp_path / "out")]) != 0
    assert f"tunebench bench: error: {option} must be > 0, got" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()                      # refused before anything is written


def test_command_flow_writes_after_every_problem_and_stops_on_a_sticky_cuda_error(tmp_path, monkeypatch, capsys):
    # The GPU-only parts replaced: this checks the command's own flow on a CPU.
    calls = []

    def fake_run(problem, providers, **kw):
        calls.append(problem)
        note = "RuntimeError: CUDA error: an illegal memory access was encountered" if len(calls) == 2 else ""
        return [Measurement(problem, "tunebench-paged", False, OK, 0.5),
                Measurement(problem, "sdpa-dense-flash", True, FAILED if note else OK, None if note else 0.6, note=note)]

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(command, "measure_ceilings", lambda dtypes, timer=None, copy_timer=None: CEILINGS)
    monkeypatch.setattr(command, "environment", lambda: {"device": "fake H100", "command": "tunebench bench"})
    monkeypatch.setattr(command, "run_problem", fake_run)
    assert main(["bench", "--kernel", "paged_attention", "--out", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert len(calls) == 2 and "stopped early: sdpa-dense-flash" in captured.err
    assert "summary:" in captured.out and "ceilings measured in this run: copy 3.00 TB/s" in captured.out
    doc = json.loads((tmp_path / "bench.json").read_text())
    assert len(doc["rows"]) == 4 and doc["meta"]["device"] == "fake H100"
    md = (tmp_path / "bench.md").read_text()
    assert md.count("best peer:") == 2 and "illegal memory access" in md and "device: fake H100" in md


def test_plots_are_written_or_skipped_when_matplotlib_is_missing(tmp_path):
    rs = rows(_synthetic(), CEILINGS)
    paths = plots.plot_throughput(rs, tmp_path)
    roof = plots.plot_roofline(rs, CEILINGS, tmp_path)
    if plots._pyplot() is None:
        assert paths == [] and roof is None
        return
    assert len(paths) == 2 and all(p.stat().st_size > 0 for p in paths) and roof.stat().st_size > 0


def test_problem_selection_filters_and_merges_v1_into_prefill():
    headline = command.bench_problems(None, None, None)
    assert len(headline) == len(set(headline)) and all(p.kernel in ("flash_v2", "paged_attention") for p in headline)
    # four uniform decode rows with a bf16 cache, the same four with an fp8 one, B 1 x 128k, B 64 x 4k at the four
    # other page sizes (issue 19's goals table), and the ragged batch
    assert sum(p.paged for p in headline) == 14 and sum(p.kv_dtype == "float8_e4m3fn" for p in headline) == 4
    assert {p.page for p in headline if p.paged and (p.B, p.Nk) == (64, 4096)} == set(PAGES)
    assert any(p.paged and (p.B, p.Nk) == (1, 131072) for p in headline)
    decode = command.bench_problems("headline", None, ["paged_attention"])
    assert decode and all(p.paged for p in decode) and decode[-1] == ragged.headline()[0]
    assert all(p.dtype == "float16" for p in command.bench_problems("headline", None, None, ["float16"]))
    assert not any(isinstance(p, ragged.RaggedDecode) for p in command.bench_problems("headline", None, ["flash_v2"]))
    preset = command.bench_problems(None, "llama-3-8b", None)
    assert any(p.paged for p in preset) and not any(isinstance(p, ragged.RaggedDecode) for p in preset)
    with pytest.raises(ValueError, match="give one of --suite, --preset"):
        command.bench_problems("headline", "llama-3-8b", None)
    with pytest.raises(KeyError, match="unknown suite"):
        command.bench_problems("nope", None, None)
    with pytest.raises(ValueError, match="no problems left"):
        command.bench_problems("headline", None, ["paged_attention"], ["float16"])


@settings(max_examples=15, deadline=None)
@given(nq=st.integers(49, 260), nk=st.integers(1, 260), seed=st.integers(0, 2**16))
@example(nq=200, nk=230, seed=0)
@example(nq=200, nk=200, seed=0)
@example(nq=150, nk=120, seed=0)
@example(nq=150, nk=10, seed=0)                                   # Nq > Nk: the first rows see no key
def test_check_windows_slice_the_causal_problem_exactly(nq, nk, seed):
    from tunebench import reference as ref
    g = torch.Generator().manual_seed(seed)
    q, k, v = torch.randn(1, 2, nq, 16, generator=g), torch.randn(1, 1, nk, 16, generator=g), \
        torch.randn(1, 1, nk, 16, generator=g)
    full = ref.attention(q, k, v, causal=True)
    windows = check_windows(nq, rows=16, seed=seed)
    assert len(windows) == 3 and windows[0][0] == 0 and windows[-1][1] == nq
    for s, e in windows:
        kv_end = max(0, min(nk, e + nk - nq))
        part = ref.attention(q[:, :, s:e], k[:, :, :kv_end], v[:, :, :kv_end], causal=True)
        torch.testing.assert_close(part, full[:, :, s:e], rtol=0, atol=1e-12)


def test_few_rows_are_checked_in_one_window():
    assert check_windows(40, rows=16) == [(0, 40)]


# -- the harness, with fake providers: wrong and failing providers are reported and never timed

def _fake(name, make, peer=True):
    return Provider(name, "prefill", peer, make, name)


def _sdpa_runner(inp):
    import torch.nn.functional as F
    k, v = inp.expanded_kv()
    return Runner(lambda: F.scaled_dot_product_attention(inp.q, k, v, is_causal=inp.problem.causal))


def _raises(inp):
    raise RuntimeError("CUDA error: an illegal memory access\nmore detail")


def _skips(inp):
    raise Skip("not for this shape")


def _off_by_scale(inp):
    run = _sdpa_runner(inp).fn
    return Runner(lambda: run() * 1.01)


def _writes_nothing(inp):
    out = torch.empty_like(inp.q)
    return Runner(lambda: out, out=out)        # the harness poisons out first: it must come back NaN


def test_harness_checks_all_then_times_only_the_correct():
    timed = []

    def timer(fn):
        timed.append(fn)
        return (2.0, 1.0, 3.0)

    providers = [_fake("good", _sdpa_runner), _fake("raises", _raises), _fake("skips", _skips),
                 _fake("off", _off_by_scale), _fake("nothing", _writes_nothing),
                 Provider("decode-only", "decode", True, _raises, "")]
    p = Problem("flash_v2", 1, 4, 2, 70, 70, 16, "float32", causal=True)
    got = {m.provider: m for m in run_problem(p, providers, device="cpu", timer=timer)}
    assert set(got) == {"good", "raises", "skips", "off", "nothing"}
    assert got["good"].status == OK and got["good"].median_ms == 2.0 and got["good"].p80_ms == 3.0
    assert got["good"].err_ratio <= 1
    assert got["raises"].status == FAILED and got["raises"].note == "RuntimeError: CUDA error: an illegal memory access"
    assert got["skips"].status == SKIPPED and got["skips"].note == "not for this shape"
    assert got["off"].status == WRONG and got["off"].err_ratio > 1 and "float64 reference" in got["off"].note
    assert got["nothing"].status == WRONG and "NaN" in got["nothing"].note
    assert len(timed) == 1 and all(got[n].median_ms is None for n in ("raises", "skips", "off", "nothing"))


def test_a_problem_whose_inputs_cannot_be_built_is_reported_for_every_provider(monkeypatch):
    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB")

    monkeypatch.setattr(measure, "make_inputs", oom)
    p = Problem("flash_v2", 1, 2, 2, 32, 32, 16, "float32")
    got = run_problem(p, [_fake("a", _sdpa_runner), _fake("b", _raises)], device="cpu", timer=_wall_timer)
    assert [m.status for m in got] == [FAILED, FAILED]
    assert all("OutOfMemoryError: CUDA out of memory" in m.note for m in got)


def test_ceilings_count_bytes_read_and_written():
    c = measure.measure_ceilings(["float16"], device="cpu", timer=lambda fn: (fn(), 2.0)[1:] * 3,
                               copy_bytes=1 << 20, matmul_n=64)
    assert c.copy_bytes_per_s == pytest.approx(2 * (1 << 20) / 2e-3)
    assert set(c.matmul_flops_per_s) == {"float16", "bfloat16"}
    assert c.matmul_flops_per_s["float16"] == pytest.approx(2 * 64 ** 3 / 2e-3)
    assert c.for_problem(DECODE) == (pytest.approx(c.copy_bytes_per_s / 1e9), "copy GB/s")
    graphed = measure.measure_ceilings([], device="cpu", timer=lambda fn: (fn(), 2.0)[1:] * 3, copy_bytes=1 << 20,
                                       matmul_n=64, copy_timer=lambda fn: (fn(), 1.0)[1:] * 3)
    assert graphed.copy_bytes_per_s == pytest.approx(2 * c.copy_bytes_per_s) and "graph" in graphed.notes["copy"]


def test_a_provider_whose_timing_fails_is_reported():
    def timer(fn):
        raise torch.cuda.OutOfMemoryError("out of memory")

    p = Problem("flash_v2", 1, 2, 2, 32, 32, 16, "float32")
    (m,) = run_problem(p, [_fake("good", _sdpa_runner)], device="cpu", timer=timer)
    assert m.status == FAILED and m.note.startswith("timing failed: OutOfMemoryError")


# -- the real providers that can run on a CPU (SDPA, naive, gather, flash_v2 DEFAULT under the interpreter)

def _wall_timer(fn):
    fn()
    return (1.0, 1.0, 1.0)


def test_real_prefill_providers_agree(device):
    names = ["tunebench-v2-default", "sdpa-flash", "sdpa-cudnn", "naive"]
    p = Problem("flash_v2", 1, 4, 2, 48, 48, 32, "float16", causal=True)
    got = {m.provider: m for m in run_problem(p, providers.select_providers(names), device=device, timer=_wall_timer)}
    assert got["sdpa-flash"].status == OK and got["naive"].status == OK
    assert got["tunebench-v2-default"].status == OK, got["tunebench-v2-default"].note
    assert got["sdpa-cudnn"].status in (OK, SKIPPED)               # no cuDNN on a CPU: skipped, with its reason
    assert got["sdpa-cudnn"].status == OK or "backend unavailable" in got["sdpa-cudnn"].note


def test_real_prefill_providers_skip_what_they_cannot_do():
    p = Problem("flash_v2", 1, 2, 2, 40, 56, 16, "float32", causal=True)      # Nq != Nk causal: SDPA is top-left
    chosen = providers.select_providers(["sdpa-flash", "tunebench-v1"])
    got = {m.provider: m for m in run_problem(p, chosen, device="cpu", timer=_wall_timer)}
    assert got["sdpa-flash"].status == SKIPPED and "top-left" in got["sdpa-flash"].note
    big = Problem("flash_v2", 1, 1, 1, 16384, 16384, 16, "float32")
    with pytest.raises(Skip, match="N = 8192"):
        providers.PROVIDERS[providers.PROVIDER_NAMES.index("tunebench-v1")].make(Inputs(big, *(torch.empty(0),) * 3))
    with pytest.raises(Skip, match="score matrix"):
        providers._naive(Inputs(dataclasses_replace(big, B=2), *(torch.empty(0),) * 3))


def test_real_decode_providers_agree_on_cpu():
    names = ["sdpa-dense-flash", "gather-sdpa", "flashinfer", "sdpa-loop", "sdpa-padded"]
    p = Problem("paged_attention", 3, 4, 2, 1, 70, 32, "float32")
    got = {m.provider: m for m in run_problem(p, providers.select_providers(names), device="cpu", timer=_wall_timer,
                                              graph_timer=_wall_timer)}
    assert got["sdpa-dense-flash"].status == OK and got["gather-sdpa"].status == OK, got
    assert got["flashinfer"].status in (SKIPPED, FAILED)
    assert "sdpa-loop" not in got and "sdpa-padded" not in got       # ragged-batch peers: not on a uniform batch


def _timers(calls):
    def launches(fn):
        fn()
        calls.append(LAUNCHES)
        return (3.0, 2.5, 3.5)

    def graph(fn):
        fn()
        calls.append(GRAPH)
        return (2.0, 1.9, 2.1)
    return launches, graph


def test_decode_is_timed_by_graph_replay_with_the_launch_by_launch_figure_beside_it():
    calls = []
    launches, graph = _timers(calls)
    p = Problem("paged_attention", 2, 4, 2, 1, 40, 16, "float32")
    (m,) = run_problem(p, providers.select_providers(["sdpa-dense-flash"]), device="cpu", timer=launches,
                       graph_timer=graph)
    assert m.status == OK and calls == [LAUNCHES, GRAPH]
    assert (m.timed_by, m.median_ms, m.p20_ms, m.p80_ms, m.launch_ms) == (GRAPH, 2.0, 1.9, 2.1, 3.0)
    calls.clear()
    (m,) = run_problem(PREFILL_SMALL, [_fake("good", _sdpa_runner)], device="cpu", timer=launches, graph_timer=graph)
    assert calls == [LAUNCHES] and (m.timed_by, m.median_ms, m.launch_ms) == (LAUNCHES, 3.0, 3.0)   # prefill as before



def test_graph_prefill_times_prefill_by_graph_replay_too_and_its_table_shows_both_figures():
    # --graph-prefill: a short prefill's launch-by-launch time can hold host launch cost that the GPU never sees;
    # graph replay leaves it out, and the table shows both, as for decode.
    calls = []
    launches, graph = _timers(calls)
    (m,) = run_problem(PREFILL_SMALL, [_fake("good", _sdpa_runner)], device="cpu", timer=launches, graph_timer=graph,
                       graph_phases=("decode", "prefill"))
    assert calls == [LAUNCHES, GRAPH] and (m.timed_by, m.median_ms, m.launch_ms) == (GRAPH, 2.0, 3.0)
    (r,) = rows([m], CEILINGS)
    assert (r["graph_ms"], r["launch_ms"], r["launch_vs_graph"]) == (2.0, 3.0, 1.5)
    lines = tables.format_table([r]).splitlines()
    assert lines[1].strip() == tables.PREFILL_GRAPH_TIMING
    assert lines[2].split()[:5] == ["provider", "status", "graph", "ms", "launches"]
    assert "2.0000" in lines[4] and "3.0000" in lines[4]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the command's flow with the GPU parts replaced")
def test_graph_prefill_option_reaches_every_problem(tmp_path, monkeypatch):
    seen = []

    def fake_run(problem, providers, **kw):
        seen.append(kw["graph_phases"])
        return [Measurement(problem, "tunebench-v2", False, OK, 0.5)]

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(command, "measure_ceilings", lambda dtypes, timer=None, copy_timer=None: CEILINGS)
    monkeypatch.setattr(command, "environment", lambda: {"device": "fake H200", "command": "tunebench bench"})
    monkeypatch.setattr(command, "run_problem", fake_run)
    args = ["bench", "--kernel", "flash_v2", "--dtype", "bfloat16", "--out", str(tmp_path)]
    assert main(args) == 0 and set(seen) == {("decode",)}
    seen.clear()
    assert main(args + ["--graph-prefill"]) == 0 and seen and set(seen) == {("decode", "prefill")}

def test_providers_are_timed_in_interleaved_rounds_and_each_figure_is_the_median_of_its_rounds():
    # Round r starts at provider r (mod n), as the tuner's re-timing rotates; a drifting clock (each timing slower
    # than the last) then falls on every provider alike, and the spread of a provider's rounds is reported.
    order, clock = [], iter(range(1, 100))

    def drifting(fn):
        fn()
        t = float(next(clock))
        order.append(fn)
        return (t, t - 0.5, t + 0.5)

    chosen = [_fake("a", _sdpa_runner), _fake("b", _sdpa_runner), _fake("c", _sdpa_runner)]
    got = run_problem(PREFILL_SMALL, chosen, device="cpu", timer=drifting, rounds=3)
    fns = list(dict.fromkeys(order))                     # the runners' fns in first-timed order: a, b, c
    assert [fns.index(f) for f in order] == [0, 1, 2, 1, 2, 0, 2, 0, 1]
    by = {m.provider: m for m in got}
    assert by["a"].round_ms == [1.0, 6.0, 8.0] and by["a"].median_ms == 6.0 and by["a"].p20_ms == 5.5
    assert by["b"].round_ms == [2.0, 4.0, 9.0] and by["c"].round_ms == [3.0, 5.0, 7.0]
    r = _row(rows(got, CEILINGS), PREFILL_SMALL, "a")
    assert r["rounds"] == 3 and r["round_spread"] == pytest.approx(8.0)
    (one,) = run_problem(PREFILL_SMALL, chosen[:1], device="cpu", timer=drifting)       # rounds=1: as before
    assert len(one.round_ms) == 1 and _row(rows([one], CEILINGS), PREFILL_SMALL, "a")["round_spread"] is None


def test_a_provider_whose_timing_fails_in_a_later_round_is_reported_failed_and_not_timed_again():
    calls = []

    def fails_second(fn):
        fn()
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("clock went away")
        return (1.0, 1.0, 1.0)

    (m,) = run_problem(PREFILL_SMALL, [_fake("a", _sdpa_runner)], device="cpu", timer=fails_second, rounds=3)
    assert m.status == FAILED and "timing failed: RuntimeError: clock went away" in m.note and len(calls) == 2


def test_a_decode_provider_that_cannot_be_graph_captured_keeps_its_launch_figure_and_is_not_compared():
    def no_graph(fn):
        raise RuntimeError("operation not permitted when stream is capturing\nmore")

    p = Problem("paged_attention", 2, 4, 2, 1, 40, 16, "float32")
    (m,) = run_problem(p, providers.select_providers(["sdpa-dense-flash"]), device="cpu", timer=_wall_timer,
                       graph_timer=no_graph)
    assert m.status == FAILED and m.median_ms is None and m.launch_ms == 1.0
    assert m.note.startswith("graph timing failed (RuntimeError: operation not permitted when stream is capturing)")
    (r,) = rows([m], CEILINGS)
    assert r["throughput"] is None and r["launch_ms"] == 1.0 and r["graph_ms"] is None


def test_decode_table_shows_both_timings_and_says_the_ratios_are_graph_timed():
    table = tables.format_table([r for r in rows(_synthetic(), CEILINGS) if r["phase"] == "decode"])
    lines = table.splitlines()
    assert lines[1].strip() == tables.DECODE_TIMING
    assert lines[2].split()[:5] == ["provider", "status", "graph", "ms", "launches"]
    paged = next(x for x in lines if x.split()[0] == "tunebench-paged")
    graph_ms, launch_ms = (DECODE.kv_bytes / x * 1e3 for x in (2.7e12, 2.0e12))
    assert f"{graph_ms:.4f}" in paged and f"{launch_ms:.4f}" in paged and "1.12x" in paged and "2700.0" in paged


# -- the command line

@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_bench_without_a_gpu_exits_nonzero_with_the_reason(capsys, tmp_path):
    assert main(["bench", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "needs a CUDA GPU" in err and "tunebench roofline" in err
    assert not (tmp_path / "out").exists()


def test_bench_argument_errors_come_before_the_gpu_check(capsys):
    assert main(["bench", "--provider", "nope"]) == 2
    assert "unknown provider nope; known: tunebench-v2" in capsys.readouterr().err
    assert main(["bench", "--suite", "headline", "--preset", "llama-3-8b"]) == 2
    assert "give one of --suite, --preset" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "--kernel", "flash_v3"])


# -- `tunebench report` over a small database

def _device(name="NVIDIA H100 80GB HBM3"):
    from tunebench.device import DeviceIdentity
    return DeviceIdentity(name, "9.0", 132, 80 << 30, "550.54", "2.11.0", "3.6.0", True)


def _fill(store):
    from tunebench.registry import kernel_module, kernel_identity
    from tunebench.store import TrialResult
    dev, h = _device(), kernel_identity("flash_v2")
    problem = Problem("flash_v2", 4, 16, 16, 4096, 4096, 128, "float16", causal=True)
    config = dict(kernel_module("flash_v2").DEFAULT)
    t0 = datetime(2026, 1, 1, 12, 0, tzinfo=timezone.utc)
    for i, (status, ms) in enumerate([("ok", 1.2), ("ok", 0.8), ("incorrect", None), ("compile_error", None)]):
        store.record_trial(dev, "flash_v2", h, problem, TrialResult(
            i, config, status, median_ms=ms, started_at=t0 + timedelta(seconds=30 * i),
            finished_at=t0 + timedelta(seconds=30 * i + 10)))
    store.upsert_winner(dev, "flash_v2", h, problem, config, 0.8, 1.5, 0.9)
    store.upsert_winner(dev, "flash_v2", "0ldha5h", dataclasses_replace(problem, Nq=1024, Nk=1024), config, 0.1, 2.0)
    return problem


def dataclasses_replace(p, **kw):
    import dataclasses
    return dataclasses.replace(p, **kw)


def test_report_lists_winners_speedups_trials_and_tuning_time(tmp_path, capsys):
    from tunebench.store import Store
    db = tmp_path / "results.db"
    with Store(str(db)) as store:
        problem = _fill(store)
    out = tmp_path / "report"
    assert main(["report", "--db", str(db), "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert text in capsys.readouterr().out
    line = next(x for x in text.splitlines() if problem.label() in x)
    assert "| 1.50x | - | 0.90x |" in line and "ok 2, compile_error 1, incorrect 1" in line   # one config: no runner-up
    assert "| 100 s (trials 40 s) |" in line                      # first start -> last end; sum of durations
    stale = next(x for x in text.splitlines() if "Nq1024" in x)
    assert "stale" in stale and "2.00x" in stale and "no trials" in stale
    assert "4 trials: ok 2, compile_error 1, incorrect 1" in text
    assert "NVIDIA H100 80GB HBM3 (capability 9.0, torch 2.11.0, triton 3.6.0)" in text


def test_report_gives_the_margin_over_the_runner_up_and_says_when_the_space_has_little_left():
    from tunebench.registry import kernel_module
    from tunebench.report import WinnerLine, headroom, margin
    from tunebench.store import TrialResult, Winner
    default = dict(kernel_module("flash_v2").DEFAULT)
    other = dict(default, BLOCK_N=32)
    trials = [TrialResult(0, default, "ok", median_ms=1.0), TrialResult(1, other, "ok", median_ms=1.1),
              TrialResult(2, other, "ok", median_ms=1.05), TrialResult(3, dict(default, BLOCK_M=16), "incorrect")]
    problem = Problem("flash_v2", 4, 16, 16, 4096, 4096, 128, "float16")
    winner = Winner("H", "9.0", "flash_v2", "h", problem, default, 1.0, 1.0, None, "", "", datetime.now(timezone.utc))
    assert margin(winner, trials) == pytest.approx(1.05)           # the runner-up's best trial, over the winner's
    assert margin(winner, trials[:1]) is None
    [line] = headroom([WinnerLine(winner, {}, None, None, False, 1.05)])
    assert "median 1.00x" in line and "runner-up config median 1.05x" in line and "little left" in line
    winner = Winner("H", "9.0", "flash_v2", "h", problem, other, 1.0, 1.3, None, "", "", datetime.now(timezone.utc))
    assert "little left" not in headroom([WinnerLine(winner, {}, None, None, False, 1.05)])[0]


def test_report_says_which_kernel_auto_runs_per_bucket():
    """Per bucket with a current flash_v3 winner: by its speedup over flash_v2 timed beside it where it has one,
    else the faster of it and flash_v2's winner, flash_v2 where flash_v2 has none (a lone winner is no evidence against
    flash_v2's DEFAULT); a stale flash_v3 winner, or one of another device, is not compared."""
    from tunebench.report import WinnerLine, auto_choices
    from tunebench.store import Winner

    def line(kernel, n, ms, device="H100", stale=False, versus=None):
        problem = Problem(kernel, 4, 16, 16, n, n, 128, "bfloat16")
        return WinnerLine(Winner(device, "9.0", kernel, "h", problem, {}, ms, 1.0, versus, "", "",
                                 datetime.now(timezone.utc)), {}, None, None, stale)
    lines = [line("flash_v3", 1024, 0.07), line("flash_v2", 1024, 0.06), line("flash_v3", 4096, 0.9),
             line("flash_v2", 4096, 1.1), line("flash_v3", 8192, 3.9), line("flash_v3", 2048, 0.2, stale=True),
             line("flash_v2", 8192, 3.0, device="H200"), line("flash_v3", 16384, 10.0, versus=0.9),
             line("flash_v2", 16384, 12.0), line("flash_v3", 512, 0.05, versus=1.1),
             line("flash_v3", 2048, 0.2, versus=1.1)]
    rows = {r[0]: r for r in auto_choices(lines)}
    assert set(rows) == {f"bfloat16 B4 H16/16 Nq{n} Nk{n} D128" for n in (512, 1024, 2048, 4096, 8192, 16384)}
    assert rows["bfloat16 B4 H16/16 Nq1024 Nk1024 D128"][3:] == ["flash_v2", "0.0600", "-", "flash_v2"]
    assert rows["bfloat16 B4 H16/16 Nq4096 Nk4096 D128"][3:] == ["flash_v2", "1.1000", "-", "flash_v3"]
    assert rows["bfloat16 B4 H16/16 Nq8192 Nk8192 D128"][3:] == ["flash_v2", "no winner", "-", "flash_v2"]
    assert rows["bfloat16 B4 H16/16 Nq16384 Nk16384 D128"][3:] == ["flash_v2", "12.0000", "0.90x", "flash_v2"]
    # Faster beside flash_v2, but under registry.EAGER_MIN_MS: flash_v2 in eager calls, flash_v3 in a CUDA graph.
    assert rows["bfloat16 B4 H16/16 Nq512 Nk512 D128"][3:] == ["flash_v2", "no winner", "1.10x",
                                                              "flash_v2 (eager; flash_v3 in a CUDA graph)"]
    assert rows["bfloat16 B4 H16/16 Nq2048 Nk2048 D128"][3:] == ["flash_v2", "no winner", "1.10x", "flash_v3"]


def test_report_on_an_empty_or_missing_database(tmp_path, capsys):
    from tunebench.store import Store
    Store(str(tmp_path / "empty.db")).close()
    assert main(["report", "--db", str(tmp_path / "empty.db")]) == 0
    assert "No winners stored." in capsys.readouterr().out
    assert main(["report", "--db", str(tmp_path / "missing.db")]) == 2
    assert "no results database at" in capsys.readouterr().err


def test_tuning_times_and_counts_formatting():
    from tunebench.report import format_counts, format_duration, tuning_times
    from tunebench.store import TrialResult
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    trials = [TrialResult(0, {}, "ok", started_at=t0, finished_at=t0 + timedelta(seconds=5)),
              TrialResult(1, {}, "timeout", started_at=t0 + timedelta(seconds=60), finished_at=None)]
    assert tuning_times(trials) == (timedelta(seconds=5), timedelta(seconds=5))
    assert tuning_times([trials[1]]) == (None, None)
    assert format_counts({"timeout": 1, "ok": 3, "weird": 2}) == "ok 3, timeout 1, weird 2"
    assert [format_duration(timedelta(seconds=s)) for s in (59, 600, 9000)] == ["59 s", "10.0 min", "2.5 h"]


@pytest.mark.gpu
def test_headline_decode_rows_are_graph_timed_and_checked(tmp_path):
    names = ["tunebench-paged", "tunebench-paged-default", "sdpa-dense-flash", "sdpa-dense-cudnn", "sdpa-padded",
             "sdpa-loop"]
    argv = ["bench", "--suite", "headline", "--kernel", "paged_attention", "--out", str(tmp_path), "--rep-ms", "30",
            "--warmup-ms", "10"] + [a for n in names for a in ("--provider", n)]
    assert main(argv) == 0
    with open(tmp_path / "bench.csv") as f:
        read = list(csv.DictReader(f))
    from tunebench.commands.bench import bench_problems
    expected = {p.label() for p in bench_problems("headline", None, ["paged_attention"])}
    assert {r["problem"] for r in read} == expected and any(r["ragged"] for r in read)
    assert any(r["kv_dtype"] for r in read) and any(not r["kv_dtype"] for r in read)      # the fp8 rows and the bf16
    paged = [r for r in read if r["provider"] == "tunebench-paged"]
    assert len(paged) == len(expected) and all(r["status"] == "ok" for r in paged), [r["note"] for r in paged]
    # Graph against launch-by-launch times are the bench's to report, not asserted: 8 test processes share the GPU.
    for r in (r for r in read if r["status"] == "ok"):
        graph, launch = float(r["graph_ms"]), float(r["launch_ms"])
        assert r["timed_by"] == "graph" and graph > 0 and launch > 0
        element = 1 if r["kv_dtype"] else 2                              # bytes per cached K/V element
        assert float(r["throughput"]) == pytest.approx(float(r["kv_tokens"]) * 2 * 8 * 128 * element / graph / 1e6)
