"""Issue 20's goals for tunebench.paged_prefill, on a GPU, every compared thing in this one process:

1. A prefill chunk over a cached context (bf16, Hq32/Hkv8, D128, page 16), against dense attention on the same
   tokens with contiguous K/V: SDPA with a bottom-right causal bias (torch.nn.attention.bias.causal_lower_right) on
   the flash, efficient and cuDNN backends (K/V repeated per query head where the backend needs it), and
   tunebench.flash_attention (flash_v2, bottom-right causal). Timed with do_bench (L2 flushed); TFLOP/s count only
   the key-query pairs the mask keeps; the bf16 matmul ceiling is measured in the same run.
2. A mixed batch: 64 decode rows (context 4096) plus one 2048-token chunk over an 8192 context, as one paged_prefill
   launch against paged_attention on the decode rows plus paged_prefill on the chunk (two launches), timed by CUDA-graph
   replay (a serving step is replayed from a graph) and launch by launch.

Each tunebench output is checked first against a float64 reference on the last query rows of each sequence.

    python3 bench/paged_prefill_probe.py [--out DIR]
"""
from __future__ import annotations

import argparse
import csv
import math
import pathlib

import torch

HQ, HKV, D, PAGE, DTYPE = 32, 8, 128, 16, torch.bfloat16
CHUNKS = [(512, 4096), (2048, 8192), (4096, 32768), (1024, 16384), (512, 32768)]   # (new tokens, context)
CHECK_ROWS = 16


def pairs(chunk: int, ctx: int) -> int:
    """Key-query pairs a bottom-right causal chunk of ``chunk`` queries over ``ctx`` keys computes."""
    return chunk * (ctx - chunk) + chunk * (chunk + 1) // 2


def dense_and_paged(chunks: list[tuple[int, int]], seed: int = 0):
    """q [B, Hq, n, D] per sequence and K/V [1, Hkv, ctx, D] per sequence, plus the packed paged inputs."""
    from tunebench.inputs import pack_paged
    g = torch.Generator(device="cuda").manual_seed(seed)
    qs, ks, vs = [], [], []
    for n, ctx in chunks:
        qs.append(torch.randn(1, HQ, n, D, device="cuda", generator=g).to(DTYPE))
        ks.append(torch.randn(1, HKV, ctx, D, device="cuda", generator=g).to(DTYPE))
        vs.append(torch.randn(1, HKV, ctx, D, device="cuda", generator=g).to(DTYPE))
    max_ctx = max(ctx for _, ctx in chunks)
    pad = [torch.nn.functional.pad(t, (0, 0, 0, max_ctx - t.shape[2])) for t in ks + vs]
    k, v = torch.cat(pad[:len(ks)]), torch.cat(pad[len(ks):])
    lens = torch.tensor([ctx for _, ctx in chunks], dtype=torch.int32, device="cuda")
    k_cache, v_cache, tables = pack_paged(k, v, lens, PAGE, torch.Generator().manual_seed(seed))
    q_packed = torch.cat([q[0].transpose(0, 1) for q in qs]).contiguous()        # [total, Hq, D]
    cu = torch.tensor([0] + [sum(n for n, _ in chunks[:i + 1]) for i in range(len(chunks))], dtype=torch.int32,
                      device="cuda")
    return qs, ks, vs, (q_packed, k_cache, v_cache, tables, cu, lens)


