"""The roofline: how fast a problem could run on a GPU, and whether bytes or arithmetic decide it.

Two numbers per problem: its FLOPs (QK^T and PV) over the chip's matmul rate, and its fewest bytes (each input read
once, the output written once) over memory bandwidth. The larger time is the floor. Arithmetic intensity (FLOPs per
byte) above the chip's ridge point (rate / bandwidth) means compute-bound, below it memory-bound.

Ceilings are plain data. Each says where it comes from: a vendor datasheet, or a measurement taken on this
workplace's GPUs (a large device-to-device copy, bytes read plus written; a bf16 8192^3 matmul). `tunebench bench`
re-measures both in the same run as its kernels.

The seed's table of N, d and ops/byte (A100, fp16, ridge 201) is the unfused score matmul [N, d] x [d, N] that writes
the N x N score matrix to memory: 2 N^2 d FLOPs over 2 (2 N d + N^2) bytes, i.e. N d / (N + 2 d). A fused kernel
(FlashAttention) never writes the scores, so its intensity grows with N instead of saturating at d.
"""
from __future__ import annotations

from dataclasses import dataclass

from .shapes import DTYPE_BYTES, Problem

DATASHEET = "datasheet"
MEASURED = "measured"


@dataclass(frozen=True)
class Ceiling:
    value: float        # bytes/s or FLOP/s
    source: str         # DATASHEET or MEASURED
    note: str = ""


@dataclass(frozen=True)
class GPU:
    name: str
    bandwidth: tuple[Ceiling, ...]          # HBM bytes/s, best known first: a measurement beats a datasheet
    compute: dict[str, tuple[Ceiling, ...]]  # dtype -> dense FLOP/s, same order

    def ceiling(self, kind: str, dtype: str = "bfloat16", prefer: str = MEASURED) -> Ceiling:
        """The bandwidth (kind "bandwidth") or the dtype's matmul rate (kind "compute"), from ``prefer``'s source
        when there is one, else the first listed."""
        options = self.bandwidth if kind == "bandwidth" else self.compute[dtype]
        return next((c for c in options if c.source == prefer), options[0])


def _tb(x: float) -> float:
    return x * 1e12


# fp16 and bf16 rates are dense tensor-core rates (no sparsity). fp32 is the plain FMA rate: the kernels run fp32
# dots with input_precision="ieee", not TF32.
_HOPPER_COMPUTE = {
    "float16": (Ceiling(_tb(989.4), DATASHEET, "dense fp16 tensor core"),),
    "bfloat16": (Ceiling(_tb(989.4), DATASHEET, "dense bf16 tensor core"),),
    "float32": (Ceiling(_tb(66.9), DATASHEET, "fp32 FMA, no TF32"),),
}
_H200_COMPUTE = dict(_HOPPER_COMPUTE, bfloat16=(
    Ceiling(_tb(790), MEASURED, "bf16 8192^3 matmul on an H200 here: 686-790 TFLOP/s"),
    Ceiling(_tb(989.4), DATASHEET, "dense bf16 tensor core"),
))
_A100_COMPUTE = {
    "float16": (Ceiling(_tb(312), DATASHEET, "dense fp16 tensor core"),),
    "bfloat16": (Ceiling(_tb(312), DATASHEET, "dense bf16 tensor core"),),
    "float32": (Ceiling(_tb(19.5), DATASHEET, "fp32 FMA, no TF32"),),
}

GPUS = {
    "H100": GPU("H100 SXM", (Ceiling(_tb(3.0), MEASURED, "device-to-device copy on an H100 here"),
                             Ceiling(_tb(3.35), DATASHEET, "HBM3")), _HOPPER_COMPUTE),
    "H100-PCIe": GPU("H100 PCIe", (Ceiling(_tb(2.0), DATASHEET, "HBM2e"),), {
        "float16": (Ceiling(_tb(756), DATASHEET, "dense fp16 tensor core"),),
        "bfloat16": (Ceiling(_tb(756), DATASHEET, "dense bf16 tensor core"),),
        "float32": (Ceiling(_tb(51.2), DATASHEET, "fp32 FMA, no TF32"),)}),
    "H200": GPU("H200 SXM", (Ceiling(_tb(4.27), MEASURED, "device-to-device copy on an H200 here"),
                             Ceiling(_tb(4.8), DATASHEET, "HBM3e")), _H200_COMPUTE),
    # The seed's A100 is the 40 GB part: 312 TFLOP/s / 1.555 TB/s = 201 FLOPs per byte.
    "A100": GPU("A100 SXM 40GB", (Ceiling(_tb(1.555), DATASHEET, "HBM2"),), _A100_COMPUTE),
    "A100-80GB": GPU("A100 SXM 80GB", (Ceiling(_tb(2.039), DATASHEET, "HBM2e"),), _A100_COMPUTE),
}


def gpu_key_for(device_name: str) -> str | None:
    """The GPUS key for a CUDA device name such as "NVIDIA H100 80GB HBM3", or None when it is not listed."""
    name = device_name.upper()
    if "H200" in name:
        return "H200"
    if "H100" in name:
        return "H100-PCIe" if "PCIE" in name else "H100"
    if "A100" in name:
        return "A100-80GB" if "80GB" in name else "A100"
    return None


def current_gpu_key() -> tuple[str, str]:
    """(GPUS key, why): this machine's GPU when it is listed, else H100."""
    try:
        import torch
        if torch.cuda.is_available():
            name = torch.cuda.get_device_name()
            key = gpu_key_for(name)
            if key is not None:
                return key, f"this GPU ({name})"
            return "H100", f"this GPU ({name}) has no listed ceilings; using H100's (pass --gpu)"
    except ImportError:
        pass
    return "H100", "no GPU here; using H100 (pass --gpu)"


