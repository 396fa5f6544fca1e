"""The one builder of a problem's tensors and its float64 reference: the tuner (Workload), the gate and its tests
(dense and paged cases) and `tunebench bench` (Inputs, reference_for) all draw here. A kernel of another domain
brings its own inputs and reference (tunebench.kernel_protocol): DomainWorkload calls them.

Values are standard normal, drawn in float32 on the device the tensors live on by a generator seeded there, then cast
to the problem's dtype: fresh random inputs, never zeros (a kernel can look right on zeros). Dense kernels take
q [B, Hq, Nq, D], k/v [B, Hkv, Nk, D]. The paged kernel takes q [B, Hq, D] and a cache of pages of problem.page
tokens: the logical K/V are drawn once and packed into pages in random order. A problem with an fp8 kv_dtype packs
its cache quantised (per-KV-head scales, passed to the launch as k_scale / v_scale), and its references are taken on
the dequantised values (the rule in tunebench.correctness).

A reference is a pair: the float64 result and the same naive computation in the problem's dtype, whose error is the
yardstick of tunebench.correctness.close_enough.
"""
from __future__ import annotations

import dataclasses
import itertools
import random
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .correctness import Verdict, close_enough, poison
from .shapes import Problem
from .shapes import PAGED_KERNELS, PAGED_PREFILL_KERNELS
from . import reference as ref

CHECK_ROWS = 32                           # query rows per checked window (prefill)
CHECK_MAX_HEADS = 4096                    # decode: check every sequence while B x Hq stays under this


def draw_qkv(problem: Problem, device, seed: int = 0, layout: str = "bhnd", fill: bool = True):
    """q, k, v for a problem, viewed as [B, H, N, D] (decode: q [B, Hq, D]).

    layout 'bnhd' gives dense tensors [B, N, H, D] storage viewed through .transpose(1, 2), as a user's projection
    output would be. fill=False leaves them uninitialised, for a compile worker, which needs only their shapes, dtypes
    and alignment."""
    if layout not in ("bhnd", "bnhd"):
        raise ValueError(f"layout must be 'bhnd' or 'bnhd', got {layout!r}")
    p, device = problem, torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        if not fill:
            return torch.empty(*shape, dtype=p.torch_dtype, device=device)
        return torch.randn(*shape, generator=gen, dtype=torch.float32, device=device).to(p.torch_dtype)

    def dense(h, n):
        if layout == "bhnd":
            return randn(p.B, h, n, p.D)
        return randn(p.B, n, h, p.D).transpose(1, 2)

    q = randn(p.B, p.Hq, p.D) if p.paged else dense(p.Hq, p.Nq)
    return q, dense(p.Hkv, p.Nk), dense(p.Hkv, p.Nk)