def check(out_packed, qs, ks, vs, chunks) -> float:
    """Max error of the last CHECK_ROWS queries of each sequence over the float64 reference, relative to the
    tolerance rule (<= 1 passes), with the naive bf16 computation as the yardstick."""
    from tunebench.correctness import close_enough
    worst, start = 0.0, 0
    for (n, ctx), q, k, v in zip(chunks, qs, ks, vs):
        rows = min(CHECK_ROWS, n)
        qi = q[0, :, n - rows:]                                          # [Hq, rows, D]
        kk, vv = (t[0].repeat_interleave(HQ // HKV, 0) for t in (k, v))
        pos = torch.arange(ctx - rows, ctx, device="cuda")[:, None]
        keep = torch.arange(ctx, device="cuda")[None, :] <= pos
        refs = []
        for dt in (torch.float64, DTYPE):       # the float64 reference, and the naive computation in bf16
            scores = ((qi.to(dt) @ kk.to(dt).transpose(-1, -2)) / math.sqrt(D)).masked_fill(~keep, -math.inf)
            probs = torch.softmax(scores if dt == torch.float64 else scores.float(), -1).to(dt)
            refs.append(probs @ vv.to(dt))
        got = out_packed[start + n - rows:start + n].transpose(0, 1)    # [Hq, rows, D]
        verdict = close_enough(got, refs[0], refs[1])
        worst = max(worst, verdict.ratio)
        start += n
    return worst


def peers(q, k, v):
    """Dense attention on contiguous K/V, bottom-right causal: name -> callable (or the reason it cannot run)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right
    import tunebench
    n, ctx = q.shape[2], k.shape[2]
    bias = causal_lower_right(n, ctx)
    ke, ve = (t.repeat_interleave(HQ // HKV, 1) for t in (k, v))
    keep = torch.ones(n, ctx, dtype=torch.bool, device="cuda").tril(ctx - n)
    out = {"tunebench flash_v2 (dense)": lambda: tunebench.flash_attention(q, k, v, causal=True)}
    for name, backend in (("sdpa flash", SDPBackend.FLASH_ATTENTION), ("sdpa efficient", SDPBackend.EFFICIENT_ATTENTION)):
        def run(backend=backend):
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(q, ke, ve, attn_mask=bias)
        out[name] = run

    def cudnn():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(q, ke, ve, attn_mask=keep)
    out["sdpa cudnn (bool mask)"] = cudnn
    return out


def time_ms(fn) -> float | str:
    from triton.testing import do_bench
    try:
        fn()
        torch.cuda.synchronize()
        return do_bench(fn)
    except Exception as e:          # a peer that cannot run here is reported, not fatal
        return f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"


def chunk_rows(matmul_tflops: float) -> list[dict]:
    import tunebench
    rows = []
    for n, ctx in CHUNKS:
        qs, ks, vs, packed = dense_and_paged([(n, ctx)], seed=n + ctx)
        out = tunebench.paged_prefill(*packed, check_values=False)
        ratio = check(out, qs, ks, vs, [(n, ctx)])
        flops = 4.0 * HQ * D * pairs(n, ctx)
        times = {"tunebench paged_prefill": time_ms(lambda: tunebench.paged_prefill(*packed, check_values=False))}
        times.update({name: time_ms(fn) for name, fn in peers(qs[0], ks[0], vs[0]).items()})
        tf = {k: flops / (t * 1e-3) / 1e12 for k, t in times.items() if isinstance(t, float)}
        best_peer = max((v for k, v in tf.items() if k.startswith("sdpa")), default=None)
        cudnn = tf.get("sdpa cudnn (bool mask)")
        row = dict(chunk=n, context=ctx, check_ratio=ratio, tunebench_tflops=tf.get("tunebench paged_prefill"),
                   vs_cudnn=(tf["tunebench paged_prefill"] / cudnn) if cudnn else None,
                   vs_best_sdpa=(tf["tunebench paged_prefill"] / best_peer) if best_peer else None,
                   of_matmul=tf["tunebench paged_prefill"] / matmul_tflops)
        row.update({f"{k} TFLOP/s" if k in tf else f"{k} (failed)": tf.get(k, times[k]) for k in times})
        rows.append(row)
        print(f"chunk {n:5d} over {ctx:6d}: check {ratio:.2f} of allowed; " + "; ".join(
            f"{k} {v:.0f}" if isinstance(v, float) else f"{k}: {v}" for k, v in
            ((k, tf.get(k, times[k])) for k in times)) + (f"; vs cuDNN {row['vs_cudnn']:.2f}x" if cudnn else "") +
            f"; {row['of_matmul']:.0%} of matmul", flush=True)
    return rows


def mixed_row() -> dict:
    import tunebench
    from tunebench.tune.timing import gpu_bench, graph_bench
    decode = [(1, 4096)] * 64
    chunk = [(2048, 8192)]
    qs, ks, vs, packed = dense_and_paged(decode + chunk, seed=7)
    q, kc, vc, tables, cu, lens = packed
    out = tunebench.paged_prefill(*packed, check_values=False)
    ratio = check(out, qs, ks, vs, decode + chunk)
    dq = q[:64]                                            # the decode rows' queries, [64, Hq, D]
    d_args = (dq, kc, vc, tables[:64], lens[:64])
    c_args = (q[64:], kc, vc, tables[64:], cu[64:] - 64, lens[64:])

    def one():
        return tunebench.paged_prefill(*packed, check_values=False)

    def two():
        tunebench.paged_attention(*d_args)
        return tunebench.paged_prefill(*c_args, check_values=False)
    two()
    row = dict(check_ratio=ratio)
    for name, bench in (("graph", graph_bench), ("launches", gpu_bench)):
        t1, t2 = bench(one).median_ms, bench(two).median_ms
        row[f"one_launch_ms_{name}"], row[f"two_launches_ms_{name}"], row[f"speedup_{name}"] = t1, t2, t2 / t1
        print(f"mixed batch (64 decode rows at 4k + a 2048 chunk over 8k), {name}: one paged_prefill launch "
              f"{t1:.3f} ms, paged_attention + paged_prefill {t2:.3f} ms: {t2 / t1:.2f}x (goal >= 1.3x); check "
              f"{ratio:.2f} of allowed", flush=True)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="folder for paged-prefill.csv")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("paged_prefill_probe needs a CUDA GPU")
    from triton.testing import do_bench
    a, b = (torch.randn(8192, 8192, device="cuda").to(DTYPE) for _ in range(2))
    matmul = 2 * 8192 ** 3 / (do_bench(lambda: a @ b) * 1e-3) / 1e12
    print(f"{torch.cuda.get_device_name()}: bf16 matmul ceiling {matmul:.0f} TFLOP/s (8192^3, this run)")
    rows = chunk_rows(matmul)
    mixed = mixed_row()
    if args.out:
        path = pathlib.Path(args.out) / "paged-prefill.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        keys = list(dict.fromkeys(k for r in rows for k in r))
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)
        (pathlib.Path(args.out) / "paged-prefill-mixed.csv").write_text(
            ",".join(mixed) + "\n" + ",".join(str(v) for v in mixed.values()) + "\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
