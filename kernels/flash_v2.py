"""FlashAttention-2 forward in Triton: the outer loop runs over Q tiles, the inner loop over K/V blocks.

Supported:
- q [B, Hq, Nq, D], k/v [B, Hkv, Nk, D] with any strides (a [B, N, H, D] tensor seen through .transpose(1, 2) works
  without a copy); out [B, Hq, Nq, D] in q's dtype, optionally given by the caller, is fully written.
- fp16, bf16 and fp32. fp32 dots run with input_precision="ieee" (no TF32), so fp32 is as accurate as a plain fp32
  computation, and much slower than fp16/bf16: they run on FMA units, and launch caps fp32 tiles to what registers
  hold (see _tiles), whatever BLOCK_M/BLOCK_N the config asks for.
- Head dims 16..256, non-powers of two included: the head dim is padded to the next power of two and masked.
- Any Nq and Nk (Nq != Nk allowed); tails are masked, and launch computes EVEN_M / EVEN_N / EVEN_D so that the even
  case carries no mask.
- GQA/MQA: query head h reads kv head h // (Hq // Hkv).
- Causal attention aligned bottom-right (FlashAttention >= 2.1): query i sees key j iff j <= i + (Nk - Nq). The K/V
  loop is split into an unmasked stage (blocks every row of the Q tile sees in full) and a masked diagonal stage. A
  query row that sees no key at all (Nq > Nk) outputs zeros.
- USE_TMA (Hopper and newer, not the interpreter): K/V/Q/O go through tensor descriptors built on the device, one 2-d
  descriptor [N, D] per (batch, head), so TMA zero-fills the tails and clips the stores. When the strides do not allow
  TMA (last dim not contiguous, a stride or the base not 16-byte aligned), launch falls back to the pointer path.
  The descriptors need global scratch: launch installs a torch allocator with triton.set_allocator.

Not supported: backward, dropout, attention bias or arbitrary masks, sliding windows, variable-length batches,
returning the log-sum-exp, head dims above 256, B * Hq above 65535 (the grid's second axis), offsets inside one
head beyond int32 ((N - 1) * row stride >= 2**31).
"""
import torch
import triton
import triton.language as tl

from ._launch import (ELEMENT_BYTES, LOG2E, check_config, check_dense_inputs, check_grid, dot_precision,
                      head_dim_unsupported, interpreting, padded_head_dim, qk_scale, shared_memory_limit)


@triton.jit
def _load_rows(ptrs, rows, n_rows, offs_d, HEAD_DIM: tl.constexpr, MASK_ROWS: tl.constexpr, EVEN_D: tl.constexpr):
    """A [rows, D_PAD] tile, zero-filled in rows >= n_rows (if MASK_ROWS) and columns >= HEAD_DIM (unless EVEN_D)."""
    if MASK_ROWS:
        if EVEN_D:
            tile = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
        else:
            tile = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    else:
        if EVEN_D:
            tile = tl.load(ptrs)
        else:
            tile = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    return tile


@triton.jit
def _store_rows(ptrs, tile, rows, n_rows, offs_d, HEAD_DIM: tl.constexpr, MASK_ROWS: tl.constexpr,
                EVEN_D: tl.constexpr):
    if MASK_ROWS:
        if EVEN_D:
            tl.store(ptrs, tile, mask=rows[:, None] < n_rows)
        else:
            tl.store(ptrs, tile, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM))
    else:
        if EVEN_D:
            tl.store(ptrs, tile)
        else:
            tl.store(ptrs, tile, mask=offs_d[None, :] < HEAD_DIM)


