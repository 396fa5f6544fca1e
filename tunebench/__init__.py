"""tunebench: tuned Triton attention kernels and the harness that tunes and checks them.

    import tunebench
    out = tunebench.flash_attention(q, k, v, causal=True)          # q [B, Hq, Nq, D], k/v [B, Hkv, Nk, D]
    out = tunebench.paged_attention(q, k_cache, v_cache, block_tables, context_lens)

Importing this module stays light: no optuna, sqlalchemy or hypothesis, and no kernel is compiled until called.
"""
from .allocator import BlockAllocator, OutOfBlocks
from .dispatch import explain, flash_attention, paged_attention, reload, tuned_paged_block_size

__version__ = "0.1.0"
__all__ = ["flash_attention", "paged_attention", "explain", "reload", "tuned_paged_block_size", "BlockAllocator",
           "OutOfBlocks"]
