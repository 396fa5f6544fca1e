"""Inputs and references for a Problem, built once and reused by every config that is checked or timed on it.

Dense kernels take q [B, Hq, Nq, D], k/v [B, Hkv, Nk, D]. The paged kernel takes q [B, Hq, D] and a cache whose
layout depends on the config's BLOCK_SIZE, so the logical K/V are drawn once and packed per block size, into blocks
in random order.
"""
from __future__ import annotations

import torch

from .correctness import Verdict, close_enough, poison
from .shapes import Problem
from . import reference as ref


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


class Workload:
    """Random inputs for one problem (fixed seed) plus its float64 and naive low-precision references.

    The values are drawn on the device the workload lives on, by a generator seeded there (drawn on the host, 67-100M
    values per llama-3-8b prefill problem made a runner's setup 1.1 s on an H200; drawn on the GPU, 0.36 s with the
    references). fill=False leaves them uninitialised, for a compile worker, which needs only their shapes, dtypes and
    alignment."""

    def __init__(self, problem: Problem, seed: int = 0, device: str | torch.device = "cuda", fill: bool = True):
        self.problem, self.device = problem, torch.device(device)
        self._gen = torch.Generator(device="cpu").manual_seed(seed)    # the paged blocks' order
        values = torch.Generator(device=self.device).manual_seed(seed)
        p, dt = problem, problem.torch_dtype

        def randn(*shape):
            if not fill:
                return torch.empty(*shape, dtype=dt, device=self.device)
            return torch.randn(*shape, generator=values, dtype=torch.float32, device=self.device).to(dt)

        if p.paged:
            self.q = randn(p.B, p.Hq, p.D)
            self.k, self.v = randn(p.B, p.Hkv, p.Nk, p.D), randn(p.B, p.Hkv, p.Nk, p.D)
            self.context_lens = torch.full((p.B,), p.Nk, dtype=torch.int32, device=self.device)
        else:
            self.q = randn(p.B, p.Hq, p.Nq, p.D)
            self.k, self.v = randn(p.B, p.Hkv, p.Nk, p.D), randn(p.B, p.Hkv, p.Nk, p.D)
        self.out = torch.empty_like(self.q)
        self._refs = None
        self._packed: dict[int, tuple] = {}

    def args(self, config: dict) -> tuple:
        """Positional arguments for the kernel module's ``launch``."""
        if not self.problem.paged:
            return (self.q, self.k, self.v)
        bs = config["BLOCK_SIZE"]
        if bs not in self._packed:
            self._packed[bs] = pack_paged(self.k, self.v, self.context_lens, bs, self._gen)
        k_cache, v_cache, tables = self._packed[bs]
        return (self.q, k_cache, v_cache, tables, self.context_lens)

    def kwargs(self) -> dict:
        return {} if self.problem.paged else {"causal": self.problem.causal}

    def run(self, module, config: dict) -> torch.Tensor:
        """Launches once into a NaN-poisoned output."""
        poison(self.out)
        return module.launch(*self.args(config), config=config, out=self.out, **self.kwargs())

    def references(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(float64 reference, the same naive computation in the problem's dtype), computed once."""
        if self._refs is None:
            dt = self.problem.torch_dtype
            if self.problem.paged:
                # The logical (dense) K/V are what the paged kernel must reproduce, whatever the block layout.
                q4 = self.q[:, :, None, :]
                self._refs = tuple(ref.attention(q4, self.k, self.v, dtype=d)[:, :, 0, :] for d in (torch.float64, dt))
            else:
                self._refs = tuple(ref.attention(self.q, self.k, self.v, self.problem.causal, dtype=d)
                                   for d in (torch.float64, dt))
        return self._refs

    def check(self, module, config: dict) -> Verdict:
        out = self.run(module, config)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        ref64, lowp = self.references()
        return close_enough(out, ref64, lowp)
