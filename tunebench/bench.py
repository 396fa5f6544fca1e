"""`tunebench bench`: the tuned kernels against their peers, on one GPU, in one process.

For each problem every provider gets the same inputs. Each provider runs once, and its output is checked against the
same float64 reference rows with the project's one rule (tunebench.correctness.close_enough); only then are the
correct ones timed (triton.testing.do_bench, median with the 20th and 80th percentiles). A provider that disagrees is
reported as wrong and not timed; one that cannot run is reported with its reason; the rest go on. The copy bandwidth
and the matmul rate are measured in the same run, so "% of ceiling" compares like with like.

Measuring (``run_problem``, ``measure_ceilings``) is kept apart from formatting (``rows``, ``format_table``,
``summary``, ``write_csv``, ``write_json``, the plots), so that the formatting can be tested on synthetic numbers.

Throughput: prefill in TFLOP/s (Problem.flops: QK^T and PV, halved when causal); decode in GB/s of effective KV
bandwidth (the K and V bytes a decode step must read, over its time), as paged-attention papers count it.
"""
from __future__ import annotations

import csv
import dataclasses
import datetime
import gc
import json
import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from .inputs import DEFAULT_BLOCK_SIZE, Inputs, make_inputs, reference_for
from .shapes import PAGED_KERNELS, Problem, preset_problems, suite

DEFAULT_SUITE = "headline"
V1_MAX_N = 8192                           # FlashAttention-1 rewrites O, m, l in HBM per K/V step: slow beyond this
NAIVE_MAX_SCORES = 1 << 28                # naive attention materialises B x Hq x Nq x Nk scores
COPY_BYTES = 1 << 30
MATMUL_N = 8192
OK, WRONG, SKIPPED, FAILED = "ok", "wrong", "skipped", "failed"
# After these a CUDA context is unusable: every later launch in the process fails, so the run stops there.
STICKY_CUDA_ERRORS = ("illegal memory access", "unspecified launch failure", "device-side assert",
                      "misaligned address", "illegal instruction")


class Skip(Exception):
    """A provider that does not apply to this problem or this machine; the message says why."""


# ----------------------------------------------------------------------------------------------------------------
# Providers: each prepares everything outside the timed region and returns a Runner whose fn() is what is timed

@dataclass
class Runner:
    fn: Callable            # () -> output tensor; the timed region
    out: object = None      # a preallocated output the harness poisons (NaN) before the checked run
    note: str = ""


@dataclass(frozen=True)
class Provider:
    name: str
    phase: str              # "prefill" or "decode"
    peer: bool              # False for tunebench's own kernels: the best peer is the best of the others
    make: Callable          # Inputs -> Runner; raises Skip(reason)
    about: str


def _tuned_flash(variant: str):
    def make(inp: Inputs) -> Runner:
        import tunebench
        p = inp.problem
        if variant == "v1" and max(p.Nq, p.Nk) > V1_MAX_N:
            raise Skip(f"the FlashAttention-1 schedule rewrites O, m and l in HBM on every K/V step; "
                       f"not timed above N = {V1_MAX_N}")
        q, k, v, causal = inp.q, inp.k, inp.v, p.causal
        note = tunebench.explain(q, k, causal=causal, variant=variant).split(" -> ", 1)[-1]
        return Runner(lambda: tunebench.flash_attention(q, k, v, causal=causal, variant=variant), note=note)
    return make


def _flash_v2_default(inp: Inputs) -> Runner:
    import torch
    from .registry import kernel_module
    module = kernel_module("flash_v2")
    config = dict(module.DEFAULT)
    why = module.keep(config, dataclasses.replace(inp.problem, kernel="flash_v2"))
    if why:
        raise Skip(f"keep() rejects DEFAULT here: {why}")
    q, k, v, causal = inp.q, inp.k, inp.v, inp.problem.causal
    out = torch.empty_like(q)
    return Runner(lambda: module.launch(q, k, v, config=config, causal=causal, out=out), out=out, note=str(config))


def _first_line(e: BaseException | str) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]


def _sdpa_call(backend, q, k, v, causal: bool, gqa: bool):
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    def fn():
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
    return fn


def _try_sdpa(backend, q, k, v, causal: bool, gqa: bool):
    """Runs one SDPA call to see whether the backend takes these inputs; returns the reason it does not, or None."""
    fn = _sdpa_call(backend, q, k, v, causal, gqa)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            fn()
            return None
        except RuntimeError as e:
            why = [_first_line(w.message) for w in caught] + [_first_line(e)]
            return "; ".join(why)


