"""RMSNorm, y = x / sqrt(mean(x^2) + eps) * weight over the last dimension, as a tunebench kernel module.

Supports x [B, N, D] in fp16, bf16 and fp32 (any D: the row is padded to a power of two), weight [D]; statistics in
float32. It follows the kernel convention of tunebench.kernel_protocol: launch, SPACE, keep, DEFAULT, plus the hooks
of a kernel that is not attention (make_inputs, reference) and the problems it is tuned on (SHAPES). It reads B, Nq
(tokens), D and dtype from a Problem; the other fields are 1 or ignored.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm(x_ptr, w_ptr, out_ptr, n_rows, D, stride_x, stride_out, eps,
              ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < D)
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    # -- mean of squares per row (padding reads 0), then 1/rms
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)
    w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
    y = x * rstd[:, None] * w[None, :]
    tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


def launch(x, weight, config=None, *, eps=1e-6, out=None):
    """RMSNorm of x [B, N, D] (any strides) with weight [D] -> out [B, N, D] (x's dtype). config None means DEFAULT."""
    config = DEFAULT if config is None else config
    if x.dim() != 3 or weight.shape != (x.shape[-1],):
        raise ValueError(f"expected x [B, N, D] and weight [D]; got {tuple(x.shape)} and {tuple(weight.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    B, N, D = x.shape
    rows = x.reshape(B * N, D)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    weight = weight.contiguous()
    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if out.shape != x.shape or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {x.dtype} tensor of shape {tuple(x.shape)}")
    n_rows, block_d = B * N, triton.next_power_of_2(D)
    grid = (triton.cdiv(n_rows, config["ROWS"]),)
    _rms_norm[grid](rows, weight, out, n_rows, D, rows.stride(0), D, float(eps),
                    ROWS=config["ROWS"], BLOCK_D=block_d, num_warps=config["num_warps"])
    return out


SPACE = {"ROWS": [1, 2, 4, 8, 16], "num_warps": [1, 2, 4, 8]}

MAX_ELEMENTS = 16384                # rows x padded D held by one program; more spills registers


def keep(config, problem):
    """Why a config is not worth compiling for a problem (DEFAULT always passes), or None."""
    rows, elements = config["ROWS"], config["ROWS"] * triton.next_power_of_2(problem.D)
    if rows > 1 and elements > MAX_ELEMENTS:
        return f"ROWS x padded D = {elements} > {MAX_ELEMENTS} elements per program"
    if rows > problem.B * problem.Nq:
        return f"ROWS {rows} > the {problem.B * problem.Nq} rows of the problem"
    if config["num_warps"] > 1 and config["num_warps"] * 32 > elements:
        return f"{config['num_warps']} warps for {elements} elements"
    return None


DEFAULT = {"ROWS": 1, "num_warps": 1}


def make_inputs(problem, device, seed):
    """(args, kwargs, out) for launch: x [B, Nq, D] standard normal, weight near 1, drawn on the device."""
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(problem.B, problem.Nq, problem.D, generator=gen, device=device).to(problem.torch_dtype)
    weight = (1 + 0.1 * torch.randn(problem.D, generator=gen, device=device)).to(problem.torch_dtype)
    return (x, weight), {"eps": 1e-6}, torch.empty_like(x)


def reference(x, weight, *, eps=1e-6, dtype):
    """The plainest RMSNorm, computed in ``dtype``."""
    x, weight = x.to(dtype), weight.to(dtype)
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps) * weight


def throughput(problem, ms):
    """GB/s: x read and y written once."""
    moved = 2 * problem.B * problem.Nq * problem.D * torch.finfo(problem.torch_dtype).bits // 8
    return moved / (ms * 1e-3) / 1e9


# The problems `tunebench tune --kernel rmsnorm --suite S` tunes (Problem fields; Hq, Hkv and Nk need not be given).
SHAPES = {
    "tiny": [dict(B=2, Nq=33, D=48, dtype="float32"), dict(B=1, Nq=64, D=64, dtype="float16")],
    "default": [dict(B=4, Nq=4096, D=4096, dtype="bfloat16"), dict(B=16, Nq=2048, D=8192, dtype="bfloat16"),
                dict(B=64, Nq=1, D=4096, dtype="bfloat16"), dict(B=4, Nq=4096, D=4096, dtype="float16")],
}
