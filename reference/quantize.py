"""The plainest fp8 KV-cache quantisation there is (vLLM's kv_cache_dtype="fp8"): real value = stored value * scale.

A scale is one number for the whole cache, or one per KV head: shape [] or [1], or [Hkv], broadcast over the head axis
of x [..., Hkv, D].
"""
import torch


def _per_head(scale, x: torch.Tensor, dtype) -> torch.Tensor:
    s = torch.as_tensor(scale, dtype=dtype, device=x.device)
    return s.reshape(-1, 1) if s.numel() > 1 else s.reshape(())


def quantize_fp8(x: torch.Tensor, scale, dtype: torch.dtype) -> torch.Tensor:
    """x / scale in float32, saturated to the format's largest finite value, rounded to nearest (even)."""
    fmax = torch.finfo(dtype).max
    return (x.float() / _per_head(scale, x, torch.float32)).clamp(-fmax, fmax).to(dtype)


def dequantize_fp8(x8: torch.Tensor, scale, dtype=torch.float64) -> torch.Tensor:
    """stored value * scale, computed in ``dtype`` (float64: exact)."""
    return x8.to(dtype) * _per_head(scale, x8, dtype)
