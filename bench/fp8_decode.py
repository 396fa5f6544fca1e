"""fp8 KV cache against the bf16 cache, on a GPU, in one process (issue 19's goal: fp8 time <= 0.55x bf16 at
B16 x 16k, Hq32/Hkv8, D128, pages of 16).

Both caches hold the same tokens (the fp8 one is the bf16 one quantised to e4m3 with per-KV-head scales) and both
run through tunebench.paged_attention. Each is its own Problem (the fp8 one has kv_dtype set, as the dispatcher builds
it from the call), so each runs the config the dispatcher picks for its own bucket: its exact winner (tune the fp8
buckets with `tunebench tune --suite fp8`), a safe transfer among fp8 buckets, or DEFAULT; the config and the reason
are printed. Each is timed launch by launch (triton.testing.do_bench) and by CUDA-graph replay (do_bench_cudagraph),
median ms. GB/s is Problem.throughput's: K and V of every token read once, in the cache's dtype.
The fp8 output is first checked against the float64 reference on its dequantised cache (tunebench/correctness.py).

    python bench/fp8_decode.py                       # B16 x 16384
    python bench/fp8_decode.py --batch 64 --context 4096 --kv-dtype e5m2 --per-tensor
"""
import argparse
import dataclasses

import torch
import triton

import tunebench
from tunebench.correctness import close_enough
from tunebench.inputs import fp8_paged_references, fp8_scales, make_inputs
from tunebench.reference import quantize_fp8
from tunebench.shapes import Problem

KV_DTYPES = {"e4m3": "float8_e4m3fn", "e5m2": "float8_e5m2"}


def times_ms(fn) -> tuple[float, float]:
    """(launch by launch, CUDA-graph replay), median ms."""
    fn()
    torch.cuda.synchronize()
    eager = triton.testing.do_bench(fn, return_mode="median")
    graph = triton.testing.do_bench_cudagraph(fn, return_mode="median")
    return eager, graph


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--context", type=int, default=16384)
    ap.add_argument("--page", type=int, default=16)
    ap.add_argument("--kv-dtype", choices=sorted(KV_DTYPES), default="e4m3")
    ap.add_argument("--per-tensor", action="store_true", help="one scale per cache instead of one per KV head")
    args = ap.parse_args(argv)
    problem = Problem("paged_attention", args.batch, 32, 8, 1, args.context, 128, "bfloat16", page=args.page)
    fp8_problem = dataclasses.replace(problem, kv_dtype=KV_DTYPES[args.kv_dtype])
    kv_dtype = fp8_problem.torch_cache_dtype
    inp = make_inputs(problem, "cuda", seed=0)
    q, bt, cl = inp.q, inp.block_tables, inp.context_lens
    k_scale, v_scale = (fp8_scales(c, kv_dtype, not args.per_tensor) for c in (inp.k_cache, inp.v_cache))
    k8, v8 = (quantize_fp8(c, s, kv_dtype) for c, s in ((inp.k_cache, k_scale), (inp.v_cache, v_scale)))
    del inp.k, inp.v

    def bf16():
        return tunebench.paged_attention(q, inp.k_cache, inp.v_cache, bt, cl)

    def fp8():
        return tunebench.paged_attention(q, k8, v8, bt, cl, k_scale=k_scale, v_scale=v_scale)

    rows = slice(0, 2)                                   # the reference on two sequences keeps the check quick
    verdict = close_enough(fp8()[rows], *fp8_paged_references(q[rows], k8, v8, bt[rows], cl[rows], k_scale, v_scale))
    print(f"bf16 cache runs {tunebench.explain(q, inp.k_cache, block_tables=bt)}")
    print(f"fp8 cache runs {tunebench.explain(q, k8, block_tables=bt)}")
    print(f"fp8 ({kv_dtype}, {'per tensor' if args.per_tensor else 'per KV head'} scales) against the reference on "
          f"its dequantised cache: {'ok' if verdict.ok else 'FAILED'} (max error {verdict.err:.3g}, allowed "
          f"{verdict.allowed:.3g})")
    results = {}
    for name, fn, p in (("bf16 cache", bf16, problem), (f"fp8 {args.kv_dtype} cache", fp8, fp8_problem)):
        eager, graph = times_ms(fn)
        results[name] = (eager, graph)
        print(f"{name:16s} launch by launch {eager * 1e3:8.1f} us ({p.throughput(eager):6.0f} GB/s)   "
              f"graph replay {graph * 1e3:8.1f} us ({p.throughput(graph):6.0f} GB/s)")
    (be, bg), (fe, fg) = results.values()
    print(f"fp8 / bf16 time: launch by launch {fe / be:.3f}x, graph replay {fg / bg:.3f}x (goal <= 0.55x)")
    return 0 if verdict.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
