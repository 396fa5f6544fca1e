"""FlashAttention-1 forward: the schedule of Dao et al. 2022, Algorithm 1, as a Triton kernel.

One program per (batch, query head). Its OUTER loop runs over K/V blocks (B_c = BLOCK_N rows of K and V, loaded once
per outer step) and its INNER loop over Q blocks (B_r = BLOCK_M rows). The running output O_i and the softmax
statistics m_i (row max) and l_i (row sum) live in HBM: every inner step reads them, folds in one S_ij = Q_i K_j^T
tile and writes them back, so O, m and l make one HBM round trip per K/V block. O is kept normalised
(diag(l_i)^-1 sum_j P_ij V_j) as in the paper. This is the schedule FlashAttention-2 improves on (outer loop over Q, O
in registers, grid over Q blocks too); tunebench keeps it to measure against flash_v2, not to be fast.

Supported:
- q [B, Hq, Nq, D], k and v [B, Hkv, Nk, D], out [B, Hq, Nq, D], any strides (a [B, N, H, D] tensor viewed through
  .transpose(1, 2) works without a copy).
- GQA/MQA: Hq a multiple of Hkv; query head h reads kv head h // (Hq // Hkv).
- Any Nq and Nk (tails masked), Nq != Nk included.
- Causal masking aligned bottom-right (query i sees key j iff j <= i + Nk - Nq, as in FlashAttention >= 2.1). Q
  blocks that see none of the current K/V block are skipped. A query row that sees no key (Nq > Nk) outputs 0.
- Head dims 16..256; one that is not a power of two is padded to the next one and masked.
- fp16, bf16 and fp32. fp32 dots are exact fp32 (input_precision="ieee", no tf32), like naive fp32 torch.

Not supported: backward, dropout, attention bias or arbitrary masks, sliding windows, variable-length (packed)
batches, paged K/V (see paged_attention), fp8, head dims outside 16..256.

Scratch: launch allocates fp32 O [B*Hq, Nq, D rounded up to 16], m and l [B*Hq, Nq] per call (O in fp32 so that rewriting it once per
K/V block does not accumulate fp16 rounding); the kernel initialises them itself (Algorithm 1, line 2) and writes the
result to `out`, in q's dtype, in a final pass over the Q blocks.

Tuning: SPACE holds B_r (BLOCK_M), B_c (BLOCK_N), num_warps and num_stages (the software-pipelining depth of the inner
loop over Q blocks). keep() rejects configs whose estimated shared memory exceeds the device's opt-in limit or whose
estimated register tiles would spill heavily; both estimates were fitted by compiling SPACE for sm_90 with triton 3.6
(no config over the estimate, no admitted config spilling more than about 1 KiB per thread).
"""
import torch
import triton
import triton.language as tl

from ._launch import (ELEMENT_BYTES, LOG2E, check_config, check_dense_inputs, dot_precision, head_dim_unsupported,
                      padded_head_dim, qk_scale, shared_memory_limit)


