"""GPU probe for kernels/flash_v2.py, built to get the most out of one short device session.

(a) check: every config keep() admits, each on a few awkward problems (head dims 16..256 incl. non-powers of two,
    Nq != Nk, tails, GQA/MQA, batch > 1, fp16/bf16/fp32, causal rows that see no key, [B, N, H, D] strides), in
    parallel worker processes (compiling dominates), against the float64 reference via tunebench.correctness.
(b) bench: fp16 B=4 H=16 D=128 at N=4096 and 16384, causal and not, for a few configs next to torch SDPA with the
    FLASH_ATTENTION and CUDNN_ATTENTION backends; triton.testing.do_bench medians, reported in TFLOP/s.

    python3 bench/flash_v2_probe.py --check-seconds 150 --workers 15
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import torch

from tunebench.correctness import close_enough, poison
from tunebench.kernels import flash_v2
from tunebench.shapes import Problem
import tunebench.reference as ref

P = lambda *a, **kw: Problem("flash_v2", *a, **kw)  # noqa: E731
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
]
# DEFAULT and the TMA configs most likely to win also run on the whole pool.
FULL_POOL_CONFIGS = [
    flash_v2.DEFAULT,
    {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3, "USE_TMA": True},
    {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2, "USE_TMA": True},
]
BENCH_CONFIGS = [
    {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2, "USE_TMA": False},
    {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3, "USE_TMA": False},
    {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2, "USE_TMA": False},
    {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3, "USE_TMA": False},
    {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3, "USE_TMA": True},
    {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 4, "USE_TMA": True},
    {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2, "USE_TMA": True},
    {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3, "USE_TMA": True},
    {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 4, "num_stages": 3, "USE_TMA": True},
    {"BLOCK_M": 256, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2, "USE_TMA": True},
]


def all_configs():
    keys = list(flash_v2.SPACE)
    return [dict(zip(keys, vals)) for vals in itertools.product(*flash_v2.SPACE.values())]


def check_pairs(per_config: int, seed: int = 0) -> list[tuple[dict, int]]:
    """(config, pool index) pairs: each admitted config on `per_config` pool problems (rotating), plus the
    FULL_POOL_CONFIGS on every problem they are admitted for."""
    pairs = []
    cursor = seed
    for config in all_configs():
        admitted = [i for i, (p, _) in enumerate(POOL) if flash_v2.keep(config, p) is None]
        if not admitted:
            continue
        for j in range(min(per_config, len(admitted))):
            pairs.append((config, admitted[(cursor + j) % len(admitted)]))
        cursor += per_config
    for config in FULL_POOL_CONFIGS:
        pairs += [(config, i) for i, (p, _) in enumerate(POOL) if flash_v2.keep(config, p) is None]
    return pairs


def make_inputs(problem, layout, seed):
    g = torch.Generator().manual_seed(seed)
    p = problem

    def make(h, n):
        shape = (p.B, h, n, p.D) if layout == "bhnd" else (p.B, n, h, p.D)
        t = torch.randn(*shape, generator=g).to(dtype=p.torch_dtype, device="cuda")
        return t if layout == "bhnd" else t.transpose(1, 2)

    return make(p.Hq, p.Nq), make(p.Hkv, p.Nk), make(p.Hkv, p.Nk)


def run_chunk(args) -> list[dict]:
    """Worker: checks its pairs until the deadline. After a CUDA error the context is poisoned: skip the rest."""
    chunk, deadline = args
    refs = {}
    results, poisoned = [], None
    for config, idx in chunk:
        problem, layout = POOL[idx]
        row = {"config": config, "problem": problem.label(), "layout": layout}
        if poisoned or time.time() > deadline:
            results.append(dict(row, status="skipped", reason=poisoned or "deadline"))
            continue
        try:
            q, k, v = make_inputs(problem, layout, seed=idx)
            if idx not in refs:
                refs[idx] = (ref.attention(q, k, v, problem.causal),
                             ref.attention(q, k, v, problem.causal, dtype=q.dtype))
            out = poison(torch.empty_like(q))
            t0 = time.time()
            flash_v2.launch(q, k, v, config, causal=problem.causal, out=out)
            torch.cuda.synchronize()
            verdict = close_enough(out, *refs[idx])
            row.update(status="ok" if verdict.ok else "incorrect", err=verdict.err, allowed=verdict.allowed,
                       reason=verdict.reason, secs=round(time.time() - t0, 2))
        except Exception as e:  # noqa: BLE001 - every failure is a finding
            msg = f"{type(e).__name__}: {str(e)[-400:]}"
            row.update(status="error", reason=msg)
            if "CUDA" in msg or "illegal" in msg:
                poisoned = "after a CUDA error in this worker"
        results.append(row)
    return results


def check(workers: int, seconds: float, per_config: int) -> list[dict]:
    pairs = check_pairs(per_config)
    # Group by config so that a worker reuses what it compiled; chunks small enough to balance.
    chunks = [pairs[i:i + 6] for i in range(0, len(pairs), 6)]
    deadline = time.time() + seconds
    print(f"check: {len(pairs)} (config, problem) pairs in {len(chunks)} chunks, {workers} workers", flush=True)
    import multiprocessing as mp
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


def bench(configs, ns=(4096, 16384)):
    import triton
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F
    rows = []
    for n, causal in itertools.product(ns, (False, True)):
        p = P(4, 16, 16, n, n, 128, "float16", causal=causal)
        q, k, v = make_inputs(p, "bhnd", seed=1)
        out = torch.empty_like(q)
        line = {}
        for name, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
            try:
                with sdpa_kernel(backend):
                    ms = triton.testing.do_bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
                                                 warmup=10, rep=80, return_mode="median")
                line[name] = round(tflops(p, ms), 1)
            except Exception as e:  # noqa: BLE001
                line[name] = f"{type(e).__name__}"
        for c in configs:
            tag = "{BLOCK_M}x{BLOCK_N}w{num_warps}s{num_stages}{tma}".format(**c, tma="T" if c["USE_TMA"] else "P")
            if flash_v2.keep(c, p) is not None:
                line[tag] = "rejected"
                continue
            try:
                ms = triton.testing.do_bench(lambda: flash_v2.launch(q, k, v, c, causal=causal, out=out),
                                             warmup=10, rep=80, return_mode="median")
                line[tag] = round(tflops(p, ms), 1)
            except Exception as e:  # noqa: BLE001
                line[tag] = f"{type(e).__name__}: {str(e)[-200:]}"
        print(f"bench fp16 B4 H16 D128 N{n} {'causal' if causal else 'full'} TFLOP/s:", json.dumps(line), flush=True)
        rows.append({"N": n, "causal": causal, **line})
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--check-seconds", type=float, default=150)
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    ap.add_argument("--per-config", type=int, default=2)
    ap.add_argument("--bench-configs", default=None, help="JSON list of configs (default: BENCH_CONFIGS)")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    a = ap.parse_args(argv)
    print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    rows = [] if a.skip_check else check(a.workers, a.check_seconds, a.per_config)
    configs = json.loads(a.bench_configs) if a.bench_configs else BENCH_CONFIGS
    bench_rows = bench(configs)
    with open(os.path.join(a.out, "flash_v2_probe.json"), "w") as fh:
        json.dump({"check": rows, "bench": bench_rows}, fh, indent=1, default=str)
    return 0 if not any(r["status"] in ("incorrect", "error") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
