import sys, json, torch
from tunebench.inputs import make_inputs
from tunebench.shapes import Problem
from tunebench.kernels import paged_attention as pa
cfg = json.loads(sys.argv[1])
pr = Problem("paged_attention", 16, 32, 8, 1, 16384, 128, "bfloat16", page=16, kv_dtype="float8_e4m3fn")
inp = make_inputs(pr, "cuda")
out = torch.empty_like(inp.q)
for _ in range(6):
    pa.launch(inp.q, inp.k_cache, inp.v_cache, inp.block_tables, inp.context_lens, cfg, out=out, k_scale=inp.k_scale, v_scale=inp.v_scale)
torch.cuda.synchronize()