def _sdpa(backend_name: str):
    def make(inp: Inputs) -> Runner:
        from torch.nn.attention import SDPBackend
        backend = getattr(SDPBackend, backend_name)
        p = inp.problem
        if p.causal and p.Nq != p.Nk:
            raise Skip("SDPA's is_causal is top-left aligned; it matches bottom-right causal only when Nq == Nk")
        q, k, v = inp.q, inp.k, inp.v
        if p.group == 1:
            why = _try_sdpa(backend, q, k, v, p.causal, False)
            if why:
                raise Skip(f"backend unavailable for these inputs: {why}")
            return Runner(_sdpa_call(backend, q, k, v, p.causal, False))
        if _try_sdpa(backend, q, k, v, p.causal, True) is None:
            return Runner(_sdpa_call(backend, q, k, v, p.causal, True), note="enable_gqa=True")
        k, v = inp.expanded_kv()
        why = _try_sdpa(backend, q, k, v, p.causal, False)
        if why:
            raise Skip(f"backend unavailable for these inputs: {why}")
        return Runner(_sdpa_call(backend, q, k, v, p.causal, False), note="K/V pre-expanded to Hq heads (untimed)")
    return make


_COMPILED = {}


def _compiled(name: str, fn):
    """torch.compile'd once per process; each new shape recompiles (static shapes), so the recompile limit is raised
    above the number of shapes a suite holds (past it, dynamo would silently fall back to eager)."""
    import torch
    import torch._dynamo.config as dynamo_config
    for knob in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, knob):
            setattr(dynamo_config, knob, max(getattr(dynamo_config, knob), 1024))
    if hasattr(dynamo_config, "accumulated_recompile_limit"):
        dynamo_config.accumulated_recompile_limit = max(dynamo_config.accumulated_recompile_limit, 4096)
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(fn, dynamic=False)
    return _COMPILED[name]


def _flex(inp: Inputs) -> Runner:
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as e:
        raise Skip(f"FlexAttention is not in this torch: {_first_line(e)}")
    p = inp.problem
    q, k, v = inp.q, inp.k, inp.v
    block_mask = None
    if p.causal:
        offset = p.Nk - p.Nq

        def bottom_right(b, h, q_idx, kv_idx):
            return kv_idx <= q_idx + offset
        block_mask = create_block_mask(bottom_right, None, None, p.Nq, p.Nk, device=inp.device)
    flex = _compiled("flex_attention", flex_attention)
    gqa = p.group > 1

    def fn():
        return flex(q, k, v, block_mask=block_mask, enable_gqa=gqa)
    try:
        fn()
    except Exception as e:   # compile errors come in many types; FlexAttention is skipped, not the run
        raise Skip(f"FlexAttention (compiled) failed on this torch/GPU: {type(e).__name__}: {_first_line(e)}")
    return Runner(fn, note="torch.compile(flex_attention, dynamic=False)")


def _naive(inp: Inputs) -> Runner:
    import torch
    p = inp.problem
    scores = p.B * p.Hq * p.Nq * p.Nk
    if scores > NAIVE_MAX_SCORES:
        gb = scores * inp.q.element_size() / 1e9
        raise Skip(f"naive attention materialises the {gb:.1f} GB score matrix; run only up to "
                   f"{NAIVE_MAX_SCORES:.3g} scores")
    if p.causal and p.Nq > p.Nk:
        raise Skip("rows that see no key give NaN in a plain softmax (Nq > Nk, causal)")
    q = inp.q
    k, v = inp.expanded_kv()
    scale = 1.0 / math.sqrt(p.D)
    mask = None
    if p.causal:
        i = torch.arange(p.Nq, device=inp.device)[:, None]
        mask = torch.arange(p.Nk, device=inp.device)[None, :] > i + (p.Nk - p.Nq)

    def fn():
        s = (q @ k.transpose(-1, -2)) * scale
        if mask is not None:
            s = s.masked_fill(mask, float("-inf"))
        return torch.softmax(s, dim=-1) @ v
    return Runner(fn, note="softmax(QK^T * scale) V in the input dtype")


def _tuned_paged(inp: Inputs) -> Runner:
    import tunebench
    q, kc, vc, bt, cl = inp.q, inp.k_cache, inp.v_cache, inp.block_tables, inp.context_lens
    note = tunebench.explain(q, kc, block_tables=bt).split(" -> ", 1)[-1]
    return Runner(lambda: tunebench.paged_attention(q, kc, vc, bt, cl), note=f"block size {inp.block_size}; {note}")


def _tuned_paged_own_block(inp: Inputs) -> Runner:
    """The tuned kernel on a cache laid out in the block size it was tuned to on this GPU (when that differs)."""
    import torch
    import tunebench
    from .inputs import pack_paged
    p = inp.problem
    bs = tunebench.tuned_paged_block_size(p.Hkv, p.D, p.dtype)
    if bs is None or bs == inp.block_size:
        raise Skip("no tuned block size on this GPU" if bs is None else f"the tuned block size is {bs} already")
    kc, vc, bt = pack_paged(inp.k, inp.v, inp.context_lens, bs, torch.Generator().manual_seed(1))
    q, cl = inp.q, inp.context_lens
    return Runner(lambda: tunebench.paged_attention(q, kc, vc, bt, cl), note=f"cache in the tuned block size {bs}")


