"""A/B of flash_v3's PINGPONG schedule (two consumer warpgroups taking turns at the tensor cores) against the shipped
flash_v3 winners' structures and cuDNN, on the headline prefill shapes plus short prompts (N 1k-2k) and D 256.

Two phases, so that a schedule that deadlocks cannot take the call down with it:
    python3 ab_pingpong.py check --out $OUT     # every candidate on every problem: the last CHECK_ROWS query rows of
                                                # the first and last batch against the float64 reference, NaN-poisoned
    python3 ab_pingpong.py bench --out $OUT     # the candidates that passed, beside cuDNN and SDPA flash, one process
The check writes $OUT/ab-check.json after every problem; the bench times only what it lists as ok (triton do_bench
medians, TFLOP/s), with the bf16 matmul ceiling measured in the same run, and writes $OUT/ab-pingpong.csv. Inputs,
the check of one config, the timing and the ceiling are bench/flash_v3_probe.py's.
"""
import csv
import json
import os
import sys
import time

import torch

from tunebench.kernels import flash_v3
from tunebench.shapes import Problem

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "bench"))
from flash_v3_probe import CHECK_ROWS, _time, check_one, inputs, matmul_ceiling  # noqa: E402

P = lambda B, H, n, D, causal: Problem("flash_v3", B, H, H, n, n, D, "bfloat16", causal=causal)  # noqa: E731
PROBLEMS = ([P(4, 16, n, 128, c) for n in (1024, 2048, 4096, 8192, 16384) for c in (False, True)]
            + [P(4, 32, 16384, 64, c) for c in (False, True)]
            + [P(4, 8, n, 256, c) for n in (4096, 16384) for c in (False, True)])
D = flash_v3.DEFAULT
INCUMBENTS = [D, dict(D, BLOCK_N=128, STAGES=3), dict(D, WARP_SPECIALIZE=True)]   # the shipped H200 winners
PP = dict(D, BLOCK_M=64, num_warps=4, WARP_SPECIALIZE=True, PINGPONG=True)
PINGPONGS = [dict(PP, BLOCK_N=bn, STAGES=s, OVERLAP=o)
             for bn, s, o in ((128, 2, False), (128, 2, True), (128, 3, True),
                              (64, 2, False), (64, 2, True), (64, 3, True))]


def candidates(problem):
    return [c for c in INCUMBENTS + PINGPONGS if flash_v3.keep(c, problem) is None]


def key(c):
    return json.dumps(c, sort_keys=True)


def check(out_dir):
    results = []
    awkward = [Problem("flash_v3", 2, 8, 2, 1000, 777, 128, "bfloat16", causal=True),
               Problem("flash_v3", 1, 4, 4, 97, 1025, 64, "float16", causal=True),
               Problem("flash_v3", 1, 2, 1, 300, 100, 256, "bfloat16", causal=True),
               Problem("flash_v3", 1, 4, 4, 2048, 2048, 128, "bfloat16", causal=True)]
    for problem in awkward + PROBLEMS:
        qkv = inputs(problem, seed=1)
        # awkward shapes: every row; the others (Nq == Nk): the last CHECK_ROWS rows of each batch end
        rows = problem.Nq if problem in awkward else CHECK_ROWS
        for config in candidates(problem):
            row = {"problem": problem.label(), "config": key(config), "reason": "",
                   **check_one(problem, config, qkv, rows)}
            results.append(row)
            print(row["status"], row["problem"], row["config"], row["reason"], flush=True)
        # written after every problem: a check cut by its time limit still leaves the bench what it passed
        with open(os.path.join(out_dir, "ab-check.json"), "w") as fh:
            json.dump(results, fh, indent=1)
    print("check:", {s: sum(r["status"] == s for r in results) for s in {r["status"] for r in results}},
          flush=True)


def bench(out_dir):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F
    ok = {(r["problem"], r["config"]) for r in json.load(open(os.path.join(out_dir, "ab-check.json")))
          if r["status"] == "ok"}
    ceiling = matmul_ceiling()
    print(f"{torch.cuda.get_device_name()}: bf16 matmul ceiling {ceiling:.0f} TFLOP/s", flush=True)
    out_rows = []
    for problem in PROBLEMS:
        q, k, v = inputs(problem)
        out = torch.empty_like(q)
        tf = lambda ms: problem.flops / (ms * 1e-3) / 1e12  # noqa: E731
        line, timed = {}, {}
        for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa_flash", SDPBackend.FLASH_ATTENTION)):
            with sdpa_kernel(backend):
                line[name] = tf(_time(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=problem.causal)))
        for config in candidates(problem):
            if (problem.label(), key(config)) in ok:
                timed[key(config)] = config
                line[key(config)] = tf(_time(lambda: flash_v3.launch(q, k, v, config, causal=problem.causal,
                                                                     out=out)))
        best = {pp: max((c for c in timed if timed[c]["PINGPONG"] == pp), key=line.get, default=None)
                for pp in (False, True)}
        print(f"\n{problem.label()}: cuDNN {line['cudnn']:.0f}, SDPA flash {line['sdpa_flash']:.0f} TFLOP/s",
              flush=True)
        for c in sorted(timed, key=lambda c: -line[c]):
            print(f"  {line[c]:6.0f}  {line[c] / line['cudnn']:.3f}x cuDNN  {line[c] / ceiling:5.1%}  {c}", flush=True)
        if best[False] and best[True]:
            print(f"  PINGPONG best / incumbent best: {line[best[True]] / line[best[False]]:.3f}x", flush=True)
        for c, t in line.items():
            out_rows.append({"problem": problem.label(), "provider": c, "tflops": round(t, 1),
                             "vs_cudnn": round(t / line["cudnn"], 3), "of_ceiling": round(t / ceiling, 3),
                             "ceiling": round(ceiling, 1)})
        del q, k, v, out
    with open(os.path.join(out_dir, "ab-pingpong.csv"), "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(out_rows[0]))
        w.writeheader()
        w.writerows(out_rows)


if __name__ == "__main__":
    phase, out_dir = sys.argv[1], sys.argv[sys.argv.index("--out") + 1]
    t0 = time.time()
    {"check": check, "bench": bench}[phase](out_dir)
    print(f"{phase}: {time.time() - t0:.0f} s", flush=True)
