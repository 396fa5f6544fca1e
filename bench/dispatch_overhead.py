"""Host cost of tunebench's dispatch, on a GPU: import time over torch + triton, per-call overhead of
tunebench.flash_attention / paged_attention over a direct launch of the same config, and the cost per call of
recording (tunebench.record) once the call's bucket has been seen (goal: under 1 us); on Hopper, also the host time
of one flash_v3 launch against one flash_v2 launch (DEFAULT configs): at a 70-100 us kernel, a launch path slower
than do_bench's L2 flush shows up in its timings (the N 1k case of BENCHMARKS.md).

Both paths launch the same kernel on a tiny problem, so the host is the bottleneck and the difference in wall time
per call is the dispatcher's own cost (shape key, dict lookup, Python call). Median of several rounds.
"""
import statistics
import subprocess
import sys
import time

import torch


def import_time(runs=3) -> tuple[float, float]:
    code = ("import time; t=time.perf_counter(); import {m}; print(time.perf_counter()-t)")
    base, full = [], []
    for _ in range(runs):   # interleaved, so file-cache warmth favours neither
        base.append(float(subprocess.check_output([sys.executable, "-c", code.format(m="torch, triton")])))
        full.append(float(subprocess.check_output([sys.executable, "-c", code.format(m="torch, triton, tunebench")])))
    return statistics.median(base), statistics.median(full)


def _round(fn, n) -> float:
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e6


def paired_us(direct, dispatched, n=2000, rounds=15) -> tuple[float, float, float]:
    """Host time per call of each path, rounds alternating between them; the overhead is the median of the per-round
    differences, so that drift between rounds cancels."""
    for fn in (direct, dispatched):
        for _ in range(200):
            fn()
    torch.cuda.synchronize()
    a, b = [], []
    for r in range(rounds):
        first, second = (direct, dispatched) if r % 2 == 0 else (dispatched, direct)
        x, y = _round(first, n), _round(second, n)
        a.append(x if first is direct else y)
        b.append(y if first is direct else x)
    return statistics.median(a), statistics.median(b), statistics.median(d2 - d1 for d1, d2 in zip(a, b))


def recording_us(call, n=2000, rounds=15) -> float:
    """Extra host time per call while tunebench.record is active, for a call whose bucket it has seen: rounds
    alternate recording off and on, and the median of the per-round differences counts."""
    import tempfile
    from tunebench.runtime import record
    with tempfile.TemporaryDirectory() as tmp, record.record(f"{tmp}/shapes.json") as recorder:
        for _ in range(200):
            call()
        diffs = []
        for r in range(rounds):
            times = {}
            for on in ((False, True) if r % 2 == 0 else (True, False)):
                record._ACTIVE = recorder if on else None
                times[on] = _round(call, n)
            diffs.append(times[True] - times[False])
        record._ACTIVE = recorder
    return statistics.median(diffs)


def chosen(dispatch, kernel: str) -> dict:
    """The config the dispatcher cached for this script's one call of ``kernel`` (its cache key also holds the
    shapes and dtypes, which grew a field before: matching on the kernel alone keeps this script working)."""
    configs = [config for key, config in dispatch._DISPATCHER._cache.items() if key[0] == kernel]
    assert len(configs) == 1, f"expected one cached {kernel} call, found {len(configs)}"
    return configs[0]


def launch_v3_against_v2(q, k, v) -> None:
    """Host time per direct launch of flash_v3 and of flash_v2 (DEFAULT) on the same tiny inputs, where flash_v3
    runs (Hopper); the difference is flash_v3's launch path (argument checks, four TMA descriptors, Gluon's binding)."""
    from tunebench.registry import registered
    if not registered("flash_v3"):
        print("flash_v3: not registered here (it needs a Hopper GPU): launch cost not measured")
        return
    from tunebench.kernels import flash_v2, flash_v3
    v2, v3, over = paired_us(lambda: flash_v2.launch(q, k, v, config=dict(flash_v2.DEFAULT)),
                             lambda: flash_v3.launch(q, k, v, config=dict(flash_v3.DEFAULT)))
    print(f"direct launch host time: flash_v2 {v2:.1f} us/call, flash_v3 {v3:.1f} us/call: flash_v3 costs "
          f"{over:+.1f} us more (median of paired rounds)")
    v3_launch_breakdown(flash_v3, q, k, v)


