"""How long a launch takes: the median and the 20th/80th percentiles, in milliseconds.

On a GPU, ``triton.testing.do_bench`` times each launch with CUDA events and flushes the L2 cache before each one, so
a kernel is not credited with inputs left in cache by its previous run. Under the Triton interpreter the same
functions take a few wall-clock measurements instead: those exercise the tuner end to end on a CPU, and say nothing
about a GPU (the store marks such a device as not a speed measurement).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

QUANTILES = (0.5, 0.2, 0.8)     # median, p20, p80: the order do_bench returns them in
GRAPH_REP_MS = 25               # per replayed graph: 10 replays of 25 ms, 0.25 s a decode timing (was 100 ms, 1 s)
INTERPRET_REPS = 2              # the interpreter is slow (~0.1-0.5 s a tiny launch); the check launch warmed it up


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float


Bench = Callable[[Callable[[], object]], Timing]


def gpu_bench(fn: Callable[[], object]) -> Timing:
    from triton.testing import do_bench
    median, p20, p80 = do_bench(fn, quantiles=list(QUANTILES))
    return Timing(median, p20, p80)


def graph_bench(fn: Callable[[], object], rep: float = GRAPH_REP_MS) -> Timing:
    """CUDA-graph replay (triton.testing.do_bench_cudagraph): the launches' host overhead is left out, as it is when a
    serving engine replays its decode step from a graph. Used for paged decode, whose kernels take tens of
    microseconds: timed one launch at a time, with compile workers loading the host, their host overhead would rank
    the configs rather than the GPU time. ``rep``: ms of launches captured in the graph, which is replayed 10 times,
    so one timing takes about 10 x rep (GRAPH_REP_MS for the tuner: hundreds of launches at tens of microseconds).
    The L2 cache is not flushed between replays (unlike do_bench): inputs that fit in L2 are read partly from it.
    `tunebench bench` times every decode provider with this function too."""
    from triton.testing import do_bench_cudagraph
    median, p20, p80 = do_bench_cudagraph(fn, rep=rep, quantiles=list(QUANTILES))
    return Timing(median, p20, p80)


def wall_bench(fn: Callable[[], object], reps: int = INTERPRET_REPS) -> Timing:
    """Wall-clock time of ``reps`` calls: for the interpreter, where there is no device to time."""
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return Timing(*quantiles(times, QUANTILES))


# About how long one timing takes on a GPU (bench_for), in seconds: do_bench's 25 ms warm-up and 100 ms of launches,
# or a graph of GRAPH_REP_MS of launches replayed 10 times. For ordering work (tunebench.tune.run.schedule), not for
# reporting.
TYPICAL_S = {"launches": 0.1, "graph": 10 * GRAPH_REP_MS / 1e3}


def typical_s(paged: bool) -> float:
    return TYPICAL_S["graph" if paged else "launches"]


def bench_for(interpret: bool, paged: bool = False) -> Bench:
    if interpret:
        return wall_bench
    return graph_bench if paged else gpu_bench


def quantiles(values: list[float], qs: tuple[float, ...]) -> list[float]:
    """Linear interpolation between order statistics, as torch.quantile (and so do_bench) computes them."""
    xs = sorted(values)
    out = []
    for q in qs:
        pos = q * (len(xs) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(xs) - 1)
        out.append(xs[lo] + (xs[hi] - xs[lo]) * (pos - lo))
    return out


def interleaved(fns: list[Callable[[], object]], bench: Bench, rounds: int, first: int = 0) -> list[list[float]]:
    """Times every fn once per round, rotating which goes first, so that drift (clocks, temperature, a neighbour on
    the machine) falls on all of them alike. Returns each fn's medians, one per round. ``first``: the number of the
    first round, when the rounds are shared among workers."""
    medians: list[list[float]] = [[] for _ in fns]
    for r in range(first, first + rounds):
        for j in round_order(len(fns), r):
            medians[j].append(bench(fns[j]).median_ms)
    return medians


def round_order(count: int, round_number: int) -> list[int]:
    """The order round ``round_number`` times ``count`` contenders in: rotated by one each round, so that each goes
    first in turn (interleaved here, and tunebench bench's rounds)."""
    return [(i + round_number) % count for i in range(count)]


def contenders(rounds: list[list[float]]) -> list[int]:
    """The finalists still in the running after interleaved rounds: the leader (lowest median of its rounds) and
    every finalist whose fastest round beats the leader's slowest. Their rounds overlap, so a few more decide it: a
    fast config's rounds spread most, and two slow rounds of three can make a slower config the winner."""
    leader = min(range(len(rounds)), key=lambda i: confirmed_ms(rounds[i]))
    return [i for i in range(len(rounds)) if i == leader or min(rounds[i]) < max(rounds[leader])]


def confirmed_ms(round_medians: list[float]) -> float:
    """One number for a config re-timed over several rounds: the median of its round medians."""
    return statistics.median(round_medians)