def _paged_default(inp: Inputs) -> Runner:
    import torch
    from .registry import kernel_module
    module = kernel_module("paged_attention")
    config = dict(module.DEFAULT, BLOCK_SIZE=inp.block_size)
    why = module.keep(config, inp.problem)
    if why:
        raise Skip(f"keep() rejects DEFAULT with BLOCK_SIZE={inp.block_size}: {why}")
    q, kc, vc, bt, cl = inp.q, inp.k_cache, inp.v_cache, inp.block_tables, inp.context_lens
    out = torch.empty_like(q)
    return Runner(lambda: module.launch(q, kc, vc, bt, cl, config=config, out=out), out=out, note=str(config))


def _grouped_q(inp: Inputs):
    """Decode q [B, Hq, D] seen as [B, Hkv, G, D]: a KV head's G query heads become its query rows, which is the
    same computation without repeating K/V (non-causal, one token per query head)."""
    p = inp.problem
    return inp.q.reshape(p.B, p.Hkv, p.group, p.D)


def _dense_decode(backend_name: str):
    def make(inp: Inputs) -> Runner:
        from torch.nn.attention import SDPBackend
        backend = getattr(SDPBackend, backend_name)
        p = inp.problem
        q4, k, v = _grouped_q(inp), inp.k, inp.v
        why = _try_sdpa(backend, q4, k, v, False, False)
        if why:
            raise Skip(f"backend unavailable for these inputs: {why}")
        call = _sdpa_call(backend, q4, k, v, False, False)
        return Runner(lambda: call().reshape(p.B, p.Hq, p.D), note="contiguous K/V; GQA folded into query rows")
    return make


def _gather_then_sdpa(inp: Inputs) -> Runner:
    from torch.nn.attention import SDPBackend
    p = inp.problem
    q4, kc, vc = _grouped_q(inp), inp.k_cache, inp.v_cache
    tables = inp.block_tables.long()
    nb, bs = tables.shape[1], inp.block_size

    def gather(cache):                       # [num_blocks, bs, Hkv, D] -> [B, Hkv, Nk, D]
        return cache[tables].reshape(p.B, nb * bs, p.Hkv, p.D)[:, :p.Nk].transpose(1, 2)

    backend = SDPBackend.FLASH_ATTENTION
    if _try_sdpa(backend, q4, gather(kc), gather(vc), False, False) is not None:
        backend = None

    def fn():
        k, v = gather(kc), gather(vc)
        if backend is None:
            import torch.nn.functional as F
            return F.scaled_dot_product_attention(q4, k, v).reshape(p.B, p.Hq, p.D)
        return _sdpa_call(backend, q4, k, v, False, False)().reshape(p.B, p.Hq, p.D)
    note = "gather timed with SDPA " + ("flash" if backend is not None else "(PyTorch's choice of backend)")
    return Runner(fn, note=note)


def _flex_paged(inp: Inputs) -> Runner:
    import torch
    try:
        from torch.nn.attention.experimental._paged_attention import PagedAttention
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention, noop_mask
    except ImportError as e:
        raise Skip(f"FlexAttention's paged attention is not in this torch: {_first_line(e)}")
    p, bs = inp.problem, inp.block_size
    num_blocks, nb = inp.k_cache.shape[0], inp.block_tables.shape[1]
    tables = inp.block_tables.long()
    try:
        paged = PagedAttention(num_blocks, bs, p.B, device=inp.device)
        paged.page_table[:, :nb] = tables
        logical = torch.arange(nb, device=inp.device).expand(p.B, nb)
        paged.physical_to_logical.scatter_(1, tables, logical)
        paged.capacity[:] = nb * bs
        logical_mask = create_block_mask(noop_mask, p.B, None, 1, nb * bs, device=inp.device, BLOCK_SIZE=(128, bs))
        block_mask = paged.convert_logical_block_mask(logical_mask, kv_len=inp.context_lens)
        # [num_blocks, bs, Hkv, D] seen as one sequence of physical slots [1, Hkv, num_blocks * bs, D]: no copy.
        k = inp.k_cache.view(1, num_blocks * bs, p.Hkv, p.D).transpose(1, 2)
        v = inp.v_cache.view(1, num_blocks * bs, p.Hkv, p.D).transpose(1, 2)
        q4 = inp.q[:, :, None, :]
        flex = _compiled("flex_attention", flex_attention)

        def fn():
            return flex(q4, k, v, block_mask=block_mask, enable_gqa=p.group > 1)[:, :, 0, :]
        fn()
    except Exception as e:   # an experimental API: any failure skips this provider, not the run
        raise Skip(f"FlexAttention paged attention failed on this torch/GPU: {type(e).__name__}: {_first_line(e)}")
    return Runner(fn, note=f"torch.nn.attention.experimental PagedAttention, page {bs}, compiled")


