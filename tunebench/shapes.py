"""Problems, the one shape-to-bucket function, named suites and model presets.

A Problem says what is computed; a config (from a kernel's SPACE) says how. The tuner, the dispatcher and the tests
all describe work as Problems, and ``bucket`` is the only place that maps a shape to the key winners are stored under.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

DTYPES = ("float16", "bfloat16", "float32")
DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "float8_e4m3fn": 1, "float8_e5m2": 1}
# The KV cache dtypes a paged decode problem may have besides its query's (vLLM's kv_cache_dtype="fp8"): the cache is
# read at half the bytes, so it is a problem of its own, with its own winners.
KV_DTYPES = ("float8_e4m3fn", "float8_e5m2")
DENSE_KERNELS = ("flash_v2", "flash_v1")
PAGED_KERNELS = ("paged_attention",)
PAGES = (8, 16, 32, 64, 128)       # KV page sizes (tokens per cache block) a paged problem may have
DEFAULT_PAGE = 16                  # vLLM's default block size: a paged Problem given no page has this one
# Varlen queries over a paged cache. Its Problem is uniform across the batch, for tuning and bucketing (the kernel
# takes ragged batches): B sequences, each with Nq new tokens and a context of Nk tokens (cached plus new, so
# Nq <= Nk), always causal (bottom-right), with the cache's page. It is not `paged` (that means decode, Nq == 1).
PAGED_PREFILL_KERNELS = ("paged_prefill",)


@dataclass(frozen=True)
class Problem:
    """One attention call's shape. For paged decode, Nq is 1 and Nk is the context length of every sequence.

    ``page`` is the KV cache's page size (tokens per block) of a paged problem: a layout the allocator fixes for the
    whole cache, so it is part of the problem (winners are tuned and stored per page), not of a kernel's config. A
    paged problem given no page gets DEFAULT_PAGE (16); a dense problem has none (None).

    ``kv_dtype`` is the KV cache's dtype where it differs from ``dtype`` (the query's and output's): one of KV_DTYPES,
    for paged decode only. None means the cache has ``dtype``; given equal to ``dtype``, it is stored as None, so one
    cache layout has one bucket. It is part of the bucket: an fp8 cache moves half the bytes per tile, so a config
    tuned for the bf16 cache says nothing safe about it."""
    kernel: str
    B: int
    Hq: int
    Hkv: int
    Nq: int
    Nk: int
    D: int
    dtype: str = "float16"
    causal: bool = False
    page: int | None = None
    kv_dtype: str | None = None

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        for name in ("B", "Hq", "Hkv", "Nq", "Nk", "D"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.Hq % self.Hkv:
            raise ValueError(f"Hq ({self.Hq}) must be a multiple of Hkv ({self.Hkv})")
        if self.paged and (self.Nq != 1 or self.causal):
            raise ValueError("paged decode problems have Nq == 1 and causal == False")
        if self.kernel in PAGED_PREFILL_KERNELS and (self.Nq > self.Nk or not self.causal):
            raise ValueError(f"paged prefill problems have causal == True and Nq (new tokens per sequence) <= Nk "
                             f"(cached plus new tokens), got causal={self.causal}, Nq={self.Nq}, Nk={self.Nk}")
        self._check_page()
        self._check_kv_dtype()

    def _check_page(self) -> None:
        if not self.has_pages:
            if self.page is not None:
                raise ValueError(f"page is the KV page size of a paged problem; {self.kernel} is dense and takes "
                                 f"page=None, got {self.page!r}")
            return
        if self.page is None:
            object.__setattr__(self, "page", DEFAULT_PAGE)    # frozen: set once, here
        elif type(self.page) is not int or self.page not in PAGES:
            raise ValueError(f"page (the KV cache's tokens per block) must be a power of two in "
                             f"{PAGES[0]}..{PAGES[-1]} ({', '.join(map(str, PAGES))}), got {self.page!r}")

    def _check_kv_dtype(self) -> None:
        if self.kv_dtype == self.dtype:
            object.__setattr__(self, "kv_dtype", None)        # frozen: set once, here
        if self.kv_dtype is None:
            return
        if not self.paged:
            raise ValueError(f"kv_dtype is the KV cache's dtype of a paged decode problem; {self.kernel} takes "
                             f"kv_dtype=None (its K/V have dtype {self.dtype}), got {self.kv_dtype!r}")
        if self.kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv_dtype (the KV cache's dtype) must be None (the same as dtype, {self.dtype}) or one "
                             f"of {KV_DTYPES}, got {self.kv_dtype!r}")

    @property
    def paged(self) -> bool:
        return self.kernel in PAGED_KERNELS

    @property
    def has_pages(self) -> bool:
        """Whether the problem reads a paged cache (decode or prefill), so has a page size."""
        return self.paged or self.kernel in PAGED_PREFILL_KERNELS

    @property
    def group(self) -> int:
        return self.Hq // self.Hkv

    @property
    def torch_dtype(self):
        import torch
        return getattr(torch, self.dtype)

    @property
    def cache_dtype(self) -> str:
        """The dtype K and V are stored in: kv_dtype, else dtype."""
        return self.kv_dtype or self.dtype

    @property
    def torch_cache_dtype(self):
        import torch
        return getattr(torch, self.cache_dtype)

    @property
    def flops(self) -> float:
        """Matmul FLOPs (QK^T and PV), halved for causal where Nq == Nk, as FlashAttention's benchmarks count."""
        f = 4.0 * self.B * self.Hq * self.Nq * self.Nk * self.D
        if self.kernel in PAGED_PREFILL_KERNELS:      # each new token sees the cached keys and the new ones up to it
            return 4.0 * self.B * self.Hq * self.D * (self.Nq * (self.Nk - self.Nq) + self.Nq * (self.Nq + 1) / 2)
        return f / 2 if self.causal else f

    @property
    def min_bytes(self) -> float:
        """Each input read once, the output written once (K and V in the cache's dtype)."""
        return float(2 * self.B * self.Hq * self.Nq * self.D * DTYPE_BYTES[self.dtype]) + self.kv_bytes

    @property
    def kv_bytes(self) -> float:
        """Bytes of K and V read once, in the cache's dtype: what decode must move, and what its bandwidth is counted
        in (an fp8 cache's GB/s count one byte per element)."""
        return float(2 * self.B * self.Hkv * self.Nk * self.D * DTYPE_BYTES[self.cache_dtype])

    @property
    def unit(self) -> str:
        return "GB/s" if self.paged else "TFLOP/s"

    def throughput(self, ms: float | None) -> float | None:
        """The one throughput of a timing: TFLOP/s for prefill, GB/s of K/V read for decode; None without a time."""
        if ms is None or not ms > 0:
            return None
        return self.kv_bytes / (ms * 1e-3) / 1e9 if self.paged else self.flops / (ms * 1e-3) / 1e12

    def label(self) -> str:
        c = " causal" if self.causal else ""
        page = f" page{self.page}" if self.has_pages else ""
        kv = f" kv {self.kv_dtype}" if self.kv_dtype else ""
        return (f"{self.kernel} {self.dtype} B{self.B} H{self.Hq}/{self.Hkv} "
                f"Nq{self.Nq} Nk{self.Nk} D{self.D}{c}{page}{kv}")


