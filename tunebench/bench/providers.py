"""The providers `tunebench bench` compares: tunebench's own kernels and the peers.

Each provider prepares everything outside the timed region from the problem's shared Inputs and returns a Runner
whose fn() is what is timed, or raises Skip with the reason it does not apply.

A ragged decode batch (bench/ragged.py: sequences of different lengths) is run by the paged providers, which take
per-sequence context lengths, and by the peers a user of dense attention has for it: SDPA on K/V padded to the
longest sequence with a key mask (sdpa-padded*), and a loop of SDPA over the sequences (sdpa-loop). Those peers are
for ragged batches only (on a uniform batch they are the dense peers again); the dense peers say why they skip one.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Callable

from ..inputs import Inputs
from ..paged_inputs import pack_paged
from .ragged import RaggedDecode, padding_bias

V1_MAX_N = 8192                           # FlashAttention-1 rewrites O, m, l in HBM per K/V step: slow beyond this
NAIVE_MAX_SCORES = 1 << 28                # naive attention materialises B x Hq x Nq x Nk scores


class Skip(Exception):
    """A provider that does not apply to this problem or this machine; the message says why."""


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
    ragged_only: bool = False   # a peer for ragged decode batches only (left out of uniform ones)
    fp8_cache: bool = False     # reads a problem's fp8 KV cache (Problem.kv_dtype) with its scales

    def applies(self, problem) -> bool:
        """Whether this provider is run on (and listed for) a problem. An fp8-cache problem is run by the providers
        that read that cache only: the dense peers would read the bf16 K/V, another problem (its own row)."""
        phase = "decode" if problem.paged else "prefill"
        if problem.kv_dtype is not None and not self.fp8_cache:
            return False
        return self.phase == phase and (isinstance(problem, RaggedDecode) or not self.ragged_only)


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
    from ..registry import kernel_module
    module = kernel_module("flash_v2")
    config = dict(module.DEFAULT)
    why = module.keep(config, dataclasses.replace(inp.problem, kernel="flash_v2"))
    if why:
        raise Skip(f"keep() rejects DEFAULT here: {why}")
    q, k, v, causal = inp.q, inp.k, inp.v, inp.problem.causal
    out = torch.empty_like(q)
    return Runner(lambda: module.launch(q, k, v, config=config, causal=causal, out=out), out=out, note=str(config))


def first_line(e: BaseException | str) -> str:
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
            why = [first_line(w.message) for w in caught] + [first_line(e)]
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
        raise Skip(f"FlexAttention is not in this torch: {first_line(e)}")
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
        raise Skip(f"FlexAttention (compiled) failed on this torch/GPU: {type(e).__name__}: {first_line(e)}")
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
    q, kc, vc, bt, cl, ks, vs = (inp.q, inp.k_cache, inp.v_cache, inp.block_tables, inp.context_lens, inp.k_scale,
                                 inp.v_scale)
    note = tunebench.explain(q, kc, block_tables=bt).split(" -> ", 1)[-1]
    return Runner(lambda: tunebench.paged_attention(q, kc, vc, bt, cl, k_scale=ks, v_scale=vs),
                  note=f"page {inp.block_size}; {note}")


def _tuned_paged_own_block(inp: Inputs) -> Runner:
    """The tuned kernel on a cache laid out in the page size recommended for this geometry on this GPU
    (runtime/pages.py), when that differs from the problem's."""
    import torch
    import tunebench
    p = inp.problem
    bs = tunebench.tuned_paged_block_size(p.Hkv, p.D, p.dtype)
    if bs is None or bs == inp.block_size:
        raise Skip("no recommended page size on this GPU" if bs is None else f"the recommended page is {bs} already")
    kc, vc, bt = pack_paged(inp.k, inp.v, inp.context_lens, bs, torch.Generator().manual_seed(1))
    q, cl = inp.q, inp.context_lens
    return Runner(lambda: tunebench.paged_attention(q, kc, vc, bt, cl), note=f"cache in the recommended page {bs}")