@dataclass(frozen=True)
class Analysis:
    problem: Problem
    gpu: str
    flops: float
    min_bytes: float
    compute: Ceiling
    bandwidth: Ceiling

    @property
    def intensity(self) -> float:
        """FLOPs per byte of the minimum traffic."""
        return self.flops / self.min_bytes

    @property
    def ridge(self) -> float:
        """The intensity at which the compute and memory times are equal on this GPU."""
        return self.compute.value / self.bandwidth.value

    @property
    def bound(self) -> str:
        return "compute" if self.intensity >= self.ridge else "memory"

    @property
    def compute_s(self) -> float:
        return self.flops / self.compute.value

    @property
    def memory_s(self) -> float:
        return self.min_bytes / self.bandwidth.value

    @property
    def floor_s(self) -> float:
        """No implementation runs much faster than this."""
        return max(self.compute_s, self.memory_s)


def analyze(problem: Problem, gpu: str = "H100", prefer: str = MEASURED) -> Analysis:
    if gpu not in GPUS:
        raise KeyError(f"unknown GPU {gpu!r}; known: {', '.join(GPUS)}")
    g = GPUS[gpu]
    return Analysis(problem, gpu, problem.flops, problem.min_bytes,
                    g.ceiling("compute", problem.dtype, prefer), g.ceiling("bandwidth", prefer=prefer))


def unfused_score_intensity(n: int, d: int, dtype: str = "float16") -> float:
    """The seed's ops/byte: the score matmul [n, d] x [d, n] reading Q and K and writing the n x n scores."""
    return 2.0 * n * n * d / (DTYPE_BYTES[dtype] * (2 * n * d + n * n))


def fused_intensity(n: int, d: int, dtype: str = "float16", causal: bool = False) -> float:
    """A fused forward (Q, K, V read once, O written once) at Nq = Nk = n, one head."""
    return analyze(Problem("flash_v2", 1, 1, 1, n, n, d, dtype, causal)).intensity


SEED_SWEEP = [(n, d) for d in (64, 128, 256) for n in (256, 2048, 4096)]


def format_analysis(a: Analysis) -> str:
    p = a.problem
    unit, rate = ("GB/s", p.kv_bytes / a.floor_s / 1e9) if p.paged else ("TFLOP/s", a.flops / a.floor_s / 1e12)
    what = "effective KV bandwidth" if p.paged else "throughput"
    lines = [
        f"problem      {p.label()}",
        f"GPU          {GPUS[a.gpu].name}: compute {a.compute.value / 1e12:.0f} TFLOP/s ({a.compute.source}: "
        f"{a.compute.note}), memory {a.bandwidth.value / 1e12:.2f} TB/s ({a.bandwidth.source}: {a.bandwidth.note})",
        f"FLOPs        {a.flops:.4g}" + ("  (causal: half of the full score matrix)" if p.causal else ""),
        f"min bytes    {a.min_bytes:.4g}  (Q, K, V read once, O written once)",
        f"intensity    {a.intensity:.1f} FLOPs/byte; ridge point {a.ridge:.0f} FLOPs/byte",
        f"bound        {a.bound}-bound",
        f"floor        {a.floor_s * 1e3:.4g} ms  (compute {a.compute_s * 1e3:.4g} ms, memory {a.memory_s * 1e3:.4g} ms)"
        f"  -> at most {rate:.4g} {unit} {what}",
    ]
    return "\n".join(lines)


def format_sweep(gpu: str = "A100", dtype: str = "float16", prefer: str = MEASURED,
                 sweep=SEED_SWEEP) -> str:
    """The seed's table (unfused score matmul) next to the fused kernel's intensity, against ``gpu``'s ridge."""
    g = GPUS[gpu]
    ridge = g.ceiling("compute", dtype, prefer).value / g.ceiling("bandwidth", prefer=prefer).value
    lines = [f"{g.name}, {dtype}: ridge point {ridge:.0f} FLOPs/byte",
             f"{'N':>6} {'d':>4} {'unfused QK^T ops/byte':>22} {'bound':>8} {'fused ops/byte':>15} {'bound':>8}"]
    for n, d in sweep:
        u, f = unfused_score_intensity(n, d, dtype), fused_intensity(n, d, dtype)
        lines.append(f"{n:>6} {d:>4} {u:>22.0f} {_bound(u, ridge):>8} {f:>15.0f} {_bound(f, ridge):>8}")
    lines.append("unfused: S = QK^T written to memory (the seed's table); fused: FlashAttention, scores stay on chip")
    return "\n".join(lines)


def _bound(intensity: float, ridge: float) -> str:
    return "compute" if intensity >= ridge else "memory"


def format_ceilings(gpu: str) -> str:
    g = GPUS[gpu]
    rows = [f"{g.name} ceilings:"]
    rows += [f"  memory   {c.value / 1e12:7.2f} TB/s     {c.source:<9} {c.note}" for c in g.bandwidth]
    for dtype, options in g.compute.items():
        rows += [f"  {dtype:<8} {c.value / 1e12:7.1f} TFLOP/s  {c.source:<9} {c.note}" for c in options]
    return "\n".join(rows)


def format_suite(analyses: list[Analysis]) -> str:
    lines = [f"{'problem':<62} {'FLOPs/byte':>10} {'ridge':>6} {'bound':>8} {'floor ms':>10}"]
    for a in analyses:
        lines.append(f"{a.problem.label():<62} {a.intensity:>10.1f} {a.ridge:>6.0f} {a.bound:>8} "
                     f"{a.floor_s * 1e3:>10.4g}")
    return "\n".join(lines)