def _pow2_ceil(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(n)))


def bucket(problem: Problem) -> Problem:
    """The one shape-to-bucket map: batch and sequence lengths round up to powers of two; all else (the page size and
    the cache's dtype included) is exact."""
    return dataclasses.replace(problem, B=_pow2_ceil(problem.B), Nq=_pow2_ceil(problem.Nq), Nk=_pow2_ceil(problem.Nk))


def bucket_key(problem: Problem) -> str:
    b = bucket(problem)
    return (f"{b.kernel}|{b.dtype}|D{b.D}|{'causal' if b.causal else 'full'}|"
            f"B{b.B}|H{b.Hq}/{b.Hkv}|Nq{b.Nq}|Nk{b.Nk}" + (f"|page{b.page}" if b.has_pages else "")
            + (f"|kv{b.kv_dtype}" if b.kv_dtype else ""))


def family(problem: Problem) -> tuple:
    """What a config may be carried across: never kernel, dtype, head dim, causality, page size or cache dtype (a paged
    cache's layout: a winner for one page says nothing safe about another; an fp8 cache moves half the bytes per
    tile of a bf16 one, so the tile and partition sizes that keep the memory busy differ)."""
    return (problem.kernel, problem.dtype, problem.D, problem.causal, problem.page, problem.kv_dtype)


