"""A paged KV cache for a problem, built from fresh random values: the logical K/V packed into pages in random
physical order (pack_paged), the gate's hostile layouts (paged_inputs, paged_prefill_inputs: shared prefixes, NaN in
every row no sequence reads, strided views), the compile worker's few-block stand-in (compile_only_paged), and an fp8
cache's quantisation and scales. The float64 references of these cases are here too; tunebench.inputs builds the
tuner's and the bench's inputs on top of them.
"""
from __future__ import annotations

import dataclasses
import itertools
import random

import torch

from .shapes import PAGED_KERNELS, Problem
from . import reference as ref

def paged_references(q, k_cache, v_cache, block_tables, context_lens, scale=None):
    """(float64 reference, naive in q's dtype) of a paged decode, gathered through the block table."""
    args = (q, k_cache, v_cache, block_tables, context_lens)
    return tuple(ref.paged_attention(*args, scale=scale, dtype=d) for d in (torch.float64, q.dtype))


# --- paged caches -------------------------------------------------------------------------------------------------

def pack_paged(k: torch.Tensor, v: torch.Tensor, context_lens: torch.Tensor, block_size: int,
               generator: torch.Generator | None = None, spare_blocks: int = 3):
    """Packs dense per-sequence K/V [B, Hkv, N, D] into a paged cache with blocks in random physical order.

    Returns (k_cache, v_cache, block_tables): caches [num_blocks, block_size, Hkv, D] (unused blocks hold random
    values, never zeros), block_tables int32 [B, max_blocks] padded with block 0.
    """
    B, Hkv, N, D = k.shape
    per_seq = [-(-int(n) // block_size) for n in context_lens.tolist()]
    max_blocks = max(max(per_seq), 1)
    num_blocks = sum(per_seq) + spare_blocks
    perm = torch.randperm(num_blocks, generator=generator).to(k.device)
    k_cache = torch.randn(num_blocks, block_size, Hkv, D, dtype=k.dtype, device=k.device, generator=None)
    v_cache = torch.randn_like(k_cache)
    tables = torch.zeros(B, max_blocks, dtype=torch.int32, device=k.device)
    nxt = 0
    for b, nb in enumerate(per_seq):
        ids = perm[nxt:nxt + nb]
        nxt += nb
        tables[b, :nb] = ids.to(torch.int32)
        n = int(context_lens[b])
        pad = nb * block_size - n
        for cache, src in ((k_cache, k), (v_cache, v)):
            dense = src[b, :, :n].transpose(0, 1)                        # [n, Hkv, D]
            if pad:
                dense = torch.cat([dense, cache[ids[-1], block_size - pad:]], dim=0)
            cache[ids] = dense.reshape(nb, block_size, Hkv, D)
    return k_cache, v_cache, tables


def compile_only_paged(problem: Problem, device, spare_blocks: int = 3):
    """(k_cache, v_cache, block_tables) with what Triton specialises a paged launch on (dtypes, 16-byte alignment,
    strides, the table's width, and the block count's class: 1, a multiple of 16, or neither) equal to pack_paged's
    for the same problem, but with at most 17 uninitialised blocks and a table of zeros. For compiling only: a
    launch would read blocks that are not there. An fp8 problem's cache has its kv_dtype."""
    p = problem
    width = max(-(-p.Nk // p.page), 1)
    num_blocks = p.B * -(-p.Nk // p.page) + spare_blocks
    small = num_blocks if num_blocks == 1 else 16 if num_blocks % 16 == 0 else 17
    k_cache = torch.empty(small, p.page, p.Hkv, p.D, dtype=p.torch_cache_dtype, device=device)
    tables = torch.zeros(p.B, width, dtype=torch.int32, device=device)
    return k_cache, torch.empty_like(k_cache), tables


def _shared_tables(context_lens, block_size: int, shared: int, extra_columns: int, perm):
    """Block tables (-1 past a sequence's blocks) taking physical blocks from perm in order, the first ``shared``
    blocks of sequence 0 reused by every later sequence; and the rows of each block that some sequence reads."""
    per_seq = [-(-n // block_size) for n in context_lens]
    tables = torch.full((len(context_lens), max(per_seq) + extra_columns), -1, dtype=torch.int32)
    reach = torch.zeros(len(perm), dtype=torch.long)
    nxt = 0
    for b, (n, nb) in enumerate(zip(context_lens, per_seq)):
        k_sh = 0 if b == 0 else min(shared, nb)
        ids = torch.cat([tables[0, :k_sh].long(), perm[nxt:nxt + nb - k_sh]])
        nxt += nb - k_sh
        tables[b, :nb] = ids.to(torch.int32)
        rows = torch.full((nb,), block_size, dtype=torch.long)
        rows[-1] = n - (nb - 1) * block_size
        reach.scatter_reduce_(0, ids, rows, reduce="amax")
    return tables, reach


def paged_inputs(problem: Problem, device, seed: int, *, context_lens=None, shared_blocks=None,
                 extra_columns=None, strided=None):
    """(q, k_cache, v_cache, block_tables, context_lens) for a paged case of the gate, fresh random values, in pages
    of problem.page tokens.

    Physical blocks are a random permutation of the pool. Sequences after the first share its first
    ``shared_blocks`` blocks (as forked samples share a prompt). Cache rows that no sequence reaches, and the spare
    blocks, hold NaN, so a kernel that reads past a context fails. Table entries past a sequence's blocks are -1.
    Half the time (by seed) block 0 is a spare.
    With ``strided``, q is a slice of a fused QKV tensor and K/V are the halves of one [num_blocks, 2, ...] tensor.
    Arguments left as None are drawn from ``seed`` (lengths up to problem.Nk, the first exactly Nk).
    """
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    p, bs = problem, problem.page
    if context_lens is None:
        context_lens = [p.Nk] + [rng.choice((1, p.Nk, rng.randint(1, p.Nk), max(1, p.Nk // bs) * bs))
                                 for _ in range(p.B - 1)]
    if shared_blocks is None:
        shared_blocks = rng.choice((0, rng.randint(0, -(-p.Nk // bs))))
    extra_columns = rng.randint(0, 2) if extra_columns is None else extra_columns
    strided = rng.random() < 0.5 if strided is None else strided

    per_seq = [-(-n // bs) for n in context_lens]
    shared = min(shared_blocks, per_seq[0])
    num_blocks = per_seq[0] + sum(max(0, nb - shared) for nb in per_seq[1:]) + 2
    perm = torch.randperm(num_blocks, generator=g)                 # its last two entries are the spare blocks
    if rng.random() < 0.5:
        # Make block 0 a spare (all NaN) half the time: a kernel that turns masked table entries into block 0 and
        # then reads those rows unmasked fails.
        zero = int((perm == 0).nonzero())
        perm[zero], perm[-1] = perm[-1].clone(), 0
    tables, reach = _shared_tables(context_lens, bs, shared, extra_columns, perm)

    dt, Hkv, D = p.torch_dtype, p.Hkv, p.D
    qkv = torch.randn(p.B, p.Hq + 2 * Hkv if strided else p.Hq, D, generator=g).to(dt)
    q = qkv[:, :p.Hq]
    # The cache is drawn where it lives: long GPU contexts hold hundreds of MB.
    g_dev = torch.Generator(device=device).manual_seed(seed)
    kv = torch.randn(num_blocks, 2, bs, Hkv, D, generator=g_dev, device=device).to(dt)
    unread = torch.arange(bs)[None, :] >= reach[:, None]           # [num_blocks, bs]
    kv.masked_fill_(unread.to(device)[:, None, :, None, None], float("nan"))
    k_cache, v_cache = kv[:, 0], kv[:, 1]
    if not strided:
        k_cache, v_cache = k_cache.contiguous(), v_cache.contiguous()
    lens = torch.tensor(context_lens, dtype=torch.int32, device=device)
    return q.to(device), k_cache, v_cache, tables.to(device), lens


# --- paged prefill (varlen queries over a paged cache) ----------------------------------------------------------

def paged_prefill_inputs(problem: Problem, device, seed: int, *, q_lens=None, context_lens=None, shared_blocks=None,
                         extra_columns=None, strided=None):
    """(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens) for a paged prefill case, fresh random values.

    The cache, the tables and the context lengths are paged_inputs' (the same layout, NaN in the rows no sequence
    reaches, a random permutation of the pool), so problem.Nk is the longest context. q_lens are the new tokens per
    sequence (each at most its context): left as None, the first sequence has problem.Nq and the others are drawn
    from 0, 1 (decode rows), Nq and anything in between. With ``strided``, q is a slice of a fused QKV tensor, K/V
    the halves of one tensor, cu_seqlens_q and context_lens every other element of a larger tensor and block_tables
    column-major.
    """
    rng = random.Random(seed + 1)
    strided = rng.random() < 0.5 if strided is None else strided
    decode = dataclasses.replace(problem, kernel=PAGED_KERNELS[0], Nq=1, causal=False)
    _, k_cache, v_cache, tables, lens = paged_inputs(decode, device, seed, context_lens=context_lens,
                                                     shared_blocks=shared_blocks, extra_columns=extra_columns,
                                                     strided=strided)
    ctx = lens.tolist()
    if q_lens is None:
        q_lens = [problem.Nq] + [rng.choice((0, 1, min(problem.Nq, n), rng.randint(1, min(problem.Nq, n))))
                                 for n in ctx[1:]]
    g = torch.Generator().manual_seed(seed + 1)
    total, Hq, Hkv = sum(q_lens), problem.Hq, problem.Hkv
    q = torch.randn(total, Hq + 2 * Hkv if strided else Hq, problem.D, generator=g).to(problem.torch_dtype)[:, :Hq]
    cu = torch.tensor([0] + list(itertools.accumulate(q_lens)), dtype=torch.int32)
    if strided:
        cu, lens = (torch.stack([t, torch.full_like(t, -7)], dim=1)[:, 0] for t in (cu.to(device), lens))
        tables = tables.t().contiguous().t()
    return q.to(device), k_cache, v_cache, tables, cu.to(device), lens


def paged_prefill_references(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale=None):
    """(float64 reference, naive in q's dtype) of a paged prefill, gathered through the block table."""
    args = (q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens)
    return tuple(ref.paged_prefill(*args, scale=scale, dtype=d) for d in (torch.float64, q.dtype))


# --- fp8 paged caches ----------------------------------------------------------------------------------------------

def fp8_scales(cache: torch.Tensor, dtype: torch.dtype, per_head: bool) -> torch.Tensor:
    """float32 scales that map the finite values of a cache [num_blocks, block_size, Hkv, D] onto the fp8 format's
    range (amax / max finite): [Hkv] per KV head, else [] (one for the whole cache). Never zero."""
    amax = torch.nan_to_num(cache.float(), nan=0.0).abs().amax(dim=(0, 1, 3) if per_head else None)
    return (amax.clamp_min(1e-6) / torch.finfo(dtype).max).to(torch.float32)


def fp8_paged_inputs(problem: Problem, device, seed: int, kv_dtype: torch.dtype, per_head: bool, **layout):
    """paged_inputs with the caches quantised to ``kv_dtype`` (float8_e4m3fn or float8_e5m2) by the reference
    quantiser: (q, k_cache, v_cache, block_tables, context_lens, k_scale, v_scale). NaN rows stay NaN."""
    q, k_cache, v_cache, tables, lens = paged_inputs(problem, device, seed, **layout)
    k_scale, v_scale = (fp8_scales(c, kv_dtype, per_head) for c in (k_cache, v_cache))
    k8, v8 = (ref.quantize_fp8(c, s, kv_dtype) for c, s in ((k_cache, k_scale), (v_cache, v_scale)))
    return q, k8, v8, tables, lens, k_scale, v_scale


def fp8_paged_references(q, k_cache, v_cache, block_tables, context_lens, k_scale, v_scale, scale=None):
    """paged_references on the dequantised fp8 cache (stored value * scale, exact in float64): the float64 reference,
    and the naive computation in q's dtype on those values (tunebench.correctness states the rule)."""
    k64, v64 = (ref.dequantize_fp8(c, s) for c, s in ((k_cache, k_scale), (v_cache, v_scale)))
    return paged_references(q, k64, v64, block_tables, context_lens, scale)


# The tuner's and the bench's fp8 problems (Problem.kv_dtype): the logical K/V [B, Hkv, N, D] are drawn in the
# problem's dtype as for any problem, then quantised per KV head with fp8_scales; the packed cache holds exactly the
# values the dense K/V quantise to (quantisation is elementwise), so one dense reference checks it.

def kv_scales(problem: Problem, k, v) -> tuple | None:
    """(k_scale, v_scale), float32 [Hkv], of a problem with an fp8 kv_dtype, from its dense K/V; else None."""
    if problem.kv_dtype is None:
        return None
    return tuple(fp8_scales(x.transpose(1, 2), problem.torch_cache_dtype, per_head=True) for x in (k, v))


def fp8_scales_like(problem: Problem, device) -> tuple | None:
    """Scales of the launch's shape and dtype for a compile worker, which needs no values (ones); None unless fp8."""
    if problem.kv_dtype is None:
        return None
    return tuple(torch.ones(problem.Hkv, dtype=torch.float32, device=device) for _ in range(2))


def quantised(problem: Problem, caches: tuple, scales: tuple | None) -> tuple:
    """The caches [num_blocks, block_size, Hkv, D] in the problem's kv_dtype (unchanged when it has none)."""
    if scales is None:
        return tuple(caches)
    return tuple(ref.quantize_fp8(c, s, problem.torch_cache_dtype) for c, s in zip(caches, scales))


def dequantised(problem: Problem, kv: tuple, scales: tuple | None) -> tuple:
    """Dense K/V [B, Hkv, N, D] as an fp8 cache of the problem holds them, dequantised exactly in float64 (unchanged
    when it has no fp8 kv_dtype)."""
    if scales is None:
        return tuple(kv)
    dt = problem.torch_cache_dtype
    return tuple(ref.dequantize_fp8(ref.quantize_fp8(x.transpose(1, 2), s, dt), s).transpose(1, 2)
                 for x, s in zip(kv, scales))
