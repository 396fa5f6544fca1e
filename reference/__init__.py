"""Naive PyTorch attention references. Imports only torch: never a kernel, never tunebench."""
from .attention import attention, paged_attention, gather_paged_kv
from .attention import paged_prefill

__all__ = ["attention", "paged_attention", "gather_paged_kv"]
__all__ += ["paged_prefill"]