@triton.jit
def _flash_v1_fwd(
    Q, K, V, Out, O_acc, M_acc, L_acc,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    Hq, Nq, Nk, D, D_SCR, qk_scale,
    GROUP: tl.constexpr, D_PAD: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)             # one program per (batch, query head)
    b = pid // Hq
    h = pid % Hq
    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_kb + (h // GROUP) * stride_kh
    v_base = V + b * stride_vb + (h // GROUP) * stride_vh
    out_base = Out + b * stride_ob + h * stride_oh
    # Scratch is contiguous: O [B*Hq, Nq, D_SCR], m and l [B*Hq, Nq]. D_SCR (D rounded up to 16) keeps O's rows
    # 64-byte aligned, so the O round trips, most of this schedule's HBM traffic, stay vectorised for any D.
    o_base = O_acc + pid * Nq * D_SCR
    m_base = M_acc + pid * Nq
    l_base = L_acc + pid * Nq

    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < D
    scr_d_ok = offs_d < D_SCR                        # O's columns D..D_SCR-1 hold zeros (Q and V are 0-padded)
    diag = Nk - Nq                                   # bottom-right causal: query i sees key j iff j <= i + diag

    # -- Algorithm 1, line 2: O = 0, l = 0, m = -inf in HBM
    for start_m in range(0, Nq, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < Nq
        tl.store(o_base + offs_m[:, None] * D_SCR + offs_d[None, :], tl.zeros([BLOCK_M, D_PAD], tl.float32),
                 mask=m_ok[:, None] & scr_d_ok[None, :])
        tl.store(m_base + offs_m, tl.full([BLOCK_M], float("-inf"), tl.float32), mask=m_ok)
        tl.store(l_base + offs_m, tl.zeros([BLOCK_M], tl.float32), mask=m_ok)
    # The next reads of O, m, l may be done by other threads of this program than the ones that wrote them.
    tl.debug_barrier()

    # -- line 5: outer loop over K/V blocks
    for start_n in range(0, Nk, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < Nk
        # -- line 6: load K_j, V_j once per outer step
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)

        lo = 0
        if CAUSAL:
            # Q blocks wholly above the diagonal see none of this K/V block: start at the block holding the first
            # row that sees key start_n.
            lo = tl.maximum(start_n - diag, 0) // BLOCK_M * BLOCK_M
        # -- line 7: inner loop over Q blocks, software-pipelined NUM_STAGES deep. It asks for its own depth because
        #    the launch's num_stages did not pipeline it (Triton 3.6, sm_90: the same code for 1, 2 and 3).
        for start_m in tl.range(lo, Nq, BLOCK_M, num_stages=NUM_STAGES):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            m_ok = offs_m < Nq
            row_mask = m_ok[:, None] & d_ok[None, :]
            scr_mask = m_ok[:, None] & scr_d_ok[None, :]
            # -- line 8: load Q_i, O_i, l_i, m_i. Scratch loads use .cg (L2, not L1): it was written by this
            #    program on the previous outer step.
            q = tl.load(q_base + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd, mask=row_mask, other=0.0)
            o_ptrs = o_base + offs_m[:, None] * D_SCR + offs_d[None, :]
            o_i = tl.load(o_ptrs, mask=scr_mask, other=0.0, cache_modifier=".cg")
            m_i = tl.load(m_base + offs_m, mask=m_ok, other=float("-inf"), cache_modifier=".cg")
            l_i = tl.load(l_base + offs_m, mask=m_ok, other=0.0, cache_modifier=".cg")

            # -- line 9: S_ij = Q_i K_j^T (in log2 units)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
            visible = n_ok[None, :]
            if CAUSAL:
                visible = visible & (offs_n[None, :] <= offs_m[:, None] + diag)
            s = tl.where(visible, s, float("-inf"))

            # -- line 10: m~_ij = rowmax(S_ij), P~_ij = exp(S_ij - m~_ij), l~_ij = rowsum(P~_ij)
            m_ij = tl.max(s, 1)
            # A row that sees no key of this block has m~ = -inf; subtracting 0 instead keeps exp2 from giving NaN.
            m_ij_safe = tl.where(m_ij == float("-inf"), 0.0, m_ij)
            p = tl.math.exp2(s - m_ij_safe[:, None])
            l_ij = tl.sum(p, 1)

            # -- line 11: m_new = max(m_i, m~_ij), l_new = e^(m_i - m_new) l_i + e^(m~_ij - m_new) l~_ij
            m_new = tl.maximum(m_i, m_ij)
            m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.math.exp2(m_i - m_new_safe)
            beta = tl.math.exp2(m_ij - m_new_safe)
            l_new = alpha * l_i + beta * l_ij

            # -- line 12: O_i <- diag(l_new)^-1 (diag(l_i) e^(m_i - m_new) O_i + e^(m~_ij - m_new) P~_ij V_j)
            pv = tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            l_div = tl.where(l_new == 0.0, 1.0, l_new)   # rows that have seen no key yet keep O = 0
            o_i = (o_i * (alpha * l_i)[:, None] + pv * beta[:, None]) / l_div[:, None]

            # -- lines 12-13: write O_i, l_i <- l_new, m_i <- m_new to HBM
            tl.store(o_ptrs, o_i, mask=scr_mask)
            tl.store(m_base + offs_m, m_new, mask=m_ok)
            tl.store(l_base + offs_m, l_new, mask=m_ok)
        # The next outer step reads back what this one wrote, possibly through other threads.
        tl.debug_barrier()

    # -- line 16: O is already normalised; convert it to the output dtype
    for start_m in range(0, Nq, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < Nq
        row_mask = m_ok[:, None] & d_ok[None, :]
        o = tl.load(o_base + offs_m[:, None] * D_SCR + offs_d[None, :], mask=m_ok[:, None] & scr_d_ok[None, :],
                    other=0.0, cache_modifier=".cg")
        tl.store(out_base + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od,
                 o.to(Out.dtype.element_ty), mask=row_mask)


def launch(q, k, v, config=None, *, causal=False, scale=None, out=None):
    """Attention with the FlashAttention-1 schedule. q [B, Hq, Nq, D], k/v [B, Hkv, Nk, D] -> out [B, Hq, Nq, D].

    config: a dict over SPACE's keys (None: DEFAULT). causal must be a bool; scale (None: 1/sqrt(D)) a finite number.
    out, when given, must have q's shape, dtype and device; every element of it is overwritten.
    """
    config = check_config(DEFAULT if config is None else config, SPACE, BLOCK_M=16, BLOCK_N=16)
    check_dense_inputs(q, k, v, out, causal, scale)
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    grid, args, meta = kernel_arguments(q, k, v, out, config, causal, scale)
    _flash_v1_fwd[grid](*args, **meta)
    return out


def kernel_arguments(q, k, v, out, config, causal, scale):
    """(grid, positional args, keyword args) of one _flash_v1_fwd launch, scratch allocated. Inputs unchecked."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    D_scr = -(-D // 16) * 16
    o_acc = torch.empty(B * Hq, Nq, D_scr, dtype=torch.float32, device=q.device)
    m_acc = torch.empty(B * Hq, Nq, dtype=torch.float32, device=q.device)
    l_acc = torch.empty_like(m_acc)
    args = (q, k, v, out, o_acc, m_acc, l_acc, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            Hq, Nq, Nk, D, D_scr, qk_scale(scale, D))
    meta = dict(GROUP=Hq // Hkv, D_PAD=padded_head_dim(D), CAUSAL=bool(causal), DOT_PRECISION=dot_precision(q.dtype),
                BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"], NUM_STAGES=config["num_stages"],
                # The inner loop sets its own pipelining depth (see the kernel); the other loops stream.
                num_warps=config["num_warps"], num_stages=1)
    return (B * Hq,), args, meta


def shared_memory_bytes(config: dict, D_pad: int, elem_bytes: int) -> int:
    """An upper estimate of the kernel's shared memory, fitted to sm_90 code compiled from SPACE (triton 3.6): K_j and
    V_j; Q_i and its staging; one more Q_i-sized tile for the layout conversion of O when q, k, v or out have strides
    or addresses that are not multiples of 16 (an odd head dim, say); P_ij; and for each extra pipeline stage one more
    Q_i, O_i (fp32), m_i and l_i."""
    BM, BN = config["BLOCK_M"], config["BLOCK_N"]
    resident = elem_bytes * (2 * BN * D_pad + 3 * BM * D_pad + BM * BN)
    per_stage = (elem_bytes + 4) * BM * D_pad + 8 * BM
    return resident + (config["num_stages"] - 1) * per_stage


def registers_per_thread(config: dict, D_pad: int, elem_bytes: int) -> float:
    """32-bit registers per thread for what the inner loop keeps live: O_i as read and as rewritten and S_ij, P_ij
    (all fp32), plus the dot operands. Tensor-core dots (16-bit) hold Q_i, K_j and V_j as fragments, K_j and V_j
    across the whole inner loop. fp32 dots run on FMA units (no tf32) and walk both operands of each dot along its
    inner dimension: Q_i and K_j along D, P_ij and V_j along BLOCK_N."""
    BM, BN = config["BLOCK_M"], config["BLOCK_N"]
    if elem_bytes == 4:
        operands = (BM + BN) * D_pad + (BM + D_pad) * BN
    else:
        operands = (BM + 2 * BN) * D_pad * elem_bytes // 4
    return (2 * BM * D_pad + 2 * BM * BN + operands) / (32 * config["num_warps"])


# Register budget: sm_90 code compiled from SPACE with triton 3.6 spilled at most about 1 KiB per thread up to this
# estimate; beyond it, spills reach 10-20 KiB per thread and single compiles take minutes.
MAX_REGISTERS_PER_THREAD = 176
# Allocator padding and reduction scratch that shared_memory_bytes leaves out.
SHARED_MEMORY_SLACK = 2048


SPACE = {
    "BLOCK_M": [16, 32, 64, 128],
    "BLOCK_N": [16, 32, 64, 128],
    "num_warps": [2, 4, 8],
    "num_stages": [1, 2, 3],
}


def keep(config: dict, problem) -> str | None:
    """Why this config should not be compiled for this problem, or None to admit it."""
    if set(config) != set(SPACE):
        return f"config keys {sorted(config)} != SPACE keys {sorted(SPACE)}"
    if reason := head_dim_unsupported(problem.D):
        return reason
    D_pad, elem = padded_head_dim(problem.D), ELEMENT_BYTES[problem.dtype]
    smem, limit = shared_memory_bytes(config, D_pad, elem), shared_memory_limit()
    if smem + SHARED_MEMORY_SLACK > limit:
        return f"shared memory: about {smem} B (+{SHARED_MEMORY_SLACK} slack) > {limit} B on this device"
    regs = registers_per_thread(config, D_pad, elem)
    if regs > MAX_REGISTERS_PER_THREAD:
        return f"register pressure: about {regs:.0f} tile registers per thread > {MAX_REGISTERS_PER_THREAD}"
    return None


DEFAULT = {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 8, "num_stages": 1}
