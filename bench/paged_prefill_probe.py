"""Issue 20's goals for tunebench.paged_prefill, on a GPU, every compared thing in this one process:

1. A prefill chunk over a cached context (bf16, Hq32/Hkv8, D128, page 16), against dense attention on the same
   tokens with contiguous K/V: SDPA with a bottom-right causal bias (torch.nn.attention.bias.causal_lower_right) on
   the flash, efficient and cuDNN backends (K/V repeated per query head where the backend needs it), and
   tunebench.flash_attention (flash_v2, bottom-right causal). Timed with do_bench (L2 flushed, median); TFLOP/s count
   only the key-query pairs the mask keeps; the bf16 matmul ceiling is measured in the same run.
2. A mixed batch: 64 decode rows (context 4096) plus one 2048-token chunk over an 8192 context, as one paged_prefill
   launch against paged_attention on the decode rows plus paged_prefill on the chunk (two launches; the decode launch
   gets the decode rows' own block table, as an engine running it alone would), timed by CUDA-graph replay (a serving
   step is replayed from a graph) and launch by launch. The same two launches are also timed on two streams (the
   decode launch on a side stream, forked from and joined back to the current one): whether the memory-bound decode
   programs and the compute-bound chunk programs overlap on the SMs when the GPU may run them side by side, which is
   what the 1.3x goal needs (max(decode, chunk) against their sum). On a CPU the two run one after the other.

Every output is checked before anything is timed, against the float64 reference (tunebench.inputs.references) with
the tolerance rule of tunebench/correctness.py, on the first, a middle and the last CHECK_ROWS query rows of each
sequence: a tunebench output that fails stops the probe (exit 1); an SDPA peer that fails is reported, not timed.

--small runs tiny sizes (fp16, Hq4/Hkv2, D16); without a GPU it runs on the CPU under the Triton interpreter, to
check the plumbing end to end: its times are the interpreter's wall clock and say nothing about a GPU, and the SDPA
peers, the matmul ceiling and CUDA-graph timing are reported as 'skipped: needs CUDA'.

    python3 bench/paged_prefill_probe.py [--out DIR] [--small]
With --out, writes DIR/paged-prefill.csv (goal 1, a row per chunk), DIR/paged-prefill-mixed.csv (goal 2) and
DIR/paged-prefill.json (both, with the device and the matmul ceiling).
"""
from __future__ import annotations

import argparse
import functools
import json
import pathlib
from dataclasses import dataclass

import torch

from tunebench.bench.script import checked_run, script_device, write_csv
from tunebench.shapes import suite


@dataclass(frozen=True)
class Setup:
    """What the probe runs: the geometry, goal 1's chunks and goal 2's mixed batch."""
    Hq: int
    Hkv: int
    D: int
    page: int
    dtype: torch.dtype
    chunks: tuple                   # goal 1: (new tokens, context) per row
    decode_rows: int                # goal 2: this many decode rows of decode_context tokens ...
    decode_context: int
    mixed_chunk: tuple              # ... and one chunk: (new tokens, context)
    check_rows: int = 16            # query rows per checked window


def suite_chunks() -> tuple:
    """Goal 1's chunks, (new tokens, context): the paged-prefill suite's single sequences over a cached context, so
    that each one the probe times is a bucket `tunebench tune --suite paged-prefill` tunes (same geometry as ISSUE)."""
    return tuple((p.Nq, p.Nk) for p in suite("paged-prefill") if p.B == 1 and p.Nq < p.Nk)


ISSUE = Setup(32, 8, 128, 16, torch.bfloat16, suite_chunks(), 64, 4096, (2048, 8192))
# Small for the interpreter; (16, 16) is a chunk with no cached context, checked in three windows of 4 rows.
SMALL = Setup(4, 2, 16, 16, torch.float16, ((5, 40), (16, 16)), 3, 20, (9, 33), check_rows=4)
MATMUL_N = 8192
SKIPPED = "skipped: needs CUDA"
PROVIDERS = ("tunebench paged_prefill", "tunebench flash_v2 (dense)", "sdpa flash", "sdpa efficient",
             "sdpa cudnn (bool mask)")
CHUNK_FIELDS = ("chunk", "context", "check_ratio", "tunebench_tflops", "vs_cudnn", "vs_best_sdpa", "of_matmul",
                "timer") + tuple(f"{p} {c}" for p in PROVIDERS for c in ("TFLOP/s", "check", "status"))
