"""A kernel of another domain than attention, in torch: softmax over the last dimension of x [B, Nq, D], with its own
inputs and reference hooks (tunebench.kernel_protocol). MODE "wrong" is a planted bug the check must catch."""
import torch

from fake_kernels import log_launch


def launch(x, config=None, *, out=None):
    log_launch(config)
    result = torch.softmax(x.float(), dim=-1).to(x.dtype)
    if config["MODE"] == "wrong":
        result = result * 1.01
    return out.copy_(result) if out is not None else result


SPACE = {"MODE": ["ok", "wrong"], "X": [1, 2]}


def keep(config, problem):
    return None


DEFAULT = {"MODE": "ok", "X": 1}


def make_inputs(problem, device, seed):
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(problem.B, problem.Nq, problem.D, generator=gen, device=device).to(problem.torch_dtype)
    return (x,), {}, torch.empty_like(x)


def reference(x, *, dtype):
    return torch.softmax(x.to(dtype), dim=-1)


SHAPES = {"tiny": [dict(B=2, Nq=5, D=24, dtype="float32")]}
