"""Measuring for `tunebench bench`: every provider of a problem checked first, then the correct ones timed; and the
machine's ceilings measured in the same run (copy bandwidth, matmul rate).

How a provider is timed (median with the 20th and 80th percentiles):
- prefill: launch by launch (triton.testing.do_bench: CUDA events, L2 flushed before each launch);
- decode: by CUDA-graph replay (tunebench.tune.timing.graph_bench, as the tuner times decode and as a serving engine
  replays its decode step), and launch by launch beside it (launch_ms). Decode calls take tens of microseconds, so
  launch by launch a provider's host overhead and its number of launches (tunebench's split-K reduce is a second
  launch) are part of its time; the graph figure leaves them out. Throughput, ratios against peers and % of the copy
  ceiling (the bench graph-times the copy too) come from the graph figure; the launch-by-launch one shows what host
  overhead and extra launches cost.
  Graph replay does not flush L2: a problem whose K/V fits in twice the L2 cache says so in its notes.
- prefill with `tunebench bench --graph-prefill`: by graph replay too, the launch-by-launch figure beside it, as
  decode. The gap shows how much of a short prefill's launch-by-launch time is host launch cost (6-10% at N 1k, D 128
  on an H100, 2026-12-07; a Gluon launch binds more arguments than a Triton one).
"""
from __future__ import annotations

import datetime
import gc
import math
import statistics
import sys
import time
from dataclasses import dataclass, field

from ..inputs import make_inputs, reference_for
from ..shapes import Problem
from ..tune.timing import round_order
from . import ragged
from .providers import Provider, Runner, Skip, first_line

COPY_BYTES = 1 << 30
MATMUL_N = 8192
OK, WRONG, SKIPPED, FAILED = "ok", "wrong", "skipped", "failed"
GRAPH, LAUNCHES = "graph", "launches"     # what a measurement's median_ms was timed by
# After these a CUDA context is unusable: every later launch in the process fails, so the run stops there.
STICKY_CUDA_ERRORS = ("illegal memory access", "unspecified launch failure", "device-side assert",
                      "misaligned address", "illegal instruction")


@dataclass
class Measurement:
    problem: Problem
    provider: str
    peer: bool
    status: str                             # ok, wrong, skipped, failed
    median_ms: float | None = None          # the figure throughput and ratios come from (timed_by says how)
    p20_ms: float | None = None
    p80_ms: float | None = None
    err_ratio: float | None = None          # error / allowed (<= 1 passes)
    note: str = ""
    timed_by: str = ""                      # GRAPH (decode) or LAUNCHES (prefill)
    launch_ms: float | None = None          # launch-by-launch median (do_bench); decode reports it beside the graph
    round_ms: list[float] = field(default_factory=list)   # the figure's median in each interleaved round


def do_bench_timer(warmup_ms: float = 25.0, rep_ms: float = 100.0):
    """(median, p20, p80) in ms from triton.testing.do_bench: CUDA events, L2 flushed before each run."""
    def timer(fn) -> tuple[float, float, float]:
        from triton.testing import do_bench
        return tuple(do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8]))
    return timer


def graph_replay_timer(rep_ms: float = 100.0):
    """(median, p20, p80) in ms by CUDA-graph replay: the tuner's own graph_bench, ``rep_ms`` of launches per graph."""
    def timer(fn) -> tuple[float, float, float]:
        from ..tune.timing import graph_bench
        t = graph_bench(fn, rep=rep_ms)
        return t.median_ms, t.p20_ms, t.p80_ms
    return timer


def _sync(device) -> None:
    import torch
    if getattr(device, "type", device) == "cuda":
        torch.cuda.synchronize()


def _release(device) -> None:
    gc.collect()
    import torch
    if getattr(device, "type", device) == "cuda":
        torch.cuda.empty_cache()


def build_inputs(problem: Problem, device, seed: int):
    """The problem's shared inputs and the reference of the rows the bench checks (a ragged batch has its own)."""
    if isinstance(problem, ragged.RaggedDecode):
        inputs = ragged.make_inputs(problem, device, seed)
        return inputs, ragged.reference_for(inputs, seed)
    inputs = make_inputs(problem, device, seed)              # a paged cache in pages of problem.page
    return inputs, reference_for(inputs, seed)