MIXED_FIELDS = ("decode_rows", "decode_context", "chunk", "context", "check_ratio", "two_launches_check_ratio",
                "two_streams_check_ratio",
                "one_launch_ms_graph", "two_launches_ms_graph", "two_streams_ms_graph", "speedup_graph",
                "two_streams_speedup_graph", "graph_status",
                "one_launch_ms_launches", "two_launches_ms_launches", "two_streams_ms_launches", "speedup_launches",
                "two_streams_speedup_launches", "launches_status", "timer")


class WrongOutput(AssertionError):
    """An output disagrees with the float64 reference."""


def pairs(chunk: int, ctx: int) -> int:
    """Key-query pairs a bottom-right causal chunk of ``chunk`` queries over ``ctx`` keys computes."""
    return chunk * (ctx - chunk) + chunk * (chunk + 1) // 2


def dense_and_paged(setup: Setup, chunks: list, device, seed: int = 0):
    """q [1, Hq, n, D] and K/V [1, Hkv, ctx, D] per sequence, plus the packed paged inputs
    (q [total, Hq, D], k_cache, v_cache, block_tables, cu_seqlens_q, context_lens)."""
    from tunebench.paged_inputs import pack_paged
    s = setup
    g = torch.Generator(device=device).manual_seed(seed)
    qs, ks, vs = [], [], []
    for n, ctx in chunks:
        qs.append(torch.randn(1, s.Hq, n, s.D, device=device, generator=g).to(s.dtype))
        ks.append(torch.randn(1, s.Hkv, ctx, s.D, device=device, generator=g).to(s.dtype))
        vs.append(torch.randn(1, s.Hkv, ctx, s.D, device=device, generator=g).to(s.dtype))
    max_ctx = max(ctx for _, ctx in chunks)
    pad = [torch.nn.functional.pad(t, (0, 0, 0, max_ctx - t.shape[2])) for t in ks + vs]
    k, v = torch.cat(pad[:len(ks)]), torch.cat(pad[len(ks):])
    lens = torch.tensor([ctx for _, ctx in chunks], dtype=torch.int32, device=device)
    k_cache, v_cache, tables = pack_paged(k, v, lens, s.page, torch.Generator().manual_seed(seed))
    q_packed = torch.cat([q[0].transpose(0, 1) for q in qs]).contiguous()        # [total, Hq, D]
    cu = torch.tensor([0] + [sum(n for n, _ in chunks[:i + 1]) for i in range(len(chunks))], dtype=torch.int32,
                      device=device)
    return qs, ks, vs, (q_packed, k_cache, v_cache, tables, cu, lens)


@dataclass
class Mixed:
    """Goal 2's batch: its sequences' (new tokens, context), dense tensors and packed paged inputs, and the arguments
    of its two parts alone: paged_attention on the decode rows (with their own block table, as an engine running them
    alone would: not the chunk's width) and paged_prefill on the chunk."""
    chunks: list
    dense: tuple                    # qs, ks, vs
    packed: tuple                   # q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens
    decode_args: tuple              # paged_attention's
    chunk_args: tuple               # paged_prefill's

    @property
    def decode_prefill_args(self) -> tuple:
        """The decode rows alone through paged_prefill."""
        q, k_cache, v_cache, tables, lens = self.decode_args
        return q, k_cache, v_cache, tables, self.packed[4][:q.shape[0] + 1], lens


