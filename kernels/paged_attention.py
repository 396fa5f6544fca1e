"""Decode attention over a paged KV cache (one query token per sequence), with optional split-K (flash-decoding).

Layout:
- q [B, Hq, D]; k_cache, v_cache [num_blocks, block_size, Hkv, D]; block_tables int32 [B, max_blocks];
  context_lens int32 [B]. Token i of sequence b lives in block block_tables[b, i // block_size], row
  i % block_size. Blocks may appear in any order and several sequences may share blocks.
- out [B, Hq, D] in q's dtype, optionally given by the caller, is fully written.
- Any strides on every tensor, block_tables and context_lens included (e.g. q sliced out of a fused QKV projection,
  K and V as halves of one [num_blocks, 2, ...] tensor, context_lens a column of a [B, n] metadata tensor).
- fp8 cache (vLLM's kv_cache_dtype="fp8"): k_cache and v_cache float8_e4m3fn or float8_e5m2 (both the same), with
  k_scale and v_scale given by the caller: real value = stored value * scale. Each scale is a positive finite float, a
  0-d or 1-element float32 tensor (per tensor) or a float32 [Hkv] tensor (per KV head). q and out stay
  fp16/bf16/fp32. The tiles are converted from fp8 to q's dtype on load (exact: every fp8 value is representable),
  except that bf16 queries run their dots in fp16 (F16): an fp8 pair widens to fp16 in one instruction, to bf16 in
  about three, and the fp8 loop is issue-bound, not memory-bound (an H100 measured 1.09-1.19x, 2026-12-07); q's rows
  are scaled into fp16's range by powers of two, exactly, and the factors join the score scale. K's scale joins the
  score scale and V's multiplies the fp32 accumulator, once per program (one KV head each). The search key RESTAGE_V
  (fp8 caches with fp16/bf16 queries) widens the V tile to 16 bits in registers and restages it in shared memory for
  the P V dot (_restaged): without it Triton reads the fp8 tile back one byte per load into that dot's operand layout,
  whose K dimension (tokens) is strided (bench/paged_sass.py: 30 instead of 38 warp-instructions per token at
  BLOCK_N 128, 3 stages; an H100 ran the four fp8 headline shapes in 0.82-0.96x the time, 2026-12-07). Restaging K
  as well, with the dots transposed, executed 35% fewer instructions but ran slower (benchmarks/h100/2026-12-07c).
  The fp8 handling is constexpr (KV_FP8, F16, RESTAGE_V): the fp16/bf16/fp32 specialisations compile without it. A
  scale tensor's values are read (one device sync) on its first use and after an in-place write, not on every
  call.

Schedule:
- One program per (KV head, partition, sequence) handles all query heads of that KV group, so each KV byte is read
  once per group: a q tile [GROUP_PAD, D] whose unused rows are masked (GROUP_PAD >= 16 so that tl.dot applies).
  Groups above 64 query heads are split over ceil(group / 64) programs, each reading the group's K/V.
- Each loop step loads a [BLOCK_N, D] tile of K and V. A tile may span several pages: each token's physical block is
  gathered from the block table, so BLOCK_N is tuned independently of the page size (BLOCK_SIZE, the cache's
  k_cache.shape[1]: a layout, part of the problem, not searched). When BLOCK_N <=
  BLOCK_SIZE a tile lies in one page and a single table entry is read. The next tile's block ids are read one step
  ahead, so num_stages - 1 tiles are in flight.
- PARTITION > 0 splits each sequence into partitions of PARTITION tokens. The first kernel writes the unnormalised
  partial results (running max m, sum l, accumulator acc; fp32 scratch) and a reduce kernel merges them. Partitions
  past a sequence's length do nothing and the reduce reads only the partitions that hold tokens. The number of
  partitions comes from the block table's width (max_blocks * block_size), never from reading context_lens on the
  host. When that gives a single partition, or PARTITION is 0, the first kernel writes the output and no reduce runs.
- Online softmax in base 2 (scores scaled by scale * log2(e), exp2).

Supported: fp16, bf16 and fp32 (fp32 dots use input_precision="ieee": exact but slow); head dims 16..256 (non-powers
of two padded to the next power of two and masked); GQA/MQA (query head h reads KV head h // (Hq // Hkv)); any
context length >= 1 up to max_blocks * block_size (a length of 0 gives zeros).

Bad values (issue 16): the kernels never read out of bounds, whatever block_tables and context_lens hold. A length
outside [0, max_blocks * block_size] reads nothing; a block id outside [0, num_blocks) among the entries a sequence
reads is replaced by block 0 (one select per table entry, the K/V masks as they were). Either way that sequence's
output rows are NaN (the reduce propagates a partition's NaN and checks the length itself) and the others are
computed as usual. With CHECK (launch(..., check=True)) the kernel also writes an error code per sequence (ERR_* in
_launch.py), which launch reads back (a device sync) and raises as a ValueError naming the sequence and its value.
SAFE=False (launch(..., _safe=False), for bench/paged_check_cost.py only) compiles the kernels without these checks.

Not supported: more than one query token per sequence (prefill, speculative decoding), sliding windows, ALiBi or
soft-capping, int8 caches, fp8 scales per token or block, returning the log-sum-exp.
"""
import torch
import triton
import triton.language as tl

