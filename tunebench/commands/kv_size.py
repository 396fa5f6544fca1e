"""`tunebench kv-size`: KV cache bytes per token, per batch, and the paged blocks that fit in a memory budget."""
from __future__ import annotations

from ..runtime.kvcache import format_kv_size, kv_size


def kv_size_command(args) -> int:
    """args has layers, kv_heads, head_dim, dtype, context, batch, memory (GiB or None) and block_size."""
    s = kv_size(args.layers, args.kv_heads, args.head_dim, args.dtype, args.context, args.batch,
                args.memory, args.block_size)
    print(format_kv_size(s, args.layers, args.kv_heads, args.head_dim, args.dtype, args.context, args.batch))
    return 0
