"""Issue 20's mixed batch run as its two parts side by side: does some pair of configs let the memory-bound decode
programs and the compute-bound chunk programs share the SMs, with no kernel change?

The batch is bench/paged_prefill_probe.py's (64 decode rows at 4096 + a 2048-token chunk over 8192, bf16, Hq32/Hkv8,
D128, pages of 16). On the H200 (2026-12-07 evening) one paged_prefill launch took 0.99x the two launches one after the
other, and the two launches on two streams 1.00x: the chunk's programs fill every SM before a decode program starts,
whatever the order. Occupancy is a property of the configs (warps, stages and tiles set the registers and shared
memory a program holds), so this tries pairs: paged_prefill on the chunk at each of CHUNK_CONFIGS (the current
stream) beside paged_attention on the decode rows at each of DECODE_CONFIGS (a side stream forked from it and joined
back: paged_prefill_probe.two_streams), CUDA-graph-timed. The baseline is the issue's: the two parts one after the
other, each at its fastest config of the lists (each graph-timed alone). Every config's output is checked against
the float64 reference first (paged_prefill_probe.check); a wrong one stops the script (exit 1).

    python3 bench/mixed_corun.py [--out DIR] [--small]
With --out, writes DIR/mixed-corun.csv (a row per pair) and DIR/mixed-corun.json (the summary). --small runs tiny
sizes on the CPU under the Triton interpreter (plumbing only: wall-clock times that say nothing about a GPU).
"""
from __future__ import annotations

import argparse
import functools
import itertools
import json
import pathlib
import sys

import torch

from tunebench.bench.script import checked_run, script_device, write_csv
from tunebench.registry import kernel_module

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from paged_prefill_probe import ISSUE, SMALL, WrongOutput, check, mixed_batch, two_streams  # noqa: E402

GOAL = 1.3
# paged_prefill: from many small programs to few large ones (warps, stages and BLOCK_M set what a program holds).
CHUNK_CONFIGS = [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s)
                 for m, n, w, s in itertools.product((64, 128), (32, 64), (4, 8), (2, 3))]
# paged_attention: split-K over the context or not, two and four warps (small programs that may fit beside a chunk's).
DECODE_CONFIGS = [dict(BLOCK_N=n, PARTITION=p, num_warps=w, num_stages=3, RESTAGE_V=0)
                  for n, p, w in itertools.product((32,), (0, 512, 1024), (2, 4))]
SMALL_CHUNK_CONFIGS = [dict(BLOCK_M=16, BLOCK_N=16, num_warps=2, num_stages=1),
                       dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=2)]
SMALL_DECODE_CONFIGS = [dict(BLOCK_N=16, PARTITION=p, num_warps=2, num_stages=1, RESTAGE_V=0) for p in (0, 128)]
FIELDS = ("chunk_config", "decode_config", "two_streams_ms", "speedup", "chunk_alone_ms", "decode_alone_ms", "timer")


def admitted(kernel: str, configs: list, problem) -> list:
    module = kernel_module(kernel)
    return [c for c in configs if module.keep(c, problem) is None]


def problems(setup) -> tuple:
    """The two parts as tunebench Problems (for keep())."""
    from tunebench.shapes import Problem
    dtype = str(setup.dtype).removeprefix("torch.")
    n, ctx = setup.mixed_chunk
    decode = Problem("paged_attention", setup.decode_rows, setup.Hq, setup.Hkv, 1, setup.decode_context, setup.D, dtype,
                     page=setup.page)
    chunk = Problem("paged_prefill", 1, setup.Hq, setup.Hkv, n, ctx, setup.D, dtype, causal=True, page=setup.page)
    return decode, chunk