def _flashinfer(inp: Inputs) -> Runner:
    import inspect
    import torch
    try:
        import flashinfer
    except ImportError:
        raise Skip("flashinfer is not installed (optional peer)")
    p, bs = inp.problem, inp.block_size
    nb = inp.block_tables.shape[1]
    workspace = torch.empty(128 << 20, dtype=torch.uint8, device=inp.device)
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD")
    indptr = torch.arange(p.B + 1, dtype=torch.int32, device=inp.device) * nb
    indices = inp.block_tables.reshape(-1).contiguous()
    last_len = torch.full((p.B,), p.Nk - (nb - 1) * bs, dtype=torch.int32, device=inp.device)
    plan = getattr(wrapper, "plan", None) or wrapper.begin_forward
    params = inspect.signature(plan).parameters
    dtype_kw = ({"q_data_type": inp.q.dtype, "kv_data_type": inp.q.dtype} if "q_data_type" in params
                else {"data_type": inp.q.dtype})
    plan(indptr, indices, last_len, p.Hq, p.Hkv, p.D, bs, **dtype_kw)
    run = getattr(wrapper, "run", None) or wrapper.forward
    q, kc, vc = inp.q, inp.k_cache, inp.v_cache
    return Runner(lambda: run(q, (kc, vc)), note=f"flashinfer {getattr(flashinfer, '__version__', '?')}, NHD pages")


def _fa_kvcache(module_name: str):
    """flash_attn_with_kvcache from vLLM's FlashAttention fork or the flash-attn package: same page layout as ours."""
    def make(inp: Inputs) -> Runner:
        import importlib
        try:
            fa = importlib.import_module(module_name)
        except ImportError:
            raise Skip(f"{module_name} is not installed (optional peer)")
        p = inp.problem
        q = inp.q[:, None]                                    # [B, 1, Hq, D]: its layout is [B, N, H, D]
        kc, vc, bt, cl = inp.k_cache, inp.v_cache, inp.block_tables, inp.context_lens

        def fn():
            return fa.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=cl, block_table=bt).reshape(p.B, p.Hq, p.D)
        return Runner(fn, note=f"{module_name}.flash_attn_with_kvcache, page {inp.block_size}")
    return make


PROVIDERS = [
    Provider("tunebench-v2", "prefill", False, _tuned_flash("v2"), "tunebench.flash_attention (tuned flash_v2)"),
    Provider("tunebench-v2-default", "prefill", False, _flash_v2_default, "flash_v2 with its DEFAULT config"),
    Provider("tunebench-v1", "prefill", False, _tuned_flash("v1"), "tunebench.flash_attention(variant='v1')"),
    Provider("sdpa-flash", "prefill", True, _sdpa("FLASH_ATTENTION"), "SDPA, FlashAttention-2 backend"),
    Provider("sdpa-cudnn", "prefill", True, _sdpa("CUDNN_ATTENTION"), "SDPA, cuDNN backend"),
    Provider("sdpa-efficient", "prefill", True, _sdpa("EFFICIENT_ATTENTION"), "SDPA, memory-efficient backend"),
    Provider("flex", "prefill", True, _flex, "FlexAttention, torch.compile'd"),
    Provider("naive", "prefill", True, _naive, "naive PyTorch (small sizes only)"),
    Provider("tunebench-paged", "decode", False, _tuned_paged, "tunebench.paged_attention (tuned)"),
    Provider("tunebench-paged-own-block", "decode", False, _tuned_paged_own_block,
             "tunebench.paged_attention on a cache in its tuned block size"),
    Provider("tunebench-paged-default", "decode", False, _paged_default, "paged_attention with its DEFAULT config"),
    Provider("sdpa-dense-flash", "decode", True, _dense_decode("FLASH_ATTENTION"), "SDPA flash on contiguous K/V"),
    Provider("sdpa-dense-efficient", "decode", True, _dense_decode("EFFICIENT_ATTENTION"),
             "SDPA memory-efficient on contiguous K/V"),
    Provider("sdpa-dense-cudnn", "decode", True, _dense_decode("CUDNN_ATTENTION"), "SDPA cuDNN on contiguous K/V"),
    Provider("gather-sdpa", "decode", True, _gather_then_sdpa, "gather pages via the block table, then SDPA"),
    Provider("flex-paged", "decode", True, _flex_paged, "FlexAttention's experimental PagedAttention"),
    Provider("flashinfer", "decode", True, _flashinfer, "FlashInfer batch decode (if installed)"),
    Provider("vllm-flash-attn", "decode", True, _fa_kvcache("vllm.vllm_flash_attn"),
             "vLLM's flash_attn_with_kvcache (if installed)"),
    Provider("flash-attn", "decode", True, _fa_kvcache("flash_attn"), "flash-attn's flash_attn_with_kvcache"),
]
PROVIDER_NAMES = [pr.name for pr in PROVIDERS]


def select_providers(names: list[str] | None) -> list[Provider]:
    if not names:
        return list(PROVIDERS)
    unknown = [n for n in names if n not in PROVIDER_NAMES]
    if unknown:
        raise ValueError(f"unknown provider {', '.join(unknown)}; known: {', '.join(PROVIDER_NAMES)}")
    return [pr for pr in PROVIDERS if pr.name in names]


# ----------------------------------------------------------------------------------------------------------------
# Measuring

