"""FlashAttention-3-style forward for Hopper (sm_90: H100/H200), written in Triton 3.6's Gluon dialect.

The schedule, as far as Gluon on Hopper allows it:
- one program per (Q tile, batch * head), the K/V loop inside (FlashAttention-2's order); causal tiles are started
  from the bottom so that the last wave is made of short tiles;
- the Q tile and every K/V block arrive by TMA (host-side rank-4 descriptors over [B, H, N, D], so each head's tail is
  zero-filled and the output store is clipped per head) into a ring of STAGES shared-memory buffers, each guarded by
  an mbarrier;
- S = Q K^T and O += P V are asynchronous warpgroup MMAs (wgmma): Q, K and V are read from shared memory, P from
  registers; the online softmax (exp2, scale folded into one FMA) stays in registers;
- OVERLAP=False: each MMA is waited for at once (S, softmax, P V, one block after the other); OVERLAP=True:
  FlashAttention-3's intra-warpgroup overlap: S_{j+1} = Q K_{j+1}^T is issued before P_j V_j, and the softmax of
  block j + 1 runs while P_j V_j is in the tensor cores (more registers live: S_{j+1}, P_j and O);
- WARP_SPECIALIZE=False: the compute warps also issue the TMA loads, STAGES blocks ahead (a block's slot is reloaded
  as soon as its P V completes); WARP_SPECIALIZE=True: a producer partition of one warp (PRODUCER_REGS registers)
  issues the loads and the compute warps (the default partition, which gets the registers left over) hand each slot
  back with an mbarrier arrive;
- PINGPONG=True (FlashAttention-3's ping-pong; with WARP_SPECIALIZE and num_warps=4): two consumer warpgroups, each
  on its own BLOCK_M-row Q tile of the CTA, share one K/V ring (a slot is free once both have released it) and take
  turns at the tensor cores through two named barriers (_turn_take/_turn_pass): a warpgroup issues its MMAs of a
  step only after the other has issued its own, so that one's softmax runs while the other's MMAs do. Both walk the
  K/V blocks of the CTA's 2 * BLOCK_M rows, so that their turns pair up;
- Causal attention is aligned bottom-right (FlashAttention >= 2.1): query i sees key j iff j <= i + (Nk - Nq). Blocks
  that every row of a tile sees in full run without mask math; only the diagonal and the Nk tail are masked. A query
  row that sees no key at all (Nq > Nk) outputs zeros.

Supported: q [B, Hq, Nq, D], k/v [B, Hkv, Nk, D] (GQA/MQA: query head h reads kv head h // (Hq // Hkv)), any Nq and Nk,
fp16 and bf16, head dims 64, 128 and 256, on a device of compute capability 9.x. TMA needs a contiguous last dim, a
16-byte-aligned base and 16-byte-aligned strides: launch refuses other inputs (ValueError) rather than copy them
(flash_v2 runs those); `out` must satisfy the same.
Not supported (launch raises ValueError/TypeError; flash_v2 runs them): fp32, other head dims, other GPUs (Ampere
has no wgmma or TMA, Blackwell no wgmma), the Triton interpreter (Gluon has none), backward, dropout, masks other
than causal, returning the log-sum-exp, Nk = 0.

Not done yet (FlashAttention-3 has them): a persistent grid with a causal-balanced tile order, fp8.
"""
import functools

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from ._launch import check_config, check_dense_inputs, check_grid, interpreting, qk_scale