from ._launch import (ELEMENT_BYTES, ERR_BLOCK_ID, ERR_LENGTH, LOG2E, any_bad_block, check_config, check_float_dtype,
                      check_forward_only, check_grid, check_group, check_head_dim, check_interpretable,
                      check_kv_cache_dtypes, check_like, check_out, check_runnable, check_same_shape, check_scale,
                      check_tensor, checked_blocks, checked_length, dot_precision, interpreting, kv_scale,
                      no_bad_blocks, padded_head_dim, qk_scale, raise_paged_errors, shared_memory_limit, tile_blocks)


@triton.jit
def _restaged(x, anchor, OPAQUE: tl.constexpr):
    """x unchanged (the fp8 V tile just widened to 16 bits), behind an identity Triton cannot see through: its
    pipeliner then stages the widened tile in shared memory for the P V dot, as it stages a 16-bit cache's V, instead
    of sinking the widening below the shared-memory read. Sunk, that read delivers bytes in the dot's operand layout,
    whose K dimension (tokens) is strided in the cache: one byte per load (bench/paged_sass.py counts the loop). The
    identity is one `mov` per register pair, which ptxas removes. Its second operand, built from `anchor` (any runtime
    scalar; its value is never used), keeps Triton from treating it as an op of x alone, which it would sink too. The
    interpreter has no inline assembly: there it is x * 1, exact."""
    if OPAQUE:
        return tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r,r", [x, x * 0 + anchor.to(x.dtype)], dtype=x.dtype,
                                         is_pure=True, pack=2)
    else:
        return x * 1.0


