"""`tunebench roofline`: a shape's analysis, a suite's, and/or the seed's N x d sweep, against one GPU's ceilings."""
from __future__ import annotations

from ..roofline import analyze, current_gpu_key, format_analysis, format_suite, format_sweep
from ..shapes import Problem


def _normalize_dtype(name: str) -> str:
    return {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32", "half": "float16"}.get(name, name)


def problem_from_args(args) -> Problem:
    paged = args.kernel == "paged_attention"
    length = ("--seq-k", args.seq_k) if paged else ("--seq-q", args.seq_q)
    missing = [flag for flag, value in (("--heads", args.heads), length, ("--head-dim", args.head_dim))
               if value is None]
    if missing:
        raise ValueError(f"give {', '.join(missing)} (a shape), or --sweep / --suite")
    nq = args.seq_q if args.seq_q is not None else 1
    nk = args.seq_k if args.seq_k is not None else nq
    return Problem(args.kernel, args.batch, args.heads, args.kv_heads or args.heads, nq, nk, args.head_dim,
                   _normalize_dtype(args.dtype), bool(args.causal))


def roofline_command(args) -> int:
    """`tunebench roofline`: prints a shape's analysis, a suite's, and/or the seed's sweep."""
    if args.gpu is None:
        gpu, why = current_gpu_key()
        print(f"GPU: {why}")
    else:
        gpu = args.gpu
    prefer = args.ceiling
    shown = False
    if args.heads is not None or args.seq_q is not None or args.head_dim is not None or not (args.sweep or args.suite):
        print(format_analysis(analyze(problem_from_args(args), gpu, prefer)))
        shown = True
    if args.suite:
        from ..shapes import suite
        if shown:
            print()
        print(format_suite([analyze(p, gpu, prefer) for p in suite(args.suite)]))
        shown = True
    if args.sweep:
        if shown:
            print()
        print(format_sweep(gpu, _normalize_dtype(args.dtype), prefer))
    return 0
