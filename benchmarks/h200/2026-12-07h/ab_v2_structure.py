"""A/B of three structure changes to flash_v2 (kernels/flash_v2.py), each a source patch applied at import time through
bench/flash_v2_probe.py's VARIANTS / variant(), so the kernel file itself stays as it is:

    lazy          FlashAttention-4's conditional rescaling: the running max m_i stays stale (and acc, l_i untouched)
                  unless some row's max grew by more than TAU = 8 (log2 units), so p = exp2(s - m_i) <= 2**8.
    nreg<R>       the same kernel launched with maxnreg=R (R in 128, 168, 232): ptxas's register cap per thread.
    persistent    min(n_tiles, SMs * 2) programs on a 1-d grid, each looping over tiles (tile // n_m is the head,
                  so concurrent programs share a head's K/V in L2); causal heads start at their bottom (heaviest)
                  tiles. persistent1: one program per SM.

Two phases, so that a variant that faults or hangs cannot take the timing down with it:
    python3 ab_v2_structure.py check --out $OUT [--device cuda|cpu] [--workers N] [--seconds S] [--variants a,b]
        every variant ("base" included) x CONFIGS x problems (bench/flash_v2_probe.py's POOL: awkward shapes and
        layouts; large-magnitude inputs, where the lazy rescale's numerics differ most; small problems with the
        bench shapes' specializations, so that the bench finds their kernels compiled in Triton's cache), each
        config that keep() admits, into a NaN-poisoned output, against the float64 reference with
        tunebench.correctness.close_enough. Writes $OUT/ab-v2-check.json after every finished (problem, variant);
        exit code 1 if anything is incorrect or errors. persistent with USE_TMA where its shared memory cannot fit
        is recorded as "rejected" (see variant_reject). With --device cpu (under TRITON_INTERPRET=1): problems with
        Nq * Nk <= 300k and not bf16 (the interpreter refuses it), the first 2 configs, no nreg variants (the
        interpreter drops launch options such as maxnreg).
    python3 ab_v2_structure.py bench --out $OUT                              # GPU only
        bf16 B4 H16 D128 N 1k/4k/16k, B4 H32 D64 N16k and B4 H8 D256 N4k, causal and not: SDPA cuDNN and flash,
        and every (variant, config) that passed the check (no failure, at least one ok), in two interleaved passes
        (bench/flash_v2_probe.py's _bench_pass: do_bench medians, the best of the passes), beside the bf16 matmul
        ceiling (bench/flash_v3_probe.py). Prints per shape a sorted table and each variant's best config against
        base's best; writes $OUT/ab-v2-structure.csv.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import textwrap
import time

import torch

from tunebench.kernels import flash_v2
from tunebench.shapes import Problem
import tunebench.reference as ref

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "bench"))
import flash_v2_probe as probe  # noqa: E402

TAU = 8.0               # lazy rescale threshold, log2 units (the softmax scale is folded into exp2): p <= 2**TAU
NREGS = (128, 168, 232)
CHECK_JSON = "ab-v2-check.json"

# -- variants: (old, new) exact-text patches of kernels/flash_v2.py --------------------------------------------------

LAZY = [
    ("""            m_ij = tl.where(m_ij == float("-inf"), 0.0, m_ij)
            qk = qk - m_ij[:, None]
        else:
            m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            qk = qk * qk_scale - m_ij[:, None]
        p = tl.math.exp2(qk)
        # -- update m_i and l_i, rescale the accumulator
        alpha = tl.math.exp2(m_i - m_ij)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
""", f"""            m_ij = tl.where(m_ij == float("-inf"), 0.0, m_ij)
        else:
            m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            qk = qk * qk_scale
        # -- lazy rescale (FlashAttention-4): keep the stale max unless some row's max grew by more than {TAU} (log2).
        # On the first block m_i is -inf and m_ij finite (the masked branch maps -inf to 0), so the difference is +inf
        # and the block rescales (alpha = 0); after it m_i is finite, so no -inf - -inf arises.
        if tl.max(m_ij - m_i, 0) > {TAU}:
            alpha = tl.math.exp2(m_i - m_ij)
            acc = acc * alpha[:, None]
            l_i = l_i * alpha
            m_i = m_ij
        # s - m_i <= {TAU} here, so p <= 2**{TAU:g}, which fp16/bf16 hold; the final acc / l_i is unchanged.
        p = tl.math.exp2(qk - m_i[:, None])
        l_i = l_i + tl.sum(p, 1)
