"""A Hugging Face transformers attention backend: `attn_implementation="tunebench"`.

    import tunebench.integrations.transformers  # registers "tunebench" with AttentionInterface
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="tunebench")

Prefill and decode attention then run through `tunebench.flash_attention` (the tuned flash_v2 kernel) on the
[B, H, N, D] views transformers hands over, with no copy of q, k or v. The masks are built as for "sdpa" (the same
mask function is registered for "tunebench"), so this backend sees what SDPA would see.

Served (the Triton kernel runs):
- no mask, or a 4-d mask (bool, or additive float with 0 and the dtype's minimum / -inf) that is exactly bottom-right
  causal or exactly all-visible: prefill, decode (Nq = 1), and a prefill that continues a cache (Nq > 1, Nk > Nq);
- GQA/MQA (Hq a multiple of Hkv), fp16/bf16/fp32, head dim up to 256, the module's scaling;
- a sliding-window layer while every key is inside the window.

Falls back to transformers' own SDPA (`sdpa_attention_forward`), with one FallbackWarning per reason:
- any other mask: padding (a batch with left padding), a static cache's empty slots in decode, packed sequences,
  a sliding window that excludes keys, a custom mask (checked once per mask tensor: one comparison, one sync);
- dropout > 0 (training), inputs that require grad (with grad enabled: the kernel is forward only), a position
  bias (T5-style);
- query/key/value whose dtypes or head dims differ, a dtype other than fp16/bf16/fp32, head dim > 256;
- CPU tensors without TRITON_INTERPRET=1 (the kernel needs a GPU, or the slow interpreter), and bfloat16 under
  the interpreter (which computes it wrongly: tunebench.flash_attention refuses it there).
Falls back to the model's own eager attention (SDPA refuses these): attention-logit soft-capping (Gemma-2 style) and
attention sinks (`s_aux`).

The kernel returns no attention weights (as SDPA; `output_attentions=True` needs `attn_implementation="eager"`).
"""
from __future__ import annotations

import sys
import warnings
import weakref

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..kernels._launch import interpreting
from ..runtime.dispatch import flash_attention

NAME = "tunebench"
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


class FallbackWarning(UserWarning):
    """A call that tunebench's kernel cannot serve ran through transformers' own attention instead."""


MASK_REASON = "a mask that is neither plain causal nor all-visible (padding, packing, a window, or custom)"
_warned: set[str] = set()


def attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention signature: query [B, Hq, Nq, D], key/value [B, Hkv, Nk, D] -> ([B, Nq, Hq, D], None)."""
    is_causal = kwargs.pop("is_causal", None)
    is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    reason, eager = _unserved(query, key, value, attention_mask, dropout, kwargs)
    causal = None if reason else _causal(attention_mask, is_causal, query.shape[2], key.shape[2])
    if causal is None:
        return _fallback(reason or MASK_REASON, eager, module, query, key, value, attention_mask, is_causal,
                         scaling=scaling, dropout=dropout, **kwargs)
    nq = query.shape[2]
    if causal and attention_mask is None and key.shape[2] > nq:
        # No mask with Nk > Nq > 1 is a static cache's first prefill: the keys past Nq are empty slots (SDPA slices
        # them off too, and aligns causal top-left).
        key, value = key[:, :, :nq], value[:, :, :nq]
    out = flash_attention(query, key, value, causal=causal, scale=scaling)    # [B, Hq, Nq, D], q's strides
    return out.transpose(1, 2).contiguous(), None


def teacher_forced_logits(model, seq: torch.Tensor, prompt: int) -> torch.Tensor:
    """The next-token logits [B, len(seq) - prompt, V] a causal LM gives after the first ``prompt`` tokens of ``seq``
    and after each later token but the last, fed one at a time through the KV cache (a prefill, then decode steps) as
    ``generate()`` feeds them, but with the tokens given. Fed the same tokens, two attention implementations can be
    compared step by step, where greedy decoding would part them for good at the first near-tie."""
    with torch.no_grad():
        out = model(seq[:, :prompt], use_cache=True)
        logits = [out.logits[:, -1]]
        for t in range(prompt, seq.shape[1] - 1):
            out = model(seq[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True)
            logits.append(out.logits[:, -1])
    return torch.stack(logits, 1)


def _fallback(reason: str, eager: bool, module, query, key, value, mask, is_causal: bool, **kwargs):
    _warn_once(reason, "the model's eager attention" if eager else "SDPA")
    if eager:
        eager_mask = _additive_mask(mask, is_causal, query, key)
        return _eager_attention(module)(module, query, key, value, eager_mask, **kwargs)
    return sdpa_attention_forward(module, query, key, value, mask, is_causal=is_causal, **kwargs)


def _unserved(query, key, value, mask, dropout, kwargs) -> tuple[str | None, bool]:
    """Why the kernel cannot serve this call (None if it can), and whether SDPA cannot either (then eager)."""
    if kwargs.get("softcap") is not None:
        return "attention-logit soft-capping", True
    if kwargs.get("s_aux") is not None:
        return "attention sinks (s_aux)", True
    if dropout > 0:
        return "dropout > 0", False
    if kwargs.get("position_bias") is not None:
        return "a position bias", False
    window = kwargs.get("sliding_window")
    if window is not None and key.shape[2] > window:
        return "a sliding window shorter than the keys", False
    if not query.dtype == key.dtype == value.dtype or query.dtype not in DTYPES:
        return f"dtypes q {query.dtype}, k {key.dtype}, v {value.dtype} (needs one of fp16/bf16/fp32)", False
    if not query.shape[-1] == key.shape[-1] == value.shape[-1] <= MAX_HEAD_DIM:
        return f"head dims q {query.shape[-1]}, k {key.shape[-1]}, v {value.shape[-1]} (needs equal, <= 256)", False
    if query.shape[1] % key.shape[1]:
        return f"{query.shape[1]} query heads not a multiple of {key.shape[1]} key heads", False
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad):
        return "inputs that require grad (training: the kernel is forward only)", False
    if query.device.type == "cpu" and not interpreting():
        return "CPU tensors without TRITON_INTERPRET=1", False
    if query.dtype == torch.bfloat16 and interpreting():
        return "bfloat16 under the Triton interpreter (which computes it wrongly)", False
    if mask is not None and (mask.dim() != 4 or mask.shape[-2:] != (query.shape[2], key.shape[2])):
        return "a mask that is not 4-d [B or 1, H or 1, Nq, Nk]", False
    return None, False


def _causal(mask, is_causal: bool, nq: int, nk: int) -> bool | None:
    """The kernel's causal flag for this call, or None when the mask is something the kernel cannot express.

    Without a mask, transformers means what SDPA does with one: causal for a causal module's prefill, nothing to mask
    for a single query (a decode step sees every cached key)."""
    if mask is None:
        return bool(is_causal) and nq > 1
    kind = _mask_kind(mask, nq, nk)
    if kind == "full":
        return False
    if kind == "causal":
        return nq > 1
    return None


_last_mask: tuple = (None, None, None)     # (weakref to the mask, its version, its kind)


def _mask_kind(mask: torch.Tensor, nq: int, nk: int) -> str:
    """"full", "causal" (bottom-right) or "other". Every layer of a forward gets the same mask tensor, so the answer
    (one device comparison and one sync) is kept for the last mask seen, until it is freed or written to."""
    global _last_mask
    ref, version, kind = _last_mask
    if ref is not None and ref() is mask and version == mask._version:
        return kind
    if mask.dtype == torch.bool:
        visible = mask
    elif mask.is_floating_point():
        visible = mask == 0
        if not bool(torch.where(visible, True, mask <= torch.finfo(mask.dtype).min).all()):
            visible = None
    else:
        visible = None
    if visible is None:
        kind = "other"
    elif bool(visible.all()):
        kind = "full"
    else:
        causal = torch.ones(nq, nk, dtype=torch.bool, device=mask.device).tril(nk - nq)
        kind = "causal" if torch.equal(visible, causal.expand_as(visible)) else "other"
    _last_mask = (weakref.ref(mask), mask._version, kind)
    return kind


def _eager_attention(module):
    """The eager attention function of the module's own modeling file (it applies soft-capping and sinks)."""
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if eager is None:
        raise NotImplementedError(f"tunebench cannot serve {type(module).__name__}'s attention and found no eager "
                                  f"attention to fall back to: use attn_implementation='eager'")
    return eager


def _additive_mask(mask, is_causal: bool, query, key):
    """The masks are built for SDPA (bool, or None where SDPA's top-left `is_causal` is right); eager attention adds
    its mask to the scores, so it needs them as 0 / dtype minimum, with the causal part written out."""
    if mask is None:
        nq = query.shape[2]
        if not (is_causal and nq > 1):
            return None
        mask = torch.ones(nq, key.shape[2], dtype=torch.bool, device=query.device).tril()[None, None]
    if mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=query.dtype, device=mask.device).masked_fill(~mask,
                                                                                       torch.finfo(query.dtype).min)


def _warn_once(reason: str, target: str) -> None:
    if reason in _warned:
        return
    _warned.add(reason)
    warnings.warn(f"tunebench attention falls back to {target} for {reason}; later calls for this reason fall back "
                  f"silently", FallbackWarning, stacklevel=3)


AttentionInterface.register(NAME, attention_forward)
AttentionMaskInterface.register(NAME, sdpa_mask)
