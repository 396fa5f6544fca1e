"""The plainest attention there is: S = QK^T * scale, mask, softmax, PV.

Computed in ``dtype`` (float64 by default), one (batch, head) at a time so that a 16k x 16k score matrix is the most
that is ever materialised.
"""
import math

import torch


def _causal_mask(nq: int, nk: int, device) -> torch.Tensor:
    # Bottom-right alignment (FlashAttention >= 2.1): query i sees keys j <= i + (nk - nq).
    i = torch.arange(nq, device=device)[:, None]
    j = torch.arange(nk, device=device)[None, :]
    return j <= i + (nk - nq)


def attention(q, k, v, causal: bool = False, scale: float | None = None, dtype=torch.float64) -> torch.Tensor:
    """Naive attention.

    q: [B, Hq, Nq, D]; k, v: [B, Hkv, Nk, D] with Hq a multiple of Hkv (GQA/MQA: query head h reads kv head
    h // (Hq // Hkv)). Returns [B, Hq, Nq, D] in ``dtype``.

    Causal masking is bottom-right aligned. A query row that sees no key (possible only when Nq > Nk) is all zeros.
    """
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    if Hq % Hkv:
        raise ValueError(f"Hq ({Hq}) must be a multiple of Hkv ({Hkv})")
    group = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    mask = _causal_mask(Nq, Nk, q.device) if causal else None
    out = torch.empty(B, Hq, Nq, D, dtype=dtype, device=q.device)
    for b in range(B):
        for h in range(Hq):
            qi, ki, vi = (t.to(dtype) for t in (q[b, h], k[b, h // group], v[b, h // group]))
            s = (qi @ ki.T) * scale                                  # [Nq, Nk]
            if mask is not None:
                s = s.masked_fill(~mask, float("-inf"))
            p = torch.softmax(s, dim=-1)
            out[b, h] = torch.nan_to_num(p, nan=0.0) @ vi            # fully masked rows -> 0
    return out


def gather_paged_kv(cache, block_table, length: int) -> torch.Tensor:
    """Gathers one sequence's tokens from a paged cache.

    cache: [num_blocks, block_size, Hkv, D]; block_table: int [max_blocks]. Returns [Hkv, length, D].
    """
    block_size = cache.shape[1]
    n_blocks = -(-length // block_size)
    blocks = cache[block_table[:n_blocks].long()]                    # [n_blocks, block_size, Hkv, D]
    return blocks.reshape(-1, *cache.shape[2:])[:length].transpose(0, 1)


def paged_attention(q, k_cache, v_cache, block_tables, context_lens, scale: float | None = None,
                    dtype=torch.float64) -> torch.Tensor:
    """Decode attention over a paged KV cache, by gathering each sequence into a dense cache.

    q: [B, Hq, D]; k_cache, v_cache: [num_blocks, block_size, Hkv, D]; block_tables: int32 [B, max_blocks];
    context_lens: int32 [B]. Returns [B, Hq, D] in ``dtype``. The single query attends to all its context.
    """
    out = torch.empty(q.shape, dtype=dtype, device=q.device)
    for b in range(q.shape[0]):
        n = int(context_lens[b])
        k = gather_paged_kv(k_cache, block_tables[b], n)[None]        # [1, Hkv, n, D]
        v = gather_paged_kv(v_cache, block_tables[b], n)[None]
        out[b] = attention(q[b, :, None, :][None], k, v, causal=False, scale=scale, dtype=dtype)[0, :, 0, :]
    return out