def mixed_batch(setup: Setup, device, seed: int = 7) -> Mixed:
    """Goal 2's batch on ``device``: setup.decode_rows decode rows, then setup.mixed_chunk (an engine's order)."""
    s, R = setup, setup.decode_rows
    chunks = [(1, s.decode_context)] * R + [s.mixed_chunk]
    qs, ks, vs, packed = dense_and_paged(setup, chunks, device, seed=seed)
    q, kc, vc, tables, cu, lens = packed
    decode_blocks = -(-s.decode_context // s.page)
    return Mixed(chunks, (qs, ks, vs), packed, (q[:R], kc, vc, tables[:R, :decode_blocks].contiguous(), lens[:R]),
                 (q[R:], kc, vc, tables[R:], cu[R:] - R, lens[R:]))


def check(out_packed, qs, ks, vs, chunks, rows: int) -> float:
    """The worst error over the float64 reference, relative to the tolerance (<= 1 passes), on the first, a middle
    and the last ``rows`` queries of each sequence; raises WrongOutput naming the first sequence that fails.
    out_packed: [total, Hq, D], the sequences' rows packed as cu_seqlens_q packs them."""
    from tunebench.correctness import close_enough
    from tunebench.inputs import check_windows, references
    worst, start = 0.0, 0
    for i, ((n, ctx), q, k, v) in enumerate(zip(chunks, qs, ks, vs)):
        for s, e in check_windows(n, rows, seed=i):
            # Query rows [s, e) sit at positions ctx - n + s .. ctx - n + e - 1: causal over the first ctx - n + e keys.
            kv_end = ctx - n + e
            ref64, lowp = references(q[:, :, s:e], k[:, :, :kv_end], v[:, :, :kv_end], causal=True)
            got = out_packed[start + s:start + e].transpose(0, 1)[None]      # [1, Hq, rows, D]
            verdict = close_enough(got, ref64, lowp)
            if not verdict.ok:
                raise WrongOutput(f"sequence {i} ({n} new tokens over {ctx}), query rows {s}..{e - 1}: "
                                  f"{verdict.reason}")
            worst = max(worst, verdict.ratio)
        start += n
    return worst


def sdpa_peers(q, k, v) -> dict:
    """Dense attention on contiguous K/V, bottom-right causal, through SDPA's CUDA backends: name -> callable."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right
    n, ctx = q.shape[2], k.shape[2]
    bias = causal_lower_right(n, ctx)
    group = q.shape[1] // k.shape[1]
    ke, ve = (t.repeat_interleave(group, 1) for t in (k, v))
    keep = torch.ones(n, ctx, dtype=torch.bool, device=q.device).tril(ctx - n)
    out = {}
    backends = (("sdpa flash", SDPBackend.FLASH_ATTENTION), ("sdpa efficient", SDPBackend.EFFICIENT_ATTENTION))
    for name, backend in backends:
        def run(backend=backend):
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(q, ke, ve, attn_mask=bias)
        out[name] = run

    def cudnn():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(q, ke, ve, attn_mask=keep)
    out["sdpa cudnn (bool mask)"] = cudnn
    return out


def _reason(e: Exception) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:100]}"


def measure_provider(fn, checker, bench, ours: bool) -> tuple:
    """(ms or None, check ratio or None, status). Runs fn once and checks it before timing it with bench (None:
    not timed here). A tunebench output that fails raises; a peer that fails or raises is reported."""
    try:
        ratio = checker(fn())
    except Exception as e:
        if ours:
            raise
        return None, None, ("wrong output: " if isinstance(e, WrongOutput) else "failed: ") + _reason(e)
    if bench is None:
        return None, ratio, SKIPPED
    try:
        return bench(fn).median_ms, ratio, "ok"
    except Exception as e:
        if ours:
            raise
        return None, ratio, "failed: " + _reason(e)


def chunk_row(setup: Setup, n: int, ctx: int, device, bench, matmul_tflops, timer: str) -> dict:
    """Goal 1 for one chunk: a row of CHUNK_FIELDS. bench: fn -> Timing; SDPA peers run on CUDA only."""
    import tunebench
    qs, ks, vs, packed = dense_and_paged(setup, [(n, ctx)], device, seed=n + ctx)
    q, k, v = qs[0], ks[0], vs[0]
    calls = {"tunebench paged_prefill": lambda: tunebench.paged_prefill(*packed, check_values=False),
             "tunebench flash_v2 (dense)": lambda: tunebench.flash_attention(q, k, v, causal=True)}

    def check_packed(out):                                   # out: [total, Hq, D]
        return check(out, qs, ks, vs, [(n, ctx)], setup.check_rows)

    def check_dense(out):                                    # out: [1, Hq, n, D]
        return check_packed(out[0].transpose(0, 1))
    cuda = torch.device(device).type == "cuda"
    if cuda:
        calls.update(sdpa_peers(q, k, v))
    flops = 4.0 * setup.Hq * setup.D * pairs(n, ctx)
    row = dict.fromkeys(CHUNK_FIELDS)
    row.update(chunk=n, context=ctx, timer=timer)
    for name in PROVIDERS:
        if name not in calls:
            row[f"{name} status"] = SKIPPED
            continue
        checker = check_packed if name == PROVIDERS[0] else check_dense
        ms, row[f"{name} check"], row[f"{name} status"] = measure_provider(calls[name], checker, bench,
                                                                           name.startswith("tunebench"))
        row[f"{name} TFLOP/s"] = flops / (ms * 1e-3) / 1e12 if ms else None
    ours = row["tunebench paged_prefill TFLOP/s"]
    row["check_ratio"], row["tunebench_tflops"] = row["tunebench paged_prefill check"], ours
    cudnn = row["sdpa cudnn (bool mask) TFLOP/s"]
    best = max((row[f"{p} TFLOP/s"] for p in PROVIDERS[2:] if row[f"{p} TFLOP/s"]), default=None)
    row["vs_cudnn"] = ours / cudnn if ours and cudnn else None
    row["vs_best_sdpa"] = ours / best if ours and best else None
    row["of_matmul"] = ours / matmul_tflops if ours and matmul_tflops else None
    return row


def mixed_row(setup: Setup, device, graph, launches, timer: str) -> dict:
    """Goal 2: one paged_prefill launch against paged_attention + paged_prefill, both checked first; a row of
    MIXED_FIELDS. graph, launches: fn -> Timing, or None where they cannot run (then 'skipped: needs CUDA')."""
    import tunebench
    s, R = setup, setup.decode_rows
    m = mixed_batch(setup, device)
    (qs, ks, vs), packed, d_args, c_args = m.dense, m.packed, m.decode_args, m.chunk_args

    def one():
        return tunebench.paged_prefill(*packed, check_values=False)

    def two():
        return tunebench.paged_attention(*d_args), tunebench.paged_prefill(*c_args, check_values=False)
    streams = two_streams(lambda: tunebench.paged_attention(*d_args),
                          lambda: tunebench.paged_prefill(*c_args, check_values=False), device)
    row = dict.fromkeys(MIXED_FIELDS)
    row.update(decode_rows=R, decode_context=s.decode_context, chunk=s.mixed_chunk[0], context=s.mixed_chunk[1],
               timer=timer)
    row["check_ratio"] = check(one(), qs, ks, vs, m.chunks, s.check_rows)
    row["two_launches_check_ratio"] = check(torch.cat(two()), qs, ks, vs, m.chunks, s.check_rows)
    row["two_streams_check_ratio"] = check(torch.cat(streams()), qs, ks, vs, m.chunks, s.check_rows)
    for name, bench in (("graph", graph), ("launches", launches)):
        if bench is None:
            row[f"{name}_status"] = SKIPPED
            continue
        t1, t2, t3 = bench(one).median_ms, bench(two).median_ms, bench(streams).median_ms
        row[f"one_launch_ms_{name}"], row[f"two_launches_ms_{name}"], row[f"speedup_{name}"] = t1, t2, t2 / t1
        row[f"two_streams_ms_{name}"], row[f"two_streams_speedup_{name}"] = t3, t2 / t3
        row[f"{name}_status"] = "ok"
    return row


def two_streams(first, second, device):
    """A call running first() on a side stream beside second() on the current one, forked from it and joined back
    (so that a CUDA graph captures both branches), returning both results; on a CPU, one after the other."""
    if torch.device(device).type != "cuda":
        return lambda: (first(), second())
    side = torch.cuda.Stream(device=device)

    def run():
        main = torch.cuda.current_stream(device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            a = first()
        b = second()
        main.wait_stream(side)
        # a was allocated on the side stream: its memory is reused there only after the next fork, which waits for
        # everything this stream did with it, so no record_stream (which a graph capture may refuse) is needed.
        return a, b
    return run


def matmul_ceiling(setup: Setup, device) -> float | None:
    """TFLOP/s of a MATMUL_N^3 matmul in the setup's dtype, this run; None without CUDA."""
    if torch.device(device).type != "cuda":
        return None
    from triton.testing import do_bench
    a, b = (torch.randn(MATMUL_N, MATMUL_N, device=device).to(setup.dtype) for _ in range(2))
    return 2 * MATMUL_N ** 3 / (do_bench(lambda: a @ b, return_mode="median") * 1e-3) / 1e12


def _fmt(v, spec: str) -> str:
    return format(v, spec) if isinstance(v, float) else str(v)


def describe_chunk(row: dict) -> str:
    parts = [f"{p} {_fmt(row[f'{p} TFLOP/s'], '.0f')}" if row[f"{p} status"] == "ok" else f"{p}: {row[f'{p} status']}"
             for p in PROVIDERS]
    ratios = (("vs_cudnn", "vs cuDNN"), ("vs_best_sdpa", "vs best SDPA"), ("of_matmul", "of matmul"))
    extra = "".join(f"; {label} {row[k]:.2f}x" for k, label in ratios if row[k] is not None)
    return (f"chunk {row['chunk']:5d} over {row['context']:6d}: check {row['check_ratio']:.2f} of allowed; TFLOP/s "
            + "; ".join(parts) + extra)


def describe_mixed(row: dict) -> str:
    head = (f"mixed batch ({row['decode_rows']} decode rows at {row['decode_context']} + a {row['chunk']} chunk over "
            f"{row['context']}), checks {row['check_ratio']:.2f} / {row['two_launches_check_ratio']:.2f} of allowed")
    for name in ("graph", "launches"):
        if row[f"{name}_status"] != "ok":
            head += f"; {name}: {row[f'{name}_status']}"
        else:
            head += (f"; {name}: one paged_prefill launch {row[f'one_launch_ms_{name}']:.3f} ms, paged_attention + "
                     f"paged_prefill {row[f'two_launches_ms_{name}']:.3f} ms: {row[f'speedup_{name}']:.2f}x "
                     f"(goal >= 1.3x); the two on two streams {row[f'two_streams_ms_{name}']:.3f} ms: "
                     f"{row[f'two_streams_speedup_{name}']:.2f}x")
    return head


def write(rows: list, mixed: dict, meta: dict, out) -> list:
    folder = pathlib.Path(out)
    paths = [write_csv(folder / "paged-prefill.csv", CHUNK_FIELDS, rows),
             write_csv(folder / "paged-prefill-mixed.csv", MIXED_FIELDS, [mixed]), folder / "paged-prefill.json"]
    paths[2].write_text(json.dumps(dict(meta, chunks=rows, mixed=mixed), indent=1))
    return paths


def run(setup: Setup, device, out=None) -> tuple:
    """Both goals on ``device``: (chunk rows, mixed row). On CUDA, timed as the docstring says; elsewhere timed by
    the interpreter's wall clock, one call each."""
    from tunebench.tune.timing import gpu_bench, graph_bench, wall_bench
    cuda = torch.device(device).type == "cuda"
    launches = gpu_bench if cuda else functools.partial(wall_bench, reps=1)
    timer = "do_bench median (GPU)" if cuda else "interpreter wall clock, 1 call (not a GPU time)"
    matmul = matmul_ceiling(setup, device)
    name = torch.cuda.get_device_name() if cuda else "CPU (Triton interpreter)"
    print(f"{name}: {str(setup.dtype).removeprefix('torch.')} matmul ceiling "
          + (f"{matmul:.0f} TFLOP/s ({MATMUL_N}^3, this run)" if matmul else SKIPPED), flush=True)
    rows = []
    for n, ctx in setup.chunks:
        rows.append(chunk_row(setup, n, ctx, device, launches, matmul, timer))
        print(describe_chunk(rows[-1]), flush=True)
    mixed = mixed_row(setup, device, graph_bench if cuda else None, launches, timer)
    print(describe_mixed(mixed), flush=True)
    if out:
        meta = dict(device=name, dtype=str(setup.dtype), matmul_tflops=matmul, timer=timer)
        for path in write(rows, mixed, meta, out):
            print(f"wrote {path}")
    return rows, mixed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="folder for paged-prefill.csv, -mixed.csv and .json")
    parser.add_argument("--small", action="store_true",
                        help="tiny fp16 sizes; on the CPU under the Triton interpreter when there is no GPU (plumbing)")
    args = parser.parse_args(argv)
    device = script_device("paged_prefill_probe.py", args.small)
    if device is None:
        return 2
    return checked_run(lambda: run(SMALL if args.small else ISSUE, device, args.out), (WrongOutput,))


if __name__ == "__main__":
    raise SystemExit(main())
