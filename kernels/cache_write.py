"""Writes new tokens' K and V into their slots of a paged KV cache (the store half of paged decode).

- key, value [T, Hkv, D]: one row per new token (a decode step's batch, or a prompt's tokens flattened).
- k_cache, v_cache [num_blocks, block_size, Hkv, D], written in place.
- slot_mapping int32 or int64 [T]: token t goes to block slot // block_size, row slot % block_size (the slot the
  block allocator returns). A negative slot means "skip this token" (padding in a batch).
- Any strides on all tensors. fp16, bf16, fp32; head dims 16..256 (padded to a power of two and masked).
- One program per (tile of BLOCK_T tokens, KV head) copies a [BLOCK_T, D] tile of K and of V.
- fp8 cache (float8_e4m3fn or float8_e5m2, both caches the same) with k_scale and v_scale (a positive finite float, a
  0-d or 1-element float32 tensor, or float32 [Hkv]; see paged_attention): each value is quantised as key / scale
  (IEEE division in fp32), saturated to the format's largest finite value and rounded to nearest even. A NaN stays
  NaN on the GPU (Triton 3.6's interpreter writes it as 384). The rounding is done in fp32 arithmetic on the fp8
  grid before the cast, so the cast itself is exact: Triton 3.6's interpreter rounds fp32 -> fp8 half-up without
  carrying into the exponent (124.8 -> 64 in e4m3), and this keeps the CPU gate and the GPU's cvt.rn.satfinite on
  the same numbers. Without scales, key and the cache share a dtype (fp16, bf16, fp32).

Not supported: other dtype conversions, int8 caches, writing one token to several slots. A slot past the cache
(>= num_blocks x block_size) is not written: launch(..., check=True) says which (a device sync). Two tokens with the
same slot race.
"""
import math

import torch
import triton
import triton.language as tl

from ._launch import (ELEMENT_BYTES, ERR_SLOT, check_config, check_float_dtype, check_grid, check_head_dim,
                      check_kv_cache_dtypes, check_like, check_runnable, check_same_shape, check_tensor, kv_scale,
                      padded_head_dim)


