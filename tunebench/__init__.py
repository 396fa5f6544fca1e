"""tunebench: tuned Triton attention kernels and the harness that tunes and checks them.

    import tunebench
    out = tunebench.flash_attention(q, k, v, causal=True)          # q [B, Hq, Nq, D], k/v [B, Hkv, Nk, D]
    out = tunebench.paged_attention(q, k_cache, v_cache, block_tables, context_lens)
    out = tunebench.paged_prefill(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens)  # q [total_q, Hq, D]

Importing this module stays light: no optuna, sqlalchemy or hypothesis, and no kernel is compiled until called. Even
torch waits for the first use of a name below, so that `tunebench tune` can start its worker processes before it
imports torch itself.
"""
import importlib

__version__ = "0.1.0"
_EXPORTS = {"flash_attention": ".runtime.dispatch", "paged_attention": ".runtime.dispatch",
            "explain": ".runtime.dispatch", "reload": ".runtime.dispatch",
            "tuned_paged_block_size": ".runtime.dispatch", "tuned_config": ".runtime.dispatch",
            "BlockAllocator": ".runtime.allocator",
            "OutOfBlocks": ".runtime.allocator", "record": ".runtime.record"}
_EXPORTS["paged_prefill"] = ".runtime.dispatch"
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'tunebench' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
