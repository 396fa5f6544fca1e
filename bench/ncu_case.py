"""One attention call, repeated, through tunebench's public API with the tuned dispatcher: the program that Nsight
Compute wraps to profile one kernel launch (a static SASS count says what a loop issues; the counters say what it
stalls on). The first calls compile and warm up; ncu's --launch-skip picks a later one.

    ncu --clock-control none -k regex:_flash_v3 -s 3 -c 1 --section SpeedOfLight --section WarpStateStats \
        python3 bench/ncu_case.py prefill --variant v3 -B 4 --H 16 -N 4096 -D 128
    ncu --clock-control none -k regex:sdpa -s 3 -c 1 --section SpeedOfLight \
        python3 bench/ncu_case.py prefill --variant cudnn
    ncu --clock-control none -k regex:_paged_decode -s 3 -c 1 --section WarpStateStats \
        python3 bench/ncu_case.py decode -B 16 -N 16384 --kv-dtype float8_e4m3fn

Prints the config the dispatcher chose (TUNEBENCH_DB picks the database) and checks nothing: the gate does that.
"""
from __future__ import annotations

import argparse
import json
import sys


def _config(text: str) -> dict:
    """--config's value: a JSON object."""
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e}): {text!r}") from None
    if not isinstance(config, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object of the kernel's SPACE keys, got {text!r}")
    return config


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kind", choices=("prefill", "decode"))
    ap.add_argument("-B", type=int, default=4)
    ap.add_argument("--H", type=int, help="query heads (default: 16 for prefill, 32 for decode)")
    ap.add_argument("--Hkv", type=int, help="KV heads (default: --H for prefill, 8 for decode)")
    ap.add_argument("-N", type=int, default=4096, help="sequence length (decode: context length)")
    ap.add_argument("-D", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16", choices=("float16", "bfloat16"))
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--variant", default="auto", choices=("auto", "v1", "v2", "v3", "cudnn"),
                    help="prefill's kernel; cudnn: torch SDPA's cuDNN backend on the same inputs, the peer to compare")
    ap.add_argument("--config", type=_config,
                    help="prefill, --variant v2 or v3: this config (JSON) instead of the dispatcher's choice, e.g. "
                         "the one a tune picked on another GPU")
    ap.add_argument("--page", type=int, default=16)
    ap.add_argument("--kv-dtype", choices=("float8_e4m3fn", "float8_e5m2"), help="decode: an fp8 cache")
    ap.add_argument("--calls", type=int, default=6)
    args = ap.parse_args(argv)
    if args.kind == "prefill" and args.kv_dtype:
        ap.error("--kv-dtype is for decode (paged attention) only")
    if args.config is not None and (args.kind != "prefill" or args.variant not in ("v2", "v3")):
        ap.error("--config is for prefill with --variant v2 or v3")

    import torch
    import tunebench
    from tunebench.inputs import make_inputs
    from tunebench.shapes import Problem
    if not torch.cuda.is_available():
        print("ncu_case: needs a CUDA GPU", file=sys.stderr)
        return 2
    if args.kind == "prefill":
        hq = args.H or 16
        problem = Problem("flash_v2", args.B, hq, args.Hkv or hq, args.N, args.N, args.D, args.dtype,
                          causal=args.causal)
        inp = make_inputs(problem, "cuda")

        if args.variant == "cudnn":
            import torch.nn.functional as F
            from torch.nn.attention import SDPBackend, sdpa_kernel

            def call():
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    return F.scaled_dot_product_attention(inp.q, inp.k, inp.v, is_causal=args.causal)
            print("torch SDPA, cuDNN backend")
        elif args.config is not None:
            from tunebench.kernels import flash_v2, flash_v3
            kernel = {"v2": flash_v2, "v3": flash_v3}[args.variant]

            def call():
                return kernel.launch(inp.q, inp.k, inp.v, args.config, causal=args.causal)
            print(f"flash_{args.variant} with the given config {args.config}")
        else:
            def call():
                return tunebench.flash_attention(inp.q, inp.k, inp.v, causal=args.causal, variant=args.variant)
            print(tunebench.explain(inp.q, inp.k, v=inp.v, causal=args.causal, variant=args.variant))
    else:
        problem = Problem("paged_attention", args.B, args.H or 32, args.Hkv or 8, 1, args.N, args.D, args.dtype,
                          page=args.page, kv_dtype=args.kv_dtype)
        inp = make_inputs(problem, "cuda")
        scales = dict(k_scale=inp.k_scale, v_scale=inp.v_scale) if args.kv_dtype else {}

        def call():
            return tunebench.paged_attention(inp.q, inp.k_cache, inp.v_cache, inp.block_tables, inp.context_lens,
                                             **scales)
        print(tunebench.explain(inp.q, inp.k_cache, block_tables=inp.block_tables))
    for _ in range(args.calls):
        call()
    torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    sys.exit(main())
