"""Measuring for `tunebench bench`: every provider of a problem checked first, then the correct ones timed
(triton.testing.do_bench: median with the 20th and 80th percentiles); and the machine's ceilings measured in the
same run (copy bandwidth, matmul rate).
"""
from __future__ import annotations

import datetime
import gc
import math
import sys
import time
from dataclasses import dataclass, field

from ..inputs import make_inputs, reference_for
from ..shapes import Problem
from .providers import Provider, Runner, Skip, first_line

COPY_BYTES = 1 << 30
MATMUL_N = 8192
OK, WRONG, SKIPPED, FAILED = "ok", "wrong", "skipped", "failed"
# After these a CUDA context is unusable: every later launch in the process fails, so the run stops there.
STICKY_CUDA_ERRORS = ("illegal memory access", "unspecified launch failure", "device-side assert",
                      "misaligned address", "illegal instruction")


@dataclass
class Measurement:
    problem: Problem
    provider: str
    peer: bool
    status: str                             # ok, wrong, skipped, failed
    median_ms: float | None = None
    p20_ms: float | None = None
    p80_ms: float | None = None
    err_ratio: float | None = None          # error / allowed (<= 1 passes)
    note: str = ""


def do_bench_timer(warmup_ms: float = 25.0, rep_ms: float = 100.0):
    """(median, p20, p80) in ms from triton.testing.do_bench: CUDA events, L2 flushed before each run."""
    def timer(fn) -> tuple[float, float, float]:
        from triton.testing import do_bench
        return tuple(do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8]))
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


def run_problem(problem: Problem, providers: list[Provider], *, device="cuda", timer=None, seed: int = 0,
                log=None) -> list[Measurement]:
    """Every applicable provider on the same inputs: prepare, run once and check against the reference (all of them
    first), then time the correct ones. Failures are recorded with their reason and never stop the others."""
    import torch
    timer = timer or do_bench_timer()
    log = log or (lambda msg: None)
    phase = "decode" if problem.paged else "prefill"
    chosen = [pr for pr in providers if pr.phase == phase]
    try:
        inputs = make_inputs(problem, device, seed)          # a paged cache in pages of problem.page
        reference = reference_for(inputs, seed)
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
    for name, runner in runners.items():
        m = results[name]
        try:
            m.median_ms, m.p20_ms, m.p80_ms = (float(x) for x in timer(runner.fn))
        except Exception as e:  # noqa: BLE001
            m.status, m.note = FAILED, f"timing failed: {type(e).__name__}: {first_line(e)}"
            _release(device)
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
    """Bytes per second of a device-to-device copy, counting bytes read plus bytes written."""
    import torch
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / (timer(lambda: dst.copy_(src))[0] * 1e-3)


def matmul_rate(n: int, dtype: str, device, timer) -> float:
    """FLOP/s of an n x n x n torch.matmul on random data (zeros can run faster than real data)."""
    import torch
    a, b = (torch.randn(n, n, device=device).to(getattr(torch, dtype)) for _ in range(2))
    c = torch.empty_like(a)
    return 2.0 * n ** 3 / (timer(lambda: torch.matmul(a, b, out=c))[0] * 1e-3)


def measure_ceilings(dtypes, device="cuda", timer=None, copy_bytes: int = COPY_BYTES,
                     matmul_n: int = MATMUL_N) -> Ceilings:
    """The copy bandwidth, and the matmul rate of bf16 and of each dtype the problems use."""
    timer = timer or do_bench_timer()
    ceilings = Ceilings(copy_rate(copy_bytes, device, timer),
                        notes={"copy": f"{copy_bytes >> 20} MiB device-to-device copy, read + write"})
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

