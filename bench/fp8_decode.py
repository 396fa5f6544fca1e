"""fp8 KV cache against the bf16 cache, on a GPU, in one process (issue 19's goal: fp8 time <= 0.55x bf16 at
B16 x 16k, Hq32/Hkv8, D128, pages of 16).

Both caches hold the same tokens (the fp8 one is the bf16 one quantised to e4m3 with per-KV-head scales) and both
run through tunebench.paged_attention. Each is its own Problem (the fp8 one has kv_dtype set, as the dispatcher builds
it from the call), so each runs the config the dispatcher picks for its own bucket: its exact winner (tune the fp8
buckets with `tunebench tune --suite fp8`), a safe transfer among fp8 buckets, or DEFAULT; the config and the reason
are printed. Each is timed launch by launch (triton.testing.do_bench) and by CUDA-graph replay (do_bench_cudagraph),
median ms. GB/s is Problem.throughput's: K and V of every token read once, in the cache's dtype.
Both outputs are checked before anything is timed, on the first and the last sequence, against the float64 reference
(tunebench/correctness.py): the bf16 cache's on its own values, the fp8 cache's on its dequantised values. A wrong
output stops the script (exit 1).

--small runs tiny sizes (fp16 queries, B2 x 40, Hq4/Hkv2, D16); without a GPU it runs on the CPU under the Triton
interpreter, to check the plumbing end to end: its times are the interpreter's wall clock and say nothing about a GPU,
and graph replay is reported as 'skipped: needs CUDA'.

    python bench/fp8_decode.py                       # B16 x 16384
    python bench/fp8_decode.py --batch 64 --context 4096 --kv-dtype e5m2 --per-tensor
    python bench/fp8_decode.py --small --out DIR     # writes DIR/fp8-decode.csv and DIR/fp8-decode.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys

import torch

from tunebench.bench.script import script_device, write_csv

KV_DTYPES = {"e4m3": "float8_e4m3fn", "e5m2": "float8_e5m2"}
GEOMETRY = dict(Hq=32, Hkv=8, D=128, dtype="bfloat16")                            # issue 19's
SMALL = dict(batch=2, context=40, page=16, Hq=4, Hkv=2, D=16, dtype="float16")    # the interpreter's
SHORT = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
SKIPPED = "skipped: needs CUDA"
FIELDS = ("cache", "problem", "dispatch", "check_ratio", "check_err", "check_allowed", "launch_ms", "graph_ms",
          "launch_gbps", "graph_gbps", "launch_vs_first", "graph_vs_first", "graph_status", "timer")


def problems(batch: int, context: int, page: int, kv_dtype: str, Hq=32, Hkv=8, D=128, dtype="bfloat16") -> tuple:
    """(the cache in the queries' dtype, the fp8 cache): each its own Problem, so each finds its own bucket."""
    from tunebench.shapes import Problem
    problem = Problem("paged_attention", batch, Hq, Hkv, 1, context, D, dtype, page=page)
    return problem, dataclasses.replace(problem, kv_dtype=KV_DTYPES[kv_dtype])


def caches(problem, fp8_problem, per_tensor: bool, device, seed: int = 0) -> dict:
    """q, block tables, context lengths, the cache in q's dtype, the same cache quantised to fp8 and its scales."""
    from tunebench.inputs import make_inputs
    from tunebench.paged_inputs import fp8_scales
    from tunebench.reference import quantize_fp8
    kv_dtype = fp8_problem.torch_cache_dtype
    inp = make_inputs(problem, device, seed=seed)
    k_scale, v_scale = (fp8_scales(c, kv_dtype, not per_tensor) for c in (inp.k_cache, inp.v_cache))
    k8, v8 = (quantize_fp8(c, s, kv_dtype) for c, s in ((inp.k_cache, k_scale), (inp.v_cache, v_scale)))
    return dict(q=inp.q, bt=inp.block_tables, cl=inp.context_lens, k=inp.k_cache, v=inp.v_cache, k8=k8, v8=v8,
                k_scale=k_scale, v_scale=v_scale)


def calls(c: dict) -> tuple:
    """(the cache in q's dtype, the fp8 cache): each () -> the output of tunebench.paged_attention."""
    import tunebench

    def plain():
        return tunebench.paged_attention(c["q"], c["k"], c["v"], c["bt"], c["cl"])

    def fp8():
        return tunebench.paged_attention(c["q"], c["k8"], c["v8"], c["bt"], c["cl"], k_scale=c["k_scale"],
                                         v_scale=c["v_scale"])
    return plain, fp8


def check(c: dict, plain, fp8) -> tuple:
    """Both outputs' Verdicts on the first and the last sequence (the float64 reference is the slow part); raises
    AssertionError naming the cache whose output is wrong, so that nothing wrong is timed."""
    from tunebench.correctness import close_enough
    from tunebench.paged_inputs import fp8_paged_references, paged_references
    idx = torch.tensor(sorted({0, c["q"].shape[0] - 1}), device=c["q"].device)
    q, bt, cl = c["q"][idx], c["bt"][idx], c["cl"][idx]
    refs = (paged_references(q, c["k"], c["v"], bt, cl),
            fp8_paged_references(q, c["k8"], c["v8"], bt, cl, c["k_scale"], c["v_scale"]))
    verdicts = tuple(close_enough(fn()[idx], *ref) for fn, ref in zip((plain, fp8), refs))
    for name, verdict in zip(("the cache in the queries' dtype", "the fp8 cache"), verdicts):
        if not verdict.ok:
            raise AssertionError(f"{name}: the output disagrees with the float64 reference: {verdict.reason}")
    return verdicts


def gpu_times(fn) -> tuple:
    """(launch by launch, CUDA-graph replay), median ms."""
    import triton
    fn()
    torch.cuda.synchronize()
    eager = triton.testing.do_bench(fn, return_mode="median")
    graph = triton.testing.do_bench_cudagraph(fn, return_mode="median")
    return eager, graph


def wall_times(fn) -> tuple:
    """(one call's wall clock, None): the interpreter's, for the plumbing; there is no graph to replay."""
    from tunebench.tune.timing import wall_bench
    return wall_bench(fn, reps=1).median_ms, None


def measure(args, device) -> list:
    """Rows of FIELDS: the cache in q's dtype, then the fp8 cache; checked first, then timed."""
    import tunebench
    geometry = {k: SMALL[k] for k in GEOMETRY} if args.small else GEOMETRY
    problem, fp8_problem = problems(args.batch, args.context, args.page, args.kv_dtype, **geometry)
    c = caches(problem, fp8_problem, args.per_tensor, device)
    plain, fp8 = calls(c)
    verdicts = check(c, plain, fp8)
    cuda = torch.device(device).type == "cuda"
    times = gpu_times if cuda else wall_times
    scales = "per tensor" if args.per_tensor else "per KV head"
    names = (f"{SHORT.get(problem.dtype, problem.dtype)} cache", f"fp8 {args.kv_dtype} cache ({scales} scales)")
    rows = []
    for name, fn, p, k, verdict in zip(names, (plain, fp8), (problem, fp8_problem), ("k", "k8"), verdicts):
        row = dict.fromkeys(FIELDS)
        row.update(cache=name, problem=p.label(), dispatch=tunebench.explain(c["q"], c[k], block_tables=c["bt"]),
                   check_ratio=verdict.ratio, check_err=verdict.err, check_allowed=verdict.allowed,
                   timer="do_bench / do_bench_cudagraph median (GPU)" if cuda else
                   "interpreter wall clock, 1 call (not a GPU time)")
        row["launch_ms"], row["graph_ms"] = times(fn)
        row["graph_status"] = "ok" if cuda else SKIPPED
        row["launch_gbps"], row["graph_gbps"] = p.throughput(row["launch_ms"]), p.throughput(row["graph_ms"])
        for t in ("launch", "graph"):
            first = (rows[0] if rows else row)[f"{t}_ms"]
            row[f"{t}_vs_first"] = row[f"{t}_ms"] / first if row[f"{t}_ms"] and first else None
        rows.append(row)
    return rows


def _num(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def report(rows: list) -> str:
    lines = [f"{r['cache']} runs {r['dispatch']}" for r in rows]
    lines += [f"{r['cache']}: check against the float64 reference ok (max error {r['check_err']:.3g}, allowed "
              f"{r['check_allowed']:.3g})" for r in rows]
    for r in rows:
        graph = f"graph: {r['graph_status']}"
        if r["graph_status"] == "ok":
            graph = f"graph replay {r['graph_ms'] * 1e3:8.1f} us ({_num(r['graph_gbps'], '6.0f')} GB/s)"
        lines.append(f"{r['cache']:16s} launch by launch {r['launch_ms'] * 1e3:8.1f} us "
                     f"({_num(r['launch_gbps'], '6.0f')} GB/s)   {graph}")
    fp8 = rows[-1]
    lines.append(f"fp8 / {rows[0]['cache']} time: launch by launch {_num(fp8['launch_vs_first'], '.3f')}x, graph "
                 f"replay {_num(fp8['graph_vs_first'], '.3f')}x (goal <= 0.55x); times: {fp8['timer']}")
    return "\n".join(lines)


def write(rows: list, out) -> list:
    csv_path = write_csv(pathlib.Path(out) / "fp8-decode.csv", FIELDS, rows)
    json_path = csv_path.with_suffix(".json")
    json_path.write_text(json.dumps(rows, indent=1))
    return [csv_path, json_path]


def parse(argv) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=None, help="default 16 (--small: 2)")
    ap.add_argument("--context", type=int, default=None, help="default 16384 (--small: 40)")
    ap.add_argument("--page", type=int, default=None, help="default 16")
    ap.add_argument("--kv-dtype", choices=sorted(KV_DTYPES), default="e4m3")
    ap.add_argument("--per-tensor", action="store_true", help="one scale per cache instead of one per KV head")
    ap.add_argument("--small", action="store_true",
                    help="tiny fp16 sizes; on the CPU under the Triton interpreter when there is no GPU (plumbing)")
    ap.add_argument("--out", default=None, help="folder for fp8-decode.csv and fp8-decode.json")
    args = ap.parse_args(argv)
    defaults = {k: SMALL[k] for k in ("batch", "context", "page")} if args.small else dict(batch=16, context=16384,
                                                                                           page=16)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv=None) -> int:
    args = parse(argv)
    device = script_device("fp8_decode.py", args.small)
    if device is None:
        return 2
    try:
        rows = measure(args, device)
    except AssertionError as e:
        print(f"FAILED before timing: {e}", file=sys.stderr)
        return 1
    print(report(rows))
    if args.out:
        for path in write(rows, args.out):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