@triton.jit
def _paged_decode(Q, K, V, BT, CL, O, M_part, L_part, Acc_part, K_scale, V_scale, Err, qk_scale, num_parts,
                  num_blocks, capacity,
                  stride_qb, stride_qh, stride_qd,
                  stride_kb, stride_ks, stride_kh, stride_kd,
                  stride_vb, stride_vs, stride_vh, stride_vd,
                  stride_btb, stride_btn, stride_cl, stride_ksc, stride_vsc,
                  stride_ob, stride_oh, stride_od,
                  Hq, N_SUB: tl.constexpr, GROUP: tl.constexpr, ROWS: tl.constexpr, GROUP_PAD: tl.constexpr,
                  HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, EVEN_D: tl.constexpr,
                  BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, PARTITION: tl.constexpr, SPLIT: tl.constexpr,
                  DOT_PRECISION: tl.constexpr, KV_FP8: tl.constexpr, F16: tl.constexpr, RESTAGE_V: tl.constexpr,
                  OPAQUE: tl.constexpr, SAFE: tl.constexpr, CHECK: tl.constexpr):
    # KV heads vary fastest over the grid: programs running side by side read neighbouring 256-byte rows of the same
    # tokens ([block, row, head, D] layout), which keeps DRAM accesses close together.
    kv_head = tl.program_id(0) // N_SUB
    sub = tl.program_id(0) % N_SUB
    part = tl.program_id(1)
    b = tl.program_id(2)
    # A length outside [0, table width x page size] reads nothing (SAFE): the sequence's output is NaN.
    ctx, ctx_ok = checked_length(CL, b, stride_cl, capacity, SAFE)
    if SPLIT:
        start = part * PARTITION
        end = tl.minimum(start + PARTITION, ctx)
    else:
        start = 0
        end = ctx

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, D_PAD)
    offs_n = tl.arange(0, BLOCK_N)
    in_group = sub * ROWS + offs_g
    row_ok = (offs_g < ROWS) & (in_group < GROUP)
    heads = kv_head * GROUP + in_group                                   # query heads of this program's rows
    d_ok = offs_d < HEAD_DIM

    # q tile [GROUP_PAD, D_PAD]; padded rows are zeros (their scores are 0, finite, and never stored).
    q_ptrs = Q + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, D_PAD], tl.float32)
    table = BT + b.to(tl.int64) * stride_btb
    k_head = K + kv_head.to(tl.int64) * stride_kh
    v_head = V + kv_head.to(tl.int64) * stride_vh
    if KV_FP8:
        # One KV head per program, so its scales are scalars: K's joins the score scale, V's multiplies the
        # accumulator once at the end, and the tiles are only converted (exactly) from fp8 to q's dtype.
        qk_scale = qk_scale * tl.load(K_scale + kv_head * stride_ksc)
        v_scale = tl.load(V_scale + kv_head * stride_vsc)
    if F16:
        # bf16 queries on an fp8 cache: the dots run in fp16, since an fp8 pair widens to fp16 in one instruction and
        # to bf16 in about three, and the fp8 loop is issue-bound (bench/paged_sass.py). q is scaled by a power of two
        # into fp16's range, row by row (a GQA group's heads may differ in size by any factor), and the factor joins
        # that row's score scale; both steps are exact for q's 8-bit mantissa. Only rows past 2^15 are scaled.
        qf = q.to(tl.float32)
        e = tl.maximum(tl.ceil(tl.log2(tl.max(tl.abs(qf), 1))) - 15.0, 0.0)
        q = (qf * tl.math.exp2(-e)[:, None]).to(tl.float16)
        qk_scale = qk_scale * tl.math.exp2(e)[:, None]          # [GROUP_PAD, 1]: scales each row's scores

    # The block ids of the next tile are loaded one iteration ahead: the K/V loads then depend on no load of their
    # own iteration, and Triton's pipeliner keeps num_stages - 1 tiles in flight (with the table load in the same
    # iteration it keeps one, triton 3.6).
    blk_next = tile_blocks(table, start, end, offs_n, stride_btn, BLOCK_SIZE, BLOCK_N)
    bad = no_bad_blocks(offs_n, BLOCK_SIZE, BLOCK_N)
    # Every tile starts before `end`, so it holds at least one visible token and m_i is finite after the first.
    for n0 in range(start, end, BLOCK_N):
        tok = n0 + offs_n
        visible = tok < end
        blk, bad = checked_blocks(blk_next, num_blocks, bad, SAFE)
        # int64: block id * block stride overflows int32 on large caches.
        blk = blk.to(tl.int64)
        blk_next = tile_blocks(table, n0 + BLOCK_N, end, offs_n, stride_btn, BLOCK_SIZE, BLOCK_N)
        row = tok % BLOCK_SIZE
        k_rows = k_head + blk * stride_kb + row * stride_ks
        v_rows = v_head + blk * stride_vb + row * stride_vs
        if EVEN_D:
            kv_mask = visible[:, None]
        else:
            kv_mask = visible[:, None] & d_ok[None, :]
        # Masked rows read as 0, never as the stale (possibly NaN) rows past the context in a last page.
        k = tl.load(k_rows[:, None] + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
        if KV_FP8:
            k = k.to(q.dtype)
        # -- scores in base 2, new running max
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        s = tl.where(visible[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        # -- update m_i and l_i, rescale the accumulator
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_rows[:, None] + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
        if KV_FP8:
            v = v.to(q.dtype)
            if RESTAGE_V:
                v = _restaged(v, capacity, OPAQUE)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    if KV_FP8:
        acc = acc * v_scale
    if SAFE:
        # -- a bad block id or length: NaN for the whole sequence (the reduce propagates a partition's NaN)
        bad_ids = any_bad_block(bad, BLOCK_SIZE, BLOCK_N)
        acc = tl.where(bad_ids | (ctx_ok == 0), float("nan"), acc)
        if CHECK:
            code = tl.where(bad_ids, ERR_BLOCK_ID, tl.where(ctx_ok, 0, ERR_LENGTH))
            tl.store(Err + b, code, mask=code != 0)

    if SPLIT:
        # Partials of a partition with no tokens are never read by the reduce, so they are not written either.
        store_ok = row_ok & (start < ctx)
        slot = ((b * Hq + heads).to(tl.int64) * num_parts + part)
        tl.store(M_part + slot, m_i, mask=store_ok)
        tl.store(L_part + slot, l_i, mask=store_ok)
        tl.store(Acc_part + slot[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=store_ok[:, None] & d_ok[None, :])
    else:
        # A sequence of length 0 has l = 0: write zeros rather than 0/0.
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]           # NaN stays NaN (a bad sequence)
        o_ptrs = O + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + offs_d[None, :] * stride_od
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _paged_reduce(CL, O, M_part, L_part, Acc_part, num_parts, capacity, stride_cl,
                  stride_ob, stride_oh, stride_od,
                  Hq, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, PARTITION: tl.constexpr,
                  BLOCK_P: tl.constexpr, SAFE: tl.constexpr):
    """Merges the partitions of one (sequence, query head): out = sum_p 2^(m_p - M) acc_p / sum_p 2^(m_p - M) l_p.
    A partition's NaN (a bad block id) makes the output NaN; so does a length outside [0, capacity]."""
    head = tl.program_id(0)
    b = tl.program_id(1)
    ctx, ctx_ok = checked_length(CL, b, stride_cl, capacity, SAFE)
    used = (ctx + PARTITION - 1) // PARTITION                      # partitions that hold tokens
    base = (b * Hq + head).to(tl.int64) * num_parts
    offs_p = tl.arange(0, BLOCK_P)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM

    m_run = tl.full([], float("-inf"), tl.float32)
    l_run = tl.full([], 0.0, tl.float32)
    acc = tl.zeros([D_PAD], tl.float32)
    # Partition 0 is the first one read and holds a token, so m_run is finite after the first chunk.
    for p0 in range(0, used, BLOCK_P):
        parts = p0 + offs_p
        p_ok = parts < used
        m_p = tl.load(M_part + base + parts, mask=p_ok, other=float("-inf"))
        l_p = tl.load(L_part + base + parts, mask=p_ok, other=0.0)
        a_p = tl.load(Acc_part + (base + parts)[:, None] * HEAD_DIM + offs_d[None, :],
                      mask=p_ok[:, None] & d_ok[None, :], other=0.0)
        m_new = tl.maximum(m_run, tl.max(m_p, 0))
        alpha = tl.math.exp2(m_run - m_new)
        w = tl.math.exp2(m_p - m_new)                              # 0 for masked partitions
        l_run = l_run * alpha + tl.sum(w * l_p, 0)
        acc = acc * alpha + tl.sum(w[:, None] * a_p, 0)
        m_run = m_new

    out = acc / tl.where(l_run > 0, l_run, 1.0)
    if SAFE:
        out = tl.where(ctx_ok, out, float("nan"))
    o_ptrs = O + b.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh + offs_d * stride_od
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=d_ok)


def launch(q, k_cache, v_cache, block_tables, context_lens, config=None, *, scale=None, out=None, k_scale=None,
           v_scale=None, check=False, _safe=True):
    """Paged decode attention. q [B, Hq, D], caches [num_blocks, block_size, Hkv, D] -> out [B, Hq, D].

    scale defaults to 1/sqrt(D). config None means DEFAULT. The block (page) size is the cache's layout, fixed when
    it was built: it is read from k_cache.shape[1] (a power of two), never from the config. An fp8 cache needs
    k_scale and v_scale (see the module docstring).

    Bad values never read out of bounds: a sequence whose context length is outside [0, max_blocks x block_size]
    or that reads a block id outside [0, num_blocks) gets NaN rows, the others are unaffected. check=True also reads
    the kernel's error flags back (a device sync, so not inside a CUDA graph) and raises a ValueError naming the
    sequence and the bad value. _safe=False compiles the old unchecked kernel, for bench/paged_check_cost.py only.
    """
    fp8 = _check_inputs(q, k_cache, v_cache, block_tables, context_lens, out, scale, k_scale, v_scale)
    k_scale, stride_ksc = kv_scale("k_scale", k_scale, k_cache.shape[2], q.device) if fp8 else (None, 0)
    v_scale, stride_vsc = kv_scale("v_scale", v_scale, k_cache.shape[2], q.device) if fp8 else (None, 0)
    config = _check_config(dict(DEFAULT) if config is None else config)
    block_size = k_cache.shape[1]
    B, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    if out is None:
        out = torch.empty_like(q)
    if out.numel() == 0:
        return out
    D_PAD = padded_head_dim(D)
    group = Hq // Hkv
    n_sub, rows, group_pad = _group_split(group)
    partition = config["PARTITION"]
    max_tokens = block_tables.shape[1] * block_size          # the longest context the table can address
    num_parts = triton.cdiv(max_tokens, partition) if partition else 1
    check_grid(f"partitions (block_tables addresses {max_tokens} tokens, PARTITION={partition})", num_parts,
               "; use a larger PARTITION")
    split = num_parts > 1
    if split:
        m_part = torch.empty(B, Hq, num_parts, dtype=torch.float32, device=q.device)
        l_part = torch.empty_like(m_part)
        acc_part = torch.empty(B, Hq, num_parts, D, dtype=torch.float32, device=q.device)
    else:
        m_part = l_part = acc_part = out                       # unused: the kernel writes out directly
    num_blocks = k_cache.shape[0]
    capacity = max_tokens if num_blocks else 0                 # no block: no token is readable
    errors = torch.zeros(B, dtype=torch.int32, device=q.device) if check else out    # out: unused without CHECK
    _paged_decode[(Hkv * n_sub, num_parts, B)](
        q, k_cache, v_cache, block_tables, context_lens, out, m_part, l_part, acc_part, k_scale, v_scale, errors,
        qk_scale(scale, D), num_parts, num_blocks, capacity,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *block_tables.stride(), context_lens.stride(0),
        stride_ksc, stride_vsc, *out.stride(),
        Hq, N_SUB=n_sub, GROUP=group, ROWS=rows, GROUP_PAD=group_pad,
        HEAD_DIM=D, D_PAD=D_PAD, EVEN_D=D == D_PAD,
        BLOCK_SIZE=block_size, BLOCK_N=config["BLOCK_N"], PARTITION=partition if split else 0, SPLIT=split,
        DOT_PRECISION=dot_precision(q.dtype), KV_FP8=fp8,
        F16=bool(fp8 and q.dtype == torch.bfloat16), RESTAGE_V=_restages_v(config, fp8, q.dtype),
        OPAQUE=not interpreting(),
        SAFE=_safe, CHECK=check and _safe,
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )
    if split:
        _paged_reduce[(Hq, B)](
            context_lens, out, m_part, l_part, acc_part, num_parts, capacity, context_lens.stride(0), *out.stride(),
            Hq, HEAD_DIM=D, D_PAD=D_PAD, PARTITION=partition, BLOCK_P=_REDUCE_BLOCK_P, SAFE=_safe,
            num_warps=_REDUCE_WARPS,
        )
    if check:
        raise_paged_errors(errors, block_tables, context_lens, num_blocks, block_size)
    return out


_MAX_ROWS = 64        # query heads per program; larger groups are split (the q tile and accumulator stay small)
_REDUCE_BLOCK_P = 32  # partitions merged per step of the reduce
_REDUCE_WARPS = 4


def _restages_v(config: dict, fp8: bool, dtype) -> bool:
    """Whether this launch restages the V tile: an fp8 cache with 16-bit dots (keep() rejects RESTAGE_V=1 elsewhere;
    launch ignores it there, since a 16-bit cache's V is staged as 16-bit values already)."""
    return bool(config["RESTAGE_V"] and fp8 and dtype != torch.float32)


def _group_split(group: int) -> tuple[int, int, int]:
    """(programs per KV group, query heads per program, padded rows of the q tile)."""
    n_sub = -(-group // _MAX_ROWS)
    rows = -(-group // n_sub)
    return n_sub, rows, max(16, triton.next_power_of_2(rows))


def _check_config(config: dict) -> dict:
    if isinstance(config, dict) and "BLOCK_SIZE" in config:
        raise ValueError("config['BLOCK_SIZE'] is not a config key: the page size is the cache's layout, read from "
                         f"k_cache.shape[1]; expected the keys {sorted(SPACE)}")
    check_config(config, SPACE, BLOCK_N=16)
    part = config["PARTITION"]
    if not isinstance(part, int) or part < 0 or (part and part % config["BLOCK_N"]):
        raise ValueError(f"config['PARTITION'] must be 0 (no split) or a multiple of BLOCK_N="
                         f"{config['BLOCK_N']}, got {part!r}")
    if config["RESTAGE_V"] not in SPACE["RESTAGE_V"] or isinstance(config["RESTAGE_V"], bool):
        raise ValueError(f"config['RESTAGE_V'] must be one of {SPACE['RESTAGE_V']}, got {config['RESTAGE_V']!r}")
    return config


def _check_inputs(q, k_cache, v_cache, block_tables, context_lens, out, scale, k_scale, v_scale) -> bool:
    """Checks every input; returns whether the cache is fp8 (whose scales kv_scale checks at launch)."""
    cache_layout = "[num_blocks, block_size, Hkv, D]"
    for name, t, rank, layout in (("q", q, 3, "[B, Hq, D]"), ("k_cache", k_cache, 4, cache_layout),
                                  ("v_cache", v_cache, 4, cache_layout),
                                  ("block_tables", block_tables, 2, "[B, max_blocks]"),
                                  ("context_lens", context_lens, 1, "[B]")):
        check_tensor(name, t, rank, layout)
        check_like(name, t, "q", q, dtype=False)
    check_float_dtype("q", q)
    fp8 = check_kv_cache_dtypes(k_cache, v_cache, k_scale, v_scale)
    if not fp8:
        check_like("k_cache", k_cache, "q", q)
        check_like("v_cache", v_cache, "q", q)
    for name, t in (("block_tables", block_tables), ("context_lens", context_lens)):
        if t.dtype != torch.int32:
            raise TypeError(f"{name} must be int32, got {t.dtype}")
    check_same_shape("k_cache", k_cache, "v_cache", v_cache)
    B, Hq, D = q.shape
    page = k_cache.shape[1]
    if page < 1 or page & (page - 1):
        raise ValueError(f"k_cache's block size (shape[1]) must be a power of two, got {page}")
    if k_cache.shape[3] != D:
        raise ValueError(f"k_cache/v_cache head dim {k_cache.shape[3]} must equal q head dim {D}")
    check_head_dim(D)
    check_group(Hq, k_cache.shape[2], "cache")
    if block_tables.shape[0] != B or context_lens.shape[0] != B:
        raise ValueError(f"block_tables {tuple(block_tables.shape)} and context_lens {tuple(context_lens.shape)} "
                         f"must have q's batch {B} rows")
    if block_tables.shape[1] < 1:
        raise ValueError("block_tables must have at least one column (max_blocks >= 1)")
    check_grid("B", B)
    check_runnable("q", q)
    check_interpretable("q", q)
    check_forward_only(q=q, k_cache=k_cache, v_cache=v_cache)
    check_scale(scale)
    check_out(out, "q", q)
    return fp8


# Per-thread 32-bit registers the streamed tiles (K, V, scores, probabilities) may take before spilling is likely;
# the accumulator and q tile are fixed by the problem, not chosen by the config, so they are not counted here.
_TILE_REGISTERS = 192
# Shared memory that the estimate below does not itemise: reduction scratch, barriers, layout-conversion slack.
_SMEM_SLACK = 8 * 1024


def _smem_estimate(config, problem) -> int:
    """Bytes of shared memory, on the high side: the K and V tile buffers (or, if larger, the fp32 accumulator's
    layout conversion before the epilogue's store), the q tile and the probabilities as dot operands, plus slack.
    Triton 3.6 on sm_90 keeps num_stages - 1 K/V buffers for mma.sync (q tiles under 64 rows) and num_stages for
    wgmma (64-row q tiles in fp16/bf16, whose dots run asynchronously); RESTAGE_V adds the widened V tile. Checked
    against sm_90 compiles of every kernel variant for several shapes (metadata.shared), which it bounds from above."""
    elt = ELEMENT_BYTES[problem.dtype]
    d_pad, block_n = padded_head_dim(problem.D), config["BLOCK_N"]
    group_pad = _group_split(problem.group)[2]
    if config["RESTAGE_V"] and problem.kv_dtype:
        return _smem_estimate(dict(config, RESTAGE_V=0), problem) + block_n * d_pad * 2
    wgmma = group_pad >= 64 and problem.dtype != "float32"
    buffers = max(config["num_stages"] - (0 if wgmma else 1), 1)
    kv = 2 * block_n * d_pad * (1 if problem.kv_dtype else elt) * buffers      # an fp8 cache's tiles: a byte each
    epilogue = group_pad * d_pad * 4
    return max(kv, epilogue) + group_pad * d_pad * elt + group_pad * block_n * elt + _SMEM_SLACK


# The page size (BLOCK_SIZE) is not searched: it is the cache's layout, part of the Problem (problem.page).
SPACE = {
    "BLOCK_N": [16, 32, 64, 128],
    "PARTITION": [0, 128, 256, 512, 1024, 2048],   # tokens per split-K partition; 0: one partition per sequence
    "num_warps": [2, 4, 8],
    "num_stages": [1, 2, 3, 4],
    "RESTAGE_V": [0, 1],   # 1 (fp8 caches): the V tile widened to 16 bits and restaged for the P V dot (_restaged)
}


def keep(config, problem):
    """Why this config would not compile, run or fit for this problem (a string), or None. Any BLOCK_N works with
    any page (problem.page): a tile that spans pages gathers each token's block, so no rule depends on the page."""
    block_n, part = config["BLOCK_N"], config["PARTITION"]
    if part and part % block_n:
        return f"PARTITION={part} is not a multiple of BLOCK_N={block_n}"
    if config["RESTAGE_V"] and (not problem.kv_dtype or problem.dtype == "float32"):
        return ("RESTAGE_V=1 applies to an fp8 cache with fp16/bf16 queries only (a 16-bit cache's tiles are staged "
                "as 16-bit values already; fp32 queries run fp32 dots)")
    smem, limit = _smem_estimate(config, problem), shared_memory_limit()
    if smem > limit:
        return f"shared memory ~{smem // 1024} KiB > device limit {limit // 1024} KiB"
    elt = ELEMENT_BYTES[problem.dtype]
    threads = 32 * config["num_warps"]
    group_pad = _group_split(problem.group)[2]
    tile_words = 2 * block_n * padded_head_dim(problem.D) * elt // 4 + 2 * group_pad * block_n
    if tile_words // threads > _TILE_REGISTERS:
        return f"register pressure: K/V/score tiles need ~{tile_words // threads} registers per thread"
    return None


DEFAULT = {"BLOCK_N": 32, "PARTITION": 512, "num_warps": 4, "num_stages": 3, "RESTAGE_V": 0}
