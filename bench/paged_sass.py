"""Paged decode's hot loop as sm_90 SASS, compiled on any machine (no GPU: Triton's own ptxas and cuobjdump), to count
what one loop step costs before a GPU times it.

Compiles kernels/paged_attention.py's _paged_decode for sm_90 with the specialisations a real launch gets (unit
strides as constants, the other strides and pointers 16-byte divisible), Hq32/Hkv8 D128, pages of 16, split-K, and
prints per config: registers, spilled bytes, the instructions of the hot loop (the longest backward branch) by opcode,
and warp-instructions per token (loop x warps / BLOCK_N; a token is one KV head's K and V rows: 2 x 128 x 2 = 512
bytes in bf16 at D 128, 256 in fp8). At the H200's ~4.8 TB/s over 132 SMs at 1.98 GHz an SM receives ~18 bytes a
cycle and issues at most 4 warp-instructions a cycle, so a loop keeps pace with memory only if it needs no more than
4 x bytes / 18 warp-instructions per token (113 in bf16, 57 in fp8): the `issue` column is the share of the SM's
issue slots the loop would take at that pace. A latency-bound loop with a few warps per SM sustains well under 100%
(bf16 decode reached the copy ceiling at ~30%, 2026-12-07). A static count, not a timing: what a GPU then measures
decides (a variant with 35% fewer instructions ran slower on an H100: benchmarks/h100/2026-12-07c).

    python bench/paged_sass.py                   # the default grid
    python bench/paged_sass.py --q bf16 --kv fp8e4nv --block-n 64 --stages 3 --warps 4
    python bench/paged_sass.py --module kernels.paged_variant --set F16=0,1
                                                 # a variant (a copy of the module) with more constexpr keys
"""
from __future__ import annotations

import argparse
import collections
import importlib
import itertools
import pathlib
import re
import subprocess
import sys
import tempfile

UNIT_STRIDES = ("stride_qd", "stride_kd", "stride_vd", "stride_od", "stride_btn", "stride_cl")
HEAD_DIM = 128                                   # Hq32/Hkv8 D128: the issue's decode geometry
POINTERS = {"Q": "q", "O": "q", "K": "kv", "V": "kv", "BT": "i32", "CL": "i32", "Err": "i32", "M_part": "fp32",
            "L_part": "fp32", "Acc_part": "fp32", "K_scale": "fp32", "V_scale": "fp32"}


def is_fp8(kv: str) -> bool:
    return kv.startswith("fp8")