@dataclass
class Measurement:
    problem: Problem
    provider: str
    peer: bool
    status: str                             # ok, wrong, skipped, failed
    median_ms: float | None = None
    p20_ms: float | None = None
    p80_ms: float | None = None
    err_ratio: float | None = None          # error / allowed (<= 1 passes)
    note: str = ""


def do_bench_timer(warmup_ms: float = 25.0, rep_ms: float = 100.0):
    """(median, p20, p80) in ms from triton.testing.do_bench: CUDA events, L2 flushed before each run."""
    def timer(fn) -> tuple[float, float, float]:
        from triton.testing import do_bench
        return tuple(do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8]))
    return timer


def _sync(device) -> None:
    import torch
    if getattr(device, "type", device) == "cuda":
        torch.cuda.synchronize()


def _release(device) -> None:
    gc.collect()
    import torch
    if getattr(device, "type", device) == "cuda":
        torch.cuda.empty_cache()


def run_problem(problem: Problem, providers: list[Provider], *, device="cuda", timer=None, seed: int = 0,
                block_size: int = DEFAULT_BLOCK_SIZE, log=None) -> list[Measurement]:
    """Every applicable provider on the same inputs: prepare, run once and check against the reference (all of them
    first), then time the correct ones. Failures are recorded with their reason and never stop the others."""
    import torch
    timer = timer or do_bench_timer()
    log = log or (lambda msg: None)
    phase = "decode" if problem.paged else "prefill"
    chosen = [pr for pr in providers if pr.phase == phase]
    try:
        inputs = make_inputs(problem, device, seed, block_size)
        reference = reference_for(inputs, seed)
    except Exception as e:  # noqa: BLE001 -- e.g. out of memory: this problem is lost, not the run
        inputs = reference = None
        _release(device)
        why = f"building the inputs or the reference failed: {type(e).__name__}: {_first_line(e)}"
        return [Measurement(problem, pr.name, pr.peer, FAILED, note=why) for pr in chosen]
    results: dict[str, Measurement] = {}
    runners: dict[str, Runner] = {}
    for pr in chosen:
        m = Measurement(problem, pr.name, pr.peer, FAILED)
        results[pr.name] = m
        t0 = time.perf_counter()
        try:
            runner = pr.make(inputs)
            m.note = runner.note
            if runner.out is not None:
                runner.out.fill_(math.nan)
            out = runner.fn()
            _sync(device)
            verdict = reference.check(out)
            m.err_ratio = verdict.ratio
            if not verdict.ok:
                m.status, m.note = WRONG, f"disagrees with the float64 reference: {verdict.reason}"
            elif torch.isnan(out).any():
                m.status, m.note = WRONG, "NaN in the output outside the checked rows (unwritten or overflow)"
            else:
                m.status = OK
                runners[pr.name] = runner
            # A later provider that writes nothing into recycled memory must not find this correct answer there.
            out.fill_(math.nan)
            del out
        except Skip as e:
            m.status, m.note = SKIPPED, str(e)
        except Exception as e:  # noqa: BLE001 -- one provider's failure is a result, not the end of the run
            m.status, m.note = FAILED, f"{type(e).__name__}: {_first_line(e)}"
            _release(device)
        log(f"  {pr.name:<26} {m.status:<8} ({time.perf_counter() - t0:.1f} s) {m.note[:100]}")
    for name, runner in runners.items():
        m = results[name]
        try:
            m.median_ms, m.p20_ms, m.p80_ms = (float(x) for x in timer(runner.fn))
        except Exception as e:  # noqa: BLE001
            m.status, m.note = FAILED, f"timing failed: {type(e).__name__}: {_first_line(e)}"
            _release(device)
    del runners, inputs, reference
    _release(device)
    return list(results.values())


@dataclass
class Ceilings:
    copy_bytes_per_s: float
    matmul_flops_per_s: dict[str, float] = field(default_factory=dict)   # dtype -> FLOP/s
    notes: dict[str, str] = field(default_factory=dict)

    def for_problem(self, problem: Problem) -> tuple[float | None, str]:
        """The ceiling a problem's throughput is compared with, in its own unit, and its name."""
        if problem.paged:
            return self.copy_bytes_per_s / 1e9, "copy GB/s"
        rate = self.matmul_flops_per_s.get(problem.dtype)
        return (rate / 1e12 if rate else None), f"{problem.dtype} matmul TFLOP/s"


def copy_rate(nbytes: int, device, timer) -> float:
    """Bytes per second of a device-to-device copy, counting bytes read plus bytes written."""
    import torch
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / (timer(lambda: dst.copy_(src))[0] * 1e-3)


def matmul_rate(n: int, dtype: str, device, timer) -> float:
    """FLOP/s of an n x n x n torch.matmul on random data (zeros can run faster than real data)."""
    import torch
    a, b = (torch.randn(n, n, device=device).to(getattr(torch, dtype)) for _ in range(2))
    c = torch.empty_like(a)
    return 2.0 * n ** 3 / (timer(lambda: torch.matmul(a, b, out=c))[0] * 1e-3)