def _l2_note(problem: Problem, device) -> str:
    """A warning for graph-timed decode whose K/V could stay in L2 between replays (graph replay does not flush)."""
    import torch
    if not problem.paged or torch.device(device).type != "cuda":
        return ""
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)
    if not l2 or problem.kv_bytes >= 2 * l2:
        return ""
    return f"; K/V {problem.kv_bytes / 2**20:.0f} MiB < 2 x L2 ({l2 >> 20} MiB): graph replay may read it from L2"


def _time(m: Measurement, fn, graphed: bool, timer, graph_timer) -> tuple[float, list[float]] | None:
    """One round: (launch-by-launch median, [median, p20, p80] of the figure the ratios use). Launch by launch, then,
    if ``graphed`` (decode; prefill too with graph_phases), by graph replay. None, with the row marked failed, when a
    graphed provider cannot be captured (it keeps its launch-by-launch figure)."""
    timing = [float(x) for x in timer(fn)]
    launch_ms, m.timed_by = timing[0], LAUNCHES
    if graphed:
        try:
            timing = [float(x) for x in graph_timer(fn)]
        except Exception as e:  # noqa: BLE001 -- e.g. a provider that syncs cannot be captured; its row says so
            m.status, m.launch_ms = FAILED, launch_ms
            m.note = f"graph timing failed ({type(e).__name__}: {first_line(e)}); launch by launch only. {m.note}"
            return None
        m.timed_by = GRAPH
    return launch_ms, timing


def _time_rounds(measured: dict[str, Measurement], runners: dict, graphed: bool, timer, graph_timer, rounds: int,
                 device) -> None:
    """Times every correct provider once per round, rotating which goes first (the tuner's round_order), so that
    drift over the seconds a problem takes (clocks, a neighbour on the host) falls on all of them alike. Each figure
    is the median over the rounds of that round's figure; round_ms keeps the rounds' medians."""
    names = list(runners)
    per_round: dict[str, list] = {name: [] for name in names}
    for r in range(rounds):
        for name in (names[j] for j in round_order(len(names), r)):
            m = measured[name]
            if m.status != OK:
                continue                         # failed in an earlier round: not timed again
            try:
                timed = _time(m, runners[name].fn, graphed, timer, graph_timer)
            except Exception as e:  # noqa: BLE001
                m.status, m.note = FAILED, f"timing failed: {type(e).__name__}: {first_line(e)}"
                _release(device)
                continue
            if timed is not None:
                per_round[name].append(timed)
    for name, timings in per_round.items():
        m = measured[name]
        if m.status != OK or not timings:
            continue
        m.launch_ms = statistics.median(t[0] for t in timings)
        m.median_ms, m.p20_ms, m.p80_ms = (statistics.median(t[1][q] for t in timings) for q in range(3))
        m.round_ms = [t[1][0] for t in timings]


def run_problem(problem: Problem, providers: list[Provider], *, device="cuda", timer=None, graph_timer=None,
                seed: int = 0, log=None, rounds: int = 1, graph_phases=("decode",)) -> list[Measurement]:
    """Every applicable provider on the same inputs: prepare, run once and check against the reference (all of them
    first), then time the correct ones in ``rounds`` interleaved rounds (timer: launch by launch; graph_timer: graph
    replay, for the phases in ``graph_phases``). Failures are recorded with their reason and never stop the others."""
    import torch
    timer = timer or do_bench_timer()
    graph_timer = graph_timer or graph_replay_timer()
    log = log or (lambda msg: None)
    phase = "decode" if problem.paged else "prefill"
    chosen = [pr for pr in providers if pr.applies(problem)]
    try:
        inputs, reference = build_inputs(problem, device, seed)
    except Exception as e:  # noqa: BLE001 -- e.g. out of memory: this problem is lost, not the run
        inputs = reference = None
        _release(device)
        why = f"building the inputs or the reference failed: {type(e).__name__}: {first_line(e)}"
        return [Measurement(problem, pr.name, pr.peer, FAILED, note=why) for pr in chosen]
    results: dict[str, Measurement] = {}
    runners: dict[str, Runner] = {}
    for pr in chosen:
        m = Measurement(problem, pr.name, pr.peer, FAILED)
        results[pr.name] = m
        t0 = time.perf_counter()
        try:
            runner = pr.make(inputs)
            m.note = runner.note
            if runner.out is not None:
                runner.out.fill_(math.nan)
            out = runner.fn()
            _sync(device)
            verdict = reference.check(out)
            m.err_ratio = verdict.ratio
            if not verdict.ok:
                m.status, m.note = WRONG, f"disagrees with the float64 reference: {verdict.reason}"
            elif torch.isnan(out).any():
                m.status, m.note = WRONG, "NaN in the output outside the checked rows (unwritten or overflow)"
            else:
                m.status = OK
                runners[pr.name] = runner
            # A later provider that writes nothing into recycled memory must not find this correct answer there.
            out.fill_(math.nan)
            del out
        except Skip as e:
            m.status, m.note = SKIPPED, str(e)
        except Exception as e:  # noqa: BLE001 -- one provider's failure is a result, not the end of the run
            m.status, m.note = FAILED, f"{type(e).__name__}: {first_line(e)}"
            _release(device)
        log(f"  {pr.name:<26} {m.status:<8} ({time.perf_counter() - t0:.1f} s) {m.note[:100]}")
    _time_rounds(results, runners, phase in graph_phases, timer, graph_timer, rounds, device)
    l2 = _l2_note(problem, device)
    for name in runners:
        results[name].note += l2 if results[name].status == OK and results[name].timed_by == GRAPH else ""
    del runners, inputs, reference
    _release(device)
    return list(results.values())