"""),
    ("""        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_ij
""", """        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
"""),
]

_LAUNCH_OPTIONS = """        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )"""


def nreg(r: int) -> list[tuple[str, str]]:
    return [(_LAUNCH_OPTIONS, f"""        num_warps=config["num_warps"], num_stages=config["num_stages"], maxnreg={r},
    )""")]


_KERNEL_HEAD = """    if CAUSAL:
        # Tiles further down see more keys: start them first so the last wave is made of short tiles.
        start_m = tl.num_programs(0) - 1 - tl.program_id(0)
    else:
        start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
"""
_PERSISTENT_HEAD = """    n_m = tl.cdiv(Nq, BLOCK_M)
    # Persistent: tiles head-major (concurrent programs share a head's K/V in L2), each head's tiles from the bottom
    # (the heaviest, under causal) up.
    for tile in tl.range(tl.program_id(0), n_tiles, tl.num_programs(0)):
        off_bh = tile // n_m
        if CAUSAL:
            start_m = n_m - 1 - tile % n_m
        else:
            start_m = tile % n_m
"""


def persistent(programs_per_sm: int) -> list[tuple[str, str]]:
    """The kernel's body, from its tile choice to its epilogue, moved unchanged (re-indented) into a loop over tiles;
    n_tiles becomes a kernel argument; launch starts min(n_tiles, SMs * programs_per_sm) programs."""
    import inspect
    src = inspect.getsource(flash_v2)
    assert src.count(_KERNEL_HEAD) == 1, "flash_v2's tile choice changed: update _KERNEL_HEAD"
    start = src.index(_KERNEL_HEAD)
    body = src[start:src.index("\n\n\ndef launch(", start) + 1]
    rest = body[len(_KERNEL_HEAD):]
    assert "program_id" not in rest and "num_programs" not in rest and "return" not in rest, rest
    return [
        ("""                  Hq, GROUP, Nq, Nk,
                  HEAD_DIM: tl.constexpr,""", """                  Hq, GROUP, Nq, Nk, n_tiles,
                  HEAD_DIM: tl.constexpr,"""),
        (body, _PERSISTENT_HEAD + textwrap.indent(rest, "    ")),
        ("""    grid = (triton.cdiv(Nq, BLOCK_M), B * Hq)
    _flash_v2_fwd[grid](
        q, k, v, out, qk_scale(scale, D),
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        Hq, Hq // Hkv, Nq, Nk,
""", """    n_tiles = triton.cdiv(Nq, BLOCK_M) * B * Hq
    grid = (min(n_tiles, _num_sms(q) * PROGRAMS_PER_SM),)
    _flash_v2_fwd[grid](
        q, k, v, out, qk_scale(scale, D),
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        Hq, Hq // Hkv, Nq, Nk, n_tiles,
"""),
        ("""def _check_config(config: dict) -> dict:
""", f"""PROGRAMS_PER_SM = {programs_per_sm}
_SMS = {{}}


def _num_sms(q) -> int:
    \"\"\"SMs of q's device; 4 under the interpreter (or off CUDA), so that programs loop over several tiles.\"\"\"
    if interpreting() or not q.is_cuda:
        return 4
    if q.device not in _SMS:
        _SMS[q.device] = torch.cuda.get_device_properties(q.device).multi_processor_count
    return _SMS[q.device]


def _check_config(config: dict) -> dict:
"""),
    ]


VARIANTS = {"lazy": LAZY, **{f"nreg{r}": nreg(r) for r in NREGS},
            "persistent": persistent(2), "persistent1": persistent(1)}
probe.VARIANTS.update(VARIANTS)
ALL_VARIANTS = ["base", *VARIANTS]

# -- check ------------------------------------------------------------------------------------------------------------

_C = probe._C
CONFIGS = [flash_v2.DEFAULT, _C(128, 64, 8, 3, False), _C(128, 64, 8, 3, True), _C(128, 128, 8, 3, True),
           _C(64, 64, 4, 3, True)]
P = lambda *a, **kw: Problem("flash_v2", *a, **kw)  # noqa: E731
# (problem, layout, input scale). Large magnitudes: score swings of hundreds (x30, x12) and of about TAU per block (x4),
# where the lazy rescale skips some blocks and takes others. fp16 x12 (the interpreter refuses bf16; fp16 x30 would
# overflow the fp16 naive reference's scores) stands in for bf16 x30 on the CPU.
LARGE = [(P(2, 4, 2, 300, 700, 64, "bfloat16", causal=True), "bhnd", 30.0),
         (P(2, 4, 2, 300, 700, 64, "float16", causal=True), "bnhd", 12.0),
         (P(1, 4, 4, 256, 512, 128, "float16", causal=True), "bnhd", 4.0)]
# The bench shapes' specializations (ints divisible by 16 or not, even tiles, D, dtype) at N 256, GPU only: the check
# compiles them in parallel, and the bench then loads them from Triton's cache.
BENCH_SHAPED = [(P(1, h, h, 256, 256, d, "bfloat16", causal=c), "bhnd", 1.0)
                for h, d in ((16, 128), (32, 64), (8, 256)) for c in (False, True)]
CPU_MAX_SCORES = 300_000
CPU_CONFIGS = 2


def problems(device: str) -> list[tuple]:
    items = LARGE + [(p, layout, 1.0) for p, layout in probe.POOL]
    if device == "cpu":
        # the interpreter refuses bf16 (kernels/_launch.py check_interpretable: it computes it wrongly)
        return [it for it in items if it[0].Nq * it[0].Nk <= CPU_MAX_SCORES and it[0].dtype != "bfloat16"]
    return BENCH_SHAPED + items


def variants(device: str) -> tuple[list[str], dict[str, str]]:
    """(variants to check, {variant skipped: why})."""
    skipped = {}
    if device == "cpu":
        skipped = {v: "maxnreg is a compile option: the interpreter drops it (runs base)" for v in VARIANTS
                   if v.startswith("nreg")}
    return [v for v in ALL_VARIANTS if v not in skipped], skipped


def variant_reject(name: str, config: dict, problem) -> str | None:
    """Why a variant cannot run a config that flash_v2.keep admits, or None. persistent with USE_TMA: the TMA store's
    staging tile (BLOCK_M x D_PAD) gets its own shared memory, as the next tile's K/V loads overlap the store (sm_90a
    compiles: 263168 B at 128x128 s3 D128 and at 64x64 s3 D256, where base needs 230400 of the 232448 there are)."""
    if not name.startswith("persistent") or not config["USE_TMA"] or flash_v2.keep(config, problem) is not None:
        return None
    elem = flash_v2.ELEMENT_BYTES[problem.dtype]
    d_pad = flash_v2.padded_head_dim(problem.D)
    block_m, block_n = flash_v2._tiles(config, problem.dtype == "float32", d_pad)
    smem = flash_v2._smem_bytes(block_m, block_n, config["num_stages"], d_pad, elem) + block_m * d_pad * elem
    if smem > (limit := flash_v2.shared_memory_limit()):
        return f"persistent + TMA: shared memory ~{smem} B (with the store's staging tile) > the device's {limit} B"
    return None


def ckey(config: dict) -> str:
    return json.dumps(config, sort_keys=True)


def label(problem, layout, scale) -> str:
    return f"{problem.label()} {layout}" + (f" x{scale:g}" if scale != 1.0 else "")


_REFS: dict = {}
_POISONED: list[str] = []


def check_task(task) -> list[dict]:
    """One (problem, variant): every config of `configs` that keep() admits. Runs in a worker (or in-process)."""
    idx, item, name, configs, device, deadline = task
    problem, layout, scale = item
    rows, qkv = [], None
    for config in configs:
        if flash_v2.keep(config, problem) is not None:
            continue
        row = {"variant": name, "config": ckey(config), "problem": label(problem, layout, scale)}
        if why := variant_reject(name, config, problem):
            rows.append(dict(row, status="rejected", reason=why))
            continue
        if _POISONED or time.time() > deadline:
            rows.append(dict(row, status="skipped", reason=_POISONED[0] if _POISONED else "deadline"))
            continue
        try:
            qkv = qkv or probe.make_inputs(problem, layout, seed=idx, device=device, scale=scale)
            q, k, v = qkv
            if idx not in _REFS:
                _REFS.clear()
                _REFS[idx] = (ref.attention(q, k, v, problem.causal),
                              ref.attention(q, k, v, problem.causal, dtype=q.dtype))
            row.update(probe.check_launch(probe.variant(name).launch, config, problem, qkv, _REFS[idx]))
        except Exception as e:  # noqa: BLE001 - every failure is a finding (here: inputs or references)
            row.update(probe.error_result(e))
        if probe.poisons_context(row):
            _POISONED.append(f"skipped: this worker's CUDA context is poisoned ({name}, {row['problem']})")
        rows.append(row)
    return rows


def _write(out_dir, device, checked, skipped, results):
    with open(os.path.join(out_dir, CHECK_JSON), "w") as fh:
        json.dump({"device": device, "variants": checked, "skipped_variants": skipped,
                   "configs": [ckey(c) for c in CONFIGS], "tau": TAU, "results": results}, fh, indent=1)


def check(out_dir, device, workers, seconds, only=None) -> int:
    checked, skipped = variants(device)
    if only:
        checked = [v for v in checked if v in only]
    for name, why in skipped.items():
        print(f"skip variant {name}: {why}", flush=True)
    configs = CONFIGS[:CPU_CONFIGS] if device == "cpu" else CONFIGS
    deadline = time.time() + seconds
    tasks = [(idx, item, name, configs, device, deadline)
             for idx, item in enumerate(problems(device)) for name in checked]
    print(f"check on {device}: {len(checked)} variants x {len(configs)} configs x {len(tasks) // len(checked)} "
          f"problems, {workers} worker(s)", flush=True)
    if device == "cpu":
        print(f"  cpu: problems with Nq * Nk <= {CPU_MAX_SCORES} and not bf16 (the interpreter refuses it), "
              f"the first {CPU_CONFIGS} configs", flush=True)
    results = []

    def collect(rows):
        results.extend(rows)
        for r in rows:
            print(r["status"], r["variant"], r["problem"], r["config"], r.get("reason", ""), flush=True)
        _write(out_dir, device, checked, skipped, results)     # after every task: a time limit leaves what ran

    _write(out_dir, device, checked, skipped, results)
    if workers <= 1:
        for task in tasks:
            collect(check_task(task))
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            for fut in as_completed([pool.submit(check_task, t) for t in tasks]):
                try:
                    collect(fut.result())
                except Exception as e:  # noqa: BLE001 - a worker that died (a fault, not an exception) breaks the pool
                    print(f"check stopped: {type(e).__name__}: {e}", flush=True)
                    return 1
    summary = {}
    for r in results:
        s = summary.setdefault(r["variant"], {})
        s[r["status"]] = s.get(r["status"], 0) + 1
    print("check summary:", json.dumps(summary), flush=True)
    ok = passed(results)
    for name in checked:
        print(f"  {name}: {sum(v == name for v, _ in ok)} of {len(configs)} configs pass", flush=True)
    return 1 if any(r["status"] in ("incorrect", "error") for r in results) else 0


def passed(results) -> set[tuple[str, str]]:
    """(variant, config key) pairs with at least one ok and no failure."""
    ok, bad = set(), set()
    for r in results:
        pair = (r["variant"], r["config"])
        if r["status"] == "ok":
            ok.add(pair)
        elif r["status"] in ("incorrect", "error"):
            bad.add(pair)
    return ok - bad


# -- bench ------------------------------------------------------------------------------------------------------------

# The headline shapes first: a bench cut short by its call's time limit keeps them (the CSV is written after
# every shape).
BENCH = [(4, 16, n, 128) for n in (4096, 16384, 1024)] + [(4, 8, 4096, 256), (4, 32, 16384, 64)]


def tag(name: str, c: dict) -> str:
    """The key probe._bench_pass records a (variant, config) under."""
    return "{v}{BLOCK_M}x{BLOCK_N}w{num_warps}s{num_stages}{tma}".format(
        **c, v="" if name == "base" else name + ":", tma="T" if c["USE_TMA"] else "P")


def bench(out_dir, passes) -> int:
    ok = passed(json.load(open(os.path.join(out_dir, CHECK_JSON)))["results"])
    plan = [(name, [json.loads(k) for v, k in sorted(ok) if v == name]) for name in ALL_VARIANTS]
    plan = [(name, cs) for name, cs in plan if cs]
    print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    print("timing:", json.dumps({name: [tag(name, c) for c in cs] for name, cs in plan}), flush=True)
    try:
        from flash_v3_probe import matmul_ceiling
        ceiling = matmul_ceiling()
        print(f"bf16 matmul ceiling {ceiling:.0f} TFLOP/s", flush=True)
    except Exception as e:  # noqa: BLE001 - the ceiling is context, not the A/B
        ceiling = None
        print(f"no matmul ceiling: {type(e).__name__}: {str(e)[-300:]}", flush=True)
    rows = []
    for (B, H, N, D), causal in [(s, c) for s in BENCH for c in (False, True)]:
        p = Problem("flash_v2", B, H, H, N, N, D, "bfloat16", causal=causal)
        q, k, v = probe.make_inputs(p, "bhnd", seed=1)
        out = torch.empty_like(q)
        line = {}
        shape_plan = [(name, [c for c in cs if variant_reject(name, c, p) is None]) for name, cs in plan]
        for _ in range(passes):
            probe._bench_pass(shape_plan, p, q, k, v, out, line)
        timed = {t: x for t, x in line.items() if isinstance(x, float)}
        cudnn = timed.get("sdpa_cudnn")
        best = {}
        for name, cs in shape_plan:
            tags = [tag(name, c) for c in cs if tag(name, c) in timed]
            if tags:
                best[name] = max(tags, key=timed.get)
        base = timed[best["base"]] if "base" in best else None
        print(f"\n{p.label()}:", flush=True)
        for t in sorted(timed, key=lambda t: -timed[t]):
            extra = f"  {timed[t] / ceiling:5.1%} of ceiling" if ceiling else ""
            vs = f"{timed[t] / cudnn:.3f}x cuDNN" if cudnn else "no cuDNN"
            print(f"  {timed[t]:7.1f} TFLOP/s  {vs}{extra}  {t}", flush=True)
        for t, x in line.items():
            if not isinstance(x, float):
                print(f"  {t}: {x}", flush=True)
        for name in best:
            if name != "base" and base:
                print(f"  {name} best / base best: {timed[best[name]] / base:.3f}x "
                      f"({best[name]} vs {best['base']})", flush=True)
        for t, x in timed.items():
            rows.append({"problem": p.label(), "provider": t, "tflops": round(x, 1),
                         "vs_cudnn": round(x / cudnn, 3) if cudnn else "",
                         "vs_base_best": round(x / base, 3) if base else "",
                         "of_ceiling": round(x / ceiling, 3) if ceiling else ""})
        del q, k, v, out
        torch.cuda.empty_cache()
        with open(os.path.join(out_dir, "ab-v2-structure.csv"), "w", newline="") as fh:   # after every shape
            w = csv.DictWriter(fh, fieldnames=["problem", "provider", "tflops", "vs_cudnn", "vs_base_best",
                                               "of_ceiling"])
            w.writeheader()
            w.writerows(rows)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("phase", choices=("check", "bench"))
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--workers", type=int, default=None,
                    help="check worker processes (compiling dominates); default: 1 on cpu, up to 15 on cuda")
    ap.add_argument("--seconds", type=float, default=1e9, help="check deadline: what has not run by then is skipped")
    ap.add_argument("--passes", type=int, default=2, help="bench: interleaved passes, each entry keeps its best")
    ap.add_argument("--variants", default=None, help="check: comma-separated subset of " + ",".join(ALL_VARIANTS))
    a = ap.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    if a.device == "cpu" and not flash_v2.interpreting():
        ap.error("--device cpu runs the kernels under the Triton interpreter: set TRITON_INTERPRET=1")
    t0 = time.time()
    if a.phase == "check":
        workers = a.workers if a.workers is not None else (
            1 if a.device == "cpu" else max(1, min(15, (os.cpu_count() or 2) - 1)))
        only = a.variants.split(",") if a.variants else None
        if only and (unknown := set(only) - set(ALL_VARIANTS)):
            ap.error(f"unknown variants {sorted(unknown)}")
        rc = check(a.out, a.device, workers, a.seconds, only)
    else:
        rc = bench(a.out, a.passes)
    print(f"{a.phase}: {time.time() - t0:.0f} s", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