@triton.jit
def _attend(acc, l_i, m_i, q, k_src, v_src, stride_kn, stride_kd, stride_vn, stride_vd,
            offs_m, lo, hi, Nk, shift, qk_scale,
            HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
            MASK_N: tl.constexpr, MASK_CAUSAL: tl.constexpr, EVEN_D: tl.constexpr,
            USE_TMA: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One stage of the inner loop: K/V blocks [lo, hi) folded into (acc, l_i, m_i). MASK_N masks keys >= Nk;
    MASK_CAUSAL masks key j for row i when j > i + shift. Without either, the stage does no mask math at all."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    for start_n in tl.range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        # -- load K (TMA zero-fills rows >= Nk and columns >= HEAD_DIM)
        if USE_TMA:
            k = k_src.load([start_n, 0])
        else:
            k_ptrs = k_src + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd
            k = _load_rows(k_ptrs, cols, Nk, offs_d, HEAD_DIM, MASK_N, EVEN_D)
        qk = tl.dot(q, k.T, input_precision=DOT_PRECISION)
        # -- new running max; the scale is folded into the exp2 argument (one FMA per score)
        if MASK_N or MASK_CAUSAL:
            if MASK_N and MASK_CAUSAL:
                visible = (cols[None, :] < Nk) & (cols[None, :] <= offs_m[:, None] + shift)
            elif MASK_N:
                visible = cols[None, :] < Nk
            else:
                visible = cols[None, :] <= offs_m[:, None] + shift
            qk = tl.where(visible, qk * qk_scale, float("-inf"))
            m_ij = tl.maximum(m_i, tl.max(qk, 1))
            # A row that has seen no key yet keeps p = 0 and l = 0 instead of exp2(-inf - -inf) = NaN.
            m_ij = tl.where(m_ij == float("-inf"), 0.0, m_ij)
            qk = qk - m_ij[:, None]
        else:
            m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            qk = qk * qk_scale - m_ij[:, None]
        p = tl.math.exp2(qk)
        # -- update m_i and l_i, rescale the accumulator
        alpha = tl.math.exp2(m_i - m_ij)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        # -- load V and accumulate P @ V
        if USE_TMA:
            v = v_src.load([start_n, 0])
        else:
            v_ptrs = v_src + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd
            v = _load_rows(v_ptrs, cols, Nk, offs_d, HEAD_DIM, MASK_N, EVEN_D)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_ij
    return acc, l_i, m_i


@triton.jit
def _flash_v2_fwd(Q, K, V, O, qk_scale,
                  stride_qb, stride_qh, stride_qm, stride_qd,
                  stride_kb, stride_kh, stride_kn, stride_kd,
                  stride_vb, stride_vh, stride_vn, stride_vd,
                  stride_ob, stride_oh, stride_om, stride_od,
                  Hq, GROUP, Nq, Nk,
                  HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  CAUSAL: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr,
                  USE_TMA: tl.constexpr, DOT_PRECISION: tl.constexpr):
    if CAUSAL:
        # Tiles further down see more keys: start them first so the last wave is made of short tiles.
        start_m = tl.num_programs(0) - 1 - tl.program_id(0)
    else:
        start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = off_bh // Hq
    off_h = off_bh % Hq
    off_hkv = off_h // GROUP
    # int64: batch and head offsets of a large tensor overflow int32.
    q_head = Q + off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh
    k_head = K + off_b.to(tl.int64) * stride_kb + off_hkv.to(tl.int64) * stride_kh
    v_head = V + off_b.to(tl.int64) * stride_vb + off_hkv.to(tl.int64) * stride_vh
    o_head = O + off_b.to(tl.int64) * stride_ob + off_h.to(tl.int64) * stride_oh

    m0 = start_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)

    # -- load the Q tile once; it stays on chip for the whole K/V loop
    if USE_TMA:
        desc_q = tl.make_tensor_descriptor(q_head, shape=[Nq, HEAD_DIM], strides=[stride_qm, 1],
                                           block_shape=[BLOCK_M, D_PAD])
        k_src = tl.make_tensor_descriptor(k_head, shape=[Nk, HEAD_DIM], strides=[stride_kn, 1],
                                          block_shape=[BLOCK_N, D_PAD])
        v_src = tl.make_tensor_descriptor(v_head, shape=[Nk, HEAD_DIM], strides=[stride_vn, 1],
                                          block_shape=[BLOCK_N, D_PAD])
        q = desc_q.load([m0, 0])
    else:
        k_src = k_head
        v_src = v_head
        q_ptrs = q_head + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
        q = _load_rows(q_ptrs, offs_m, Nq, offs_d, HEAD_DIM, not EVEN_M, EVEN_D)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)

    # K/V blocks [0, full_hi) need no mask; [full_hi, diag_hi) are the diagonal and/or the Nk tail.
    if EVEN_N:
        full_hi = Nk
    else:
        full_hi = (Nk // BLOCK_N) * BLOCK_N
    diag_hi = Nk
    shift = Nk - Nq
    if CAUSAL:
        # Row m0 (the tile's first) sees keys j <= m0 + shift: whole blocks below that need no mask.
        full_hi = tl.minimum(full_hi, (tl.maximum(m0 + shift + 1, 0) // BLOCK_N) * BLOCK_N)
        # The tile's last valid row sees keys j <= min(m0 + BLOCK_M, Nq) - 1 + shift.
        diag_hi = tl.minimum(Nk, tl.maximum(tl.minimum(m0 + BLOCK_M, Nq) + shift, 0))

    acc, l_i, m_i = _attend(acc, l_i, m_i, q, k_src, v_src, stride_kn, stride_kd, stride_vn, stride_vd,
                            offs_m, 0, full_hi, Nk, shift, qk_scale,
                            HEAD_DIM, D_PAD, BLOCK_N, False, False, EVEN_D, USE_TMA, DOT_PRECISION)
    if CAUSAL or not EVEN_N:
        acc, l_i, m_i = _attend(acc, l_i, m_i, q, k_src, v_src, stride_kn, stride_kd, stride_vn, stride_vd,
                                offs_m, full_hi, diag_hi, Nk, shift, qk_scale,
                                HEAD_DIM, D_PAD, BLOCK_N, not EVEN_N, CAUSAL, EVEN_D, USE_TMA, DOT_PRECISION)

    # -- epilogue: rows that saw no key (l == 0) output 0, not 0/0
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = (acc / l_safe[:, None]).to(O.dtype.element_ty)
    if USE_TMA:
        desc_o = tl.make_tensor_descriptor(o_head, shape=[Nq, HEAD_DIM], strides=[stride_om, 1],
                                           block_shape=[BLOCK_M, D_PAD])
        desc_o.store([m0, 0], out)
    else:
        o_ptrs = o_head + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
        _store_rows(o_ptrs, out, offs_m, Nq, offs_d, HEAD_DIM, not EVEN_M, EVEN_D)


def launch(q, k, v, config=None, *, causal=False, scale=None, out=None):
    """Attention forward. q [B, Hq, Nq, D], k/v [B, Hkv, Nk, D] -> out [B, Hq, Nq, D] (q's dtype).

    scale defaults to 1/sqrt(D). config None means DEFAULT. If config asks for USE_TMA but the strides do not allow
    TMA, the pointer path runs instead (same result).
    """
    config = _check_config(DEFAULT if config is None else config)
    _check_inputs(q, k, v, out, causal, scale)
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    if out is None:
        out = torch.empty_like(q)
    if out.numel() == 0:
        return out
    _check_offsets(q=q, k=k, v=v, out=out)
    D_PAD = padded_head_dim(D)
    BLOCK_M, BLOCK_N = _tiles(config, q.dtype == torch.float32, D_PAD)
    use_tma = config["USE_TMA"]
    if use_tma:
        if not _tma_supported():
            raise ValueError("config['USE_TMA']=True needs a CUDA device with compute capability >= 9 "
                             "(and not the Triton interpreter)")
        use_tma = _tma_compatible(q, k, v, out)
        if use_tma:
            triton.set_allocator(_tma_allocator)
    grid = (triton.cdiv(Nq, BLOCK_M), B * Hq)
    _flash_v2_fwd[grid](
        q, k, v, out, qk_scale(scale, D),
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        Hq, Hq // Hkv, Nq, Nk,
        HEAD_DIM=D, D_PAD=D_PAD, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
        CAUSAL=causal, EVEN_M=Nq % BLOCK_M == 0, EVEN_N=Nk % BLOCK_N == 0, EVEN_D=D == D_PAD,
        USE_TMA=use_tma, DOT_PRECISION=dot_precision(q.dtype),
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )
    return out


def _check_config(config: dict) -> dict:
    check_config(config, SPACE, BLOCK_M=16, BLOCK_N=16)
    if not isinstance(config["USE_TMA"], bool):
        raise ValueError(f"config['USE_TMA'] must be a bool, got {config['USE_TMA']!r}")
    return config


def _check_inputs(q, k, v, out, causal, scale):
    check_dense_inputs(q, k, v, out, causal, scale)
    check_grid("B * Hq", q.shape[0] * q.shape[1])


def _check_offsets(**tensors: torch.Tensor) -> None:
    """Batch and head offsets are int64 in the kernel; offsets inside one head are int32."""
    for name, t in tensors.items():
        if (t.shape[2] - 1) * t.stride(2) + (t.shape[3] - 1) * t.stride(3) >= 2**31:
            raise ValueError(f"{name}: offsets inside one head exceed int32 (N={t.shape[2]}, stride {t.stride(2)})")


def _tma_allocator(size: int, alignment: int, stream):
    # Scratch for the descriptors that each program builds on the device (128 bytes each).
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _tma_compatible(*tensors: torch.Tensor) -> bool:
    """TMA needs a contiguous last dim, a 16-byte-aligned base, and every other stride a multiple of 16 bytes (a
    stride of a size-1 dim is never used, so it does not count)."""
    for t in tensors:
        es = t.element_size()
        if t.stride(-1) != 1 or t.data_ptr() % 16:
            return False
        strides = zip(t.shape[:-1], t.stride()[:-1])
        if any(size > 1 and (stride <= 0 or (stride * es) % 16) for size, stride in strides):
            return False
    return True


def _tma_supported() -> bool:
    return not interpreting() and torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


def _tiles(config: dict, fp32: bool, d_pad: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) as run. fp32 dots run on FMA units (input_precision="ieee"), whose operands sit whole in
    registers, so fp32 tiles are capped: BLOCK_N at 16 and BLOCK_M at 16 accumulator values per thread (sm_90
    compiles, causal with tails: past that, ptxas spills up to tens of KB and takes minutes). So every config,
    DEFAULT included, runs on fp32, with the tile the registers allow."""
    block_m, block_n = config["BLOCK_M"], config["BLOCK_N"]
    if fp32:
        block_m = min(block_m, max(16, 16 * 32 * config["num_warps"] // d_pad))
        block_n = 16
    return block_m, block_n


def _smem_bytes(block_m: int, block_n: int, num_stages: int, d_pad: int, elem: int) -> int:
    """An upper bound on shared memory: the Q tile plus one K and one V tile per pipeline stage (sm_90 compiles use
    num_stages buffers with wgmma and num_stages - 1 below it), plus barriers and scratch."""
    return (block_m + 2 * block_n * max(1, num_stages)) * d_pad * elem + 1024


# fp32 scores plus output accumulator per thread (16-bit inputs) beyond which ptxas spills heavily on sm_90.
_MAX_ACC_REGS = 160


SPACE = {
    "BLOCK_M": [16, 32, 64, 128, 256],
    "BLOCK_N": [16, 32, 64, 128],
    "num_warps": [4, 8],
    "num_stages": [1, 2, 3, 4],
    "USE_TMA": [False, True],
}


def keep(config, problem):
    """Why this config would not compile, run or fit for this problem (a string), or None."""
    if reason := head_dim_unsupported(problem.D):
        return reason
    fp32 = problem.dtype == "float32"
    if config["USE_TMA"]:
        if not _tma_supported():
            return "USE_TMA needs a CUDA device with compute capability >= 9, not the interpreter"
        if fp32:
            return "USE_TMA with fp32: the dots run on FMA units, so TMA buys nothing, and its tiles spill registers"
        if config["BLOCK_M"] < 64:
            return "USE_TMA with BLOCK_M < 64: no wgmma at that size, and the TMA tiles spill registers"
    d_pad = padded_head_dim(problem.D)
    block_m, block_n = _tiles(config, fp32, d_pad)
    smem = _smem_bytes(block_m, block_n, config["num_stages"], d_pad, ELEMENT_BYTES[problem.dtype])
    if smem > (limit := shared_memory_limit()):
        return f"shared memory ~{smem} B > the device's {limit} B"
    acc_regs = block_m * (d_pad + block_n) // (32 * config["num_warps"])
    if not fp32 and acc_regs > _MAX_ACC_REGS:
        return f"register pressure: {acc_regs} fp32 accumulator values per thread > {_MAX_ACC_REGS}"
    return None


# Admitted for every problem: fp16 D 256 needs ~225 KiB of shared memory, the most that fits an H100/H200.
DEFAULT = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3, "USE_TMA": False}