def compile_decode(module, q: str, kv: str, block_n: int, stages: int, warps: int, extra: dict):
    """The compiled _paged_decode of ``module``; ``extra``: values of constexpr keys beyond today's (a variant's)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    fn = module._paged_decode
    names = fn.arg_names
    unknown = sorted(set(extra) - set(names))
    if unknown:
        raise SystemExit(f"{module.__name__}._paged_decode has no parameter {unknown[0]!r}")
    fp8 = is_fp8(kv)
    # F16 as launch() sets it: bf16 queries on an fp8 cache run their dots in fp16.
    const = dict(N_SUB=1, GROUP=4, ROWS=4, GROUP_PAD=16, HEAD_DIM=HEAD_DIM, D_PAD=HEAD_DIM, EVEN_D=True, BLOCK_SIZE=16,
                 BLOCK_N=block_n, PARTITION=1024, SPLIT=True, DOT_PRECISION="ieee", KV_FP8=fp8,
                 F16=fp8 and q == "bf16", RESTAGE_V=False, OPAQUE=True, SAFE=True, CHECK=False, stride_ksc=0,
                 stride_vsc=0,
                 **{n: 1 for n in UNIT_STRIDES})
    const = {k: v for k, v in const.items() if k in names} | extra     # a variant may lack or add a key
    kinds = {"q": q, "kv": kv}
    sig = {n: "constexpr" if n in const else f"*{kinds.get(POINTERS[n], POINTERS[n])}" if n in POINTERS
           else "fp32" if n == "qk_scale" else "i32" for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names
             if n not in const and (n in POINTERS or n.startswith("stride"))}
    src = ASTSource(fn, sig, constexprs={(names.index(k),): v for k, v in const.items()}, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))


def loop_profile(cubin: bytes, suffixes: bool = False) -> tuple[dict, collections.Counter]:
    """({'REG': n, 'STACK': bytes}, opcodes of the longest loop) from the cubin, by Triton's bundled cuobjdump; with
    suffixes, opcodes as written (LDS.U8, not LDS)."""
    import triton
    tool = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "paged_decode.cubin"
        path.write_bytes(cubin)
        usage = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True).stdout
        sass = subprocess.run([tool, "-sass", path], capture_output=True, text=True).stdout
    resources = {k: int(v) for k, v in re.findall(r"(REG|STACK):(\d+)", usage)}
    code = [(int(a, 16), text) for a, text in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    loops = [(target, addr) for addr, text in code
             for target in [int(t, 16) for t in re.findall(r"BRA[^0-9]*0x([0-9a-f]+)", text)] if target < addr]
    first, last = max(loops, key=lambda span: span[1] - span[0])
    ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", text).split()[0] for addr, text in code
                              if first <= addr <= last)
    if not suffixes:
        ops = collections.Counter(op.split(".")[0] for op in ops.elements())
    return resources, ops


SM_BYTES_PER_CYCLE = 4.8e12 / 132 / 1.98e9      # an H200 SM's share of HBM bandwidth


def issue_share(per_token: float, kv: str) -> float:
    """The share of an SM's 4 issue slots a cycle that per_token warp-instructions take when tokens (K and V rows of
    one KV head) arrive at the SM's share of HBM bandwidth."""
    token_bytes = 2 * HEAD_DIM * (1 if is_fp8(kv) else 2)
    return per_token / 4 / (token_bytes / SM_BYTES_PER_CYCLE)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--q", default="bf16", choices=("bf16", "fp16"))
    ap.add_argument("--kv", action="append", choices=("bf16", "fp16", "fp8e4nv", "fp8e5"))
    ap.add_argument("--block-n", type=int, action="append")
    ap.add_argument("--stages", type=int, action="append")
    ap.add_argument("--warps", type=int, action="append")
    ap.add_argument("--module", default="kernels.paged_attention", help="the kernel's module (default: today's)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=V1,V2",
                    help="a further constexpr parameter of a variant, with the integer values to try (repeatable)")
    args = ap.parse_args(argv)
    mixed = sorted({kv for kv in args.kv or [] if not is_fp8(kv) and kv != args.q})
    if mixed:
        ap.error(f"--kv {mixed[0]} with --q {args.q}: a 16-bit cache has the queries' dtype (only fp8 caches differ)")
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    module = importlib.import_module(args.module)
    keys, values = [], []
    for spec in args.set:
        key, _, vals = spec.partition("=")
        keys.append(key)
        values.append([int(v) for v in vals.split(",")])
    grid = itertools.product(args.kv or [args.q, "fp8e4nv"], args.block_n or [64, 128], args.stages or [1, 3],
                             args.warps or [4], itertools.product(*values))
    print(f"{'kv':8} {'BLOCK_N':>7} {'stages':>6} {'warps':>5} {' '.join(f'{k:>8}' for k in keys)} {'regs':>4} "
          f"{'spill':>5} {'loop':>5} {'per token':>9} {'issue':>5}  top opcodes")
    for kv, block_n, stages, warps, extra in grid:
        res, ops = loop_profile(compile_decode(module, args.q, kv, block_n, stages, warps,
                                               dict(zip(keys, extra))).asm["cubin"])
        total = sum(ops.values())
        top = " ".join(f"{op} {n}" for op, n in ops.most_common(8))
        print(f"{kv:8} {block_n:7d} {stages:6d} {warps:5d} {' '.join(f'{v:8d}' for v in extra)} "
              f"{res.get('REG', 0):4d} {res.get('STACK', 0):5d} {total:5d} {total * warps / block_n:9.1f} "
              f"{issue_share(total * warps / block_n, kv):5.0%}  {top}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