def bucket_distance(a: Problem, b: Problem) -> float:
    """How far apart two buckets are, in log2 steps of batch, heads and lengths; infinite across families."""
    if family(a) != family(b):
        return math.inf
    return sum(abs(math.log2(getattr(a, f)) - math.log2(getattr(b, f))) for f in ("B", "Hq", "Hkv", "Nq", "Nk"))


# Model presets as plain data: attention geometry plus the prefill lengths and decode grid worth tuning for. The
# decode grid is batch x context, less the pairs whose whole cache exceeds DECODE_MAX_TOKENS.
_LONG = dict(prefill=(512, 1024, 2048, 4096, 8192, 16384, 32768), decode_batch=(1, 8, 64, 256),
             decode_ctx=(1024, 8192, 32768, 131072))
_SPARSE = dict(prefill=(512, 2048, 8192, 32768), decode_batch=(1, 16, 256), decode_ctx=(2048, 32768))
PRESETS = {
    "llama-3-8b": dict(Hq=32, Hkv=8, D=128, **_LONG),
    "mistral-7b": dict(Hq=32, Hkv=8, D=128, **_LONG),
    "qwen-2.5-7b": dict(Hq=28, Hkv=4, D=128, **_SPARSE),
    "llama-3.2-1b": dict(Hq=32, Hkv=8, D=64, **_SPARSE),
    "llama-2-7b": dict(Hq=32, Hkv=32, D=128, prefill=(1024, 4096), decode_batch=(1, 16, 64), decode_ctx=(1024, 4096)),
    "tiny-test": dict(Hq=8, Hkv=2, D=64, prefill=(256,), decode_batch=(4,), decode_ctx=(256,)),
}
DEFAULT_PRESETS = ("llama-3-8b", "mistral-7b", "qwen-2.5-7b", "llama-3.2-1b")   # what the shipped results.db covers
PREFILL_TOKENS = 16384          # a preset's prefill batch: B x N about this many tokens (B >= 1)
DECODE_MAX_TOKENS = 1 << 21     # a decode batch's cache at most 2M tokens (8 GiB at Hkv 8, D 128, bf16)


