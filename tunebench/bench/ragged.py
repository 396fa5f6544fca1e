"""A ragged decode batch for `tunebench bench`: sequences of different context lengths in one decode step.

Why a type of its own: a Problem (shapes.py) gives every sequence of a decode batch the same length Nk, and that is
the right key for tuning and dispatch (one bucket per shape). A real batch mixes lengths. RaggedDecode is a Problem
whose Nk is the longest sequence's length (the padded shape: what the dispatcher sees, since the block table is as
wide as the longest sequence) and which carries the per-sequence ``lengths``, drawn by a seeded recipe. It only
adds: Problem itself is unchanged, and only the bench builds RaggedDecode (the tuner and the dispatcher never see one;
its bucket would be the padded shape).

What it changes is what a decode step counts as work: kv_bytes, min_bytes and flops sum the lengths, so GB/s is the
K/V bytes a decode step must read (sum of lengths x bytes per token), not the padded B x Nk. A provider that pads
reads more and is charged for it in its time, not credited with it in its bytes.

Its inputs (make_inputs) are the usual bench Inputs: q [B, Hq, D]; k, v [B, Hkv, Nk, D] padded to the longest length,
random values past each sequence's end (never zeros: a peer that ignores its mask fails the check); context_lens
holding the lengths; the paged cache holding only each sequence's own tokens. Its reference (reference_for) is each
sequence's float64 attention over its own tokens.
"""
from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field

import torch

from ..inputs import Inputs, Reference, draw_qkv, references
from ..paged_inputs import pack_paged
from ..shapes import DTYPE_BYTES, Problem

BISECTION_STEPS = 100


@dataclass(frozen=True)
class RaggedDecode(Problem):
    """A paged decode batch whose sequence b has lengths[b] tokens; Nk is the longest (the padded shape)."""
    lengths: tuple[int, ...] = ()
    recipe: str = field(default="", compare=False)      # how the lengths were drawn, for the label

    def __post_init__(self):
        super().__post_init__()
        if not self.paged:
            raise ValueError(f"a ragged batch is a paged decode problem; got kernel {self.kernel!r}")
        if len(self.lengths) != self.B or not all(type(n) is int and n >= 1 for n in self.lengths):
            raise ValueError(f"lengths must be B={self.B} ints >= 1, got {self.lengths!r}")
        if max(self.lengths) != self.Nk:
            raise ValueError(f"Nk ({self.Nk}) must be the longest length ({max(self.lengths)}): the padded shape")

    @property
    def tokens(self) -> int:
        """K/V tokens the batch holds: the sum of its lengths."""
        return sum(self.lengths)

    @property
    def kv_bytes(self) -> float:
        return float(2 * self.Hkv * self.D * DTYPE_BYTES[self.dtype] * self.tokens)

    @property
    def min_bytes(self) -> float:
        return float((2 * self.B * self.Hq * self.D + 2 * self.Hkv * self.tokens * self.D) * DTYPE_BYTES[self.dtype])

    @property
    def flops(self) -> float:
        return 4.0 * self.Hq * self.tokens * self.D

    def label(self) -> str:
        return f"{super().label()} ragged({self.recipe or 'lengths given'})"

    def padded(self) -> Problem:
        """The uniform Problem of the same call: every sequence at Nk, as the dispatcher and the tuner key it."""
        return Problem(**{f.name: getattr(self, f.name) for f in dataclasses.fields(Problem)})


