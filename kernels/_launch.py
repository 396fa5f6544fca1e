"""What every kernel's launch and keep repeat: input and config checks, head-dim padding, the device's shared memory,
the interpreter rule, the grid limit and log2(e).

Each check raises TypeError for a value of the wrong kind and ValueError for a value of the right kind that is out of
range, with a message that names the argument. Like the kernels, this module imports only torch and triton.
"""
import math
import weakref
from functools import lru_cache

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # exp(x) == exp2(x * log2(e)): scores are scaled into log2 units for exp2
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)     # KV cache formats, with a caller's scale (vLLM's "fp8")
ELEMENT_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256
MAX_GRID_YZ = 65535          # CUDA's limit on the second and third grid axes
NUM_WARPS = (1, 2, 4, 8, 16)
H100_SHARED_MEMORY = 227 * 1024  # the opt-in shared memory per block of an H100/H200, assumed without a GPU
# Codes the paged kernels write to their int32 error buffer (one entry per sequence, or per token for cache_write)
# when compiled with CHECK; 0 means none. raise_paged_errors turns them into a ValueError.
ERR_LENGTH = tl.constexpr(1)       # a context length outside [0, table width x page size] (or below its new tokens)
ERR_BLOCK_ID = tl.constexpr(2)     # a block id the sequence reads outside [0, num_blocks)
ERR_QUERY_ROWS = tl.constexpr(3)   # cu_seqlens_q entries out of order or outside [0, total_q]
ERR_SLOT = tl.constexpr(4)         # a cache_write slot past the cache


def interpreting() -> bool:
    """Whether kernels run in Triton's CPU interpreter. Asks Triton, so the rule is Triton's own reading of
    TRITON_INTERPRET (triton 3.6: 1, true, on, yes or y in any case mean on; anything else, or unset, means off)."""
    return bool(triton.knobs.runtime.interpret)


def padded_head_dim(d: int) -> int:
    """The head dim the kernels' tiles use: the next power of two, at least 16 (tl.dot's smallest size)."""
    return max(16, triton.next_power_of_2(d))


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 dots run exact ("ieee", no TF32) so fp32 is as accurate as naive fp32 torch; 16-bit inputs ignore it."""
    return "ieee" if dtype == torch.float32 else "tf32"


def qk_scale(scale, D: int) -> float:
    """The softmax scale in log2 units (for exp2); scale None means 1/sqrt(D)."""
    return (1.0 / math.sqrt(D) if scale is None else float(scale)) * LOG2E


def shared_memory_limit() -> int:
    """The opt-in shared memory per block of the current CUDA device; without one (or in the interpreter), an
    H100/H200's 227 KiB."""
    if torch.cuda.is_available() and not interpreting():
        return _device_shared_memory(torch.cuda.current_device())
    return H100_SHARED_MEMORY


@lru_cache(maxsize=None)
def _device_shared_memory(index: int) -> int:
    return torch.cuda.get_device_properties(index).shared_memory_per_block_optin


def head_dim_unsupported(D: int) -> str | None:
    """Why the kernels cannot run head dim D, or None."""
    if not MIN_HEAD_DIM <= D <= MAX_HEAD_DIM:
        return f"head dim D must be in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}], got {D}"
    return None


# -- input checks ----------------------------------------------------------------------------------------------------

