"""GPU probe for kernels/flash_v3.py (Gluon, sm_90), built for one short call on an H200 (about 90 s).

(a) check: every config keep() admits, on each bench problem (B4 H16/16 bf16: D128 at N 4096/8192/16384, causal and
    not; D64 N16384), in spawned worker processes (compiling dominates, and a config that hangs or faults must not
    take the probe down): NaN-poisoned output, the last CHECK_ROWS query rows of the first and last batch against the
    float64 reference through tunebench.correctness.close_enough (the last rows: with bottom-right causal alignment,
    q[..., -R:, :] against the whole K/V is exactly the reference of those rows), and no NaN anywhere. DEFAULT and
    its warp-specialized twin also run awkward shapes (tails, GQA 4, Nq != Nk causal).
(b) bench, in this process, every check-passed config beside flash_v2's DEFAULT and SDPA cuDNN: do_bench medians in
    TFLOP/s, with ratios to cuDNN and to the bf16 matmul ceiling (torch.matmul 8192^3) measured in the same run.
A config that fails to compile, faults, hangs or is wrong is reported and skipped; nothing stops the probe.

    python3 bench/flash_v3_probe.py --workers 15 --out $OUT
"""
from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing as mp
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, TimeoutError as FutureTimeout

import torch

from tunebench.correctness import close_enough, poison
from tunebench.kernels import flash_v2, flash_v3
from tunebench.shapes import Problem
import tunebench.reference as ref

P = lambda *a, **kw: Problem("flash_v3", *a, **kw)  # noqa: E731
BENCH = [P(4, 16, 16, n, n, 128, "bfloat16", causal=c) for n in (4096, 8192, 16384) for c in (False, True)]
BENCH += [P(4, 16, 16, 16384, 16384, 64, "bfloat16")]
AWKWARD = [P(2, 8, 2, 1000, 777, 128, "bfloat16", causal=True), P(1, 4, 4, 97, 1025, 64, "float16")]
CHECK_ROWS = 64


def admitted(problem) -> list[dict]:
    keys = list(flash_v3.SPACE)
    confs = [dict(zip(keys, vals)) for vals in itertools.product(*flash_v3.SPACE.values())]
    return [c for c in confs if flash_v3.keep(c, problem) is None]