def measure_ceilings(dtypes, device="cuda", timer=None, copy_bytes: int = COPY_BYTES,
                     matmul_n: int = MATMUL_N) -> Ceilings:
    """The copy bandwidth, and the matmul rate of bf16 and of each dtype the problems use."""
    timer = timer or do_bench_timer()
    ceilings = Ceilings(copy_rate(copy_bytes, device, timer),
                        notes={"copy": f"{copy_bytes >> 20} MiB device-to-device copy, read + write"})
    for dtype in sorted(set(dtypes) | {"bfloat16"}):
        ceilings.matmul_flops_per_s[dtype] = matmul_rate(matmul_n, dtype, device, timer)
        ceilings.notes[f"matmul {dtype}"] = f"torch.matmul {matmul_n}^3, random data"
    _release(device)
    return ceilings


# ----------------------------------------------------------------------------------------------------------------
# Formatting: pure functions of measurements

def best_peer(measurements: list[Measurement]) -> Measurement | None:
    timed = [m for m in measurements if m.peer and m.status == OK and m.median_ms]
    return min(timed, key=lambda m: m.median_ms) if timed else None


def rows(measurements: list[Measurement], ceilings: Ceilings | None) -> list[dict]:
    """One flat row per measurement (CSV/JSON), with throughput, ratio against the best peer of the same problem,
    and percent of the relevant measured ceiling."""
    by_problem: dict[Problem, list[Measurement]] = {}
    for m in measurements:
        by_problem.setdefault(m.problem, []).append(m)
    out = []
    for problem, ms in by_problem.items():
        peer = best_peer(ms)
        peer_tp = problem.throughput(peer.median_ms) if peer else None
        ceiling, ceiling_name = ceilings.for_problem(problem) if ceilings else (None, "")
        for m in ms:
            tp = problem.throughput(m.median_ms) if m.status == OK else None
            out.append({
                "problem": problem.label(), "phase": "decode" if problem.paged else "prefill",
                "dtype": problem.dtype, "B": problem.B, "Hq": problem.Hq, "Hkv": problem.Hkv, "Nq": problem.Nq,
                "Nk": problem.Nk, "D": problem.D, "causal": problem.causal,
                "provider": m.provider, "peer": m.peer, "status": m.status,
                "median_ms": m.median_ms, "p20_ms": m.p20_ms, "p80_ms": m.p80_ms,
                "throughput": tp, "unit": problem.unit,
                "tflops": problem.flops / (m.median_ms * 1e-3) / 1e12 if tp else None,
                "intensity": problem.flops / problem.min_bytes,
                "best_peer": peer.provider if peer else None,
                "vs_best_peer": tp / peer_tp if tp and peer_tp else None,
                "ceiling": ceiling, "ceiling_name": ceiling_name,
                "pct_of_ceiling": 100.0 * tp / ceiling if tp and ceiling else None,
                "err_ratio": m.err_ratio, "note": m.note,
            })
    return out


def _fmt(x, spec: str, none: str = "-") -> str:
    return none if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def format_table(problem_rows: list[dict]) -> str:
    """A table for one problem's rows (fastest first, then the untimed)."""
    first = problem_rows[0]
    ceiling = (f"ceiling {first['ceiling']:.0f} {first['ceiling_name']} (measured in this run)"
               if first["ceiling"] else "no ceiling measured")
    head = f"{first['problem']}  [{first['intensity']:.0f} FLOPs/byte; {ceiling}]"
    cols = f"  {'provider':<26} {'status':<8} {'median ms':>10} {first['unit']:>8} {'vs best peer':>13} " \
           f"{'% ceiling':>9}  note"
    ordered = sorted(problem_rows, key=lambda r: (r["throughput"] is None, -(r["throughput"] or 0)))
    lines = [head, cols]
    for r in ordered:
        ratio = f"{r['vs_best_peer']:.2f}x" if r["vs_best_peer"] else "-"
        lines.append(f"  {r['provider']:<26} {r['status']:<8} {_fmt(r['median_ms'], '.4f'):>10} "
                     f"{_fmt(r['throughput'], '.1f'):>8} {ratio:>13} {_fmt(r['pct_of_ceiling'], '.0f'):>9}  "
                     f"{r['note'][:110]}")
    peer = first["best_peer"]
    lines.append(f"  best peer: {peer}" if peer else "  best peer: none timed")
    return "\n".join(lines)


def _throughput_of(rows_: list[dict], problem: str, provider: str) -> float | None:
    return next((r["throughput"] for r in rows_ if r["problem"] == problem and r["provider"] == provider), None)