def preset_problems(name: str, kernels=DENSE_KERNELS + PAGED_KERNELS, dtype: str = "bfloat16",
                    prefill_tokens: int = PREFILL_TOKENS, page: int = DEFAULT_PAGE) -> list[Problem]:
    """Prefill problems at each length (batch chosen so B x N ~ prefill_tokens, causal) and the decode grid, whose
    cache has pages of ``page`` tokens."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    p = PRESETS[name]
    out = []
    for kernel in kernels:
        if kernel in PAGED_KERNELS:
            out += [Problem(kernel, b, p["Hq"], p["Hkv"], 1, ctx, p["D"], dtype, page=page)
                    for b in p["decode_batch"] for ctx in p["decode_ctx"] if b * ctx <= DECODE_MAX_TOKENS]
        else:
            out += [Problem(kernel, max(1, prefill_tokens // n), p["Hq"], p["Hkv"], n, n, p["D"], dtype, causal=True)
                    for n in p["prefill"]]
    return out


def distinct_buckets(problems: list[Problem]) -> list[Problem]:
    """The problems less those whose bucket an earlier one has, in order."""
    seen: dict[str, Problem] = {}
    for p in problems:
        seen.setdefault(bucket_key(p), p)
    return list(seen.values())


def _default_suite() -> list[Problem]:
    # What the shipped results.db holds: the default presets' prefill (flash_v2, bf16, causal, 512-32k) and decode
    # grids (batch 1-256 x context 1k-128k, page 16), decode at every page size (the pages suite), and a few fp16,
    # non-causal, MHA and flash_v1 buckets, and the headline's decode shapes with an fp8 cache (the fp8 suite). Sized
    # so `tunebench tune` fits 20 minutes on one H200 from a cold cache.
    out = [p for name in DEFAULT_PRESETS for p in preset_problems(name, ("flash_v2", "paged_attention"))]
    for dtype in ("float16", "bfloat16"):
        out.append(Problem("flash_v2", 4, 16, 16, 4096, 4096, 128, dtype, causal=False))
        out.append(Problem("flash_v2", 4, 32, 32, 4096, 4096, 64, dtype, causal=True))
    out += [Problem("flash_v2", max(1, PREFILL_TOKENS // n), 32, 8, n, n, 128, "float16", causal=True)
            for n in (1024, 4096, 16384)]
    out += [Problem("flash_v1", 4, 16, 16, n, n, 128, "float16", causal=c) for n in (1024, 4096) for c in (False, True)]
    return distinct_buckets(out + _pages_suite() + _fp8_suite())


def _pages_suite() -> list[Problem]:
    # Decode winners at every page size, so that `tunebench pages` can weigh time against waste per page size.
    return [Problem("paged_attention", b, 32, 8, 1, ctx, 128, "bfloat16", page=page)
            for page in PAGES for b, ctx in ((64, 4096), (16, 16384))]


def _tiny_suite() -> list[Problem]:
    # Sized for the Triton interpreter on a CPU: a couple of small problems per kernel.
    return [
        Problem("flash_v2", 1, 2, 1, 64, 64, 32, "float16", causal=True),
        Problem("flash_v2", 1, 2, 2, 48, 80, 16, "float32"),
        Problem("flash_v1", 1, 2, 2, 64, 64, 32, "float16", causal=True),
        Problem("flash_v1", 1, 1, 1, 40, 40, 16, "float32"),
        Problem("paged_attention", 2, 4, 2, 1, 70, 32, "float16", page=16),
        Problem("paged_attention", 1, 2, 2, 1, 33, 16, "float16", page=8),
        Problem("paged_prefill", 2, 4, 2, 9, 40, 16, "float16", causal=True, page=8),
    ]


HEADLINE_DECODE = ((64, 4096), (16, 16384), (128, 1024), (1, 32768))     # (B, context) of the headline's decode


def _headline_suite() -> list[Problem]:
    # What `tunebench bench` reports by default (BENCHMARKS.md): D 128 across lengths, D 64 and D 256, the decode grid,
    # and FlashAttention-1 up to 8k for the V1-vs-V2 ratio; the decode shapes with a bf16 and an fp8 (e4m3) cache,
    # then the rest of issue 19's goals table, so that one run measures all of it: B 1 x 128k, and B 64 x 4k at every
    # other page size.
    out = [Problem("flash_v2", 4, 16, 16, n, n, 128, dtype, causal=c)
           for dtype in ("float16", "bfloat16") for c in (False, True) for n in (1024, 2048, 4096, 8192, 16384)]
    out += [Problem("flash_v2", 4, 32, 32, n, n, 64, dtype, causal=c)
            for dtype in ("float16", "bfloat16") for c in (False, True) for n in (4096, 16384)]
    out += [Problem("flash_v2", 4, 8, 8, n, n, 256, dtype, causal=c)
            for dtype in ("float16", "bfloat16") for c in (False, True) for n in (4096, 16384)]
    out += [Problem("flash_v1", 4, 16, 16, n, n, 128, "float16", causal=c) for c in (False, True)
            for n in (1024, 4096, 8192)]
    out += [Problem("paged_attention", b, 32, 8, 1, ctx, 128, "bfloat16", page=16, kv_dtype=kv)
            for kv in (None, "float8_e4m3fn") for b, ctx in HEADLINE_DECODE]
    out.append(Problem("paged_attention", 1, 32, 8, 1, 131072, 128, "bfloat16", page=16))
    out += [Problem("paged_attention", 64, 32, 8, 1, 4096, 128, "bfloat16", page=page) for page in PAGES if page != 16]
    return out


def _fp8_suite() -> list[Problem]:
    # The headline's decode shapes with an fp8 (e4m3) cache (issue 19's goal: fp8 at <= 0.55x the bf16 cache's time
    # at B16 x 16k). Its own suite, so that `tunebench tune --suite fp8` tunes just these buckets; the headline has
    # them too, so that one `tunebench bench` run times both caches side by side.
    return [Problem("paged_attention", b, 32, 8, 1, ctx, 128, "bfloat16", page=DEFAULT_PAGE, kv_dtype="float8_e4m3fn")
            for b, ctx in HEADLINE_DECODE]


# (B, Hq, Hkv, N) per family of the transfer suite: 4-64 programs' worth of batch x heads, GQA 1-8, 512-32k tokens.
_TRANSFER_FAMILIES = {
    ("bfloat16", 128, True): [(1, 32, 8, 16384), (1, 32, 8, 32768), (2, 32, 8, 8192), (4, 32, 8, 4096),
                              (16, 32, 8, 1024), (32, 32, 8, 512), (8, 16, 16, 2048), (4, 16, 16, 1024),
                              (2, 16, 16, 8192), (1, 28, 4, 4096), (4, 28, 4, 2048), (8, 64, 8, 1024),
                              (2, 64, 8, 4096), (64, 32, 8, 512)],
    ("bfloat16", 128, False): [(4, 16, 16, 1024), (4, 16, 16, 4096), (1, 16, 16, 16384), (1, 32, 8, 8192),
                               (16, 32, 8, 1024), (8, 28, 4, 2048), (2, 64, 8, 4096), (32, 16, 16, 512)],
    ("float16", 128, True): [(1, 32, 8, 16384), (4, 32, 8, 4096), (16, 32, 8, 1024), (8, 16, 16, 2048),
                             (2, 28, 4, 8192), (4, 64, 8, 1024)],
    ("bfloat16", 64, True): [(4, 32, 32, 4096), (1, 32, 32, 16384), (16, 32, 32, 1024), (8, 16, 16, 2048),
                             (2, 64, 8, 8192), (32, 28, 4, 512)],
    ("float16", 64, False): [(4, 32, 32, 4096), (16, 32, 32, 1024), (1, 16, 16, 16384), (8, 64, 8, 2048),
                             (2, 28, 4, 8192), (64, 16, 16, 512)],
}


def _transfer_suite() -> list[Problem]:
    # Several tuned buckets per (dtype, D, causal) family, so that leave-one-out can ask what a shape that was not
    # tuned would get from its neighbours (bench/transfer_loo.py).
    return [Problem("flash_v2", b, hq, hkv, n, n, d, dtype, causal)
            for (dtype, d, causal), shapes in _TRANSFER_FAMILIES.items() for b, hq, hkv, n in shapes]


SUITES = {
    "default": _default_suite,
    "transfer": _transfer_suite,
    "headline": _headline_suite,
    "tiny": _tiny_suite,
    "prefill": lambda: [p for p in _default_suite() if not p.paged],
    "decode": lambda: [p for p in _default_suite() if p.paged and p.page == DEFAULT_PAGE],
    "pages": _pages_suite,
    "fp8": _fp8_suite,
}


def _paged_prefill_suite() -> list[Problem]:
    # Chunked prefill over a cached context (issue 20's goal: chunks of 512-4k over 4k-32k, bf16 D128: one sequence
    # each, the chunks bench/paged_prefill_probe.py reads from here and times, and two at 1k over 16k), a whole
    # prompt, and many short chunks (speculative verification, mixed batches' buckets); GQA 4, page 16.
    shapes = ((1, 512, 4096), (1, 2048, 8192), (1, 4096, 32768), (1, 1024, 16384), (1, 512, 32768),
              (2, 1024, 16384), (1, 4096, 4096), (4, 512, 4096), (16, 128, 2048), (32, 64, 4096), (64, 8, 4096))
    return [Problem("paged_prefill", b, 32, 8, nq, nk, 128, "bfloat16", causal=True, page=DEFAULT_PAGE)
            for b, nq, nk in shapes]


SUITES["paged-prefill"] = _paged_prefill_suite


def suite(name: str) -> list[Problem]:
    if name not in SUITES:
        raise KeyError(f"unknown suite {name!r}; known: {', '.join(SUITES)}")
    return SUITES[name]()
