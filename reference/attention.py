"""The plainest attention there is: S = QK^T * scale, mask, softmax, PV.

Computed in ``dtype`` (float64 by default), for as many (batch, head) pairs at a time as keep the score matrices and
the gathered K/V within MAX_SCORES elements (one pair at a time from 8k x 16k up). One pair per step made a small
problem's reference thousands of steps of a few launches each (a paged decode of B=128 x 32 heads: 4096), which every
tuning worker computes.
"""
import math

import torch

MAX_SCORES = 1 << 27    # score elements materialised at once: 1 GiB in float64


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
    out = torch.empty(B * Hq, Nq, D, dtype=dtype, device=q.device)
    qs, ks, vs = q.reshape(B * Hq, Nq, D), k.reshape(B * Hkv, Nk, D), v.reshape(B * Hkv, Nk, D)
    pair = torch.arange(B * Hq, device=q.device)
    kv_of = (pair // Hq) * Hkv + (pair % Hq) // group              # (b, h) -> (b, h // group)
    # Bound the scores [pairs, Nq, Nk] and the gathered K/V [pairs, Nk, D] alike: at decode (Nq = 1) K/V are D times
    # the scores, and a B256 x 8k batch's were 64 GiB each in float64.
    step = max(1, MAX_SCORES // max(1, Nk * max(Nq, D)))
    for start in range(0, B * Hq, step):
        rows = slice(start, min(start + step, B * Hq))
        qi = qs[rows].to(dtype)
        ki, vi = ks[kv_of[rows]].to(dtype), vs[kv_of[rows]].to(dtype)
        s = (qi @ ki.transpose(-1, -2)) * scale                      # [pairs, Nq, Nk]
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf"))
        p = torch.softmax(s, dim=-1)
        out[rows] = torch.nan_to_num(p, nan=0.0) @ vi                # fully masked rows -> 0
    return out.reshape(B, Hq, Nq, D)


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


def paged_prefill(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale: float | None = None,
                  dtype=torch.float64) -> torch.Tensor:
    """Varlen attention over a paged KV cache, by gathering each sequence into a dense cache and calling
    ``attention`` with the bottom-right causal mask.

    q: [total_q, Hq, D], sequence b's new tokens at rows cu_seqlens_q[b] .. cu_seqlens_q[b + 1] - 1; context_lens
    counts cached plus new tokens. Returns [total_q, Hq, D] in ``dtype``: new token i of a sequence with n_new new
    tokens and L in all sees keys 0 .. L - n_new + i.
    """
    out = torch.empty(q.shape, dtype=dtype, device=q.device)
    cu = cu_seqlens_q.tolist()
    for b in range(len(cu) - 1):
        s, e, n = cu[b], cu[b + 1], int(context_lens[b])
        if e == s:
            continue
        k = gather_paged_kv(k_cache, block_tables[b], n)[None]        # [1, Hkv, n, D]
        v = gather_paged_kv(v_cache, block_tables[b], n)[None]
        qb = q[s:e].transpose(0, 1)[None]                               # [1, Hq, n_new, D]
        out[s:e] = attention(qb, k, v, causal=True, scale=scale, dtype=dtype)[0].transpose(0, 1)
    return out
