"""WIDEN 0/1/2 head to head on fp8 decode shapes (graph replay), each output checked first; prints per shape the best
config per WIDEN and, last, 'DECISION <w>' for the WIDEN value to ship (0 unless another wins by >= 4% at B16 x 16k
and loses nowhere by more than 1%)."""
import itertools, sys, torch, triton
from tunebench.inputs import make_inputs
from tunebench.shapes import Problem
from tunebench.kernels import paged_attention as pa
from tunebench.paged_inputs import fp8_paged_references
from tunebench.correctness import close_enough
best = {}
for B, N, parts in ((16, 16384, (1024, 2048)), (128, 1024, (0,)), (1, 32768, (512, 1024)), (64, 4096, (512, 1024))):
    pr = Problem("paged_attention", B, 32, 8, 1, N, 128, "bfloat16", page=16, kv_dtype="float8_e4m3fn")
    inp = make_inputs(pr, "cuda")
    sc = dict(k_scale=inp.k_scale, v_scale=inp.v_scale)
    out = torch.empty_like(inp.q)
    rows = []
    for wd, bn, part, st, w in itertools.product((0, 1, 2), (64, 128), parts, (2, 3), (4,)):
        cfg = dict(BLOCK_N=bn, PARTITION=part, num_stages=st, num_warps=w, WIDEN=wd)
        if pa.keep(cfg, pr):
            continue
        f = lambda: pa.launch(inp.q, inp.k_cache, inp.v_cache, inp.block_tables, inp.context_lens, cfg, out=out, **sc)
        if B <= 16 and bn == 128 and st == 3:         # check one config per WIDEN on a small slice of batches
            f()
            ref = fp8_paged_references(inp.q[:1], inp.k_cache, inp.v_cache, inp.block_tables[:1], inp.context_lens[:1],
                                       inp.k_scale, inp.v_scale)
            v = close_enough(out[:1], *ref)
            assert v.ok, (cfg, v.reason)
        rows.append((triton.testing.do_bench_cudagraph(f, rep=25), cfg))
    print(f"== fp8 B{B} x {N}", flush=True)
    for wd in (0, 1, 2):
        r = min((r for r in rows if r[1]["WIDEN"] == wd), key=lambda r: r[0])
        best[(B, wd)] = r[0]
        print(f"  WIDEN={wd}: {r[0]*1000:7.1f} us  {r[1]}", flush=True)
pick = 0
for wd in (1, 2):
    if best[(16, wd)] <= 0.96 * best[(16, 0)] and all(best[(b, wd)] <= 1.01 * best[(b, 0)] for b in (128, 1, 64)):
        if pick == 0 or best[(16, wd)] < best[(16, pick)]:
            pick = wd
print(f"DECISION {pick}", flush=True)
