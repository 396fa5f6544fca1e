"""Varlen attention over a paged KV cache: new query tokens of any count per sequence (chunked prefill, prompts whose
prefix is cached, speculative-decoding verification, decode rows) in one launch.

Layout:
- q [total_q, Hq, D]: the new tokens of every sequence, packed; sequence b's are rows cu_seqlens_q[b] ..
  cu_seqlens_q[b + 1] - 1 (cu_seqlens_q int32 [B + 1], starting at 0, nondecreasing, ending at total_q).
- k_cache, v_cache [num_blocks, block_size, Hkv, D], block_tables int32 [B, max_blocks]: the decode kernel's cache
  (kernels/paged_attention.py). Token i of sequence b lives in block block_tables[b, i // block_size], row
  i % block_size. The new tokens' K/V must already be in the cache (kernels/cache_write.py).
- context_lens int32 [B]: the tokens of each sequence, cached ones plus new ones (n_new <= context_len).
- out [total_q, Hq, D] in q's dtype, optionally given by the caller, is fully written.
- Any strides of every tensor, the integer ones included.

Masking: causal, aligned bottom-right within each sequence. New query i of a sequence with n_new new tokens and L
tokens in all sees keys 0 .. L - n_new + i. A sequence with one new token is exactly decode; one with none (an idle row)
writes nothing.

Schedule:
- Rows of a program's q tile are (token, query head) pairs: BLOCK_Q = BLOCK_M // HEADS new tokens of one sequence,
  times the HEADS query heads of one KV group (all of it when the group fits in BLOCK_M, else an even share), so each
  K/V tile is read once per group, as in the decode kernel, and a decode row still fills HEADS rows of a tile.
- The grid has total_q // BLOCK_Q + B programs per KV group: sequence b owns the program indices from
  cu_seqlens_q[b] // BLOCK_Q + b (at least ceil(n_new / BLOCK_Q) of them, vLLM's unified-attention numbering), and a
  program finds its sequence by binary search over cu_seqlens_q. No host sync is needed for the grid; programs past
  their sequence's tokens return at once.
- A sequence with few new tokens (at most SMALL_M // HEADS: decode rows, short speculative verifications) runs in a
  tile of SMALL_M rows instead (the smallest power of two >= max(16, HEADS), when that is below BLOCK_M): in a
  BLOCK_M tile its one token would take BLOCK_M / SMALL_M times the tensor work it needs, work that a mixed batch's
  chunk programs, running beside it, are short of. Both tile sizes are compiled into the kernel; each program
  branches once, on its sequence's new-token count.
- K/V tiles of BLOCK_N tokens gather each token's physical block from the table (one table entry when BLOCK_N <=
  block_size); the next tile's block ids are read one step ahead. Two stages: tiles every row of the tile sees
  entirely (no mask), then the tiles that cross the diagonal (causal and length masks).
- Online softmax in base 2 (scores scaled by scale * log2(e), exp2).

Supported: fp16, bf16 and fp32 (fp32 dots use input_precision="ieee"); head dims 16..256 (non-powers of two padded
and masked); GQA/MQA; any power-of-two block size (tunebench.paged_prefill admits shapes.PAGES, 8..128).

Bad values (issue 16): launch checks the values of cu_seqlens_q and context_lens against q and the table on the host
(one device-to-host copy) unless check_values=False. The kernel itself never reads or writes out of bounds, checked
or not: a sequence whose length is below its new tokens or above max_blocks * block_size reads nothing, a block id
outside [0, num_blocks) among the entries it reads is replaced by block 0. A bad length gives all the sequence's
rows NaN; a bad block id gives NaN to the rows of every tile that reads it, which includes every row whose causal keys
reach it (a row whose keys end before that block does not depend on it, and is NaN or correct). A
sequence whose cu_seqlens_q entries are out of order or outside [0, total_q] (from 0, to total_q) owns no rows and
writes none; rows owned by no sequence are not written. With CHECK (launch(..., check=True)) an error code per
sequence is written and raised as a ValueError naming it; the first B programs also check each sequence's
cu_seqlens_q and length once, since a binary search over out-of-order entries may reach no program of it. Only the
values a launch reads are checked: a block id of a sequence with no new token is never read.

Not supported: split-K over the context (a decode row with a long context runs in one program: decode-only batches
are faster through paged_attention), sliding windows, ALiBi, soft-capping, fp8 caches, the log-sum-exp.
"""
import torch
import triton
import triton.language as tl

