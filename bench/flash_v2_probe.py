"""GPU probe for kernels/flash_v2.py, built to get the most out of one short device session.

(a) check: every config keep() admits, each on a few awkward problems (head dims 16..256 incl. non-powers of two,
    Nq != Nk, tails, GQA/MQA, batch > 1, fp16/bf16/fp32, causal rows that see no key, [B, N, H, D] strides), in
    parallel worker processes (compiling dominates), against the float64 reference via tunebench.correctness.
(b) bench: fp16 B=4 H=16 D=128 at N=4096 and 16384, causal and not, for a few configs next to torch SDPA with the
    FLASH_ATTENTION and CUDNN_ATTENTION backends; triton.testing.do_bench medians, reported in TFLOP/s.
(c) variants: source patches of the kernel (VARIANTS) can be checked and timed beside it in the same session.

    python3 bench/flash_v2_probe.py --check-seconds 120 --workers 15 --seed 0 --out $OUT
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import torch

from tunebench.correctness import close_enough, poison
from tunebench.kernels import flash_v2
from tunebench.shapes import Problem
import tunebench.reference as ref

P = lambda *a, **kw: Problem("flash_v2", *a, **kw)  # noqa: E731


def _C(m, n, w, s, tma=False):
    return {"BLOCK_M": m, "BLOCK_N": n, "num_warps": w, "num_stages": s, "USE_TMA": tma}


# (problem, layout): awkward on purpose; every flag combination appears at least once.
POOL = [
    (P(2, 4, 2, 1025, 1025, 128, "float16", causal=True), "bhnd"),
    (P(3, 2, 1, 97, 513, 80, "float16"), "bnhd"),
    (P(2, 8, 2, 513, 255, 64, "bfloat16", causal=True), "bhnd"),
    (P(1, 2, 2, 255, 1025, 256, "bfloat16", causal=True), "bnhd"),
    (P(2, 2, 1, 200, 333, 111, "float32", causal=True), "bhnd"),
    (P(2, 4, 4, 256, 256, 40, "float32"), "bnhd"),
    (P(2, 4, 1, 1, 4095, 96, "float16"), "bhnd"),
    (P(1, 4, 2, 2048, 2048, 160, "float16", causal=True), "bhnd"),
    (P(2, 2, 2, 1000, 17, 16, "float16", causal=True), "bnhd"),
    (P(3, 6, 3, 1024, 1024, 128, "bfloat16"), "bhnd"),
    (P(1, 2, 1, 97, 97, 256, "float32", causal=True), "bhnd"),
    (P(1, 2, 2, 4096, 4096, 64, "float16", causal=True), "bhnd"),
    (P(2, 4, 2, 512, 1024, 256, "float16"), "bhnd"),
    (P(2, 2, 1, 333, 128, 128, "float32"), "bnhd"),
    # Same specializations as the bench shapes (even tiles, D 128 fp16): checking them compiles the bench kernels.
    (P(1, 2, 2, 256, 256, 128, "float16"), "bhnd"),
    (P(1, 2, 2, 256, 256, 128, "float16", causal=True), "bhnd"),
]
BENCH_WARMUP = (len(POOL) - 2, len(POOL) - 1)
# DEFAULT, the other candidates for it (admitted for every problem) and the TMA configs most likely to win run on the
# whole pool.
FULL_POOL_CONFIGS = [flash_v2.DEFAULT, _C(128, 64, 8, 3, True), _C(128, 128, 8, 3, True), _C(64, 64, 4, 3, True),
                     _C(128, 32, 8, 3), _C(128, 32, 8, 4), _C(64, 64, 8, 3), _C(64, 32, 4, 4)]
# [(variant, [configs])]: what the bench times.
BENCH_PLAN = [
    ("base", [_C(64, 64, 4, 3), _C(128, 32, 8, 3), _C(128, 32, 8, 4), _C(64, 64, 8, 3), _C(64, 32, 4, 4),
              _C(128, 64, 8, 3), _C(128, 128, 8, 3), _C(64, 64, 4, 3, True), _C(128, 128, 8, 3, True)]),
]
# Source patches of kernels/flash_v2.py, (old, new) text pairs, that a plan can time beside it. Earlier sessions
# timed the tutorial's late l_i update, K loaded pre-transposed and causal tiles in launch order: all within noise.
VARIANTS = {"base": []}
_LOADED = {}


def variant(name: str):
    """The flash_v2 module with VARIANTS[name] applied, imported from a file (triton.jit reads the source)."""
    if name == "base":
        return flash_v2
    if name not in _LOADED:
        import importlib.util
        import inspect
        import tempfile
        src = inspect.getsource(flash_v2)
        for old, new in VARIANTS[name]:
            assert src.count(old) == 1, (name, old)
            src = src.replace(old, new)
        # One file per process: parallel workers must not read each other's half-written file.
        path = os.path.join(tempfile.gettempdir(), f"flash_v2_{name}_{os.getpid()}.py")
        with open(path, "w") as fh:
            fh.write(src)
        # Named inside tunebench.kernels, so that its relative imports (from ._launch) resolve.
        spec = importlib.util.spec_from_file_location(f"tunebench.kernels.flash_v2_{name}", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        _LOADED[name] = mod
    return _LOADED[name]


def all_configs():
    keys = list(flash_v2.SPACE)
    return [dict(zip(keys, vals)) for vals in itertools.product(*flash_v2.SPACE.values())]


def check_triples(per_config: int, plan, seed: int = 0) -> list[tuple[str, dict, int]]:
    """(variant, config, pool index), most important first: each benched (variant, config) on the bench-shaped
    problems (so that the bench finds them compiled, and checked), FULL_POOL_CONFIGS on every problem (the first two
    for each variant too), then each admitted config on `per_config` pool problems (rotating with the seed),
    shuffled so that a deadline leaves a random sample."""
    first = [(name, c, i) for name, cs in plan for c in cs for i in BENCH_WARMUP
             if flash_v2.keep(c, POOL[i][0]) is None]
    for name in dict(plan):
        configs = FULL_POOL_CONFIGS if name == "base" else FULL_POOL_CONFIGS[:2]
        first += [(name, c, i) for c in configs for i, (p, _) in enumerate(POOL) if flash_v2.keep(c, p) is None]
    rest, cursor = [], seed
    for config in all_configs():
        admitted = [i for i, (p, _) in enumerate(POOL) if flash_v2.keep(config, p) is None]
        for j in range(min(per_config, len(admitted))):
            rest.append(("base", config, admitted[(cursor + j) % len(admitted)]))
        cursor += per_config
    random.Random(seed).shuffle(rest)
    return first + rest


def make_inputs(problem, layout, seed, device="cuda", scale=1.0):
    """q, k, v in the layout ("bnhd": [B, N, H, D] seen through .transpose(1, 2)), standard normal times `scale`
    (before the cast to the problem's dtype)."""
    g = torch.Generator().manual_seed(seed)
    p = problem

    def make(h, n):
        shape = (p.B, h, n, p.D) if layout == "bhnd" else (p.B, n, h, p.D)
        t = (torch.randn(*shape, generator=g) * scale).to(dtype=p.torch_dtype, device=device)
        return t if layout == "bhnd" else t.transpose(1, 2)

    return make(p.Hq, p.Nq), make(p.Hkv, p.Nk), make(p.Hkv, p.Nk)


def check_launch(launch, config, problem, qkv, refs) -> dict:
    """One launch(q, k, v, config, causal=..., out=...) into a NaN-poisoned output, against refs (the float64 and the
    naive low-precision reference) by tunebench.correctness.close_enough: {status: ok | incorrect | error, ...}."""
    q, k, v = qkv
    try:
        out = poison(torch.empty_like(q))
        t0 = time.time()
        launch(q, k, v, config, causal=problem.causal, out=out)
        if q.is_cuda:
            torch.cuda.synchronize()
        verdict = close_enough(out, *refs)
        return dict(status="ok" if verdict.ok else "incorrect", err=verdict.err, allowed=verdict.allowed,
                    reason=verdict.reason, secs=round(time.time() - t0, 2))
    except Exception as e:  # noqa: BLE001 - every failure is a finding
        return error_result(e)


def error_result(e: Exception) -> dict:
    """A check's result for an exception: its type and the tail of its message."""
    return dict(status="error", reason=f"{type(e).__name__}: {str(e)[-400:]}")


def poisons_context(result: dict) -> bool:
    """After a CUDA error the worker's context is poisoned: what it runs next cannot be trusted."""
    return result["status"] == "error" and ("CUDA" in result["reason"] or "illegal" in result["reason"])


def run_chunk(args) -> list[dict]:
    """Worker: checks its triples until the deadline. After a CUDA error the context is poisoned: skip the rest."""
    chunk, deadline = args
    refs = {}
    results, poisoned = [], None
    for name, config, idx in chunk:
        problem, layout = POOL[idx]
        row = {"variant": name, "config": config, "problem": problem.label(), "layout": layout}
        if poisoned or time.time() > deadline:
            results.append(dict(row, status="skipped", reason=poisoned or "deadline"))
            continue
        try:
            q, k, v = make_inputs(problem, layout, seed=idx)
            if idx not in refs:
                refs[idx] = (ref.attention(q, k, v, problem.causal),
                             ref.attention(q, k, v, problem.causal, dtype=q.dtype))
            row.update(check_launch(variant(name).launch, config, problem, (q, k, v), refs[idx]))
        except Exception as e:  # noqa: BLE001 - every failure is a finding (here: inputs or references)
            row.update(error_result(e))
        if poisons_context(row):
            poisoned = "after a CUDA error in this worker"
        results.append(row)
    return results


def check(workers: int, seconds: float, per_config: int, plan, seed: int) -> list[dict]:
    import multiprocessing as mp
    triples = check_triples(per_config, plan, seed)
    chunks = [triples[i:i + 4] for i in range(0, len(triples), 4)]
    deadline = time.time() + seconds
    print(f"check: {len(triples)} (variant, config, problem) triples, {workers} workers", flush=True)
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        rows = [r for rs in pool.map(run_chunk, [(c, deadline) for c in chunks]) for r in rs]
    by = {}
    for r in rows:
        by[r["status"]] = by.get(r["status"], 0) + 1
        if r["status"] in ("incorrect", "error"):
            print("FAIL", json.dumps(r), flush=True)
    print("check summary:", by, flush=True)
    return rows


def tflops(problem, ms):
    return problem.flops / (ms * 1e-3) / 1e12


def _time(fn) -> float:
    import triton
    return triton.testing.do_bench(fn, warmup=25, rep=150, return_mode="median")


def _bench_pass(plan, p, q, k, v, out, line):
    """One pass over SDPA and the plan; each entry keeps its best TFLOP/s over passes."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F

    def record(tag, fn):
        try:
            value = round(tflops(p, _time(fn)), 1)
        except Exception as e:  # noqa: BLE001
            value = f"{type(e).__name__}: {str(e)[-200:]}"
        if not isinstance(line.get(tag), float) or (isinstance(value, float) and value > line[tag]):
            line[tag] = value

    for tag, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
        with sdpa_kernel(backend):
            record(tag, lambda: F.scaled_dot_product_attention(q, k, v, is_causal=p.causal))
    for name, configs in plan:
        mod = variant(name)
        for c in configs:
            tag = "{v}{BLOCK_M}x{BLOCK_N}w{num_warps}s{num_stages}{tma}".format(
                **c, v="" if name == "base" else name + ":", tma="T" if c["USE_TMA"] else "P")
            if mod.keep(c, p) is not None:
                line[tag] = "rejected"
                continue
            record(tag, lambda: mod.launch(q, k, v, c, causal=p.causal, out=out))


def bench(plan, ns=(4096, 16384), passes=2):
    """One line per shape: TFLOP/s of the SDPA backends and of every (variant, config) in the plan, the best of
    `passes` interleaved passes (clocks drift over a session; interleaving spreads the drift over all entries)."""
    rows = []
    for n, causal in itertools.product(ns, (False, True)):
        p = P(4, 16, 16, n, n, 128, "float16", causal=causal)
        q, k, v = make_inputs(p, "bhnd", seed=1)
        out = torch.empty_like(q)
        line = {}
        for _ in range(passes):
            _bench_pass(plan, p, q, k, v, out, line)
        print(f"bench fp16 B4 H16 D128 N{n} {'causal' if causal else 'full'} TFLOP/s:", json.dumps(line), flush=True)
        rows.append({"N": n, "causal": causal, **line})
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--check-seconds", type=float, default=120)
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    ap.add_argument("--per-config", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0, help="rotates which pool problems each config is checked on")
    ap.add_argument("--plan", default=None, help="JSON [[variant, [configs]], ...] (default: BENCH_PLAN)")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--skip-bench", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    a = ap.parse_args(argv)
    print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    plan = json.loads(a.plan) if a.plan else BENCH_PLAN
    rows = [] if a.skip_check else check(a.workers, a.check_seconds, a.per_config, plan, a.seed)
    bench_rows = [] if a.skip_bench else bench(plan)
    with open(os.path.join(a.out, "flash_v2_probe.json"), "w") as fh:
        json.dump({"check": rows, "bench": bench_rows}, fh, indent=1, default=str)
    return 0 if not any(r["status"] in ("incorrect", "error") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