def summary(rows_: list[dict]) -> list[str]:
    """The issue's goal ratios, one line per problem they apply to; a missing side says so."""
    lines = []
    problems = list(dict.fromkeys(r["problem"] for r in rows_))
    first = {r["problem"]: r for r in rows_}

    def ratio(a, b):
        return f"{a / b:.2f}x" if a and b else "n/a"

    for label in problems:
        r = first[label]
        if r["phase"] == "prefill":
            v2 = _throughput_of(rows_, label, "tunebench-v2")
            if r["D"] == 128 and r["Nk"] >= 4096 and r["dtype"] in ("float16", "bfloat16"):
                lines.append(f"prefill {label}: tunebench-v2 {_fmt(v2, '.0f')} TFLOP/s = "
                             f"{ratio(v2, _throughput_of(rows_, label, 'sdpa-cudnn'))} cuDNN (goal >= 1.0), "
                             f"{ratio(v2, _throughput_of(rows_, label, 'sdpa-flash'))} FlashAttention-2 (goal >= 1.5)")
            v1 = _throughput_of(rows_, label, "tunebench-v1")
            if v1:
                lines.append(f"v2/v1 {label}: {ratio(v2, v1)}")
        else:
            paged = next((x for x in rows_ if x["problem"] == label and x["provider"] == "tunebench-paged"), None)
            if paged is None:
                continue
            pct = paged["pct_of_ceiling"]
            goal = " (goal >= 85%: B x context >= 64k)" if r["B"] * r["Nk"] >= 65536 else ""
            lines.append(f"decode {label}: tunebench-paged {_fmt(paged['throughput'], '.0f')} GB/s = "
                         f"{_fmt(pct, '.0f')}% of copy bandwidth{goal}, "
                         f"{ratio(paged['throughput'], _throughput_of(rows_, label, 'sdpa-dense-flash'))} "
                         f"dense SDPA flash (goal >= 1.0)")
    return lines


def _jsonable(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def write_csv(rows_: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows_[0]) if rows_ else ["problem"])
        writer.writeheader()
        for r in rows_:
            writer.writerow({k: ("" if v is None else v) for k, v in r.items()})


def write_json(rows_: list[dict], ceilings: Ceilings | None, meta: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"meta": meta,
           "ceilings": None if ceilings is None else {
               "copy_bytes_per_s": ceilings.copy_bytes_per_s, "matmul_flops_per_s": ceilings.matmul_flops_per_s,
               "notes": ceilings.notes},
           "rows": [{k: _jsonable(v) for k, v in r.items()} for r in rows_]}
    path.write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n")


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        return None


def plot_throughput(rows_: list[dict], out_dir: Path) -> list[Path]:
    """One PNG per group of problems that differ only in length: throughput against sequence length per provider."""
    plt = _pyplot()
    if plt is None:
        return []
    groups: dict[tuple, list[dict]] = {}
    for r in rows_:
        if r["throughput"] is None:
            continue
        key = (r["phase"], r["dtype"], r["Hq"], r["Hkv"], r["D"], r["causal"]) + ((r["B"],) if r["phase"] == "prefill"
                                                                                  else ())
        groups.setdefault(key, []).append(r)
    paths = []
    for key, rs in groups.items():
        phase, dtype, hq, hkv, d, causal = key[:6]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for provider in dict.fromkeys(r["provider"] for r in rs):
            pts = sorted((r["Nk"], r["throughput"]) for r in rs if r["provider"] == provider)
            peer = next(r["peer"] for r in rs if r["provider"] == provider)
            ax.plot(*zip(*pts), marker="o", label=provider, linestyle="--" if peer else "-")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)" if phase == "decode" else "sequence length N")
        ax.set_ylabel(rs[0]["unit"])
        batch = f" B{key[6]}" if phase == "prefill" else " (batch varies)"
        title = f"{phase} {dtype}{batch} H{hq}/{hkv} D{d}{' causal' if causal else ''}"
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        path = out_dir / ("throughput_" + title.replace(" ", "_").replace("/", "-") + ".png")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_roofline(rows_: list[dict], ceilings: Ceilings | None, out_dir: Path) -> Path | None:
    """Every timed point at its arithmetic intensity (FLOPs per minimum byte) and achieved TFLOP/s, under the
    measured roof min(matmul rate, intensity x copy bandwidth)."""
    plt = _pyplot()
    pts = [r for r in rows_ if r["tflops"]]
    if plt is None or not pts:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 5))
    if ceilings is not None:
        import numpy as np
        peak = max(ceilings.matmul_flops_per_s.values()) / 1e12
        x = np.logspace(0, 4.5, 200)
        ax.plot(x, np.minimum(peak, x * ceilings.copy_bytes_per_s / 1e12), color="black", lw=1.5,
                label=f"roof: {peak:.0f} TFLOP/s, {ceilings.copy_bytes_per_s / 1e12:.2f} TB/s (measured)")
    markers = "os^vD<>pP*Xh"
    for i, provider in enumerate(dict.fromkeys(r["provider"] for r in pts)):
        rs = [r for r in pts if r["provider"] == provider]
        ax.scatter([r["intensity"] for r in rs], [r["tflops"] for r in rs], s=18, marker=markers[i % len(markers)],
                   label=provider)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOPs / minimum byte)")
    ax.set_ylabel("TFLOP/s")
    ax.set_title("roofline: every measured point")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    path = out_dir / "roofline.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------------------------
# The command