from ._launch import (ELEMENT_BYTES, ERR_BLOCK_ID, ERR_LENGTH, ERR_QUERY_ROWS, any_bad_block, check_config,
                      check_float_dtype, check_forward_only, check_interpretable, check_like, check_out,
                      check_paged_cache, check_runnable, check_scale, check_tensor, checked_blocks, dot_precision,
                      no_bad_blocks, padded_head_dim, qk_scale, raise_paged_errors, shared_memory_limit, tile_blocks)


@triton.jit
def _find_sequence(CU, stride_cu, block_idx, B, BLOCK_Q: tl.constexpr):
    """The sequence that owns program `block_idx`: the last b with cu_seqlens_q[b] // BLOCK_Q + b <= block_idx."""
    lo = tl.full([], 0, tl.int32)
    hi = tl.full([], 0, tl.int32) + B
    while lo < hi:
        mid = (lo + hi) // 2
        first = tl.load(CU + mid.to(tl.int64) * stride_cu) // BLOCK_Q + mid
        if first <= block_idx:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _attend(acc, m_i, l_i, bad, q, k_head, v_head, table, lo, hi, limit, offs_n, offs_d, d_ok, qk_scale, num_blocks,
            stride_kb, stride_ks, stride_kd, stride_vb, stride_vs, stride_vd, stride_btn,
            PAGE: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr, MASKED: tl.constexpr,
            DOT_PRECISION: tl.constexpr, SAFE: tl.constexpr):
    """Online softmax over the keys [lo, hi). MASKED: key j is visible to a row only if j <= limit[row] (and
    j < hi); otherwise every key of every tile is visible to every row. A block id outside [0, num_blocks) reads
    block 0 instead and is recorded in bad (SAFE)."""
    blk_next = tile_blocks(table, lo, hi, offs_n, stride_btn, PAGE, BLOCK_N)
    for n0 in range(lo, hi, BLOCK_N):
        tok = n0 + offs_n
        blk, bad = checked_blocks(blk_next, num_blocks, bad, SAFE)
        # int64: block id * block stride overflows int32 on large caches.
        blk = blk.to(tl.int64)
        blk_next = tile_blocks(table, n0 + BLOCK_N, hi, offs_n, stride_btn, PAGE, BLOCK_N)
        row = tok % PAGE
        k_ptrs = (k_head + blk * stride_kb + row * stride_ks)[:, None] + offs_d[None, :] * stride_kd
        v_ptrs = (v_head + blk * stride_vb + row * stride_vs)[:, None] + offs_d[None, :] * stride_vd
        if MASKED:
            if EVEN_D:
                kv_mask = (tok < hi)[:, None]
            else:
                kv_mask = (tok < hi)[:, None] & d_ok[None, :]
            # Masked rows read 0, never the stale (possibly NaN) rows past a context in its last page.
            k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
            v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
        elif EVEN_D:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        else:
            k = tl.load(k_ptrs, mask=d_ok[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
        # -- scores in base 2, new running max
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if MASKED:
            s = tl.where(tok[None, :] <= limit[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        # -- update m_i and l_i, rescale the accumulator
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i, bad


@triton.jit
def _validate_sequence(CU, CL, Err, s, B, total_q, capacity, stride_cu, stride_cl):
    """Flags sequence s's rows (0 = cu_seqlens_q[0] <= ... <= cu_seqlens_q[B] = total_q locally) and its length
    (new tokens <= context_lens[s] <= capacity). Under CHECK only: the programs that own a sequence's rows find it
    by a binary search that entries out of order can mislead, so these values are checked once per sequence here."""
    start = tl.load(CU + s.to(tl.int64) * stride_cu)
    end = tl.load(CU + (s + 1).to(tl.int64) * stride_cu)
    ctx = tl.load(CL + s.to(tl.int64) * stride_cl)
    rows_ok = _rows_ok(start, end, s, B, total_q)
    len_ok = (ctx >= end - start) & (ctx <= capacity)
    code = tl.where(rows_ok, tl.where(len_ok, 0, ERR_LENGTH), ERR_QUERY_ROWS)
    tl.store(Err + s, code, mask=code != 0)


@triton.jit
def _rows_ok(start, end, b, B, total_q):
    """Sequence b's new tokens are rows start .. end - 1 of q, in bounds, the first from row 0, the last to total_q."""
    return ((start >= 0) & (start <= end) & (end <= total_q) & ((b > 0) | (start == 0))
            & ((b < B - 1) | (end == total_q)))


@triton.jit
def _paged_prefill(Q, K, V, CU, CL, BT, O, Err, qk_scale, B, total_q, num_blocks, capacity,
                   stride_qt, stride_qh, stride_qd,
                   stride_kb, stride_ks, stride_kh, stride_kd,
                   stride_vb, stride_vs, stride_vh, stride_vd,
                   stride_cu, stride_cl, stride_btb, stride_btn,
                   stride_ot, stride_oh, stride_od,
                   GROUP: tl.constexpr, HEADS: tl.constexpr, N_SUB: tl.constexpr, BLOCK_Q: tl.constexpr,
                   HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, EVEN_D: tl.constexpr, PAGE: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SMALL_M: tl.constexpr, DOT_PRECISION: tl.constexpr,
                   SAFE: tl.constexpr, CHECK: tl.constexpr):
    block_idx = tl.program_id(0)
    kv_head = tl.program_id(1) // N_SUB
    sub = tl.program_id(1) % N_SUB
    if CHECK:
        if (block_idx < B) & (tl.program_id(1) == 0):
            _validate_sequence(CU, CL, Err, block_idx, B, total_q, capacity, stride_cu, stride_cl)
    b = _find_sequence(CU, stride_cu, block_idx, B, BLOCK_Q)
    if SAFE:
        if b < 0:
            return                                    # cu_seqlens_q[0] > 0: rows before it belong to no sequence
    q_start = tl.load(CU + b.to(tl.int64) * stride_cu)
    q_end = tl.load(CU + (b + 1).to(tl.int64) * stride_cu)
    n_new = q_end - q_start
    if SAFE:
        # A sequence whose rows are out of order or out of q's bounds owns no rows: it writes nothing.
        if _rows_ok(q_start, q_end, b, B, total_q) == 0:
            return
    q0 = (block_idx - (q_start // BLOCK_Q + b)) * BLOCK_Q           # this tile's first new token, in its sequence
    if q0 >= n_new:
        return
    ctx = tl.load(CL + b.to(tl.int64) * stride_cl)
    if SAFE:
        # A length below the new tokens or past the table reads nothing (both stages below are empty): NaN rows.
        len_ok = (ctx >= n_new) & (ctx <= capacity)
        ctx = tl.where(len_ok, ctx, n_new)
    else:
        len_ok = ctx == ctx
    args = (Q, K, V, BT, O, Err, qk_scale, num_blocks, b, kv_head, sub, q_start, q0, n_new, ctx, len_ok,
            stride_qt, stride_qh, stride_qd, stride_kb, stride_ks, stride_kh, stride_kd, stride_vb, stride_vs,
            stride_vh, stride_vd, stride_btb, stride_btn, stride_ot, stride_oh, stride_od)
    if SMALL_M > 0:
        # A sequence with at most SMALL_M // HEADS new tokens (decode, a short verification) is one program, whose
        # rows fit a SMALL_M-row tile: a BLOCK_M tile would spend BLOCK_M / SMALL_M times the tensor work on it,
        # work that the chunks' programs beside it in a mixed batch need.
        if n_new <= SMALL_M // HEADS:
            _tile(*args, GROUP, HEADS, SMALL_M // HEADS, HEAD_DIM, D_PAD, EVEN_D, PAGE, SMALL_M, BLOCK_N,
                  DOT_PRECISION, SAFE, CHECK)
            return
    _tile(*args, GROUP, HEADS, BLOCK_Q, HEAD_DIM, D_PAD, EVEN_D, PAGE, BLOCK_M, BLOCK_N, DOT_PRECISION, SAFE, CHECK)


@triton.jit
def _tile(Q, K, V, BT, O, Err, qk_scale, num_blocks, b, kv_head, sub, q_start, q0, n_new, ctx, len_ok,
          stride_qt, stride_qh, stride_qd, stride_kb, stride_ks, stride_kh, stride_kd, stride_vb, stride_vs,
          stride_vh, stride_vd, stride_btb, stride_btn, stride_ot, stride_oh, stride_od,
          GROUP: tl.constexpr, HEADS: tl.constexpr, BLOCK_Q: tl.constexpr, HEAD_DIM: tl.constexpr,
          D_PAD: tl.constexpr, EVEN_D: tl.constexpr, PAGE: tl.constexpr, BLOCK_M: tl.constexpr,
          BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, SAFE: tl.constexpr, CHECK: tl.constexpr):
    """One program's q tile: new tokens q0 .. q0 + BLOCK_Q - 1 of sequence b (ctx tokens in all) times the HEADS
    query heads of share `sub` of KV head kv_head, attended over the paged cache and written to O."""
    cached = ctx - n_new

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    offs_n = tl.arange(0, BLOCK_N)
    t = offs_m // HEADS                                              # row -> new token of the tile
    in_group = sub * HEADS + offs_m % HEADS                          # row -> query head within the KV group
    row_ok = (t < BLOCK_Q) & (q0 + t < n_new) & (in_group < GROUP)
    heads = kv_head * GROUP + in_group
    tokens = (q_start + q0 + t).to(tl.int64)                         # rows of q and out
    d_ok = offs_d < HEAD_DIM
    # Row r sees keys 0 .. cached + q0 + t (bottom-right); rows past the sequence's tokens are clamped to its last
    # key, so that every row sees at least one key (finite max) and none reads past the context.
    limit = tl.minimum(cached + q0 + t, ctx - 1)

    # q tile [BLOCK_M, D_PAD]; padded rows are zeros (finite scores, never stored).
    q_ptrs = Q + tokens[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    table = BT + b.to(tl.int64) * stride_btb
    k_head = K + kv_head.to(tl.int64) * stride_kh
    v_head = V + kv_head.to(tl.int64) * stride_vh
    bad = no_bad_blocks(offs_n, PAGE, BLOCK_N)
    # -- stage 1: whole tiles that every row sees (keys <= cached + q0, the first row's limit): no mask
    full_end = (cached + q0 + 1) // BLOCK_N * BLOCK_N
    kv_end = tl.minimum(cached + q0 + BLOCK_Q, ctx)
    if SAFE:
        full_end = tl.where(len_ok, full_end, 0)
        kv_end = tl.where(len_ok, kv_end, 0)
    acc, m_i, l_i, bad = _attend(acc, m_i, l_i, bad, q, k_head, v_head, table, 0, full_end, limit, offs_n, offs_d,
                                 d_ok, qk_scale, num_blocks, stride_kb, stride_ks, stride_kd, stride_vb, stride_vs,
                                 stride_vd, stride_btn, PAGE, BLOCK_N, EVEN_D, False, DOT_PRECISION, SAFE)
    # -- stage 2: the tiles on the diagonal, up to the last row's last key. Its first tile starts at or before every
    # row's limit, so each row's running max is finite after it.
    acc, m_i, l_i, bad = _attend(acc, m_i, l_i, bad, q, k_head, v_head, table, full_end, kv_end, limit, offs_n,
                                 offs_d, d_ok, qk_scale, num_blocks, stride_kb, stride_ks, stride_kd, stride_vb,
                                 stride_vs, stride_vd, stride_btn, PAGE, BLOCK_N, EVEN_D, True, DOT_PRECISION, SAFE)

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    if SAFE:
        # -- a bad block id or length: NaN rows for the sequence
        bad_ids = any_bad_block(bad, PAGE, BLOCK_N)
        out = tl.where(bad_ids | (len_ok == 0), float("nan"), out)
        if CHECK:
            tl.store(Err + b, ERR_BLOCK_ID, mask=bad_ids)
    o_ptrs = O + tokens[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def launch(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, config=None, *, scale=None, out=None,
           check_values=True, check=False, _safe=True):
    """Paged varlen attention. q [total_q, Hq, D], caches [num_blocks, block_size, Hkv, D] -> out [total_q, Hq, D].

    scale defaults to 1/sqrt(D). config None means DEFAULT. check_values reads cu_seqlens_q and context_lens to the
    host (a device sync) and checks them against q and the block table; pass False where a sync is not allowed
    (CUDA graph capture, timing) and the values are known to be right.

    Bad values never read or write out of bounds, checked or not: a sequence with a context length outside
    [new tokens, max_blocks x block_size] gets NaN rows; a block id outside [0, num_blocks) gives NaN to every row
    that reads it (a row whose causal keys end before it is NaN or correct, never wrong); the others are unaffected;
    one whose cu_seqlens_q entries are out of order or out of q's rows writes no row.
    check=True reads the kernel's error flags back (a device sync) and raises a ValueError naming the sequence and
    the bad value. _safe=False compiles the unchecked kernel, for benchmarks only.
    """
    check_inputs(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, out, scale)
    config = check_config(dict(DEFAULT) if config is None else config, SPACE, BLOCK_M=16, BLOCK_N=16)
    if check_values:
        check_lengths(cu_seqlens_q, context_lens, q.shape[0], block_tables.shape[1] * k_cache.shape[1])
    if out is None:
        out = torch.empty_like(q)
    total_q, Hq, D = q.shape
    B = cu_seqlens_q.shape[0] - 1
    if out.numel() == 0 or B == 0:
        return out
    Hkv = k_cache.shape[2]
    group = Hq // Hkv
    n_sub, heads, block_q = _tile_rows(group, config["BLOCK_M"])
    D_PAD = padded_head_dim(D)
    grid = (total_q // block_q + B, Hkv * n_sub)
    if grid[1] > 65535:
        raise ValueError(f"Hkv x programs per group = {grid[1]} exceeds the grid limit 65535; use a larger BLOCK_M")
    num_blocks = k_cache.shape[0]
    capacity = block_tables.shape[1] * k_cache.shape[1] if num_blocks else 0   # no block: no token is readable
    errors = torch.zeros(B, dtype=torch.int32, device=q.device) if check else out    # out: unused without CHECK
    _paged_prefill[grid](
        q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, out, errors, qk_scale(scale, D), B, total_q,
        num_blocks, capacity,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), cu_seqlens_q.stride(0), context_lens.stride(0),
        *block_tables.stride(), *out.stride(),
        GROUP=group, HEADS=heads, N_SUB=n_sub, BLOCK_Q=block_q,
        HEAD_DIM=D, D_PAD=D_PAD, EVEN_D=D == D_PAD, PAGE=k_cache.shape[1],
        BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"], SMALL_M=_small_rows(heads, config["BLOCK_M"]),
        DOT_PRECISION=dot_precision(q.dtype),
        SAFE=_safe, CHECK=check and _safe, num_warps=config["num_warps"], num_stages=config["num_stages"],
    )
    if check:
        raise_paged_errors(errors, block_tables, context_lens, num_blocks, k_cache.shape[1], cu_seqlens_q, total_q)
    return out


def _tile_rows(group: int, block_m: int) -> tuple[int, int, int]:
    """(programs per KV group, query heads per program, new tokens per program) for q tiles of block_m rows."""
    n_sub = -(-group // block_m)
    heads = -(-group // n_sub)
    return n_sub, heads, block_m // heads


def _small_rows(heads: int, block_m: int) -> int:
    """Rows of the tile a sequence with few new tokens runs in (at least one token's HEADS rows, and at least 16,
    tl.dot's smallest), or 0 where that is not smaller than BLOCK_M (then every program runs BLOCK_M rows)."""
    small = max(16, triton.next_power_of_2(heads))
    return small if small < block_m else 0


def check_lengths(cu_seqlens_q, context_lens, total_q: int, capacity: int) -> None:
    """ValueError unless cu_seqlens_q starts at 0, never decreases and ends at total_q, and each sequence's new
    tokens fit its context, which fits the block table (capacity tokens). One device-to-host copy."""
    B = context_lens.shape[0]
    values = torch.cat([cu_seqlens_q, context_lens]).tolist()
    cu, lens = values[:B + 1], values[B + 1:]
    if cu[0] != 0:
        raise ValueError(f"cu_seqlens_q must start at 0, got {cu[0]}")
    for b in range(B):
        n_new = cu[b + 1] - cu[b]
        if n_new < 0:
            raise ValueError(f"cu_seqlens_q must be nondecreasing, but cu_seqlens_q[{b + 1}]={cu[b + 1]} < "
                             f"cu_seqlens_q[{b}]={cu[b]}")
        if not n_new <= lens[b] <= capacity:
            raise ValueError(f"context_lens[{b}]={lens[b]} must be >= the sequence's {n_new} new tokens (cached + "
                             f"new) and <= {capacity}, the tokens block_tables addresses (max_blocks x block_size)")
    if cu[B] != total_q:
        raise ValueError(f"cu_seqlens_q must end at q's {total_q} tokens (q.shape[0]), got {cu[B]}")


def check_inputs(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, out, scale):
    cache_layout = "[num_blocks, block_size, Hkv, D]"
    for name, t, rank, layout in (("q", q, 3, "[total_q, Hq, D]"), ("k_cache", k_cache, 4, cache_layout),
                                  ("v_cache", v_cache, 4, cache_layout),
                                  ("block_tables", block_tables, 2, "[B, max_blocks]"),
                                  ("cu_seqlens_q", cu_seqlens_q, 1, "[B + 1]"),
                                  ("context_lens", context_lens, 1, "[B]")):
        check_tensor(name, t, rank, layout)
        check_like(name, t, "q", q, dtype=False)
    check_float_dtype("q", q)
    check_paged_cache(q, k_cache, v_cache, block_tables, cu_seqlens_q=cu_seqlens_q, context_lens=context_lens)
    B = context_lens.shape[0]
    if cu_seqlens_q.shape[0] != B + 1 or block_tables.shape[0] != B:
        raise ValueError(f"cu_seqlens_q {tuple(cu_seqlens_q.shape)} must have B + 1 entries and block_tables "
                         f"{tuple(block_tables.shape)} B rows, for context_lens's B={B} sequences")
    check_runnable("q", q)
    check_interpretable("q", q)
    check_forward_only(q=q, k_cache=k_cache, v_cache=v_cache)
    check_scale(scale)
    check_out(out, "q", q)


# Per-thread 32-bit registers the streamed tiles (K, V, scores, probabilities) may take before spilling is likely.
_TILE_REGISTERS = 192
_SMEM_SLACK = 8 * 1024


def _smem_estimate(config, problem) -> int:
    """Bytes of shared memory, on the high side (the decode kernel's estimate, with a BLOCK_M-row q tile): the K and V
    tile buffers (num_stages of them) or, if larger, the fp32 accumulator's layout conversion, plus the q tile and
    the probabilities as dot operands, plus slack. Not yet checked against sm_90 compiles of this kernel."""
    elt = ELEMENT_BYTES[problem.dtype]
    d_pad, block_m, block_n = padded_head_dim(problem.D), config["BLOCK_M"], config["BLOCK_N"]
    kv = 2 * block_n * d_pad * elt * max(config["num_stages"], 1)
    epilogue = block_m * d_pad * 4
    return max(kv, epilogue) + block_m * d_pad * elt + block_m * block_n * elt + _SMEM_SLACK


SPACE = {
    "BLOCK_M": [16, 32, 64, 128],     # q tile rows: (new token, query head of the group) pairs
    "BLOCK_N": [16, 32, 64, 128],     # K/V tokens per step; any page size (a tile may span pages)
    "num_warps": [2, 4, 8],
    "num_stages": [1, 2, 3, 4],
}


def keep(config, problem):
    """Why this config would not fit this problem (a string), or None. The page size (problem.page) constrains
    nothing: a tile that spans pages gathers each token's block."""
    smem, limit = _smem_estimate(config, problem), shared_memory_limit()
    if smem > limit:
        return f"shared memory ~{smem // 1024} KiB > device limit {limit // 1024} KiB"
    elt = ELEMENT_BYTES[problem.dtype]
    threads = 32 * config["num_warps"]
    block_m, block_n = config["BLOCK_M"], config["BLOCK_N"]
    tile_words = 2 * block_n * padded_head_dim(problem.D) * elt // 4 + 2 * block_m * block_n
    if tile_words // threads > _TILE_REGISTERS:
        return f"register pressure: K/V/score tiles need ~{tile_words // threads} registers per thread"
    acc_words = block_m * padded_head_dim(problem.D)
    if acc_words // threads > _TILE_REGISTERS:
        return f"register pressure: the accumulator needs ~{acc_words // threads} registers per thread"
    return None


DEFAULT = {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}
