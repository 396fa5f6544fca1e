"""The one builder of a problem's tensors and its float64 reference: the tuner (Workload), the gate and its tests
(dense and paged cases) and `tunebench bench` (Inputs, reference_for) all draw here. A kernel of another domain
brings its own inputs and reference (tunebench.kernel_protocol): DomainWorkload calls them.

Values are standard normal, drawn in float32 on the device the tensors live on by a generator seeded there, then cast
to the problem's dtype: fresh random inputs, never zeros (a kernel can look right on zeros). Dense kernels take
q [B, Hq, Nq, D], k/v [B, Hkv, Nk, D]. The paged kernel takes q [B, Hq, D] and a cache of pages of problem.page
tokens: the logical K/V are drawn once and packed into pages in random order (tunebench.paged_inputs builds the
caches, the gate's hostile paged layouts and the fp8 quantisation). A problem with an fp8 kv_dtype packs
its cache quantised (per-KV-head scales, passed to the launch as k_scale / v_scale), and its references are taken on
the dequantised values (the rule in tunebench.correctness).

A reference is a pair: the float64 result and the same naive computation in the problem's dtype, whose error is the
yardstick of tunebench.correctness.close_enough.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .correctness import Verdict, close_enough, poison
from .paged_inputs import (compile_only_paged, dequantised, fp8_scales_like, kv_scales, pack_paged,
                           paged_prefill_inputs, paged_prefill_references, quantised)
from .shapes import PAGED_PREFILL_KERNELS, Problem
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


# --- the paged prefill tuner's workload -----------------------------------------------------------------------------

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