def select_problems(suite_name: str | None, preset: str | None, kernels: list[str] | None,
                    dtypes: list[str] | None = None) -> list[Problem]:
    """The suite's (or preset's) problems, filtered by kernel and dtype. Dense problems that differ only in kernel
    name are one prefill problem (every prefill provider runs on it)."""
    if suite_name and preset:
        raise ValueError("give --suite or --preset, not both")
    problems = preset_problems(preset) if preset else suite(suite_name or DEFAULT_SUITE)
    if kernels:
        problems = [p for p in problems if p.kernel in kernels]
    if dtypes:
        problems = [p for p in problems if p.dtype in dtypes]
    unique = dict.fromkeys(p if p.kernel in PAGED_KERNELS else dataclasses.replace(p, kernel="flash_v2")
                           for p in problems)
    if not unique:
        raise ValueError("no problems left to benchmark after the --kernel / --dtype filters")
    return list(unique)


def environment() -> dict:
    import torch
    from .device import DeviceIdentity
    d = DeviceIdentity.current()
    return {"device": d.name, "capability": d.capability, "sm_count": d.sm_count, "driver": d.driver,
            "torch": d.torch, "triton": d.triton, "cuda": torch.version.cuda,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": "tunebench " + " ".join(sys.argv[1:])}


def bench_command(args) -> int:
    problems = select_problems(args.suite, args.preset, args.kernel, args.dtype)
    providers = select_providers(args.provider)
    import torch
    if not torch.cuda.is_available():
        raise RuntimeError("`tunebench bench` needs a CUDA GPU: it times kernels, and the Triton interpreter's times "
                           "say nothing about a GPU. Use `tunebench roofline` for the analysis without one.")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = environment()
    timer = do_bench_timer(args.warmup_ms, args.rep_ms)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    log(f"tunebench bench on {meta.get('device')} (torch {meta.get('torch')}, triton {meta.get('triton')}): "
        f"{len(problems)} problems, writing to {out_dir}")
    ceilings = measure_ceilings({p.dtype for p in problems}, timer=timer)
    print(format_ceilings(ceilings), flush=True)
    measurements, sticky, started = [], None, time.perf_counter()
    for i, problem in enumerate(problems, 1):
        t0 = time.perf_counter()
        log(f"[{i}/{len(problems)}] {problem.label()}")
        measured = run_problem(problem, providers, timer=timer, log=log)
        measurements += measured
        log(f"  ({time.perf_counter() - t0:.0f} s)")
        print("\n" + format_table(rows(measured, ceilings)), flush=True)
        write_outputs(measurements, ceilings, meta, out_dir)     # after every problem: a cut-off run keeps them
        sticky = next((m for m in measured if m.status == FAILED and any(
            s in m.note for s in STICKY_CUDA_ERRORS)), None)
        if sticky is not None:
            break
    all_rows = rows(measurements, ceilings)
    plots = plot_throughput(all_rows, out_dir)
    roof = plot_roofline(all_rows, ceilings, out_dir)
    if roof is not None:
        plots.append(roof)
    log(f"{len(measurements)} measurements in {time.perf_counter() - started:.0f} s")
    print(f"\nwrote {out_dir / 'bench.csv'}, {out_dir / 'bench.json'}, {out_dir / 'bench.md'}"
          + (f" and {len(plots)} plots" if plots else "; no plots (matplotlib is not installed)"))
    print("\n".join(["", "summary:"] + summary(all_rows)))
    if sticky is not None:
        print(f"\nstopped early: {sticky.provider} left the CUDA context unusable ({sticky.note}); every later "
              f"launch in this process would fail. Rerun leaving it out (--provider ...).", file=sys.stderr)
        return 1
    return 0


def write_outputs(measurements: list[Measurement], ceilings: Ceilings | None, meta: dict, out_dir: Path) -> None:
    """bench.csv, bench.json and bench.md (the tables and the summary, for BENCHMARKS.md) in out_dir."""
    all_rows = rows(measurements, ceilings)
    write_csv(all_rows, out_dir / "bench.csv")
    write_json(all_rows, ceilings, meta, out_dir / "bench.json")
    tables = [format_table([r for r in all_rows if r["problem"] == label])
              for label in dict.fromkeys(r["problem"] for r in all_rows)]
    header = [f"device: {meta.get('device')} (capability {meta.get('capability')}, driver {meta.get('driver')}); "
              f"torch {meta.get('torch')}, triton {meta.get('triton')}, CUDA {meta.get('cuda')}; {meta.get('date')}",
              f"command: {meta.get('command')}"]
    if ceilings is not None:
        header.append(format_ceilings(ceilings))
    body = "\n".join(header) + "\n\n" + "\n\n".join(tables) + "\n\nsummary:\n" + "\n".join(summary(all_rows))
    (out_dir / "bench.md").write_text("```\n" + body + "\n```\n")


def format_ceilings(c: Ceilings) -> str:
    parts = [f"copy {c.copy_bytes_per_s / 1e12:.2f} TB/s"]
    parts += [f"{dtype} matmul {rate / 1e12:.0f} TFLOP/s" for dtype, rate in sorted(c.matmul_flops_per_s.items())]
    return "ceilings measured in this run: " + ", ".join(parts)
