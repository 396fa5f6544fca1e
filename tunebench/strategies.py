"""Hypothesis strategies for shapes *and* configs, shared by the tests (tests/strategies.py) and `tunebench check`.
Only draws live here: the tensors of a drawn case are built by tunebench.inputs.

Imported only by the gate and the tests: `import tunebench` never pulls in hypothesis.

Two profiles (TUNEBENCH_PROFILE, else `gpu` when CUDA is available): `cpu` draws small fp16/fp32 shapes that the
Triton interpreter can run in CI; `gpu` draws fp16/bf16/fp32 up to 16k tokens and head dim 256.
"""
from __future__ import annotations

import itertools
import os

import torch
from hypothesis import strategies as st

from .shapes import PAGES, Problem

PROFILE = os.environ.get("TUNEBENCH_PROFILE", "gpu" if torch.cuda.is_available() else "cpu")
ON_GPU = PROFILE == "gpu"

# bf16 gives garbage under the Triton 3.6 interpreter, so the CPU profile checks fp16 and fp32 only.
DTYPES = ("float16", "bfloat16", "float32") if ON_GPU else ("float16", "float32")
# Awkward sizes on purpose (FlashAttention's tests use 59, 111, 97, 1025).
SEQ_CPU = (1, 7, 16, 33, 64, 97, 128)
SEQ_GPU = (1, 17, 97, 128, 255, 513, 1025, 2048, 4095, 8192, 16384)
HEAD_DIMS_CPU = (16, 32, 48, 64)
HEAD_DIMS_GPU = (16, 32, 40, 64, 80, 96, 111, 128, 160, 256)
# Per-problem size cap (B * Hq * Nq * Nk) so the float64 reference stays cheap.
MAX_SCORES = 2**16 if not ON_GPU else 2**31
# Examples per kernel for `tunebench check` (the test suite takes its count from the Hypothesis profile).
DEFAULT_EXAMPLES = 200 if ON_GPU else 12


def problems(kernel: str):
    """Problems for any registered kernel: dense prefill shapes, or paged decode shapes."""
    from .shapes import PAGED_KERNELS, PAGED_PREFILL_KERNELS
    if kernel in PAGED_PREFILL_KERNELS:
        return paged_prefill_problems(kernel)
    if kernel in PAGED_KERNELS:
        return paged_problems(kernel)
    return dense_problems(kernel, **_declared_domain(kernel))


def _declared_domain(kernel: str) -> dict:
    """The head dims and dtypes a dense kernel module declares it runs (HEAD_DIMS, DTYPES; flash_v3 does), so that
    its gate draws only problems it accepts; {} for a kernel that runs them all."""
    from .registry import kernel_module
    mod = kernel_module(kernel)
    domain = {"head_dims": getattr(mod, "HEAD_DIMS", None), "dtypes": getattr(mod, "DTYPES", None)}
    return {key: value for key, value in domain.items() if value}


def all_configs(module, problem) -> list[dict]:
    """Every config in the module's SPACE that its keep() admits for this problem."""
    keys = list(module.SPACE)
    confs = [dict(zip(keys, vals)) for vals in itertools.product(*module.SPACE.values())]
    return [c for c in confs if module.keep(c, problem) is None]


def configs(module, problem):
    admitted = all_configs(module, problem)
    assert admitted, f"keep() admits no config for {problem}"
    return st.sampled_from(admitted)


