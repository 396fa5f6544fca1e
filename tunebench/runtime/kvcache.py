"""KV cache sizing: bytes per token, the cache of a batch, and how many paged blocks fit in a memory budget.

Every layer caches one K and one V vector per KV head per token, so

    bytes per token = 2 x layers x kv_heads x head_dim x dtype size.

A paged block holds ``block_size`` tokens of every layer (one block id indexes each layer's cache), so a block costs
``block_size x bytes per token``. Memory budgets are in GiB (2**30 bytes), the unit GPU memory is quoted in.
Example (the seed's Llama-2-7B-like geometry): 32 layers, 8 KV heads, head dim 128, fp16 -> 128 KiB per token and
512 MiB for 4096 tokens.

Imports nothing heavy: dtypes are named by string (``torch.float16`` is accepted through its name).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..shapes import DTYPE_BYTES

GIB = 1 << 30
DTYPE_ALIASES = {"fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp32": "float32", "float": "float32"}


def dtype_name(dtype) -> str:
    """The canonical name ('float16', 'bfloat16', 'float32') of a dtype given by name, alias or torch.dtype."""
    name = str(dtype).removeprefix("torch.")
    name = DTYPE_ALIASES.get(name, name)
    if name not in DTYPE_BYTES:
        known = sorted(DTYPE_BYTES) + sorted(DTYPE_ALIASES)
        raise ValueError(f"dtype must be one of {', '.join(known)}; got {dtype!r}")
    return name


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def kv_bytes_per_token(layers: int, kv_heads: int, head_dim: int, dtype) -> int:
    """2 (K and V) x layers x kv_heads x head_dim x bytes per element."""
    for name, value in (("layers", layers), ("kv_heads", kv_heads), ("head_dim", head_dim)):
        _positive_int(name, value)
    return 2 * layers * kv_heads * head_dim * DTYPE_BYTES[dtype_name(dtype)]


def blocks_that_fit(memory_bytes: int, bytes_per_token: int, block_size: int) -> int:
    """Whole blocks of ``block_size`` tokens that fit in ``memory_bytes``."""
    if memory_bytes < 0:
        raise ValueError(f"memory must be >= 0 bytes, got {memory_bytes!r}")
    return int(memory_bytes) // (_positive_int("block_size", block_size) * _positive_int("bytes_per_token",
                                                                                        bytes_per_token))


@dataclass(frozen=True)
class KVSize:
    bytes_per_token: int
    tokens: int                      # batch x context
    total_bytes: int                 # the cache of all those tokens, unpaged
    block_size: int
    block_bytes: int
    blocks_per_sequence: int         # ceil(context / block_size)
    memory_bytes: int | None = None
    blocks_fit: int | None = None    # in memory_bytes
    tokens_fit: int | None = None    # blocks_fit x block_size
    sequences_fit: int | None = None  # sequences of `context` tokens, each in its own blocks


def kv_size(layers: int, kv_heads: int, head_dim: int, dtype, context: int, batch: int = 1,
            memory_gib: float | None = None, block_size: int = 16) -> KVSize:
    """The KV cache of ``batch`` sequences of ``context`` tokens and, given a budget in GiB, what fits in it."""
    per_token = kv_bytes_per_token(layers, kv_heads, head_dim, dtype)
    tokens = _positive_int("context", context) * _positive_int("batch", batch)
    block_bytes = _positive_int("block_size", block_size) * per_token
    per_seq = -(-context // block_size)
    size = KVSize(per_token, tokens, tokens * per_token, block_size, block_bytes, per_seq)
    if memory_gib is None:
        return size
    if isinstance(memory_gib, bool) or not math.isfinite(memory_gib) or memory_gib <= 0:
        raise ValueError(f"memory must be a positive number of GiB, got {memory_gib!r}")
    memory = int(memory_gib * GIB)
    fit = blocks_that_fit(memory, per_token, block_size)
    return KVSize(per_token, tokens, tokens * per_token, block_size, block_bytes, per_seq,
                  memory, fit, fit * block_size, fit // per_seq)


def human_bytes(n: int | float) -> str:
    """Binary units: 131072 -> '128 KiB', 536870912 -> '512 MiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if float(n).is_integer() else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_kv_size(s: KVSize, layers: int, kv_heads: int, head_dim: int, dtype, context: int, batch: int) -> str:
    name = dtype_name(dtype)
    lines = [
        f"bytes per token: {s.bytes_per_token} ({human_bytes(s.bytes_per_token)}) = 2 x {layers} layers x "
        f"{kv_heads} kv heads x {head_dim} head dim x {DTYPE_BYTES[name]} bytes ({name})",
        f"total for batch {batch} x context {context} = {s.tokens} tokens: {s.total_bytes} bytes "
        f"({human_bytes(s.total_bytes)})",
        f"block of {s.block_size} tokens: {s.block_bytes} bytes ({human_bytes(s.block_bytes)}); "
        f"{s.blocks_per_sequence} blocks per sequence of {context}",
    ]
    if s.memory_bytes is not None:
        lines.append(f"in {human_bytes(s.memory_bytes)}: {s.blocks_fit} blocks fit = {s.tokens_fit} tokens = "
                     f"{s.sequences_fit} sequences of {context} tokens")
    return "\n".join(lines)

