"""Writes new tokens' K and V into their slots of a paged KV cache (the store half of paged decode).

- key, value [T, Hkv, D]: one row per new token (a decode step's batch, or a prompt's tokens flattened).
- k_cache, v_cache [num_blocks, block_size, Hkv, D], written in place.
- slot_mapping int32 or int64 [T]: token t goes to block slot // block_size, row slot % block_size (the slot the
  block allocator returns). A negative slot means "skip this token" (padding in a batch).
- Any strides on all tensors. fp16, bf16, fp32; head dims 16..256 (padded to a power of two and masked).
- One program per (tile of BLOCK_T tokens, KV head) copies a [BLOCK_T, D] tile of K and of V.

Not supported: dtype conversion (key and the cache must have the same dtype), quantised caches (fp8 with scales),
writing one token to several slots. Slot values are not checked (that would need a device sync): a slot past the
cache writes out of bounds, and two tokens with the same slot race.
"""
import torch
import triton
import triton.language as tl

from ._launch import (ELEMENT_BYTES, check_config, check_float_dtype, check_grid, check_head_dim, check_like,
                      check_runnable, check_same_shape, check_tensor, padded_head_dim)


@triton.jit
def _cache_write(Key, Value, KC, VC, Slots, T, block_size,
                 stride_kt, stride_kh, stride_kd,
                 stride_vt, stride_vh, stride_vd,
                 stride_kcb, stride_kcs, stride_kch, stride_kcd,
                 stride_vcb, stride_vcs, stride_vch, stride_vcd,
                 stride_slot,
                 HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_T: tl.constexpr):
    toks = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    head = tl.program_id(1).to(tl.int64)
    offs_d = tl.arange(0, D_PAD)
    slot = tl.load(Slots + toks * stride_slot, mask=toks < T, other=-1).to(tl.int64)
    write = slot >= 0                                                  # negative: padding, skipped
    slot = tl.where(write, slot, 0)
    blk = slot // block_size
    row = slot % block_size
    mask = write[:, None] & (offs_d[None, :] < HEAD_DIM)
    toks = toks.to(tl.int64)

    k = tl.load(Key + toks[:, None] * stride_kt + head * stride_kh + offs_d[None, :] * stride_kd, mask=mask)
    k_dst = KC + blk[:, None] * stride_kcb + row[:, None] * stride_kcs + head * stride_kch + offs_d[None, :] * stride_kcd
    tl.store(k_dst, k, mask=mask)
    v = tl.load(Value + toks[:, None] * stride_vt + head * stride_vh + offs_d[None, :] * stride_vd, mask=mask)
    v_dst = VC + blk[:, None] * stride_vcb + row[:, None] * stride_vcs + head * stride_vch + offs_d[None, :] * stride_vcd
    tl.store(v_dst, v, mask=mask)


def launch(key, value, k_cache, v_cache, slot_mapping, config=None):
    """k_cache[slot // block_size, slot % block_size] = key (and v_cache likewise) for every slot >= 0.

    Writes in place and returns (k_cache, v_cache). config None means DEFAULT.
    """
    config = check_config(DEFAULT if config is None else config, SPACE, BLOCK_T=1)
    _check_inputs(key, value, k_cache, v_cache, slot_mapping)
    T, Hkv, D = key.shape
    if T == 0 or Hkv == 0:
        return k_cache, v_cache
    block_t = config["BLOCK_T"]
    _cache_write[(triton.cdiv(T, block_t), Hkv)](
        key, value, k_cache, v_cache, slot_mapping, T, k_cache.shape[1],
        *key.stride(), *value.stride(), *k_cache.stride(), *v_cache.stride(), slot_mapping.stride(0),
        HEAD_DIM=D, D_PAD=padded_head_dim(D), BLOCK_T=block_t,
        num_warps=config["num_warps"],
    )
    return k_cache, v_cache


def _check_inputs(key, value, k_cache, v_cache, slot_mapping):
    cache_layout = "[num_blocks, block_size, Hkv, D]"
    for name, t, rank, layout in (("key", key, 3, "[T, Hkv, D]"), ("value", value, 3, "[T, Hkv, D]"),
                                  ("k_cache", k_cache, 4, cache_layout), ("v_cache", v_cache, 4, cache_layout),
                                  ("slot_mapping", slot_mapping, 1, "[T]")):
        check_tensor(name, t, rank, layout)
        check_like(name, t, "key", key, dtype=False)
    check_float_dtype("key", key)
    for name, t in (("value", value), ("k_cache", k_cache), ("v_cache", v_cache)):
        check_like(name, t, "key", key)
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