@st.composite
def dense_problems(draw, kernel: str, head_dims=None, gqa=True, dtypes=None):
    seqs = SEQ_GPU if ON_GPU else SEQ_CPU
    D = draw(st.sampled_from(head_dims or (HEAD_DIMS_GPU if ON_GPU else HEAD_DIMS_CPU)))
    Nq, Nk = draw(st.sampled_from(seqs)), draw(st.sampled_from(seqs))
    Hkv = draw(st.sampled_from((1, 2)))
    group = draw(st.sampled_from((1, 2, 4) if gqa else (1,)))
    B = draw(st.integers(1, 3))
    while B > 1 and B * Hkv * group * Nq * Nk > MAX_SCORES:
        B -= 1
    if Hkv * group * Nq * Nk > MAX_SCORES:
        Hkv, group = 1, 1
    if Nq * Nk > MAX_SCORES:
        Nk = max(1, MAX_SCORES // Nq)
    return Problem(kernel, B, Hkv * group, Hkv, Nq, Nk, D, draw(st.sampled_from(dtypes or DTYPES)),
                   causal=draw(st.booleans()))


# --- paged decode -------------------------------------------------------------------------------------------------
# Context lengths: 1, multiples of every block size, awkward values, and (GPU) lengths past 16k.
PAGED_CTX_CPU = (1, 8, 16, 33, 64, 100, 128, 256, 300)
PAGED_CTX_GPU = (1, 16, 100, 1024, 4095, 8192, 16384, 20000, 33000)
# Tokens x KV heads summed over the batch, capped so the interpreter stays within a few seconds per example.
PAGED_WORK_CPU = 600


@st.composite
def paged_problems(draw, kernel: str = "paged_attention", head_dims=None, contexts=None, pages=None):
    """A paged decode Problem: Nk is the longest context in the batch; GQA ratios 1, 4 and 8; the cache's page size
    drawn from shapes.PAGES (8..128), since it is part of the problem."""
    D = draw(st.sampled_from(head_dims or (HEAD_DIMS_GPU if ON_GPU else HEAD_DIMS_CPU)))
    Nk = draw(st.sampled_from(contexts or (PAGED_CTX_GPU if ON_GPU else PAGED_CTX_CPU)))
    Hkv = draw(st.sampled_from((1, 2)))
    group = draw(st.sampled_from((1, 4, 8)))
    B = draw(st.integers(1, 3))
    while not ON_GPU and B > 1 and B * Hkv * Nk > PAGED_WORK_CPU:
        B -= 1
    page = draw(st.sampled_from(pages or PAGES))
    return Problem(kernel, B, Hkv * group, Hkv, 1, Nk, D, draw(st.sampled_from(DTYPES)), page=page)


@st.composite
def paged_layouts(draw, problem: Problem):
    """Keyword arguments for tunebench.paged_inputs.paged_inputs: per-sequence lengths (the first is Nk; the others include
    1 and exact multiples of the block size), how many leading blocks the other sequences share with the first,
    extra unused table columns, and whether the inputs are strided views. Pages of problem.page tokens."""
    n, block_size = problem.Nk, problem.page
    multiples = [m for m in range(block_size, n + 1, block_size)] or [n]
    other = st.one_of(st.just(1), st.just(n), st.sampled_from(multiples), st.integers(1, n))
    lens = [n] + [draw(other) for _ in range(problem.B - 1)]
    return dict(context_lens=lens, shared_blocks=draw(st.integers(0, -(-n // block_size))),
                extra_columns=draw(st.integers(0, 2)), strided=draw(st.booleans()))


# --- paged prefill ------------------------------------------------------------------------------------------------
# New tokens per sequence (Nq) next to context lengths (Nk, cached plus new): decode (1), short chunks, whole prompts.
PREFILL_NEW_CPU = (1, 2, 7, 16, 33)
PREFILL_NEW_GPU = (1, 7, 64, 128, 255, 513, 1024, 2048, 4096)
PREFILL_CTX_GPU = PAGED_CTX_GPU[:-1]
# New tokens x context x KV heads summed over the batch, capped so an interpreted example stays within a second or two.
PREFILL_WORK_CPU = 4000


@st.composite
def paged_prefill_problems(draw, kernel: str = "paged_prefill", head_dims=None, groups=(1, 2, 4, 8), pages=None):
    """A paged prefill Problem: the first sequence of a drawn batch has Nq new tokens and Nk in all (Nq <= Nk, so
    Nk - Nq are cached); GQA ratios 1-8; page sizes from shapes.PAGES. The other sequences' lengths are drawn by
    paged_prefill_layouts (or the gate's seed)."""
    D = draw(st.sampled_from(head_dims or (HEAD_DIMS_GPU if ON_GPU else HEAD_DIMS_CPU)))
    Nk = draw(st.sampled_from(PREFILL_CTX_GPU if ON_GPU else PAGED_CTX_CPU))
    Nq = min(Nk, draw(st.sampled_from(PREFILL_NEW_GPU if ON_GPU else PREFILL_NEW_CPU)))
    Hkv = draw(st.sampled_from((1, 2)))
    group = draw(st.sampled_from(groups))
    B = draw(st.integers(1, 4))
    while not ON_GPU and B > 1 and B * Hkv * Nq * Nk > PREFILL_WORK_CPU:
        B -= 1
    page = draw(st.sampled_from(pages or PAGES))
    return Problem(kernel, B, Hkv * group, Hkv, Nq, Nk, D, draw(st.sampled_from(DTYPES)), causal=True, page=page)


@st.composite
def paged_prefill_layouts(draw, problem: Problem):
    """paged_layouts' keyword arguments plus q_lens, the new tokens per sequence: the first has problem.Nq, the
    others mix idle rows (0), decode rows (1), whole contexts (no cache; on the CPU at most Nq new tokens) and
    chunks over a cached prefix."""
    layout = draw(paged_layouts(problem))
    lens = layout["context_lens"]
    caps = [n if ON_GPU else min(n, problem.Nq) for n in lens[1:]]     # the interpreter's time goes with tokens
    new = [problem.Nq] + [draw(st.one_of(st.sampled_from((0, 1, cap)), st.integers(0, cap))) for cap in caps]
    return dict(layout, q_lens=new)
