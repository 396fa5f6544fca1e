"""Naive PyTorch attention references. Imports only torch: never a kernel, never tunebench."""
from .attention import attention, paged_attention, gather_paged_kv, paged_prefill
from .quantize import dequantize_fp8, quantize_fp8

__all__ = ["attention", "paged_attention", "gather_paged_kv", "paged_prefill", "quantize_fp8", "dequantize_fp8"]