def check_tensor(name: str, t, rank: int, layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != rank:
        raise ValueError(f"{name} must be {rank}-d {layout}, got shape {tuple(t.shape)}")


def check_float_dtype(name: str, t: torch.Tensor) -> None:
    if t.dtype not in DTYPES:
        raise TypeError(f"{name} dtype must be float16, bfloat16 or float32, got {t.dtype}")


def check_like(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor, dtype: bool = True) -> None:
    """t shares ref's device (and, if dtype, its dtype)."""
    if dtype and t.dtype != ref.dtype:
        raise TypeError(f"{name} dtype {t.dtype} must match {ref_name} dtype {ref.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; all tensors must share one "
                         f"device")


def check_same_shape(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.shape != ref.shape:
        raise ValueError(f"{name} shape {tuple(t.shape)} must equal {ref_name} shape {tuple(ref.shape)}")


def check_head_dim(D: int) -> None:
    reason = head_dim_unsupported(D)
    if reason:
        raise ValueError(reason)


def check_group(Hq: int, Hkv: int, kv_name: str) -> None:
    if Hkv < 1 or Hq % Hkv:
        raise ValueError(f"q heads Hq={Hq} must be a multiple of {kv_name} heads Hkv={Hkv}")


def check_grid(what: str, size: int, hint: str = "") -> None:
    if size > MAX_GRID_YZ:
        raise ValueError(f"{what} = {size} exceeds the grid limit {MAX_GRID_YZ}{hint}")


def check_runnable(name: str, t: torch.Tensor) -> None:
    """Triton runs CUDA tensors; CPU tensors only in its interpreter."""
    if t.device.type != "cuda" and not interpreting():
        raise ValueError(f"{name} is on {t.device}: Triton needs CUDA tensors (CPU tensors only under "
                         f"TRITON_INTERPRET=1, set before importing the kernel, for the CPU interpreter)")


def check_scale(scale) -> None:
    if isinstance(scale, bool) or not (scale is None or isinstance(scale, (int, float))):
        raise TypeError(f"scale must be a number or None, got {type(scale).__name__}")
    if scale is not None and not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be finite and > 0, got {scale!r}")


def check_call(**tensors) -> None:
    """What every public entry point checks first, before it reads a shape: each named input is a tensor, none asks
    for a gradient (check_forward_only), and none is bfloat16 under the interpreter (check_interpretable)."""
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    check_forward_only(**tensors)
    for name, t in tensors.items():
        check_interpretable(name, t)


def check_forward_only(**tensors) -> None:
    """The kernels have no backward: an input that requires grad (with grad enabled) would lose its gradient in
    silence, so it is refused."""
    if not torch.is_grad_enabled():
        return
    for name, t in tensors.items():
        if t.requires_grad:
            raise ValueError(f"{name} requires grad, but tunebench's kernels are forward only: no autograd (call "
                             f"under torch.no_grad() or torch.inference_mode(), or pass {name}.detach())")


def check_interpretable(name: str, t: torch.Tensor) -> None:
    """bfloat16 attention gives garbage under the Triton interpreter (3.6 and 3.9: errors ~1e8), so it is refused
    there rather than computed wrong; a copy (the cache write) is exact and does not call this."""
    if t.dtype == torch.bfloat16 and interpreting():
        raise TypeError(f"{name} is bfloat16, which the Triton {triton.__version__} interpreter computes wrongly: "
                        f"use float16 or float32 on the CPU, or run bfloat16 on a GPU")


def check_kv_cache_dtypes(k_cache: torch.Tensor, v_cache: torch.Tensor, k_scale, v_scale) -> bool:
    """Whether the caches are fp8 (then both need a scale) or of another dtype (then neither takes one); k_cache and
    v_cache always share a dtype."""
    if v_cache.dtype != k_cache.dtype:
        raise TypeError(f"v_cache dtype {v_cache.dtype} must match k_cache dtype {k_cache.dtype}")
    fp8 = k_cache.dtype in FP8_DTYPES
    for name, scale in (("k_scale", k_scale), ("v_scale", v_scale)):
        if fp8 and scale is None:
            raise TypeError(f"{name} is required for an fp8 cache ({k_cache.dtype}): pass the scale the cache was "
                            f"quantised with (real value = stored value * scale)")
        if not fp8 and scale is not None:
            raise TypeError(f"{name} is given but the cache is {k_cache.dtype}: scales apply only to an fp8 cache "
                            f"(float8_e4m3fn or float8_e5m2)")
    return fp8


def kv_scale(name: str, scale, kv_heads: int, device) -> tuple[torch.Tensor, int]:
    """(a float32 tensor on `device`, the stride between KV heads: 0 for one scale for all) for an fp8 cache's
    scale: a positive finite float, a 0-d or 1-element float32 tensor, or a float32 tensor [kv_heads]."""
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"{name} must be finite and > 0, got {scale!r}")
        # A fill kernel, not a host-to-device copy: no sync, and capturable in a CUDA graph.
        return torch.full((1,), float(scale), dtype=torch.float32, device=device), 0
    if not isinstance(scale, torch.Tensor):
        raise TypeError(f"{name} must be a float or a float32 tensor, got {type(scale).__name__}")
    if scale.dtype != torch.float32:
        raise TypeError(f"{name} must be float32, got {scale.dtype}")
    if scale.device != torch.device(device):
        raise ValueError(f"{name} is on {scale.device} but the cache is on {device}; all tensors must share one device")
    if scale.dim() <= 1 and scale.numel() == 1:
        stride = 0
    elif scale.dim() == 1 and scale.shape[0] == kv_heads:
        stride = scale.stride(0)
    else:
        raise ValueError(f"{name} must be 0-d or [1] (per tensor) or [Hkv] = [{kv_heads}] (per KV head), got shape "
                         f"{tuple(scale.shape)}")
    _check_scale_values(name, scale)
    return scale, stride


# id(scale tensor) -> its version counter when its values were last checked. Reading a GPU tensor's values costs a
# device sync, so a scale is read once, and again only after an in-place write (which bumps its version); the entry
# goes when the tensor does, before its id can be reused.
_CHECKED_SCALES: dict[int, int] = {}


def _check_scale_values(name: str, scale: torch.Tensor) -> None:
    if _CHECKED_SCALES.get(id(scale)) == scale._version:
        return
    if scale.is_cuda and torch.cuda.is_current_stream_capturing():
        return                                          # no sync possible inside a CUDA graph capture
    bad = ~(torch.isfinite(scale) & (scale > 0))
    if bool(bad.any()):
        raise ValueError(f"{name} must be finite and > 0 everywhere, got {scale.flatten().tolist()[:8]}")
    if id(scale) not in _CHECKED_SCALES:
        weakref.finalize(scale, _CHECKED_SCALES.pop, id(scale), None)
    _CHECKED_SCALES[id(scale)] = scale._version


def check_causal(causal) -> None:
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")


def check_out(out, ref_name: str, ref: torch.Tensor) -> None:
    """out, when given, has ref's shape, dtype and device."""
    if out is None:
        return
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor or None, got {type(out).__name__}")
    check_same_shape("out", out, ref_name, ref)
    check_like("out", out, ref_name, ref)


def check_dense_inputs(q, k, v, out, causal, scale) -> None:
    """The inputs of a dense attention forward: q [B, Hq, Nq, D], k and v [B, Hkv, Nk, D], out None or like q."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, 4, "[B, H, N, D]")
        check_float_dtype(name, t)
    check_like("k", k, "q", q)
    check_like("v", v, "q", q)
    check_same_shape("k", k, "v", v)
    B, Hq, Nq, D = q.shape
    if k.shape[0] != B:
        raise ValueError(f"k/v batch size {k.shape[0]} must equal q batch size {B}")
    if k.shape[3] != D:
        raise ValueError(f"k/v head dim {k.shape[3]} must equal q head dim {D}")
    check_head_dim(D)
    check_group(Hq, k.shape[1], "k/v")
    check_runnable("q", q)
    check_interpretable("q", q)
    check_forward_only(q=q, k=k, v=v)
    check_causal(causal)
    check_scale(scale)
    check_out(out, "q", q)


# -- config checks ---------------------------------------------------------------------------------------------------

def check_config(config, space: dict, **powers_of_two: int) -> dict:
    """config has exactly SPACE's keys; each key named in powers_of_two is a power of two >= its value; num_warps and
    (if the space has it) num_stages are valid. Returns config."""
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict with keys {sorted(space)}, got {type(config).__name__}")
    unknown, missing = set(config) - set(space), set(space) - set(config)
    if unknown:
        raise ValueError(f"config has unknown keys {sorted(unknown)}; expected {sorted(space)}")
    if missing:
        raise ValueError(f"config is missing keys {sorted(missing)}; expected {sorted(space)}")
    for name, low in powers_of_two.items():
        value = config[name]
        if not _is_int(value) or value < low or value & (value - 1):
            raise ValueError(f"config[{name!r}] must be a power of two >= {low}, got {value!r}")
    if not _is_int(config["num_warps"]) or config["num_warps"] not in NUM_WARPS:
        raise ValueError(f"config['num_warps'] must be one of {NUM_WARPS}, got {config['num_warps']!r}")
    if "num_stages" in space and (not _is_int(config["num_stages"]) or config["num_stages"] < 1):
        raise ValueError(f"config['num_stages'] must be an int >= 1, got {config['num_stages']!r}")
    return config


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_paged_cache(q, k_cache, v_cache, block_tables, **int32_tensors) -> None:
    """The paged cache q reads (q's last two dims [Hq, D]): k_cache and v_cache [num_blocks, block_size, Hkv, D] of
    one shape, q's dtype and head dim, a power-of-two block size, Hq a multiple of Hkv; block_tables
    [B, max_blocks >= 1] and the named integer tensors int32. Ranks and devices are checked before (check_tensor,
    check_like)."""
    check_like("k_cache", k_cache, "q", q)
    check_like("v_cache", v_cache, "q", q)
    for name, t in (("block_tables", block_tables), *int32_tensors.items()):
        if t.dtype != torch.int32:
            raise TypeError(f"{name} must be int32, got {t.dtype}")
    check_same_shape("k_cache", k_cache, "v_cache", v_cache)
    page, D = k_cache.shape[1], q.shape[-1]
    if page < 1 or page & (page - 1):
        raise ValueError(f"k_cache's block size (shape[1]) must be a power of two, got {page}")
    if k_cache.shape[3] != D:
        raise ValueError(f"k_cache/v_cache head dim {k_cache.shape[3]} must equal q head dim {D}")
    check_head_dim(D)
    check_group(q.shape[-2], k_cache.shape[2], "cache")
    if block_tables.shape[1] < 1:
        raise ValueError("block_tables must have at least one column (max_blocks >= 1)")


# -- bad values in the paged kernels: block ids masked in the kernels, error flags read back with check=True ------

@triton.jit
def tile_blocks(table, n0, end, offs_n, stride_btn, PAGE: tl.constexpr, BLOCK_N: tl.constexpr):
    """Physical block of each token of the tile that starts at n0 (0 for tokens at or past `end`, whose loads are
    masked). When BLOCK_N <= PAGE the tile lies inside one page (tiles start at multiples of BLOCK_N), so one table
    entry is read."""
    if BLOCK_N <= PAGE:
        blk = tl.load(table + (n0 // PAGE) * stride_btn, mask=n0 < end, other=0)
    else:
        tok = n0 + offs_n
        blk = tl.load(table + (tok // PAGE) * stride_btn, mask=tok < end, other=0)
    return blk


@triton.jit
def checked_length(CL, b, stride_cl, capacity, SAFE: tl.constexpr):
    """(sequence b's context length, whether it lies in [0, capacity]); with SAFE a length outside reads as 0, so
    nothing is read for it (the table's entries past its width would be another row's, or out of bounds)."""
    ctx = tl.load(CL + b.to(tl.int64) * stride_cl)
    ok = (ctx >= 0) & (ctx <= capacity)
    if SAFE:
        ctx = tl.where(ok, ctx, 0)
    return ctx, ok


@triton.jit
def no_bad_blocks(offs_n, PAGE: tl.constexpr, BLOCK_N: tl.constexpr):
    """checked_blocks' starting `bad`: False, shaped like a tile's block ids (a scalar when a tile lies in one page,
    so that the loop carries one bit, else one per token)."""
    if BLOCK_N <= PAGE:
        bad = tl.full([], 0, tl.int1)
    else:
        bad = offs_n < 0
    return bad


@triton.jit
def any_bad_block(bad, PAGE: tl.constexpr, BLOCK_N: tl.constexpr):
    """Whether checked_blocks saw a bad block id, from its `bad`."""
    if BLOCK_N <= PAGE:
        seen = bad
    else:
        seen = tl.max(bad.to(tl.int32), 0) > 0
    return seen


@triton.jit
def checked_blocks(blk, num_blocks, bad, SAFE: tl.constexpr):
    """(blk with ids outside [0, num_blocks) replaced by block 0, bad | which were outside). Two compares and one
    select per table entry (a scalar when the tile lies in one page): the K/V loads keep their masks as they were,
    and a bad id reads block 0, in bounds, whose result the caller replaces with NaN."""
    if SAFE:
        ok = (blk >= 0) & (blk < num_blocks)
        blk = tl.where(ok, blk, 0)
        bad = bad | (ok == 0)
    return blk, bad


def raise_paged_errors(errors: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor, num_blocks: int,
                       page: int, cu_seqlens_q: torch.Tensor | None = None, total_q: int | None = None) -> None:
    """ValueError naming each sequence whose error flag the kernel set (errors: int32 [B], the ERR_* codes) and its
    bad value, read back to the host (a device sync); nothing when no flag is set."""
    codes = errors.tolist()
    flagged = [b for b, code in enumerate(codes) if code]
    if not flagged:
        return
    lens = context_lens.tolist()
    cu = cu_seqlens_q.tolist() if cu_seqlens_q is not None else None
    capacity = block_tables.shape[1] * page
    lines = [_paged_error(b, codes[b], lens[b], block_tables[b].tolist(), num_blocks, page, capacity, cu, total_q)
             for b in flagged[:8]]
    more = f" (and {len(flagged) - 8} more)" if len(flagged) > 8 else ""
    raise ValueError(f"bad paged inputs in {len(flagged)} of {len(codes)} sequences{more}; their outputs are NaN:\n"
                     + "\n".join(lines))


def _paged_error(b: int, code: int, ctx: int, table: list, num_blocks: int, page: int, capacity: int,
                 cu: list | None, total_q: int | None) -> str:
    if code == ERR_QUERY_ROWS.value:
        return (f"sequence {b}: cu_seqlens_q[{b}]={cu[b]}, cu_seqlens_q[{b + 1}]={cu[b + 1]}: each sequence's "
                f"rows must satisfy 0 <= start <= end <= total_q={total_q}, from 0 to total_q")
    if code == ERR_LENGTH.value:
        if cu is not None and ctx < cu[b + 1] - cu[b]:
            return f"sequence {b}: context_lens[{b}]={ctx} is below its {cu[b + 1] - cu[b]} new tokens"
        if num_blocks == 0:
            return f"sequence {b}: context_lens[{b}]={ctx} but the cache has no blocks (num_blocks 0)"
        return (f"sequence {b}: context_lens[{b}]={ctx} is outside [0, {capacity}], the tokens block_tables "
                f"addresses (max_blocks {len(table)} x block_size {page})")
    pages = -(-min(max(ctx, 0), capacity) // page)
    bad = [(j, blk) for j, blk in enumerate(table[:pages]) if not 0 <= blk < num_blocks]
    if code == ERR_BLOCK_ID.value and bad:
        j, blk = bad[0]
        return (f"sequence {b}: block_tables[{b}, {j}]={blk} is outside [0, num_blocks={num_blocks}) "
                f"({len(bad)} bad ids among its first {pages} entries)")
    return f"sequence {b}: error code {code} (its values changed after the launch?)"