@gluon.jit
def _issue_kv_load(k_desc, v_desc, k_bufs, v_bufs, k_bars, v_bars, j, b, hkv, pred,
                   BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    """Starts the TMA loads of K/V block j into ring slot j % STAGES (skipped where pred is false)."""
    s = j % STAGES
    k_bar = k_bars.index(s)
    v_bar = v_bars.index(s)
    mbarrier.expect(k_bar, k_desc.block_type.nbytes, pred=pred)
    tma.async_copy_global_to_shared(k_desc, [b, hkv, j * BLOCK_N, 0], k_bar, k_bufs.index(s), pred=pred)
    mbarrier.expect(v_bar, v_desc.block_type.nbytes, pred=pred)
    tma.async_copy_global_to_shared(v_desc, [b, hkv, j * BLOCK_N, 0], v_bar, v_bufs.index(s), pred=pred)


@gluon.jit
def _softmax(qk, m_i, l_i, j, rows, offs_n, Nk, shift, qk_scale,
             BLOCK_N: gl.constexpr, MASK_N: gl.constexpr, MASK_CAUSAL: gl.constexpr):
    """The online softmax of block j's scores: (P, alpha, new m_i, new l_i), in log2 units (the scale is folded into
    the exp2 argument). MASK_N masks keys >= Nk; MASK_CAUSAL masks key c for row r when c > r + shift."""
    if MASK_N or MASK_CAUSAL:
        cols = j * BLOCK_N + offs_n
        if MASK_N and MASK_CAUSAL:
            visible = (cols[None, :] < Nk) & (cols[None, :] <= rows[:, None] + shift)
        elif MASK_N:
            visible = (cols[None, :] < Nk) & (rows[:, None] >= 0)
        else:
            visible = cols[None, :] <= rows[:, None] + shift
        qk = gl.where(visible, qk * qk_scale, float("-inf"))
        m_ij = gl.maximum(m_i, gl.max(qk, 1))
        # A row that has seen no key yet keeps p = 0 and l = 0 instead of exp2(-inf - -inf) = NaN. (Visibility is a
        # prefix of the keys, so such a row sees no key in any later block either.)
        m_ij = gl.where(m_ij == float("-inf"), 0.0, m_ij)
        qk = qk - m_ij[:, None]
    else:
        m_ij = gl.maximum(m_i, gl.max(qk, 1) * qk_scale)
        qk = qk * qk_scale - m_ij[:, None]
    p = gl.exp2(qk)
    alpha = gl.exp2(m_i - m_ij)
    return p, alpha, m_ij, l_i * alpha + gl.sum(p, 1)


@gluon.jit
def _release(k_desc, v_desc, k_bufs, v_bufs, k_bars, v_bars, empty_bars, j, b, hkv, n_blocks, pred,
             BLOCK_N: gl.constexpr, STAGES: gl.constexpr, PRODUCER: gl.constexpr):
    """Block j's slot is free (its P V completed): PRODUCER reuses it for block j + STAGES, which it loads now;
    otherwise the producer partition is told (skipped where pred is false)."""
    if PRODUCER:
        ahead = j + STAGES
        _issue_kv_load(k_desc, v_desc, k_bufs, v_bufs, k_bars, v_bars, ahead, b, hkv, (ahead < n_blocks) & pred,
                       BLOCK_N, STAGES)
    else:
        mbarrier.arrive(empty_bars.index(j % STAGES), count=1, pred=pred)


@gluon.jit
def _turn_take(PINGPONG: gl.constexpr, ME: gl.constexpr):
    """PINGPONG: consumer ME waits for its turn at the tensor cores, i.e. until the other consumer warpgroup has
    issued its MMAs (_turn_pass). Named barriers 14 (consumer 0's turn) and 15 (consumer 1's), 256 threads: one
    warpgroup arrives, the other syncs. (Triton 3.6 uses barrier 0 within a partition and low ids around
    warp_specialize.)"""
    if PINGPONG:
        if ME == 0:
            gl.inline_asm_elementwise("bar.sync 14, 256; // $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1)
        else:
            gl.inline_asm_elementwise("bar.sync 15, 256; // $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _turn_pass(PINGPONG: gl.constexpr, ME: gl.constexpr):
    """PINGPONG: consumer ME has issued its MMAs; the other consumer's turn (an arrive: ME goes on at once)."""
    if PINGPONG:
        if ME == 0:
            gl.inline_asm_elementwise("bar.arrive 15, 256; // $0", "=r", [], dtype=gl.int32, is_pure=False,
                                      pack=1)
        else:
            gl.inline_asm_elementwise("bar.arrive 14, 256; // $0", "=r", [], dtype=gl.int32, is_pure=False,
                                      pack=1)


@gluon.jit
def _issue_qk(q_smem, k_bufs, k_bars, j, s_zero, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
              STAGES: gl.constexpr):
    """Starts S_j = Q K_j^T (async wgmma, K viewed transposed in shared memory) once K_j has landed."""
    s = j % STAGES
    mbarrier.wait(k_bars.index(s), (j // STAGES) & 1)
    k_t = k_bufs.index(s).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0))
    return warpgroup_mma(q_smem, k_t, s_zero, use_acc=False, is_async=True)


@gluon.jit
def _issue_pv(p, acc, v_bufs, v_bars, j, p_layout: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
              STAGES: gl.constexpr):
    """Starts O += P_j V_j (async wgmma, P from registers) once V_j has landed. Returns (O, P as the wgmma reads
    it): a wait that leaves this wgmma in flight must keep that P alive (in its deps), its registers being read."""
    s = j % STAGES
    p_op = gl.convert_layout(p.to(v_bufs.dtype), p_layout)
    mbarrier.wait(v_bars.index(s), (j // STAGES) & 1)
    return warpgroup_mma(p_op, v_bufs.index(s).reshape([BLOCK_N, HEAD_DIM]), acc, is_async=True), p_op


@gluon.jit
def _attend(acc, l_i, m_i, q_smem, k_desc, v_desc, k_bufs, v_bufs, k_bars, v_bars, empty_bars,
            b, hkv, m0, lo, hi, n_blocks, Nk, shift, qk_scale,
            s_layout: gl.constexpr, o_layout: gl.constexpr, p_layout: gl.constexpr,
            BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr,
            MASK_N: gl.constexpr, MASK_CAUSAL: gl.constexpr, PRODUCER: gl.constexpr,
            PINGPONG: gl.constexpr, ME: gl.constexpr):
    """K/V blocks [lo, hi) folded into (acc, l_i, m_i), one block at a time: S = Q K^T, softmax, O += P V, each MMA
    waited for at once. Block j's slot is released (reloaded with block j + STAGES where PRODUCER, else handed to
    the producer partition) when its P V completes. PINGPONG: each MMA is issued in this consumer's turn."""
    rows = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout))
    offs_n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    for j in range(lo, hi):
        _turn_take(PINGPONG, ME)
        qk = _issue_qk(q_smem, k_bufs, k_bars, j, s_zero, BLOCK_N, HEAD_DIM, STAGES)
        _turn_pass(PINGPONG, ME)
        qk = warpgroup_mma_wait(num_outstanding=0, deps=(qk, ))
        p, alpha, m_i, l_i = _softmax(qk, m_i, l_i, j, rows, offs_n, Nk, shift, qk_scale,
                                      BLOCK_N, MASK_N, MASK_CAUSAL)
        acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
        _turn_take(PINGPONG, ME)
        acc, _ = _issue_pv(p, acc, v_bufs, v_bars, j, p_layout, BLOCK_N, HEAD_DIM, STAGES)
        _turn_pass(PINGPONG, ME)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))     # at once: P need not be kept alive
        _release(k_desc, v_desc, k_bufs, v_bufs, k_bars, v_bars, empty_bars, j, b, hkv, n_blocks, True,
                 BLOCK_N, STAGES, PRODUCER)
    return acc, l_i, m_i


@gluon.jit
def _attend_overlapped(acc, l_i, m_i, q_smem, k_desc, v_desc, k_bufs, v_bufs, k_bars, v_bars, empty_bars,
                       b, hkv, m0, lo, hi, n_blocks, Nk, shift, qk_scale,
                       s_layout: gl.constexpr, o_layout: gl.constexpr, p_layout: gl.constexpr,
                       BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr,
                       MASK_N: gl.constexpr, MASK_CAUSAL: gl.constexpr, PRODUCER: gl.constexpr,
                       PINGPONG: gl.constexpr, ME: gl.constexpr):
    """_attend with FlashAttention-3's intra-warpgroup overlap: S_{j+1} = Q K_{j+1}^T is issued before O += P_j V_j,
    and the softmax of block j + 1 runs while P_j V_j is still in the tensor cores; O is rescaled once that MMA is
    waited for. Each turn of the loop ends with no wgmma in flight, and every wait that leaves one in flight names
    what it still reads or writes (O and P_j) in its deps: values of an in-flight wgmma carried around the loop, or
    left out of the deps, made ptxas serialize the wgmmas and inject waits of its own (C7514, C7517), and the
    earlier schedule, which carried them, gave wrong results on causal problems on an H100. Block j's slot is
    released (reloaded, or handed to the producer) when its P V completes. PINGPONG: the MMAs of each step (S_{j+1}
    and P_j V_j) are issued together in this consumer's turn, so that the other consumer's run while this one's
    softmax does (FlashAttention-3's ping-pong)."""
    rows = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout))
    offs_n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    if hi > lo:
        _turn_take(PINGPONG, ME)
        qk = _issue_qk(q_smem, k_bufs, k_bars, lo, s_zero, BLOCK_N, HEAD_DIM, STAGES)
        _turn_pass(PINGPONG, ME)
        qk = warpgroup_mma_wait(num_outstanding=0, deps=(qk, ))
        p, alpha, m_i, l_i = _softmax(qk, m_i, l_i, lo, rows, offs_n, Nk, shift, qk_scale,
                                      BLOCK_N, MASK_N, MASK_CAUSAL)
        acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
        for j in range(lo, hi - 1):
            # -- S_{j+1} first, then P_j V_j; wait for S_{j+1} only, and take block j + 1's softmax meanwhile
            _turn_take(PINGPONG, ME)
            qk = _issue_qk(q_smem, k_bufs, k_bars, j + 1, s_zero, BLOCK_N, HEAD_DIM, STAGES)
            acc, p_op = _issue_pv(p, acc, v_bufs, v_bars, j, p_layout, BLOCK_N, HEAD_DIM, STAGES)
            _turn_pass(PINGPONG, ME)
            qk, acc, p_op = warpgroup_mma_wait(num_outstanding=1, deps=(qk, acc, p_op))
            p, alpha, m_i, l_i = _softmax(qk, m_i, l_i, j + 1, rows, offs_n, Nk, shift, qk_scale,
                                          BLOCK_N, MASK_N, MASK_CAUSAL)
            # -- P_j V_j done: free block j's slot, rescale O for block j + 1's running max
            acc, p_op = warpgroup_mma_wait(num_outstanding=0, deps=(acc, p_op))
            _release(k_desc, v_desc, k_bufs, v_bufs, k_bars, v_bars, empty_bars, j, b, hkv, n_blocks, True,
                     BLOCK_N, STAGES, PRODUCER)
            acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
        _turn_take(PINGPONG, ME)
        acc, p_op = _issue_pv(p, acc, v_bufs, v_bars, hi - 1, p_layout, BLOCK_N, HEAD_DIM, STAGES)
        _turn_pass(PINGPONG, ME)
        acc, p_op = warpgroup_mma_wait(num_outstanding=0, deps=(acc, p_op))
        _release(k_desc, v_desc, k_bufs, v_bufs, k_bars, v_bars, empty_bars, hi - 1, b, hkv, n_blocks, True,
                 BLOCK_N, STAGES, PRODUCER)
    return acc, l_i, m_i