def references(q, k, v, causal: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(float64 reference, the same naive computation in q's dtype). A decode q [B, Hq, D] is one query row."""
    if q.dim() == 3:
        return tuple(ref.attention(q[:, :, None, :], k, v, dtype=d)[:, :, 0, :] for d in (torch.float64, q.dtype))
    return tuple(ref.attention(q, k, v, causal, dtype=d) for d in (torch.float64, q.dtype))


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


# --- the tuner's workload -----------------------------------------------------------------------------------------

class Workload:
    """Random inputs for one problem (fixed seed) plus its float64 and naive low-precision references, for the tuner.

    Drawn on the device the workload lives on (drawing on the host made a worker's setup several times slower).
    fill=False leaves them uninitialised, for a compile worker, which needs only their shapes, dtypes and alignment."""

    def __init__(self, problem: Problem, seed: int = 0, device: str | torch.device = "cuda", fill: bool = True):
        self.problem, self.device = problem, torch.device(device)
        self._gen = torch.Generator(device="cpu").manual_seed(seed)    # the paged blocks' order
        self._refs = None
        self._packed: tuple | None = None
        if problem.paged:
            self.context_lens = torch.full((problem.B,), problem.Nk, dtype=torch.int32, device=self.device)
        if problem.paged and not fill:
            # A compile worker of a 2M-token cache would hold it twice (dense, then packed) in each of its processes
            # and run the GPU out of memory: it gets the launch's specialisation at a few blocks' cost instead.
            self.q = torch.empty(problem.B, problem.Hq, problem.D, dtype=problem.torch_dtype, device=self.device)
            self.k = self.v = None
            self._packed = compile_only_paged(problem, self.device)
            self.scales = fp8_scales_like(problem, self.device)
        else:
            self.q, self.k, self.v = draw_qkv(problem, self.device, seed, fill=fill)
            self.scales = kv_scales(problem, self.k, self.v)
        self.out = torch.empty_like(self.q)

    def args(self, config: dict) -> tuple:
        """Positional arguments for the kernel module's ``launch``. A paged cache (pages of problem.page tokens) is
        packed once, on first use: every config of the problem runs on the same layout."""
        if not self.problem.paged:
            return (self.q, self.k, self.v)
        if self._packed is None:
            k_cache, v_cache, tables = pack_paged(self.k, self.v, self.context_lens, self.problem.page, self._gen)
            self._packed = (*quantised(self.problem, (k_cache, v_cache), self.scales), tables)
        k_cache, v_cache, tables = self._packed
        return (self.q, k_cache, v_cache, tables, self.context_lens)

    def kwargs(self) -> dict:
        if self.problem.paged:
            return {} if self.scales is None else dict(zip(("k_scale", "v_scale"), self.scales))
        return {"causal": self.problem.causal}

    def run(self, module, config: dict) -> torch.Tensor:
        """Launches once into a NaN-poisoned output."""
        poison(self.out)
        return module.launch(*self.args(config), config=config, out=self.out, **self.kwargs())

    def references(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(float64 reference, the same naive computation in the problem's dtype), computed once. A paged problem's
        reference is that of its logical (dense) K/V, whatever the block layout; an fp8 cache's, of its dequantised
        values."""
        if self._refs is None:
            k, v = dequantised(self.problem, (self.k, self.v), self.scales)
            self._refs = references(self.q, k, v, self.problem.causal)
        return self._refs

    def check(self, module, config: dict) -> Verdict:
        out = self.run(module, config)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        ref64, lowp = self.references()
        return close_enough(out, ref64, lowp)

    def throughput(self, ms: float | None) -> float | None:
        return self.problem.throughput(ms)


class DomainWorkload(Workload):
    """The tuner's and the gate's inputs for a kernel of another domain (RMSNorm, softmax, ...): its own
    make_inputs(problem, device, seed) -> (args, kwargs, out) and reference(*args, dtype, **kwargs) hooks
    (tunebench.kernel_protocol), called once per problem."""

    def __init__(self, problem: Problem, module, seed: int = 0, device: str | torch.device = "cuda"):
        self.problem, self.device, self.module = problem, torch.device(device), module
        args, kwargs, self.out = module.make_inputs(problem, self.device, seed)
        self._args, self._kwargs = tuple(args), dict(kwargs)
        self._refs = None

    def args(self, config: dict) -> tuple:
        return self._args

    def kwargs(self) -> dict:
        return self._kwargs

    def references(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._refs is None:
            self._refs = tuple(self.module.reference(*self._args, dtype=d, **self._kwargs)
                               for d in (torch.float64, self.problem.torch_dtype))
        return self._refs

    def throughput(self, ms: float | None) -> float | None:
        hook = getattr(self.module, "throughput", None)
        return hook(self.problem, ms) if hook is not None and ms else None


def workload_for(problem: Problem, module, seed: int = 0, device: str | torch.device = "cuda",
                 fill: bool = True) -> Workload:
    """The tuner's inputs for a problem of this kernel module: its own hooks' for a kernel of another domain, else
    attention's."""
    from .kernel_protocol import is_domain_kernel
    if module is not None and is_domain_kernel(module):
        return DomainWorkload(problem, module, seed, device)
    if problem.kernel in PAGED_PREFILL_KERNELS:
        return PagedPrefillWorkload(problem, seed, device, fill)
    return Workload(problem, seed, device, fill=fill)


# --- the bench's inputs and its reference on a subset of the output ----------------------------------------------

@dataclass
class Inputs:
    """One problem's inputs, shared by every provider of `tunebench bench`. Prefill: q [B, Hq, Nq, D],
    k/v [B, Hkv, Nk, D]. Decode: q [B, Hq, D]; k/v the logical [B, Hkv, Nk, D]; the same K/V packed into pages of
    problem.page tokens in random order."""
    problem: Problem
    q: object
    k: object
    v: object
    k_cache: object = None
    v_cache: object = None
    block_tables: object = None
    context_lens: object = None
    k_scale: object = None          # an fp8 cache's scales (float32 [Hkv]); None for a cache in the problem's dtype
    v_scale: object = None
    _expanded: Optional[tuple] = None

    @property
    def device(self):
        return self.q.device

    @property
    def block_size(self) -> int | None:
        """Tokens per page of the paged cache (problem.page); None for a dense problem."""
        return self.problem.page

    def expanded_kv(self):
        """K/V with each KV head repeated for its query heads (for providers without GQA), built once."""
        if self._expanded is None:
            g = self.problem.group
            self._expanded = (self.k, self.v) if g == 1 else tuple(t.repeat_interleave(g, dim=1)
                                                                   for t in (self.k, self.v))
        return self._expanded


def make_inputs(problem: Problem, device, seed: int = 0) -> Inputs:
    inputs = Inputs(problem, *draw_qkv(problem, device, seed))
    if problem.paged:
        inputs.context_lens = torch.full((problem.B,), problem.Nk, dtype=torch.int32, device=device)
        k_cache, v_cache, inputs.block_tables = pack_paged(
            inputs.k, inputs.v, inputs.context_lens, problem.page, torch.Generator().manual_seed(seed))
        scales = kv_scales(problem, inputs.k, inputs.v)
        inputs.k_cache, inputs.v_cache = quantised(problem, (k_cache, v_cache), scales)
        inputs.k_scale, inputs.v_scale = scales or (None, None)
    return inputs


@dataclass
class Reference:
    """float64 reference and the same naive computation in the problem's dtype, on a subset of the output."""
    ref64: object
    lowp: object
    pick: Callable          # output -> the same subset

    def check(self, out) -> Verdict:
        return close_enough(self.pick(out), self.ref64, self.lowp)


def check_windows(nq: int, rows: int = CHECK_ROWS, seed: int = 0) -> list[tuple[int, int]]:
    """Query-row windows to check: the first rows, a random middle window and the last rows (all rows if few).

    A window [s, e) of a bottom-right causal problem equals the causal problem of q[s:e] against k[:e + (nk - nq)]
    (at least 0 keys): the reference runs on that slice unchanged, rows that see no key included (they are zeros).
    """
    if nq <= 3 * rows:
        return [(0, nq)]
    mid = random.Random(seed).randrange(rows, nq - 2 * rows)
    return [(0, rows), (mid, mid + rows), (nq - rows, nq)]


def _decode_rows(p: Problem, device, seed: int) -> torch.Tensor:
    """The sequences a decode reference covers: every one while that is cheap, else the first, last and a few."""
    if p.B * p.Hq <= CHECK_MAX_HEADS:
        return torch.arange(p.B, device=device)
    g = torch.Generator().manual_seed(seed)
    n = max(2, CHECK_MAX_HEADS // p.Hq)
    idx = torch.cat([torch.tensor([0, p.B - 1]), torch.randperm(p.B - 2, generator=g)[:n - 2] + 1])
    return idx.sort().values.to(device)


def reference_for(inputs: Inputs, seed: int = 0) -> Reference:
    """The reference of the rows the bench checks: large problems are checked on a sample, not in full."""
    p = inputs.problem
    if p.paged:
        idx = _decode_rows(p, inputs.device, seed)
        scales = None if p.kv_dtype is None else (inputs.k_scale, inputs.v_scale)
        k, v = dequantised(p, (inputs.k[idx], inputs.v[idx]), scales)
        return Reference(*references(inputs.q[idx], k, v), lambda out: out[idx])
    windows = check_windows(p.Nq, seed=seed)
    parts = []
    for s, e in windows:
        kv_end = max(0, min(p.Nk, e + p.Nk - p.Nq)) if p.causal else p.Nk
        parts.append(references(inputs.q[:, :, s:e], inputs.k[:, :, :kv_end], inputs.v[:, :, :kv_end], p.causal))
    return Reference(torch.cat([r for r, _ in parts], dim=2), torch.cat([lo for _, lo in parts], dim=2),
                     lambda out: torch.cat([out[:, :, s:e] for s, e in windows], dim=2))


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


class PagedPrefillWorkload(Workload):
    """The tuner's inputs for a paged prefill problem: every sequence has problem.Nq new tokens and a context of
    problem.Nk, contiguous tensors, and the values are not re-checked on each launch (a sync would be timed).
    fill is accepted for workload_for's sake: the inputs are always drawn (the pages are laid out from them)."""

    def __init__(self, problem: Problem, seed: int = 0, device: str | torch.device = "cuda", fill: bool = True):
        self.problem, self.device = problem, torch.device(device)
        self._args = paged_prefill_inputs(problem, self.device, seed, q_lens=[problem.Nq] * problem.B,
                                          context_lens=[problem.Nk] * problem.B, shared_blocks=0, extra_columns=0,
                                          strided=False)
        for cache in self._args[1:3]:
            # Random values, not NaN, in the rows no sequence reads: the worker's check that a kernel left its inputs
            # as they were compares them with torch.equal, to which NaN never equals itself.
            unread = cache.isnan()
            cache[unread] = torch.randn(int(unread.sum()), device=cache.device).to(cache.dtype)
        self.out = torch.empty_like(self._args[0])
        self._refs = None

    def args(self, config: dict) -> tuple:
        return self._args

    def kwargs(self) -> dict:
        return {"check_values": False}

    def references(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._refs is None:
            self._refs = paged_prefill_references(*self._args)
        return self._refs


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
