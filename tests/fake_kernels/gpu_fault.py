"""A real illegal memory access on a GPU, for the gpu-marked reliability test: MODE "oob" launches a Triton store
2**40 elements past the output (a 64-bit offset, so the address is far outside any allocation and the GPU faults),
which leaves the worker's CUDA context unusable; "ok" is correct attention. Never launch "oob" on a CPU: under the
interpreter it is a wild write into the test process's own memory."""
import triton
import triton.language as tl

from fake_kernels import attention, log_launch

FAR = 2 ** 40


@triton.jit
def _store_far(out_ptr, offset, BLOCK: tl.constexpr):
    idx = tl.arange(0, BLOCK)
    tl.store(out_ptr + offset + idx, tl.zeros([BLOCK], dtype=tl.float32))


def launch(q, k, v, config=None, *, causal=False, scale=None, out=None):
    log_launch(config)
    if config["MODE"] == "oob":
        if not out.is_cuda:
            raise RuntimeError("fake_kernels.gpu_fault: the out-of-bounds store runs on a GPU only")
        _store_far[(1,)](out, FAR, BLOCK=16)
        return out
    return attention(q, k, v, causal, out, delay_s=0.0)


SPACE = {"MODE": ["ok", "oob"], "X": [1, 2]}


def keep(config, problem):
    if config["MODE"] == "oob" and config["X"] == 2:
        return "one out-of-bounds store is enough"
    return None


DEFAULT = {"MODE": "ok", "X": 1}
