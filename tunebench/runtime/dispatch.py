"""Runtime dispatch: a call's shape -> its bucket -> the config to run (winners.py) -> launch. Nothing here tunes.

A GPU with no winners at all runs DEFAULT and says so once. Every call is counted when a recording is on
(record.py); a shape seen before costs one dict lookup more.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from ..kernels._launch import check_call
from ..registry import EAGER_MIN_MS, kernel_module, replacement_runs, require_kernels
from ..shapes import KV_DTYPES, PAGES, Problem
from . import record
from .warn import warn_user
from .winners import INTERPRETER, Choice, Winners, tune_hint

VARIANTS = {"v2": "flash_v2", "v1": "flash_v1", "v3": "flash_v3", "auto": None}
# What variant="auto" compares, by their exact winners' tuned times for the call's bucket: the last runs every shape
# and is the fallback; the others only where they can take the inputs (flash_v3: Hopper, fp16/bf16, D 64/128/256,
# TMA-friendly strides).
AUTO_KERNELS = ("flash_v3", "flash_v2")
record.start_from_environment()


def check_from_environment(environ=os.environ) -> bool:
    """TUNEBENCH_CHECK set to anything but "" or "0" turns check=True on for every paged call of the program."""
    return environ.get("TUNEBENCH_CHECK", "") not in ("", "0")


ENV_CHECK = check_from_environment()            # read once, at import


class Dispatcher:
    """Holds the loaded winners and a per-shape cache of chosen configs, so a warm call costs one dict lookup."""

    def __init__(self, winners: Winners | None = None):
        self._winners = winners
        self._cache: dict[tuple, dict] = {}
        self._warned_default = False

    @property
    def winners(self) -> Winners:
        if self._winners is None:
            self._winners = Winners.load()
        return self._winners

    def choose(self, problem: Problem) -> Choice:
        """The config for a call: exact winner, safe transfer or DEFAULT, with the reason. A paged problem carries
        its cache's page size, so only winners and trials at that page are evidence for it."""
        module = kernel_module(problem.kernel)
        default = dict(module.DEFAULT)

        def admits(config):
            return module.keep(config, problem) is None
        choice = self.winners.choose(problem, default, admits)
        if choice is not None and admits(choice.config):
            return choice
        if choice is not None:
            why = f"{choice.why}, but keep() rejects it here: {module.keep(choice.config, problem)}; DEFAULT"
        elif not self.winners.exact:
            device, hint = self.winners.device_name, tune_hint(self.winners.device_name)
            why = f"no tuned winners for {device}: DEFAULT ({hint})"
            if not self._warned_default:
                self._warned_default = True
                where = "the Triton interpreter (no GPU)" if device == INTERPRETER else device
                warn_user(f"tunebench: no tuned configs for {where}; using each kernel's DEFAULT. "
                          f"{hint[0].upper()}{hint[1:]}.")
        else:
            why = "DEFAULT: no exact winner and no safe transfer (no config beat DEFAULT in every nearby tuned bucket)"
        return Choice(default, why)

    def config_for(self, key: tuple, resolve) -> dict:
        """The config cached for a call's shape key; resolve() picks it on the first call with that key."""
        config = self._cache.get(key)
        if config is None:
            config = self._cache[key] = resolve()
        return config


_DISPATCHER = Dispatcher()


def reload() -> None:
    """Forgets loaded winners and cached choices (e.g. after tuning in the same process or changing TUNEBENCH_DB)."""
    global _DISPATCHER
    _DISPATCHER = Dispatcher()


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _dense_problem(kernel: str, q, k, causal: bool) -> Problem:
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be 4-d [B, H, N, D]; got q {tuple(q.shape)}, k {tuple(k.shape)}")
    B, Hq, Nq, D = q.shape
    return Problem(kernel, B, Hq, k.shape[1], Nq, k.shape[2], D, _dtype_name(q), bool(causal))