def _paged_default(inp: Inputs) -> Runner:
    import torch
    from ..registry import kernel_module
    module = kernel_module("paged_attention")
    config = dict(module.DEFAULT)
    why = module.keep(config, inp.problem)
    if why:
        raise Skip(f"keep() rejects DEFAULT at page {inp.block_size}: {why}")
    q, kc, vc, bt, cl, ks, vs = (inp.q, inp.k_cache, inp.v_cache, inp.block_tables, inp.context_lens, inp.k_scale,
                                 inp.v_scale)
    out = torch.empty_like(q)
    return Runner(lambda: module.launch(q, kc, vc, bt, cl, config=config, out=out, k_scale=ks, v_scale=vs), out=out,
                  note=str(config))


def _uniform_only(inp: Inputs) -> None:
    if isinstance(inp.problem, RaggedDecode):
        raise Skip("one dense call takes every sequence at one length: a ragged batch needs padding and a mask "
                   "(sdpa-padded*) or a loop over sequences (sdpa-loop)")


def _grouped_q(inp: Inputs):
    """Decode q [B, Hq, D] seen as [B, Hkv, G, D]: a KV head's G query heads become its query rows, which is the
    same computation without repeating K/V (non-causal, one token per query head)."""
    p = inp.problem
    return inp.q.reshape(p.B, p.Hkv, p.group, p.D)


def _dense_decode(backend_name: str):
    def make(inp: Inputs) -> Runner:
        from torch.nn.attention import SDPBackend
        backend = getattr(SDPBackend, backend_name)
        _uniform_only(inp)
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
    _uniform_only(inp)
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


def _padded_decode(backend_name: str | None):
    """SDPA on K/V padded to the longest sequence, with an additive key mask built once per batch: what a user of
    dense attention does with a ragged batch in one call. backend_name None: PyTorch's own choice, the plain call."""
    def make(inp: Inputs) -> Runner:
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel
        p = inp.problem
        q4, k, v, bias = _grouped_q(inp), inp.k, inp.v, padding_bias(inp)

        def call():
            return F.scaled_dot_product_attention(q4, k, v, attn_mask=bias).reshape(p.B, p.Hq, p.D)
        fn = call
        if backend_name is not None:
            backend = getattr(SDPBackend, backend_name)

            def fn():
                with sdpa_kernel(backend):
                    return call()
            try:
                fn()
            except RuntimeError as e:
                raise Skip(f"backend unavailable for these inputs: {first_line(e)}")
        return Runner(fn, note=f"K/V padded to {p.Nk} (reads B x {p.Nk} tokens), additive key mask built once "
                               f"(untimed); GQA folded into query rows")
    return make


def _sdpa_loop(inp: Inputs) -> Runner:
    """One SDPA call per sequence on its own tokens (views of the padded K/V, no copy), then the outputs stacked."""
    import torch
    from torch.nn.attention import SDPBackend
    p = inp.problem
    q4 = _grouped_q(inp)
    per_seq = [(q4[b:b + 1], inp.k[b:b + 1, :, :n], inp.v[b:b + 1, :, :n]) for b, n in enumerate(p.lengths)]
    backend = SDPBackend.FLASH_ATTENTION
    if _try_sdpa(backend, *per_seq[0], False, False) is not None:
        backend = None

    def one(q, k, v):
        if backend is None:
            import torch.nn.functional as F
            return F.scaled_dot_product_attention(q, k, v)
        return _sdpa_call(backend, q, k, v, False, False)()

    def fn():
        return torch.cat([one(*t) for t in per_seq]).reshape(p.B, p.Hq, p.D)
    which = "flash" if backend is not None else "PyTorch's choice of backend"
    return Runner(fn, note=f"{p.B} SDPA calls ({which}) on each sequence's own tokens, then a cat")


def _flex_paged(inp: Inputs) -> Runner:
    import torch
    try:
        from torch.nn.attention.experimental._paged_attention import PagedAttention
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention, noop_mask
    except ImportError as e:
        raise Skip(f"FlexAttention's paged attention is not in this torch: {first_line(e)}")
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
        raise Skip(f"FlexAttention paged attention failed on this torch/GPU: {type(e).__name__}: {first_line(e)}")
    return Runner(fn, note=f"torch.nn.attention.experimental PagedAttention, page {bs}, compiled")