def v3_launch_breakdown(flash_v3, q, k, v, n=2000) -> None:
    """Where a flash_v3 launch's host time goes: building its arguments (four TMA descriptors), Triton's own call
    with those arguments prebuilt (binding, specialisation key, descriptor encoding, the launch), the rest being
    launch()'s checks; then the functions with the most own time over 500 profiled launches."""
    import cProfile
    import io
    import pstats
    config = dict(flash_v3.DEFAULT)
    out = torch.empty_like(q)
    kernel, grid, args, options = flash_v3._arguments(q, k, v, out, config, False, None)
    parts = {"launch()": lambda: flash_v3.launch(q, k, v, config=config, out=out),
             "_arguments()": lambda: flash_v3._arguments(q, k, v, out, config, False, None),
             "kernel[grid](prebuilt)": lambda: kernel[grid](*args, **options)}
    for fn in parts.values():
        for _ in range(200):
            fn()
    torch.cuda.synchronize()
    us = {name: statistics.median(_round(fn, n) for _ in range(5)) for name, fn in parts.items()}
    rest = us["launch()"] - us["_arguments()"] - us["kernel[grid](prebuilt)"]
    print("flash_v3 launch host time: " + ", ".join(f"{name} {t:.1f} us" for name, t in us.items())
          + f"; checks and the rest {rest:.1f} us (medians of 5 rounds of {n})")
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(500):
        parts["launch()"]()
    profile.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(18)
    print("\n".join(line for line in text.getvalue().splitlines() if line.strip())[-3000:])


def main():
    import tunebench
    from tunebench.runtime import dispatch
    from tunebench.kernels import flash_v2, paged_attention as pa
    from tunebench.paged_inputs import pack_paged
    base, full = import_time()
    print(f"import: torch+triton {base * 1e3:.0f} ms; + tunebench {full * 1e3:.0f} ms "
          f"(tunebench adds {(full - base) * 1e3:.0f} ms)")
    q = torch.randn(1, 2, 16, 64, device="cuda", dtype=torch.float16)
    k, v = torch.randn_like(q), torch.randn_like(q)
    tunebench.flash_attention(q, k, v)
    config = chosen(dispatch, "flash_v2")
    direct, tuned, over = paired_us(lambda: flash_v2.launch(q, k, v, config=config),
                                    lambda: tunebench.flash_attention(q, k, v))
    print(f"flash_attention: direct launch {direct:.1f} us/call, dispatched {tuned:.1f} us/call: "
          f"overhead {over:.1f} us (median of paired rounds)")
    print(f"flash_attention while recording: {recording_us(lambda: tunebench.flash_attention(q, k, v)):+.2f} us/call "
          f"(goal < 1 us)")
    launch_v3_against_v2(q, k, v)
    qd = torch.randn(2, 8, 64, device="cuda", dtype=torch.bfloat16)
    kd = torch.randn(2, 2, 40, 64, device="cuda", dtype=torch.bfloat16)
    lens = torch.full((2,), 40, dtype=torch.int32, device="cuda")
    kc, vc, tables = pack_paged(kd, kd.clone(), lens, 16)
    tunebench.paged_attention(qd, kc, vc, tables, lens)
    pconf = chosen(dispatch, "paged_attention")
    direct, tuned, over = paired_us(lambda: pa.launch(qd, kc, vc, tables, lens, config=pconf),
                                    lambda: tunebench.paged_attention(qd, kc, vc, tables, lens))
    print(f"paged_attention: direct launch {direct:.1f} us/call, dispatched {tuned:.1f} us/call: "
          f"overhead {over:.1f} us (median of paired rounds)")
    print(f"paged_attention while recording: "
          f"{recording_us(lambda: tunebench.paged_attention(qd, kc, vc, tables, lens)):+.2f} us/call (goal < 1 us)")


if __name__ == "__main__":
    main()
