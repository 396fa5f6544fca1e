import itertools, torch, triton
from tunebench.inputs import make_inputs
from tunebench.shapes import Problem
from tunebench.kernels import paged_attention as pa
for B, N in ((16, 16384), (128, 1024), (1, 32768)):
    for kv in ("float8_e4m3fn", None):
        pr = Problem("paged_attention", B, 32, 8, 1, N, 128, "bfloat16", page=16, kv_dtype=kv)
        inp = make_inputs(pr, "cuda")
        sc = dict(k_scale=inp.k_scale, v_scale=inp.v_scale) if kv else {}
        out = torch.empty_like(inp.q)
        rows = []
        for bn, part, st, w, wd in itertools.product((64, 128), (0, 1024) if B > 1 else (512, 1024), (2, 3), (4, 8), (0, 1) if kv else (0,)):
            cfg = dict(BLOCK_N=bn, PARTITION=part, num_stages=st, num_warps=w, WIDEN=wd)
            if pa.keep(cfg, pr):
                continue
            f = lambda: pa.launch(inp.q, inp.k_cache, inp.v_cache, inp.block_tables, inp.context_lens, cfg, out=out, **sc)
            try:
                ms = triton.testing.do_bench_cudagraph(f, rep=30)
            except Exception as e:
                print("ERR", cfg, type(e).__name__, str(e)[:100]); continue
            rows.append((ms, cfg))
        rows.sort(key=lambda r: r[0])
        print(f"== B{B} N{N} kv={kv}", flush=True)
        for ms, cfg in rows[:6]:
            print(f"  {ms*1000:7.1f} us  {cfg}")
        for wd in (0, 1):
            best = [r for r in rows if r[1]["WIDEN"] == wd]
            if best:
                print(f"  best WIDEN={wd}: {best[0][0]*1000:.1f} us {best[0][1]}", flush=True)