def _paged_problem(q, k_cache, block_tables) -> Problem:
    """The call's Problem; its page is the cache's block size (k_cache.shape[1]) and its kv_dtype the cache's fp8
    dtype, if any, so winners are per page size and per cache dtype. Any other cache dtype is left to the launch's
    checks (a mismatch with q is named there)."""
    if q.dim() != 3 or k_cache.dim() != 4 or block_tables.dim() != 2:
        raise ValueError(f"expected q [B, Hq, D], k_cache [num_blocks, block_size, Hkv, D], block_tables "
                         f"[B, max_blocks]; got {tuple(q.shape)}, {tuple(k_cache.shape)}, {tuple(block_tables.shape)}")
    B, Hq, D = q.shape
    # The longest context the table can address: known on the host, with no device sync.
    nk = max(1, block_tables.shape[1] * k_cache.shape[1])
    kv = _dtype_name(k_cache)
    return Problem("paged_attention", B, Hq, k_cache.shape[2], 1, nk, D, _dtype_name(q), page=k_cache.shape[1],
                   kv_dtype=kv if kv in KV_DTYPES else None)


def tuned_config(problem: Problem) -> dict:
    """The config the dispatcher runs for a problem of any registered kernel, a user's own included
    (tunebench.kernel_protocol): the exact winner of its bucket, a safe transfer, or DEFAULT. Cached per problem,
    so a kernel's own wrapper pays one dict lookup per call: ``launch(..., config=tunebench.tuned_config(p))``."""
    return _DISPATCHER.config_for(("config", problem), lambda: _DISPATCHER.choose(problem).config)


_LAUNCH: dict[str, object] = {}


def _launcher(kernel: str):
    """The kernel module's launch, looked up once: a warm call should cost one dict lookup, not an importlib call."""
    launch = _LAUNCH.get(kernel)
    if launch is None:
        launch = _LAUNCH[kernel] = kernel_module(kernel).launch
    return launch


