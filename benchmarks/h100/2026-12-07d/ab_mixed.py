"""Dev A/B (not shipped): the mixed batch of bench/paged_prefill_probe.py (64 decode rows at 4096 + a 2048 chunk over
8192, bf16 Hq32/Hkv8 D128 page 16) as one paged_prefill launch, main's kernel (kernels/_pp_main.py) against this
branch's (small tiles for few-token sequences), per config, and the two launches (paged_attention + paged_prefill on
the chunk), all graph-timed in this process after a check against the float64 reference windows."""
import sys
import torch
sys.path.insert(0, "bench")
import paged_prefill_probe as probe
from tunebench.kernels import paged_attention as pa, paged_prefill as new, _pp_main as old
from tunebench.tune.timing import graph_bench

dev = "cuda" if torch.cuda.is_available() else "cpu"
s = probe.ISSUE if dev == "cuda" else probe.SMALL
R = s.decode_rows
decode, chunk = [(1, s.decode_context)] * R, [s.mixed_chunk]
qs, ks, vs, packed = probe.dense_and_paged(s, decode + chunk, dev, seed=7)
q, kc, vc, tables, cu, lens = packed
nb = -(-s.decode_context // s.page)
d_args = (q[:R], kc, vc, tables[:R, :nb].contiguous(), lens[:R])
c_args = (q[R:], kc, vc, tables[R:], cu[R:] - R, lens[R:])
bench = (lambda f: graph_bench(f, rep=100).median_ms) if dev == "cuda" else (lambda f: (f(), 0.0)[1])
PP = [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=st) for m, n, w, st in
      ((64, 32, 4, 2), (128, 32, 4, 2), (128, 64, 8, 2), (128, 32, 8, 3), (64, 64, 4, 3), (128, 64, 8, 3))]
PA = [dict(pa.DEFAULT, BLOCK_N=n, PARTITION=p) for n, p in ((32, 512), (64, 512), (64, 1024), (64, 0))]
rows = {}
for c in PP:
    for name, mod in (("old", old), ("new", new)):
        f = lambda mod=mod, c=c: mod.launch(*packed, config=c, check_values=False)
        ratio = probe.check(f(), qs, ks, vs, decode + chunk, s.check_rows)
        assert ratio <= 1.0, (name, c, ratio)
        rows[(name, str(c))] = bench(f)
    fc = lambda c=c: new.launch(*c_args, config=c, check_values=False)
    rows[("chunk", str(c))] = bench(fc)
    print(c, {k[0]: round(v, 4) for k, v in rows.items() if k[1] == str(c)}, flush=True)
for c in PA:
    fd = lambda c=c: pa.launch(*d_args, config=c)
    rows[("decode", str(c))] = bench(fd)
    print(c, round(rows[("decode", str(c))], 4), flush=True)
best = {k: min(v for (n, _), v in rows.items() if n == k) for k in ("old", "new", "chunk", "decode")}
two = best["chunk"] + best["decode"]
print(f"best one launch: main {best['old']:.4f} ms, branch {best['new']:.4f} ms ({best['old'] / max(best['new'], 1e-9):.3f}x); "
      f"two launches (best chunk {best['chunk']:.4f} + best decode {best['decode']:.4f}) = {two:.4f} ms; "
      f"speedup vs two: main {two / max(best['old'], 1e-9):.3f}x, branch {two / max(best['new'], 1e-9):.3f}x")