@triton.jit
def _round_to_fp8(x, scale, FP8_MAX: tl.constexpr, MANTISSA: tl.constexpr, MIN_EXP: tl.constexpr):
    """x / scale (fp32), saturated to +-FP8_MAX and rounded to nearest even on the grid of an fp8 format with
    MANTISSA bits and smallest normal exponent MIN_EXP, all in exact fp32 arithmetic."""
    x = tl.math.div_rn(x, scale)
    sign = (x.to(tl.int32, bitcast=True) >> 31) << 31                  # x's sign bit alone (-0.0 stays -0.0)
    a = tl.minimum(tl.abs(x), FP8_MAX, propagate_nan=tl.PropagateNan.ALL)
    biased = a.to(tl.int32, bitcast=True) >> 23                        # exponent of a, biased by 127
    biased = tl.maximum(biased, MIN_EXP + 127)                         # subnormals step like the smallest normal
    step = ((biased - MANTISSA) << 23).to(tl.float32, bitcast=True)   # 2^(exponent - MANTISSA): the grid's spacing
    inv_step = ((254 + MANTISSA - biased) << 23).to(tl.float32, bitcast=True)
    v = a * inv_step                                                   # exact (a power of two), v < 2^(MANTISSA+1)
    low = tl.floor(v)
    frac = v - low
    up = (frac > 0.5) | ((frac == 0.5) & ((low.to(tl.int32) & 1) == 1))
    r = (low + up.to(tl.float32)) * step
    return (r.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def _cache_write(Key, Value, KC, VC, Slots, K_scale, V_scale, Err, T, block_size, num_slots,
                 stride_kt, stride_kh, stride_kd,
                 stride_vt, stride_vh, stride_vd,
                 stride_kcb, stride_kcs, stride_kch, stride_kcd,
                 stride_vcb, stride_vcs, stride_vch, stride_vcd,
                 stride_slot, stride_ksc, stride_vsc,
                 HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_T: tl.constexpr, KV_FP8: tl.constexpr,
                 FP8_MAX: tl.constexpr, MANTISSA: tl.constexpr, MIN_EXP: tl.constexpr, CHECK: tl.constexpr):
    toks = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    head = tl.program_id(1).to(tl.int64)
    offs_d = tl.arange(0, D_PAD)
    slot = tl.load(Slots + toks * stride_slot, mask=toks < T, other=-1).to(tl.int64)
    inside = slot < num_slots                                          # past the cache: not written (flagged)
    write = (slot >= 0) & inside                                       # negative: padding, skipped
    if CHECK:
        tl.store(Err + toks, ERR_SLOT, mask=(inside == 0) & (tl.program_id(1) == 0))
    slot = tl.where(write, slot, 0)
    blk = slot // block_size
    row = slot % block_size
    mask = write[:, None] & (offs_d[None, :] < HEAD_DIM)
    toks = toks.to(tl.int64)

    k = tl.load(Key + toks[:, None] * stride_kt + head * stride_kh + offs_d[None, :] * stride_kd, mask=mask)
    if KV_FP8:
        k = _round_to_fp8(k.to(tl.float32), tl.load(K_scale + head * stride_ksc), FP8_MAX, MANTISSA, MIN_EXP)
        k = k.to(KC.dtype.element_ty)
    k_dst = KC + blk[:, None] * stride_kcb + row[:, None] * stride_kcs + head * stride_kch + offs_d[None, :] * stride_kcd
    tl.store(k_dst, k, mask=mask)
    v = tl.load(Value + toks[:, None] * stride_vt + head * stride_vh + offs_d[None, :] * stride_vd, mask=mask)
    if KV_FP8:
        v = _round_to_fp8(v.to(tl.float32), tl.load(V_scale + head * stride_vsc), FP8_MAX, MANTISSA, MIN_EXP)
        v = v.to(VC.dtype.element_ty)
    v_dst = VC + blk[:, None] * stride_vcb + row[:, None] * stride_vcs + head * stride_vch + offs_d[None, :] * stride_vcd
    tl.store(v_dst, v, mask=mask)


def launch(key, value, k_cache, v_cache, slot_mapping, config=None, *, k_scale=None, v_scale=None, check=False):
    """k_cache[slot // block_size, slot % block_size] = key (and v_cache likewise) for every slot >= 0; into an fp8
    cache, quantised with k_scale and v_scale (required then, refused otherwise).

    Writes in place and returns (k_cache, v_cache). config None means DEFAULT. A slot at or past num_blocks x
    block_size is not written; check=True then raises a ValueError naming the token and its slot (reading the
    kernel's flags back: a device sync).
    """
    config = check_config(DEFAULT if config is None else config, SPACE, BLOCK_T=1)
    fp8 = _check_inputs(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    T, Hkv, D = key.shape
    k_scale, stride_ksc = kv_scale("k_scale", k_scale, Hkv, key.device) if fp8 else (None, 0)
    v_scale, stride_vsc = kv_scale("v_scale", v_scale, Hkv, key.device) if fp8 else (None, 0)
    if T == 0 or Hkv == 0:
        return k_cache, v_cache
    block_t = config["BLOCK_T"]
    fmt = torch.finfo(k_cache.dtype)
    errors = torch.zeros(T, dtype=torch.int32, device=key.device) if check else slot_mapping   # unused unless check
    _cache_write[(triton.cdiv(T, block_t), Hkv)](
        key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale, errors, T, k_cache.shape[1],
        k_cache.shape[0] * k_cache.shape[1],
        *key.stride(), *value.stride(), *k_cache.stride(), *v_cache.stride(), slot_mapping.stride(0),
        stride_ksc, stride_vsc,
        HEAD_DIM=D, D_PAD=padded_head_dim(D), BLOCK_T=block_t, KV_FP8=fp8,
        FP8_MAX=fmt.max if fp8 else 0.0, MANTISSA=round(-math.log2(fmt.eps)) if fp8 else 0,
        MIN_EXP=round(math.log2(fmt.smallest_normal)) if fp8 else 0, CHECK=check,
        num_warps=config["num_warps"],
    )
    if check:
        _raise_slot_errors(errors, slot_mapping, k_cache.shape[0], k_cache.shape[1])
    return k_cache, v_cache


def _raise_slot_errors(errors, slot_mapping, num_blocks: int, block_size: int) -> None:
    flagged = errors.nonzero().flatten().tolist()
    if flagged:
        slots = slot_mapping.tolist()
        named = ", ".join(f"slot_mapping[{t}]={slots[t]}" for t in flagged[:8])
        raise ValueError(f"{len(flagged)} of {len(slots)} tokens have a slot past the cache's num_blocks {num_blocks} "
                         f"x block_size {block_size} = {num_blocks * block_size} slots and were not written: {named}")


def _check_inputs(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale) -> bool:
    """Checks every input; returns whether the cache is fp8 (whose scales kv_scale checks at launch)."""
    cache_layout = "[num_blocks, block_size, Hkv, D]"
    for name, t, rank, layout in (("key", key, 3, "[T, Hkv, D]"), ("value", value, 3, "[T, Hkv, D]"),
                                  ("k_cache", k_cache, 4, cache_layout), ("v_cache", v_cache, 4, cache_layout),
                                  ("slot_mapping", slot_mapping, 1, "[T]")):
        check_tensor(name, t, rank, layout)
        check_like(name, t, "key", key, dtype=False)
    check_float_dtype("key", key)
    check_like("value", value, "key", key)
    fp8 = check_kv_cache_dtypes(k_cache, v_cache, k_scale, v_scale)
    if not fp8:
        check_like("k_cache", k_cache, "key", key)
        check_like("v_cache", v_cache, "key", key)
    if slot_mapping.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"slot_mapping must be int32 or int64, got {slot_mapping.dtype}")
    check_same_shape("value", value, "key", key)
    check_same_shape("v_cache", v_cache, "k_cache", k_cache)
    if key.shape[1:] != k_cache.shape[2:]:
        raise ValueError(f"key [T, Hkv, D] = {tuple(key.shape)} must match the cache's [Hkv, D] = "
                         f"{tuple(k_cache.shape[2:])}")
    check_head_dim(key.shape[2])
    if slot_mapping.shape[0] != key.shape[0]:
        raise ValueError(f"slot_mapping has {slot_mapping.shape[0]} entries but key has {key.shape[0]} tokens")
    check_grid("Hkv", key.shape[1])
    check_runnable("key", key)
    return fp8


_TILE_REGISTERS = 64  # per-thread 32-bit registers for the K and V tiles a program holds


SPACE = {
    "BLOCK_T": [1, 2, 4, 8, 16],     # tokens per program
    "num_warps": [1, 2, 4, 8],
}


def keep(config, problem):
    """Why this config would not run well for this problem (a string), or None. Uses problem.D and problem.dtype."""
    elements = config["BLOCK_T"] * padded_head_dim(problem.D)
    threads = 32 * config["num_warps"]
    if config["num_warps"] > 1 and threads * 8 > elements:
        return f"{threads} threads for a tile of {elements} elements: most threads idle"
    if 2 * elements * ELEMENT_BYTES[problem.dtype] // 4 // threads > _TILE_REGISTERS:
        return f"register pressure: {elements} elements per tile on {threads} threads"
    return None


DEFAULT = {"BLOCK_T": 1, "num_warps": 1}
