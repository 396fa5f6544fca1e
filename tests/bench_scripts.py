"""The bench scripts' tests share these: a script loaded as a module, and wrong outputs to plant in its calls."""
import importlib.util
import math
import pathlib
import sys

import torch

BENCH = pathlib.Path(__file__).resolve().parents[1] / "bench"


def load(name: str):
    """bench/NAME.py as a module (registered in sys.modules, where a dataclass of its looks its module up)."""
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def plant(how: str):
    """out [rows, H, D] -> a wrong copy: all zeros, one NaN in the last row, or the first row's last element moved by
    0.05 (far past the tolerance of fp16 at these sizes). A check that covers the first and last rows catches each."""
    def wrong(out: torch.Tensor) -> torch.Tensor:
        out = out.clone()
        if how == "zeros":
            return torch.zeros_like(out)
        if how == "nan":
            out[-1, 0, 0] = math.nan
        else:
            out[0, -1, -1] += 0.05
        return out
    return wrong


PLANTED = ("zeros", "nan", "perturbed")