def inputs(problem, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    mk = lambda h, n: torch.randn(problem.B, h, n, problem.D, generator=g, device="cuda").to(problem.torch_dtype)  # noqa: E731
    return mk(problem.Hq, problem.Nq), mk(problem.Hkv, problem.Nk), mk(problem.Hkv, problem.Nk)


def check_one(problem, config, qkv, rows: int = CHECK_ROWS) -> dict:
    """Runs the config once into a poisoned output and checks the last `rows` query rows of the first and last batch
    (with bottom-right causal alignment, those rows against the whole K/V are exactly their own reference)."""
    q, k, v = qkv
    out = poison(torch.empty_like(q))
    t0 = time.time()
    flash_v3.launch(q, k, v, config, causal=problem.causal, out=out)
    torch.cuda.synchronize()
    secs = time.time() - t0
    if torch.isnan(out).any():
        return {"status": "incorrect", "reason": f"{int(torch.isnan(out).sum())} NaN outputs", "secs": secs}
    worst = None
    last = slice(max(0, problem.Nq - rows), problem.Nq)
    for b in sorted({0, problem.B - 1}):
        qs, ks, vs = q[b:b + 1, :, last], k[b:b + 1], v[b:b + 1]
        verdict = close_enough(out[b:b + 1, :, last], ref.attention(qs, ks, vs, problem.causal),
                               ref.attention(qs, ks, vs, problem.causal, dtype=q.dtype))
        if not verdict.ok:
            return {"status": "incorrect", "reason": f"batch {b}: {verdict.reason}", "secs": secs}
        worst = max(worst or 0.0, verdict.ratio)
    return {"status": "ok", "worst_ratio": round(worst, 3), "secs": round(secs, 2)}


def check_task(task) -> list[dict]:
    """Worker: one config on its problems; after a CUDA error the context is poisoned, so the rest is skipped."""
    config, problems = task
    rows, poisoned = [], None
    for problem in problems:
        row = {"config": config, "problem": problem.label()}
        if poisoned:
            rows.append(dict(row, status="skipped", reason=poisoned))
            continue
        try:
            row.update(check_one(problem, config, inputs(problem)))
        except Exception as e:  # noqa: BLE001 - every failure is a finding
            msg = f"{type(e).__name__}: {str(e)[-600:]}"
            row.update(status="error", reason=msg)
            if "CUDA" in msg or "illegal" in msg or "cuda" in msg:
                poisoned = "after a CUDA error in this worker"
        rows.append(row)
    return rows


def check(workers: int, seconds: float) -> list[dict]:
    """Every admitted config on every bench problem it is admitted for (plus AWKWARD for DEFAULT and its
    warp-specialized twin), in worker processes; tasks unfinished at the deadline are reported as timeouts."""
    by_config = {}
    for problem in BENCH:
        for config in admitted(problem):
            by_config.setdefault(json.dumps(config, sort_keys=True), []).append(problem)
    for config in (flash_v3.DEFAULT, dict(flash_v3.DEFAULT, WARP_SPECIALIZE=True)):
        by_config.setdefault(json.dumps(config, sort_keys=True), []).extend(AWKWARD)
    # The longest tasks first (they bound the wall time), DEFAULT first of all.
    tasks = sorted(((json.loads(c), ps) for c, ps in by_config.items()),
                   key=lambda t: (t[0] != flash_v3.DEFAULT, -len(t[1])))
    print(f"check: {len(tasks)} configs, {sum(len(ps) for _, ps in tasks)} (config, problem) pairs, "
          f"{workers} workers", flush=True)
    pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"))
    futures = [(task, pool.submit(check_task, task)) for task in tasks]
    deadline, rows = time.time() + seconds, []
    for (config, problems), future in futures:
        try:
            rows += future.result(timeout=max(0.1, deadline - time.time()))
        except FutureTimeout:
            rows += [{"config": config, "problem": p.label(), "status": "timeout",
                      "reason": f"unfinished after {seconds:.0f} s (a hang, or too little time)"} for p in problems]
        except Exception as e:  # noqa: BLE001 - a dead worker
            rows += [{"config": config, "problem": p.label(), "status": "error",
                      "reason": f"worker died: {type(e).__name__}: {e}"} for p in problems]
    for process in list(getattr(pool, "_processes", {}).values()):   # our own workers, hung or idle
        process.kill()
    pool.shutdown(wait=False, cancel_futures=True)
    summary = {}
    for r in rows:
        summary[r["status"]] = summary.get(r["status"], 0) + 1
        if r["status"] != "ok":
            print("FAIL", json.dumps(r), flush=True)
    print("check summary:", summary, flush=True)
    return rows


def _time(fn) -> float:
    import triton
    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


def matmul_ceiling() -> float:
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    return 2 * 8192**3 / (_time(lambda: a @ b) * 1e-3) / 1e12


def bench(rows: list[dict], seconds: float) -> list[dict]:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F
    ceiling = matmul_ceiling()
    print(f"bf16 matmul ceiling (8192^3): {ceiling:.0f} TFLOP/s", flush=True)
    passed = {}
    for r in rows:
        if r["status"] == "ok":
            passed.setdefault(r["problem"], []).append(r["config"])
    results, start = [], time.time()
    for i, problem in enumerate(BENCH):
        deadline = start + seconds * (i + 1) / len(BENCH)      # each problem its share; DEFAULT first in each
        q, k, v = inputs(problem)
        out = torch.empty_like(q)
        tflops = lambda ms: problem.flops / (ms * 1e-3) / 1e12  # noqa: E731
        line = {"problem": problem.label(), "ceiling": round(ceiling, 1)}

        def cudnn():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=problem.causal)
        entries = [("cudnn", cudnn), ("flash_v2 DEFAULT", lambda: flash_v2.launch(
            q, k, v, flash_v2.DEFAULT, causal=problem.causal, out=out))]
        configs = sorted(passed.get(problem.label(), []), key=lambda c: c != flash_v3.DEFAULT)
        entries += [(f"v3 {json.dumps(c)}", (lambda c: lambda: flash_v3.launch(
            q, k, v, c, causal=problem.causal, out=out))(c)) for c in configs]
        for tag, fn in entries:
            if time.time() > deadline:
                line[tag] = "skipped: deadline"
                continue
            try:
                line[tag] = round(tflops(_time(fn)), 1)
            except Exception as e:  # noqa: BLE001
                line[tag] = f"error: {type(e).__name__}: {str(e)[:200]}"
        report(line)
        results.append(line)
        del q, k, v, out
    return results


def report(line: dict) -> None:
    cudnn, ceiling = line.get("cudnn"), line["ceiling"]
    numbers = {k: v for k, v in line.items() if k.startswith(("v3", "flash_v2")) and isinstance(v, float)}
    v3 = {k: v for k, v in numbers.items() if k.startswith("v3")}
    best = max(v3, key=v3.get) if v3 else None
    shown = lambda v: f"{v} TFLOP/s" if isinstance(v, float) else "(see below)"  # noqa: E731
    print(f"\n{line['problem']}: cuDNN {shown(cudnn)}, flash_v2 DEFAULT {shown(line.get('flash_v2 DEFAULT'))}",
          flush=True)
    for tag, value in sorted(numbers.items(), key=lambda kv: -kv[1])[:8]:
        vs = f"{value / cudnn:.2f}x cuDNN" if isinstance(cudnn, float) else "cuDNN n/a"
        print(f"  {value:7.1f}  {vs}  {value / ceiling:5.1%} of ceiling  {tag}", flush=True)
    if best:
        print(f"  best flash_v3: {best}", flush=True)
    for tag, value in line.items():
        if isinstance(value, str) and tag != "problem":
            print(f"  {tag}: {value}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    parser.add_argument("--check-seconds", type=float, default=55)
    parser.add_argument("--bench-seconds", type=float, default=30)
    parser.add_argument("--out", default=os.environ.get("OUT"))
    args = parser.parse_args()
    if reason := flash_v3.unavailable():
        print(f"flash_v3 cannot run here: {reason}", file=sys.stderr)
        return 2
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"triton {__import__('triton').__version__}", flush=True)
    rows = check(args.workers, args.check_seconds)
    results = bench(rows, args.bench_seconds)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "flash_v3_probe.json"), "w") as fh:
            json.dump({"check": rows, "bench": results}, fh, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