def long_tailed_lengths(batch: int, mean: int, max_len: int, min_len: int = 16, sigma: float = 1.0,
                        seed: int = 0) -> tuple[int, ...]:
    """``batch`` context lengths whose mean is exactly ``mean`` and whose longest is exactly ``max_len``.

    One sequence (at a seeded position) has max_len tokens; the others are lognormal(0, sigma) draws, scaled (by
    bisection) so that, rounded and clipped to [min_len, max_len], the batch's total is mean x batch; the few tokens
    that rounding leaves over go one each to the longest unclipped sequences. Python's random, seeded: the same
    lengths on every machine."""
    for name, value in (("batch", batch), ("mean", mean), ("max_len", max_len), ("min_len", min_len)):
        if type(value) is not int or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    rest = mean * batch - max_len
    if not min_len <= mean <= max_len or not (batch - 1) * min_len <= rest <= (batch - 1) * max_len:
        raise ValueError(f"no {batch} lengths in [{min_len}, {max_len}] with one at {max_len} have mean {mean}")
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma!r}")
    rng = random.Random(seed)
    draws = [rng.lognormvariate(0.0, sigma) for _ in range(batch - 1)]

    def scaled(s: float) -> list[int]:
        return [min(max_len, max(min_len, round(s * x))) for x in draws]
    lo, hi = 0.0, float(max_len) / min(draws, default=1.0)        # total(lo) <= rest <= total(hi)
    for _ in range(BISECTION_STEPS):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if sum(scaled(mid)) <= rest else (lo, mid)
    lengths = scaled(lo)
    left = rest - sum(lengths)
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]) * (left + 1):
        if left == 0:
            break
        if lengths[i] < max_len:
            lengths[i] += 1
            left -= 1
    lengths.insert(rng.randrange(batch), max_len)
    return tuple(lengths)


def ragged_decode(B: int = 64, Hq: int = 32, Hkv: int = 8, D: int = 128, dtype: str = "bfloat16", page: int = 16,
                  mean: int = 2048, max_len: int = 32768, min_len: int = 16, sigma: float = 1.0,
                  seed: int = 0) -> RaggedDecode:
    """A ragged decode batch with long_tailed_lengths; the defaults are the headline row (issue 19: mean 2k, max
    32k, batch 64, Hq32/Hkv8, D128, bf16, pages of 16)."""
    lengths = long_tailed_lengths(B, mean, max_len, min_len, sigma, seed)
    recipe = f"lognormal sigma {sigma:g} seed {seed}, mean {mean}, max {max_len}, min {min_len}"
    return RaggedDecode("paged_attention", B, Hq, Hkv, 1, max_len, D, dtype, page=page, lengths=lengths,
                        recipe=recipe)


def headline() -> list[RaggedDecode]:
    """The ragged rows `tunebench bench --suite headline` adds to the suite's decode rows."""
    return [ragged_decode()]


def make_inputs(problem: RaggedDecode, device, seed: int = 0) -> Inputs:
    """The bench's Inputs of a ragged batch: dense K/V padded to Nk (random past each end), the paged cache holding
    each sequence's own tokens in pages of problem.page, in random physical order."""
    inputs = Inputs(problem, *draw_qkv(problem, device, seed))
    inputs.context_lens = torch.tensor(problem.lengths, dtype=torch.int32, device=device)
    inputs.k_cache, inputs.v_cache, inputs.block_tables = pack_paged(
        inputs.k, inputs.v, inputs.context_lens, problem.page, torch.Generator().manual_seed(seed))
    return inputs


def reference_for(inputs: Inputs, seed: int = 0) -> Reference:
    """Each sequence's float64 attention over its own tokens (and the same in the problem's dtype), every sequence
    checked: the work is the sum of the lengths, as cheap as one uniform batch of the mean length."""
    q, k, v = inputs.q, inputs.k, inputs.v
    parts = [references(q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n])
             for b, n in enumerate(inputs.problem.lengths)]
    return Reference(torch.cat([r for r, _ in parts]), torch.cat([lo for _, lo in parts]), lambda out: out)


def padding_bias(inputs: Inputs):
    """An additive key mask [B, 1, 1, Nk] in q's dtype: 0 on each sequence's tokens, -inf on the padding; built once
    per batch (as a serving stack builds its mask once per step for every layer), so it is not timed."""
    p = inputs.problem
    lens = inputs.context_lens.to(torch.long)
    pad = torch.arange(p.Nk, device=inputs.device)[None, :] >= lens[:, None]
    bias = torch.zeros(p.B, 1, 1, p.Nk, dtype=inputs.q.dtype, device=inputs.device)
    return bias.masked_fill_(pad[:, None, None, :], float("-inf"))