def run(setup, device, chunk_configs, decode_configs, out=None) -> dict:
    from tunebench.tune.timing import graph_bench, wall_bench
    cuda = torch.device(device).type == "cuda"
    bench = graph_bench if cuda else functools.partial(wall_bench, reps=1)
    timer = ("CUDA-graph replay (do_bench_cudagraph median)" if cuda
             else "interpreter wall clock, 1 call (not a GPU time)")
    m = mixed_batch(setup, device)
    (qs, ks, vs), R = m.dense, setup.decode_rows
    decode_problem, chunk_problem = problems(setup)
    chunk_configs = admitted("paged_prefill", chunk_configs, chunk_problem)
    decode_configs = admitted("paged_attention", decode_configs, decode_problem)
    prefill, decode = kernel_module("paged_prefill").launch, kernel_module("paged_attention").launch
    chunk_calls = {json.dumps(c): functools.partial(prefill, *m.chunk_args, c, check_values=False)
                   for c in chunk_configs}
    decode_calls = {json.dumps(c): functools.partial(decode, *m.decode_args, c) for c in decode_configs}
    # Each config checked, beside the other part's first config's output (computed once).
    decode_out, chunk_out = next(iter(decode_calls.values()))(), next(iter(chunk_calls.values()))()
    for call in chunk_calls.values():
        check(torch.cat([decode_out, call()]), qs, ks, vs, m.chunks, setup.check_rows)
    for call in decode_calls.values():
        check(torch.cat([call(), chunk_out]), qs, ks, vs, m.chunks, setup.check_rows)
    chunk_ms = {name: bench(call).median_ms for name, call in chunk_calls.items()}
    decode_ms = {name: bench(call).median_ms for name, call in decode_calls.items()}
    sequential = min(chunk_ms.values()) + min(decode_ms.values())
    rows = []
    for (c, chunk_call), (d, decode_call) in itertools.product(chunk_calls.items(), decode_calls.items()):
        pair = two_streams(decode_call, chunk_call, device)
        a, b = pair()
        check(torch.cat([a, b]), qs, ks, vs, m.chunks, setup.check_rows)
        t = bench(pair).median_ms
        rows.append(dict(chunk_config=c, decode_config=d, two_streams_ms=t, speedup=sequential / t,
                         chunk_alone_ms=chunk_ms[c], decode_alone_ms=decode_ms[d], timer=timer))
    best = min(rows, key=lambda r: r["two_streams_ms"])
    summary = dict(device=torch.cuda.get_device_name() if cuda else "CPU (Triton interpreter)", timer=timer,
                   decode_rows=R, decode_context=setup.decode_context, chunk=list(setup.mixed_chunk),
                   best_chunk_alone_ms=min(chunk_ms.values()), best_decode_alone_ms=min(decode_ms.values()),
                   sequential_ms=sequential, best_pair=best, goal=GOAL, pairs=len(rows))
    print(f"{summary['device']}: chunk alone best {summary['best_chunk_alone_ms']:.3f} ms, decode alone best "
          f"{summary['best_decode_alone_ms']:.3f} ms, one after the other {sequential:.3f} ms; best of {len(rows)} "
          f"pairs on two streams {best['two_streams_ms']:.3f} ms: {best['speedup']:.2f}x (goal >= {GOAL}x); "
          f"chunk {best['chunk_config']}, decode {best['decode_config']}; times: {timer}", flush=True)
    if out:
        folder = pathlib.Path(out)
        print(f"wrote {write_csv(folder / 'mixed-corun.csv', FIELDS, rows)}")
        (folder / "mixed-corun.json").write_text(json.dumps(dict(summary, rows=rows), indent=1))
        print(f"wrote {folder / 'mixed-corun.json'}")
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="folder for mixed-corun.csv and .json")
    parser.add_argument("--small", action="store_true",
                        help="tiny fp16 sizes; on the CPU under the Triton interpreter when there is no GPU (plumbing)")
    args = parser.parse_args(argv)
    device = script_device("mixed_corun.py", args.small)
    if device is None:
        return 2
    configs = (SMALL_CHUNK_CONFIGS, SMALL_DECODE_CONFIGS) if args.small else (CHUNK_CONFIGS, DECODE_CONFIGS)
    return checked_run(lambda: run(SMALL if args.small else ISSUE, device, *configs, out=args.out), (WrongOutput,))


if __name__ == "__main__":
    raise SystemExit(main())