def _flashinfer(inp: Inputs) -> Runner:
    import inspect
    import torch
    try:
        import flashinfer
    except ImportError:
        raise Skip("flashinfer is not installed (optional peer)")
    p, bs = inp.problem, inp.block_size
    workspace = torch.empty(128 << 20, dtype=torch.uint8, device=inp.device)
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD")
    # Each sequence's own pages (a ragged batch's differ in number): CSR over the block table's used columns.
    lens = inp.context_lens.to(torch.long)
    pages = (lens + bs - 1) // bs
    indptr = torch.cat([pages.new_zeros(1), pages.cumsum(0)]).to(torch.int32)
    used = torch.arange(inp.block_tables.shape[1], device=inp.device)[None, :] < pages[:, None]
    indices = inp.block_tables[used].contiguous()
    last_len = (lens - (pages - 1) * bs).to(torch.int32)
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
    Provider("tunebench-auto", "prefill", False, _tuned_flash("auto"),
             "tunebench.flash_attention(variant='auto'): flash_v3 or flash_v2, whichever was tuned faster here "
             "(flash_v2 in eager calls where flash_v3 takes under registry.EAGER_MIN_MS; so a graph-timed and a "
             "launch-by-launch figure may be of different kernels)"),
    Provider("tunebench-v2-default", "prefill", False, _flash_v2_default, "flash_v2 with its DEFAULT config"),
    Provider("tunebench-v1", "prefill", False, _tuned_flash("v1"), "tunebench.flash_attention(variant='v1')"),
    Provider("sdpa-flash", "prefill", True, _sdpa("FLASH_ATTENTION"), "SDPA, FlashAttention-2 backend"),
    Provider("sdpa-cudnn", "prefill", True, _sdpa("CUDNN_ATTENTION"), "SDPA, cuDNN backend"),
    Provider("sdpa-efficient", "prefill", True, _sdpa("EFFICIENT_ATTENTION"), "SDPA, memory-efficient backend"),
    Provider("flex", "prefill", True, _flex, "FlexAttention, torch.compile'd"),
    Provider("naive", "prefill", True, _naive, "naive PyTorch (small sizes only)"),
    Provider("tunebench-paged", "decode", False, _tuned_paged, "tunebench.paged_attention (tuned)", fp8_cache=True),
    Provider("tunebench-paged-own-block", "decode", False, _tuned_paged_own_block,
             "tunebench.paged_attention on a cache in the recommended page size (tunebench pages)"),
    Provider("tunebench-paged-default", "decode", False, _paged_default, "paged_attention with its DEFAULT config",
             fp8_cache=True),
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
    Provider("sdpa-padded", "decode", True, _padded_decode(None),
             "ragged batch: SDPA on K/V padded to the longest, key mask, PyTorch's choice of backend", True),
    Provider("sdpa-padded-efficient", "decode", True, _padded_decode("EFFICIENT_ATTENTION"),
             "ragged batch: SDPA memory-efficient on padded K/V with a key mask", True),
    Provider("sdpa-padded-cudnn", "decode", True, _padded_decode("CUDNN_ATTENTION"),
             "ragged batch: SDPA cuDNN on padded K/V with a key mask", True),
    Provider("sdpa-loop", "decode", True, _sdpa_loop, "ragged batch: one SDPA call per sequence, outputs stacked",
             True),
]
PROVIDER_NAMES = [pr.name for pr in PROVIDERS]


def select_providers(names: list[str] | None) -> list[Provider]:
    if not names:
        return list(PROVIDERS)
    unknown = [n for n in names if n not in PROVIDER_NAMES]
    if unknown:
        raise ValueError(f"unknown provider {', '.join(unknown)}; known: {', '.join(PROVIDER_NAMES)}")
    return [pr for pr in PROVIDERS if pr.name in names]