@dataclass
class Ceilings:
    copy_bytes_per_s: float
    matmul_flops_per_s: dict[str, float] = field(default_factory=dict)   # dtype -> FLOP/s
    notes: dict[str, str] = field(default_factory=dict)

    def for_problem(self, problem: Problem) -> tuple[float | None, str]:
        """The ceiling a problem's throughput is compared with, in its own unit, and its name."""
        if problem.paged:
            return self.copy_bytes_per_s / 1e9, "copy GB/s"
        rate = self.matmul_flops_per_s.get(problem.dtype)
        return (rate / 1e12 if rate else None), f"{problem.dtype} matmul TFLOP/s"


def copy_rate(nbytes: int, device, timer) -> float:
    """Bytes per second of a device-to-device copy run by the SMs, counting bytes read plus bytes written.

    An elementwise kernel (dst = -src), not ``dst.copy_(src)``: a same-device copy_ is a cudaMemcpy, which CUDA-graph
    capture turns into a memcpy node. Graph-timed that way, the H200 "copy ceiling" came out at 2.72 TB/s (2026-12-06;
    4.22 TB/s launch by launch on 2026-11-22) and the decode kernels at 126-157% of it."""
    import torch
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / (timer(lambda: torch.neg(src, out=dst))[0] * 1e-3)


def matmul_rate(n: int, dtype: str, device, timer) -> float:
    """FLOP/s of an n x n x n torch.matmul on random data (zeros can run faster than real data)."""
    import torch
    a, b = (torch.randn(n, n, device=device).to(getattr(torch, dtype)) for _ in range(2))
    c = torch.empty_like(a)
    return 2.0 * n ** 3 / (timer(lambda: torch.matmul(a, b, out=c))[0] * 1e-3)


def measure_ceilings(dtypes, device="cuda", timer=None, copy_bytes: int = COPY_BYTES,
                     matmul_n: int = MATMUL_N, copy_timer=None) -> Ceilings:
    """The copy bandwidth, and the matmul rate of bf16 and of each dtype the problems use. copy_timer (default:
    timer): the bench gives its graph timer, so that decode's % of copy compares two graph-timed figures."""
    timer = timer or do_bench_timer()
    how = "" if copy_timer is None else ", CUDA-graph replay"
    ceilings = Ceilings(copy_rate(copy_bytes, device, copy_timer or timer),
                        notes={"copy": f"{copy_bytes >> 20} MiB elementwise copy by the SMs, read + write{how}"})
    for dtype in sorted(set(dtypes) | {"bfloat16"}):
        ceilings.matmul_flops_per_s[dtype] = matmul_rate(matmul_n, dtype, device, timer)
        ceilings.notes[f"matmul {dtype}"] = f"torch.matmul {matmul_n}^3, random data"
    _release(device)
    return ceilings


def environment() -> dict:
    import torch
    from ..device import DeviceIdentity
    d = DeviceIdentity.current()
    return {"device": d.name, "capability": d.capability, "sm_count": d.sm_count, "driver": d.driver,
            "torch": d.torch, "triton": d.triton, "cuda": torch.version.cuda,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": "tunebench " + " ".join(sys.argv[1:])}