def _variant_kernel(variant: str) -> str | None:
    """The kernel a variant forces, or None for "auto"."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {variant!r}")
    return VARIANTS[variant]


def _unregistered(kernel: str) -> str | None:
    """Why a kernel is not registered here (flash_v3 off Hopper, in the interpreter), or None."""
    try:
        require_kernels([kernel])
        return None
    except KeyError as e:
        return str(e.args[0])


def _refusal(kernel: str, q, k, v) -> str | None:
    """Why an auto candidate cannot take these inputs here, or None."""
    if kernel == AUTO_KERNELS[-1]:
        return None
    return _unregistered(kernel) or kernel_module(kernel).refusal(q, k, v)


def auto_kernel(q, k, v, causal: bool, captured: bool = False) -> tuple[str, str]:
    """(kernel, why) for variant="auto": of AUTO_KERNELS that can take these inputs here, the first whose exact winner
    for the call's bucket (one keep() admits) was timed beside the fallback kernel's config when it was tuned (its
    speedup_vs_peer: tune/confirm.py) decides; else the two winners' times from their own runs, the fallback kernel
    where it alone has one, or neither has, or the other kernel's was never timed beside it; and in an eager call (not
    ``captured`` into a CUDA graph) the fallback where the other's winner is under registry.EAGER_MIN_MS: all by
    registry.replacement_runs."""
    times, untimed, skipped = {}, [], []
    for kernel in AUTO_KERNELS:
        reason = _refusal(kernel, q, k, v)
        if reason:
            skipped.append(f"{kernel} cannot run it ({reason})")
            continue
        problem = _dense_problem(kernel, q, k, causal)
        module = kernel_module(kernel)
        # A winner keep() now rejects is not what Dispatcher.choose would run (it falls back to DEFAULT): not compared.
        admits = lambda config: module.keep(config, problem) is None  # noqa: E731 - problem/module of this turn
        ms = _DISPATCHER.winners.exact_ms(problem, admits)
        versus = _DISPATCHER.winners.exact_versus_peer(problem, admits) if kernel != AUTO_KERNELS[-1] else None
        if versus is not None:
            # Measured head to head in one re-timing: this settles it, whatever the two winners' times from their
            # own runs say.
            fallback = AUTO_KERNELS[-1]
            chosen = kernel if replacement_runs(versus, ms, None, captured) else fallback
            why = (f"{kernel}'s winner for this bucket was timed at {versus:.2f}x {fallback}'s config beside it when "
                   f"it was tuned")
            if replacement_runs(versus, ms, None, captured=True) and chosen != kernel:
                why += _host_bound(kernel, ms, fallback)
            elif chosen != kernel:
                why += f", so {fallback} runs"
            return chosen, "; ".join([why] + skipped)
        if ms is not None:
            times[kernel] = ms
        else:
            untimed.append(kernel)
    # No head-to-head figure: registry's rule on the two winners' own times, where they have them.
    fallback = AUTO_KERNELS[-1]
    replacing = next((kernel for kernel in AUTO_KERNELS[:-1] if kernel in times), None)
    kernel = replacing if replacing and replacement_runs(None, times[replacing], times.get(fallback), captured) \
        else fallback
    if replacing and kernel != replacing and replacement_runs(None, times[replacing], times.get(fallback), True):
        why = f"{replacing}'s winner for this bucket ({times[replacing]:.4g} ms) is faster" + _host_bound(
            replacing, times[replacing], fallback)
    elif len(times) > 1:
        others = ", ".join(f"{other} {t:.4g} ms" for other, t in times.items() if other != kernel)
        why = (f"the fastest tuned winner for this bucket ({times[kernel]:.4g} ms; {others}), by times from their own "
               f"runs (`tunebench tune --replace` on this GPU times them side by side)")
    elif replacing:
        why = (f"{replacing}'s winner for this bucket ({times[replacing]:.4g} ms) was never timed beside {fallback}'s "
               f"config, so {fallback} runs, whose DEFAULT it may not beat (`tunebench tune --replace` on this GPU "
               f"tunes both and times them side by side)")
    elif times:
        why = f"the only tuned winner for this bucket ({times[kernel]:.4g} ms)" + "".join(
            f"; {other} has no winner it can run here, so it was not compared (`tunebench tune --replace` on this "
            f"GPU tunes both and times them side by side)" for other in untimed)
    else:
        why = "no kernel has an exact winner for this bucket, so the one that runs every shape"
    return kernel, "; ".join([why] + skipped)


def _host_bound(kernel: str, ms: float, fallback: str) -> str:
    return (f", but at {ms * 1e3:.0f} us on the GPU, under {EAGER_MIN_MS * 1e3:.0f} us, an eager {kernel} call waits "
            f"on its launch's host time, so {fallback} runs ({kernel} runs inside a CUDA graph capture)")


_AUTO_ALONE: list[bool] = []


def _auto_alone() -> bool:
    """Whether no auto candidate but the fallback is registered on this machine (flash_v3 off Hopper, in the
    interpreter): then variant="auto" is the fallback for every call, with no per-call key (~0.8 us) to build."""
    if not _AUTO_ALONE:
        _AUTO_ALONE.append(all(_unregistered(k) for k in AUTO_KERNELS[:-1]))
    return _AUTO_ALONE[0]


def _auto_key(q, k, v, causal: bool, captured: bool) -> tuple:
    # flash_v3's TMA needs 16-byte aligned bases and strides: a later call with other strides may be refused. An eager
    # call and one captured into a CUDA graph may choose differently (registry.EAGER_MIN_MS).
    return ("auto", q.shape, k.shape, q.dtype, causal, q.stride(), k.stride(), v.stride(),
            q.data_ptr() % 16, k.data_ptr() % 16, v.data_ptr() % 16, captured)


# The input rule (kernels/_launch.py check_call) is the launch's: each kernel's launch refuses inputs that require
# grad, bf16 under the interpreter and non-tensors on every call. Here, only an input that is not a tensor reaches
# check_call, when reading its shape for the key fails, so that it is named rather than an AttributeError.
def _flash_eager(q, k, v, causal: bool, scale: Optional[float], variant: str) -> torch.Tensor:
    kernel = _variant_kernel(variant)
    try:
        shape = (q.shape, k.shape, q.dtype, causal)
        if kernel is None:
            if _auto_alone():
                kernel = AUTO_KERNELS[-1]
            else:
                captured = q.is_cuda and torch.cuda.is_current_stream_capturing()
                kernel = _DISPATCHER.config_for(_auto_key(q, k, v, causal, captured),
                                                lambda: auto_kernel(q, k, v, causal, captured)[0])
    except AttributeError:
        check_call(q=q, k=k, v=v)
        raise
    key = (kernel, *shape)
    recorder = record.active()
    if recorder is not None:
        recorder.count(key, lambda: _dense_problem(kernel, q, k, causal))
    config = _DISPATCHER.config_for(key, lambda: _DISPATCHER.choose(_dense_problem(kernel, q, k, causal)).config)
    return _launcher(kernel)(q, k, v, config=config, causal=causal, scale=scale)


def _paged_eager(q, k_cache, v_cache, block_tables, context_lens, scale: Optional[float], k_scale=None,
                 v_scale=None, check: bool = False) -> torch.Tensor:
    try:
        key = ("paged_attention", q.shape, k_cache.shape, block_tables.shape, q.dtype, k_cache.dtype)
    except AttributeError:
        check_call(q=q, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables, context_lens=context_lens)
        raise
    recorder = record.active()
    if recorder is not None:
        recorder.count(key, lambda: _paged_problem(q, k_cache, block_tables))

    config = _DISPATCHER.config_for(key, lambda: _DISPATCHER.choose(_paged_problem(q, k_cache, block_tables)).config)
    return _launcher("paged_attention")(q, k_cache, v_cache, block_tables, context_lens, config=config, scale=scale,
                                        k_scale=k_scale, v_scale=v_scale, check=check or ENV_CHECK)


# torch.compile sees the kernels as opaque custom ops (fullgraph works); eager calls skip the op layer's overhead.
@torch.library.custom_op("tunebench::flash_attention", mutates_args=())
def _flash_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: Optional[float],
              variant: str) -> torch.Tensor:
    return _flash_eager(q, k, v, causal, scale, variant)


@_flash_op.register_fake
def _(q, k, v, causal, scale, variant):
    return q.new_empty(q.shape)


# An fp8 cache's scales reach the op as a tensor or a float (its schema has no union): the unused one is None.
@torch.library.custom_op("tunebench::paged_attention", mutates_args=())
def _paged_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
              context_lens: torch.Tensor, scale: Optional[float], k_scale: Optional[torch.Tensor] = None,
              v_scale: Optional[torch.Tensor] = None, k_scale_value: Optional[float] = None,
              v_scale_value: Optional[float] = None, check: bool = False) -> torch.Tensor:
    k_scale = k_scale_value if k_scale is None else k_scale
    v_scale = v_scale_value if v_scale is None else v_scale
    return _paged_eager(q, k_cache, v_cache, block_tables, context_lens, scale, k_scale, v_scale, check)


@_paged_op.register_fake
def _(q, k_cache, v_cache, block_tables, context_lens, scale, k_scale=None, v_scale=None, k_scale_value=None,
      v_scale_value=None, check=False):
    return q.new_empty(q.shape)


def _tensor_or_value(scale):
    """(tensor, None) or (None, float) for the op's schema; anything else goes on to the launch's checks."""
    if isinstance(scale, torch.Tensor) or scale is None:
        return scale, None
    return None, scale


def flash_attention(q, k, v, causal: bool = False, scale: float | None = None, variant: str = "auto") -> torch.Tensor:
    """Tuned FlashAttention forward.

    q: [B, Hq, Nq, D]; k, v: [B, Hkv, Nk, D] (SDPA's layout, any strides; Hq a multiple of Hkv). Returns
    [B, Hq, Nq, D] in q's dtype. causal masks bottom-right (FlashAttention >= 2.1).
    variant "auto" runs, of flash_v3 (Hopper only) and flash_v2, flash_v3 where its exact winner for the call's
    bucket was timed faster than flash_v2's config beside it when tuned, else the one whose exact winner was tuned
    fastest on this GPU when both have one, else flash_v2; in an eager call (not captured into a CUDA graph) flash_v2
    also where flash_v3's winner takes under registry.EAGER_MIN_MS, below which its launch's host time decides
    (`tunebench.explain` says which and why); "v2", "v3" and "v1" (the FlashAttention-1 schedule) force one.
    """
    if torch.compiler.is_compiling():
        return _flash_op(q, k, v, causal, scale, variant)
    return _flash_eager(q, k, v, causal, scale, variant)


def paged_attention(q, k_cache, v_cache, block_tables, context_lens, scale: float | None = None, k_scale=None,
                    v_scale=None, *, check: bool = False) -> torch.Tensor:
    """Tuned decode attention over a paged KV cache.

    q: [B, Hq, D]; k_cache, v_cache: [num_blocks, block_size, Hkv, D]; block_tables: int32 [B, max_blocks];
    context_lens: int32 [B]. Any strides, the integer tensors' included. Returns [B, Hq, D] in q's dtype.

    Bad values are safe by construction: the kernel never reads out of bounds. A sequence whose context length is
    negative or above max_blocks x block_size, or whose first ceil(length / block_size) table entries hold a block id
    outside [0, num_blocks), gets NaN in its output rows and no crash; the other sequences are computed as usual.
    check=True (or TUNEBENCH_CHECK=1 in the environment for the whole program) reads the kernel's error flags back
    after the launch and raises a ValueError naming the sequence and its bad value (block id, or length vs the
    table's capacity). It costs a device sync, so it is off by default and cannot run inside a CUDA graph.

    An fp8 cache (float8_e4m3fn or float8_e5m2, as vLLM's kv_cache_dtype="fp8") needs k_scale and v_scale: real
    value = stored value * scale; each a positive float, a 0-d or 1-element float32 tensor, or float32 [Hkv] (per KV
    head). It runs the config tuned for that cache's dtype (an fp8 cache has buckets of its own). Write such a cache
    with tunebench.kernels.cache_write.launch(..., k_scale=, v_scale=).
    """
    if torch.compiler.is_compiling():
        (ks, ks_value), (vs, vs_value) = _tensor_or_value(k_scale), _tensor_or_value(v_scale)
        return _paged_op(q, k_cache, v_cache, block_tables, context_lens, scale, ks, vs, ks_value, vs_value, check)
    return _paged_eager(q, k_cache, v_cache, block_tables, context_lens, scale, k_scale, v_scale, check)


def _paged_prefill_problem(q, k_cache, block_tables, cu_seqlens_q) -> Problem:
    """The bucketing Problem of a ragged call, from shapes alone (no device sync): B sequences, Nq their mean number
    of new tokens (rounded up, at most Nk), Nk the longest context the table addresses; its page is the cache's."""
    if q.dim() != 3 or k_cache.dim() != 4 or block_tables.dim() != 2 or cu_seqlens_q.dim() != 1:
        raise ValueError(f"expected q [total_q, Hq, D], k_cache [num_blocks, block_size, Hkv, D], block_tables "
                         f"[B, max_blocks], cu_seqlens_q [B + 1]; got {tuple(q.shape)}, {tuple(k_cache.shape)}, "
                         f"{tuple(block_tables.shape)}, {tuple(cu_seqlens_q.shape)}")
    total_q, Hq, D = q.shape
    B = max(1, cu_seqlens_q.shape[0] - 1)
    nk = max(1, block_tables.shape[1] * k_cache.shape[1])
    nq = min(nk, max(1, -(-total_q // B)))
    if k_cache.shape[1] not in PAGES:
        raise ValueError(f"k_cache's block size (shape[1]) must be one of shapes.PAGES {PAGES}, got {k_cache.shape[1]}")
    return Problem("paged_prefill", B, Hq, k_cache.shape[2], nq, nk, D, _dtype_name(q), True, page=k_cache.shape[1])


def _prefill_eager(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale: Optional[float],
                   check_values: bool, check: bool = False) -> torch.Tensor:
    try:
        key = ("paged_prefill", q.shape, k_cache.shape, block_tables.shape, cu_seqlens_q.shape, q.dtype)
    except AttributeError:
        check_call(q=q, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables, cu_seqlens_q=cu_seqlens_q,
                   context_lens=context_lens)
        raise
    recorder = record.active()

    def problem():
        return _paged_prefill_problem(q, k_cache, block_tables, cu_seqlens_q)
    if recorder is not None:
        recorder.count(key, problem)
    def resolve():
        # The inputs are checked before their shape becomes a Problem, so that a bad one is named as such.
        kernel_module("paged_prefill").check_inputs(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens,
                                                    None, scale)
        return _DISPATCHER.choose(problem()).config
    config = _DISPATCHER.config_for(key, resolve)
    return _launcher("paged_prefill")(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, config=config,
                                      scale=scale, check_values=check_values, check=check or ENV_CHECK)


@torch.library.custom_op("tunebench::paged_prefill", mutates_args=())
def _prefill_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor, scale: Optional[float],
                check_values: bool, check: bool = False) -> torch.Tensor:
    return _prefill_eager(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale, check_values, check)


@_prefill_op.register_fake
def _(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale, check_values, check=False):
    return q.new_empty(q.shape)


def paged_prefill(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale: float | None = None, *,
                  check_values: bool = True, check: bool = False) -> torch.Tensor:
    """Tuned varlen attention over a paged KV cache: chunked prefill, cached prefixes, decode rows, in one launch.

    q: [total_q, Hq, D], the new tokens of B sequences packed, sequence b's at rows cu_seqlens_q[b] ..
    cu_seqlens_q[b + 1] - 1 (int32 [B + 1]); k_cache, v_cache: [num_blocks, block_size, Hkv, D] with block_size in
    shapes.PAGES, the new tokens' K/V already written; block_tables: int32 [B, max_blocks]; context_lens: int32 [B],
    cached plus new tokens. Causal, aligned bottom-right per sequence. Returns [total_q, Hq, D] in q's dtype.
    check_values=False skips the check of cu_seqlens_q and context_lens (a device sync), e.g. under CUDA graphs.

    Bad values are safe by construction, checked or not: the kernel never reads or writes out of bounds. A sequence
    whose context length is below its new tokens or above max_blocks x block_size, or whose table holds a block id
    outside [0, num_blocks) among the entries it reads, gets NaN rows (a bad block id: the rows that read it, every
    row whose causal keys reach it; a row whose keys end before it is correct or NaN); one whose cu_seqlens_q
    entries are out of order or outside [0, total_q] writes no row; the other sequences are computed as usual.
    check=True (or TUNEBENCH_CHECK=1 for the whole program) reads the kernel's error flags back after the launch (a
    device sync) and raises a ValueError naming the sequence and its bad value.

    A function of its own, not paged_attention with an optional cu_seqlens_q: q's first dimension means tokens
    here and sequences there, the kernels differ (split-K decode vs tiles of tokens x heads), and each is tuned and
    bucketed as its own Problem; paged_attention's signature and torch.compile op stay as they were.
    """
    if torch.compiler.is_compiling():
        return _prefill_op(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale, check_values, check)
    return _prefill_eager(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale, check_values, check)


def explain(q, k=None, *, causal: bool = False, variant: str = "auto", block_tables=None, v=None) -> str:
    """Says which config a call with these inputs would launch, and why. Pass a Problem, or the call's tensors:
    (q, k) for flash_attention (v too where its strides differ from k's, for variant="auto"), (q, k_cache,
    block_tables=...) for paged_attention."""
    kernel_why = ""
    if isinstance(q, Problem):
        problem = q
    elif block_tables is not None:
        problem = _paged_problem(q, k, block_tables)
    else:
        kernel = _variant_kernel(variant)
        if kernel is None:
            kernel, why = auto_kernel(q, k, k if v is None else v, causal)
            kernel_why = f" [auto: {kernel}, {why}]"
        problem = _dense_problem(kernel, q, k, causal)
    choice = _DISPATCHER.choose(problem)
    return f"{problem.label()} -> {choice.config}: {choice.why}{kernel_why}"


def tuned_paged_block_size(kv_heads: int, head_dim: int, dtype) -> int | None:
    """The KV page size recommended for this geometry from this GPU's paged winners (runtime/pages.py: predicted
    decode time over the tuned decode buckets, weighed with the waste of last blocks), or None when nothing is tuned."""
    from .pages import recommend
    dtype = dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
    return recommend(_DISPATCHER.winners, kv_heads, head_dim, dtype).pick