@gluon.jit
def _kv_blocks(m0, Nq, Nk, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr):
    """How many K/V blocks the Q tile at row m0 reads: all, or (causal) up to the key its last valid row sees,
    j <= min(m0 + BLOCK_M, Nq) - 1 + (Nk - Nq)."""
    if CAUSAL:
        n_blocks = gl.cdiv(gl.minimum(Nk, gl.maximum(gl.minimum(m0 + BLOCK_M, Nq) + Nk - Nq, 0)), BLOCK_N)
    else:
        n_blocks = gl.cdiv(Nk, BLOCK_N)
    return n_blocks


@gluon.jit
def _span(BLOCK_M: gl.constexpr, PINGPONG: gl.constexpr):
    """Query rows per CTA: one BLOCK_M tile, or one per consumer warpgroup under PINGPONG."""
    if PINGPONG:
        return 2 * BLOCK_M
    else:
        return BLOCK_M


@gluon.jit
def _consume(q_desc, k_desc, v_desc, o_desc, q_bufs, q_bars, k_bufs, v_bufs, k_bars, v_bars, empty_bars,
             b, h, hkv, m_cta, Nq, Nk, qk_scale,
             BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr,
             CAUSAL: gl.constexpr, OVERLAP: gl.constexpr, PRODUCER: gl.constexpr, PINGPONG: gl.constexpr,
             ME: gl.constexpr, num_warps: gl.constexpr):
    """The compute warps of consumer ME: the whole K/V loop of its Q tile (rows m_cta + ME * BLOCK_M onwards), then
    the output store. Under PINGPONG the CTA's two consumers walk the same K/V blocks, those of the CTA's 2 * BLOCK_M
    rows, masked from the first row's first masked block on, so that both take the same number of turns (a causal
    tile's earlier consumer may fold in a block its rows see nothing of: p = 0 there)."""
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)

    # K/V blocks [0, full_hi) need no mask; [full_hi, n_blocks) are the diagonal and/or the Nk tail.
    n_blocks = _kv_blocks(m_cta, Nq, Nk, _span(BLOCK_M, PINGPONG), BLOCK_N, CAUSAL)
    full_hi = Nk // BLOCK_N
    shift = Nk - Nq
    if CAUSAL:
        # Row m_cta (the CTA's first) sees keys j <= m_cta + shift: whole blocks below that need no mask.
        full_hi = gl.minimum(full_hi, gl.maximum(m_cta + shift + 1, 0) // BLOCK_N)
    m0 = m_cta + ME * BLOCK_M
    q_smem = q_bufs.index(ME)

    if PRODUCER:
        for i in gl.static_range(STAGES):
            _issue_kv_load(k_desc, v_desc, k_bufs, v_bufs, k_bars, v_bars, i, b, hkv, i < n_blocks,
                           BLOCK_N, STAGES)

    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
    l_i = gl.zeros([BLOCK_M], gl.float32, gl.SliceLayout(1, s_layout))
    acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_layout)
    q_tile = q_smem.reshape([BLOCK_M, HEAD_DIM])
    mbarrier.wait(q_bars.index(ME), 0)
    if PINGPONG:
        if ME == 1:
            _turn_pass(PINGPONG, ME)          # consumer 0 takes the first turn
    if OVERLAP:
        acc, l_i, m_i = _attend_overlapped(acc, l_i, m_i, q_tile, k_desc, v_desc, k_bufs, v_bufs, k_bars, v_bars,
                                           empty_bars, b, hkv, m0, 0, full_hi, n_blocks, Nk, shift, qk_scale,
                                           s_layout, o_layout, p_layout, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES,
                                           False, False, PRODUCER, PINGPONG, ME)
        acc, l_i, m_i = _attend_overlapped(acc, l_i, m_i, q_tile, k_desc, v_desc, k_bufs, v_bufs, k_bars, v_bars,
                                           empty_bars, b, hkv, m0, full_hi, n_blocks, n_blocks, Nk, shift, qk_scale,
                                           s_layout, o_layout, p_layout, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES,
                                           True, CAUSAL, PRODUCER, PINGPONG, ME)
    else:
        acc, l_i, m_i = _attend(acc, l_i, m_i, q_tile, k_desc, v_desc, k_bufs, v_bufs, k_bars, v_bars, empty_bars,
                                b, hkv, m0, 0, full_hi, n_blocks, Nk, shift, qk_scale,
                                s_layout, o_layout, p_layout, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES,
                                False, False, PRODUCER, PINGPONG, ME)
        acc, l_i, m_i = _attend(acc, l_i, m_i, q_tile, k_desc, v_desc, k_bufs, v_bufs, k_bars, v_bars, empty_bars,
                                b, hkv, m0, full_hi, n_blocks, n_blocks, Nk, shift, qk_scale,
                                s_layout, o_layout, p_layout, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES,
                                True, CAUSAL, PRODUCER, PINGPONG, ME)

    if PINGPONG:
        if ME == 0:
            _turn_take(PINGPONG, ME)          # consumer 1's last pass: each barrier ends as it began
    # -- epilogue: rows that saw no key (l == 0) output 0, not 0/0; Q's buffer is reused to stage O for the TMA store
    l_safe = gl.where(l_i == 0.0, 1.0, l_i)
    out = acc / gl.convert_layout(l_safe, gl.SliceLayout(1, o_layout))[:, None]
    q_tile.store(out.to(o_desc.dtype))
    fence_async_shared()
    tma.async_copy_shared_to_global(o_desc, [b, h, m0, 0], q_smem)
    tma.store_wait(pendings=0)


@gluon.jit
def _produce(k_desc, v_desc, k_bufs, v_bufs, k_bars, v_bars, empty_bars, b, hkv, m_cta, Nq, Nk,
             BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, CAUSAL: gl.constexpr,
             PINGPONG: gl.constexpr):
    """The producer partition (WARP_SPECIALIZE): loads every K/V block the CTA's rows need, waiting for a free slot
    (released by every consumer: empty_bars count them)."""
    for j in range(_kv_blocks(m_cta, Nq, Nk, _span(BLOCK_M, PINGPONG), BLOCK_N, CAUSAL)):
        # Barriers start in phase 0, so the first wait on each slot (parity 1) passes at once.
        mbarrier.wait(empty_bars.index(j % STAGES), ((j // STAGES) & 1) ^ 1)
        _issue_kv_load(k_desc, v_desc, k_bufs, v_bufs, k_bars, v_bars, j, b, hkv, True, BLOCK_N, STAGES)


@gluon.jit
def _flash_v3_fwd(q_desc, k_desc, v_desc, o_desc, qk_scale, Hq, GROUP, Nq, Nk,
                  BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr,
                  CAUSAL: gl.constexpr, OVERLAP: gl.constexpr, WARP_SPECIALIZE: gl.constexpr,
                  PRODUCER_REGS: gl.constexpr, PINGPONG: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                  num_warps: gl.constexpr):
    if CAUSAL:
        # Tiles further down see more keys: start them first so the last wave is made of short tiles.
        start_m = gl.num_programs(0) - 1 - gl.program_id(0)
    else:
        start_m = gl.program_id(0)
    off_bh = gl.program_id(1)
    b = off_bh // Hq
    h = off_bh % Hq
    hkv = h // GROUP
    m_cta = start_m * _span(BLOCK_M, PINGPONG)
    CONSUMERS: gl.constexpr = 2 if PINGPONG else 1

    dtype: gl.constexpr = q_desc.dtype
    q_bufs = gl.allocate_shared_memory(dtype, [CONSUMERS] + q_desc.block_type.shape, q_desc.layout)
    k_bufs = gl.allocate_shared_memory(dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_bufs = gl.allocate_shared_memory(dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
    q_bars = gl.allocate_shared_memory(gl.int64, [CONSUMERS, 1], mbarrier.MBarrierLayout())
    k_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for c in gl.static_range(CONSUMERS):
        mbarrier.init(q_bars.index(c), count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_bars.index(i), count=1)
        mbarrier.init(v_bars.index(i), count=1)
        mbarrier.init(empty_bars.index(i), count=CONSUMERS)     # a slot is free once every consumer is done with it

    # -- the Q tiles, loaded once; each stays in shared memory (wgmma's A operand) for the whole K/V loop
    for c in gl.static_range(CONSUMERS):
        mbarrier.expect(q_bars.index(c), q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [b, h, m_cta + c * BLOCK_M, 0], q_bars.index(c), q_bufs.index(c))

    if PINGPONG:
        # Consumer 0 in the default partition, consumer 1 (as many warps) and the producer as workers.
        gl.warp_specialize([
            (_consume, (q_desc, k_desc, v_desc, o_desc, q_bufs, q_bars, k_bufs, v_bufs, k_bars, v_bars, empty_bars,
                        b, h, hkv, m_cta, Nq, Nk, qk_scale,
                        BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, CAUSAL, OVERLAP, False, True, 0, num_warps)),
            (_consume, (q_desc, k_desc, v_desc, o_desc, q_bufs, q_bars, k_bufs, v_bufs, k_bars, v_bars, empty_bars,
                        b, h, hkv, m_cta, Nq, Nk, qk_scale,
                        BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, CAUSAL, OVERLAP, False, True, 1, num_warps)),
            (_produce, (k_desc, v_desc, k_bufs, v_bufs, k_bars, v_bars, empty_bars, b, hkv, m_cta, Nq, Nk,
                        BLOCK_M, BLOCK_N, STAGES, CAUSAL, True)),
        ], [num_warps, 1], [CONSUMER_REGS, PRODUCER_REGS])
    elif WARP_SPECIALIZE:
        gl.warp_specialize([
            (_consume, (q_desc, k_desc, v_desc, o_desc, q_bufs, q_bars, k_bufs, v_bufs, k_bars, v_bars, empty_bars,
                        b, h, hkv, m_cta, Nq, Nk, qk_scale,
                        BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, CAUSAL, OVERLAP, False, False, 0, num_warps)),
            (_produce, (k_desc, v_desc, k_bufs, v_bufs, k_bars, v_bars, empty_bars, b, hkv, m_cta, Nq, Nk,
                        BLOCK_M, BLOCK_N, STAGES, CAUSAL, False)),
        ], [1], [PRODUCER_REGS])
    else:
        _consume(q_desc, k_desc, v_desc, o_desc, q_bufs, q_bars, k_bufs, v_bufs, k_bars, v_bars, empty_bars,
                 b, h, hkv, m_cta, Nq, Nk, qk_scale,
                 BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, CAUSAL, OVERLAP, True, False, 0, num_warps)

    for c in gl.static_range(CONSUMERS):
        mbarrier.invalidate(q_bars.index(c))
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(k_bars.index(i))
        mbarrier.invalidate(v_bars.index(i))
        mbarrier.invalidate(empty_bars.index(i))


def launch(q, k, v, config=None, *, causal=False, scale=None, out=None):
    """Attention forward. q [B, Hq, Nq, D], k/v [B, Hkv, Nk, D] -> out [B, Hq, Nq, D] (q's dtype).

    scale defaults to 1/sqrt(D). config None means DEFAULT. Raises ValueError/TypeError for what flash_v3 cannot run
    (see the module docstring); it never copies an input.
    """
    config = _check_config(DEFAULT if config is None else config)
    check_dense_inputs(q, k, v, out, causal, scale)
    check_grid("B * Hq", q.shape[0] * q.shape[1])
    dtype = str(q.dtype).removeprefix("torch.")
    if reason := _input_refusal(dtype, q.shape[-1]):
        raise (TypeError if dtype not in DTYPES else ValueError)(f"flash_v3: {reason}")
    _check_tma(q=q, k=k, v=v, out=out)
    if k.shape[2] == 0 and q.shape[2] > 0:
        raise ValueError("flash_v3: k/v must hold at least one key (Nk >= 1): a TMA descriptor has no empty dims")
    if reason := unavailable():
        raise ValueError(f"flash_v3: {reason}")
    if reason := _unfit(config, dtype, q.shape[-1]):
        raise ValueError(f"flash_v3: config {config} cannot run: {reason}")
    if out is None:
        out = torch.empty_like(q)
    if out.numel() == 0:
        return out
    kernel, grid, args, options = _arguments(q, k, v, out, config, causal, scale)
    kernel[grid](*args, **options)
    return out


def _arguments(q, k, v, out, config, causal, scale):
    """(kernel, grid, positional args, keyword args) of one launch; also what the sm_90 compile tests compile."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    block_m, block_n = config["BLOCK_M"], config["BLOCK_N"]
    descs = [_descriptor(t, block) for t, block in ((q, block_m), (k, block_n), (v, block_n), (out, block_m))]
    options = dict(BLOCK_M=block_m, BLOCK_N=block_n, HEAD_DIM=D, STAGES=config["STAGES"], CAUSAL=causal,
                   OVERLAP=config["OVERLAP"],
                   WARP_SPECIALIZE=config["WARP_SPECIALIZE"], PRODUCER_REGS=config["PRODUCER_REGS"],
                   PINGPONG=config["PINGPONG"], CONSUMER_REGS=_CONSUMER_REGS, num_warps=config["num_warps"])
    consumers = _consumers(config)
    if config["WARP_SPECIALIZE"]:
        options["maxnreg"] = _maxnreg(consumers * config["num_warps"])
    grid = (triton.cdiv(Nq, consumers * block_m), B * Hq)
    return _flash_v3_fwd, grid, (*descs, qk_scale(scale, D), Hq, Hq // Hkv, Nq, Nk), options


def _descriptor(t: torch.Tensor, block_rows: int) -> TensorDescriptor:
    """A rank-4 TMA descriptor over [B, H, N, D] with [1, 1, block_rows, D] boxes. A size-1 dim's stride is never
    used, so it is replaced by an aligned one (TMA checks every stride)."""
    shape, strides = list(t.shape), list(t.stride())
    for i in range(2, -1, -1):
        if shape[i] == 1:
            strides[i] = strides[i + 1] * shape[i + 1]
    block = [1, 1, block_rows, shape[3]]
    return TensorDescriptor(t, shape, strides, block, _shared_layout(block_rows, shape[3], t.dtype))


@functools.cache
def _shared_layout(block_rows: int, head_dim: int, dtype: torch.dtype):
    """The swizzled shared-memory layout of a [1, 1, block_rows, head_dim] TMA box: the same for every call of a
    config, and three quarters of a launch's host-side argument building (47 us on a 2-core CI-class CPU, 11.5 us
    cached), which shows next to a 70 us kernel."""
    return gl.NVMMASharedLayout.get_default_for([1, 1, block_rows, head_dim], _GL_DTYPES[dtype])


def _consumers(config: dict) -> int:
    """Consumer warpgroups per CTA, each with its own BLOCK_M-row Q tile: two under PINGPONG."""
    return 2 if config["PINGPONG"] else 1


# Registers per thread of the second consumer warpgroup under PINGPONG (the first, the default partition, gets what
# the producer leaves: 2 x 128 x 240 + 128 x 24 fill the SM's 64K).
_CONSUMER_REGS = 240


def _maxnreg(num_warps: int) -> int:
    """Registers per thread that let the compute warps plus the producer's warpgroup fit the SM's 64K registers (one
    CTA per SM); warp_specialize moves the producer's unused share to the compute warps."""
    return min(240, 65536 // (32 * (num_warps + 4)) // 8 * 8)


def _check_config(config: dict) -> dict:
    check_config(config, SPACE, BLOCK_M=64, BLOCK_N=16)
    for key in ("WARP_SPECIALIZE", "OVERLAP", "PINGPONG"):
        if not isinstance(config[key], bool):
            raise ValueError(f"config[{key!r}] must be a bool, got {config[key]!r}")
    for key in ("STAGES", "PRODUCER_REGS"):
        if config[key] not in SPACE[key] or isinstance(config[key], bool):
            raise ValueError(f"config[{key!r}] must be one of {SPACE[key]}, got {config[key]!r}")
    return config


def _check_tma(**tensors: torch.Tensor) -> None:
    """TMA reads and writes through descriptors: a contiguous last dim, a 16-byte-aligned base and 16-byte-aligned
    strides (of dims longer than 1). flash_v3 refuses the rest rather than copying them; flash_v2 runs any strides."""
    for name, t in tensors.items():
        if t is None:
            continue
        es = t.element_size()
        if t.stride(-1) != 1 and t.shape[-1] > 1:
            raise ValueError(f"flash_v3: {name} must have a contiguous last dim for TMA (stride 1), got strides "
                             f"{tuple(t.stride())}; use flash_v2, or pass {name}.contiguous()")
        if t.data_ptr() % 16:
            raise ValueError(f"flash_v3: {name}'s data pointer must be 16-byte aligned for TMA; use flash_v2, or "
                             f"pass {name}.contiguous()")
        bad = [s for n, s in zip(t.shape[:-1], t.stride()[:-1]) if n > 1 and (s <= 0 or (s * es) % 16)]
        if bad:
            raise ValueError(f"flash_v3: {name}'s strides {tuple(t.stride())} must be positive multiples of 16 bytes "
                             f"({16 // es} elements) for TMA; use flash_v2, or pass {name}.contiguous()")


def refusal(q, k, v) -> str | None:
    """Why flash_v3 would refuse these inputs here (device, dtype, head dim, TMA layout, no keys), or None; what
    tunebench.flash_attention(variant="auto") asks before it considers flash_v3's winners."""
    dtype = str(q.dtype).removeprefix("torch.")
    reason = unavailable() or _input_refusal(dtype, q.shape[-1])
    if reason:
        return reason
    if q.dim() != 4 or k.dim() != 4 or k.shape[2] == 0:
        return "q, k, v must be 4-d with at least one key"
    try:
        _check_tma(q=q, k=k, v=v)
    except ValueError as e:
        return str(e)
    return None


_GL_DTYPES = {torch.float16: gl.float16, torch.bfloat16: gl.bfloat16}
HEAD_DIMS = (64, 128, 256)
DTYPES = ("float16", "bfloat16")


def unavailable() -> str | None:
    """Why flash_v3 cannot run here, or None: it needs a compiled sm_90 (Hopper) kernel."""
    if interpreting():
        return ("it is written in Gluon, which has no interpreter: it needs a Hopper GPU (compute capability 9.x, "
                "H100/H200) and TRITON_INTERPRET unset; flash_v2 runs everywhere else")
    if not torch.cuda.is_available():
        return ("it needs a Hopper GPU (compute capability 9.x, H100/H200) and no CUDA device is available (it is "
                "written in Gluon, which has no CPU interpreter); flash_v2 runs everywhere else")
    major, minor = torch.cuda.get_device_capability()
    if major != 9:
        return (f"it needs a Hopper GPU (compute capability 9.x, H100/H200: wgmma and TMA), the device has "
                f"{major}.{minor}")
    return None


def _input_refusal(dtype: str, D: int) -> str | None:
    if dtype not in DTYPES:
        return f"dtype must be float16 or bfloat16 (wgmma on 16-bit inputs), got {dtype}; flash_v2 runs fp32"
    if D not in HEAD_DIMS:
        return f"head dim must be one of {HEAD_DIMS}, got {D}; flash_v2 runs the others"
    return None


# Shared memory per CTA beyond the tiles: mbarriers and the compiler's scratch.
_SMEM_SLACK = 1024
# The opt-in shared memory per block of an H100/H200.
_HOPPER_SHARED_MEMORY = 227 * 1024
# fp32 scores plus output accumulator per thread beyond which ptxas spills on sm_90 (as flash_v2 measured).
_MAX_ACC_REGS = 160


def _unfit(config: dict, dtype: str, D: int) -> str | None:
    """Why a config cannot compile or fit an sm_90 SM for this dtype and head dim, or None; the device aside."""
    if reason := _input_refusal(dtype, D):
        return reason
    block_m, block_n, warps = config["BLOCK_M"], config["BLOCK_N"], config["num_warps"]
    if block_m < 16 * warps:
        return f"BLOCK_M={block_m} < 16 rows per warp * num_warps={warps}: wgmma gives each warp 16 rows"
    if not config["WARP_SPECIALIZE"] and config["PRODUCER_REGS"] != SPACE["PRODUCER_REGS"][0]:
        return "PRODUCER_REGS only matters with WARP_SPECIALIZE (the same kernel as its first value)"
    if config["PINGPONG"]:
        if not config["WARP_SPECIALIZE"]:
            return "PINGPONG needs WARP_SPECIALIZE: one producer warp feeds both consumer warpgroups"
        if warps != 4:
            return f"PINGPONG runs two consumer warpgroups of num_warps=4 each, got num_warps={warps}"
    smem = (_consumers(config) * block_m + 2 * config["STAGES"] * block_n) * D * 2 + _SMEM_SLACK
    if smem > _HOPPER_SHARED_MEMORY:
        return f"shared memory ~{smem} B > the H100/H200's {_HOPPER_SHARED_MEMORY} B"
    acc_regs = block_m * (D + block_n) // (32 * warps)
    if acc_regs > _MAX_ACC_REGS:
        return f"register pressure: {acc_regs} fp32 accumulator values per thread > {_MAX_ACC_REGS}"
    # No further rule for OVERLAP (which keeps S_{j+1} and P_j live beside O): under the rebuilt schedule ptxas
    # spills nothing for OVERLAP + WARP_SPECIALIZE at 4 warps (240 registers) and at most 8 bytes at 8 warps
    # (D 128, 128 x 128 tiles: 168 registers), so the tuner measures those configs rather than keep() guessing.
    return None


SPACE = {
    "BLOCK_M": [64, 128],
    "BLOCK_N": [64, 128],
    "num_warps": [4, 8],
    "STAGES": [2, 3],
    "OVERLAP": [False, True],
    "WARP_SPECIALIZE": [False, True],
    # The producer's register budget under WARP_SPECIALIZE (it only issues TMA loads: 24 is the hardware minimum).
    # Larger budgets compile (40 was checked) but only take registers from the compute warps; kept to one value so
    # that a probe of every config fits one short GPU call.
    "PRODUCER_REGS": [24],
    # Two consumer warpgroups (num_warps=4 each) on two Q tiles, taking turns at the tensor cores so that one's
    # softmax runs while the other's MMAs do (FlashAttention-3's ping-pong); needs WARP_SPECIALIZE.
    "PINGPONG": [False, True],
}


def keep(config, problem):
    """Why this config would not compile, run or fit for this problem (a string), or None. Off Hopper and in the
    interpreter every config is rejected with the reason."""
    return unavailable() or _unfit(config, problem.dtype, problem.D)


# Admitted for every problem flash_v3 runs: D 256 needs BLOCK_N 64 to fit two stages and the registers.
DEFAULT = {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "STAGES": 2, "OVERLAP": False,
           "WARP_SPECIALIZE": False, "PRODUCER_REGS": 24, "PINGPONG": False}
