"""Every planted fault in one search space, for the consolidated reliability test: each MODE but "ok" is a fault,
tried once (X == 1); "ok" runs at X = 1..3 (slower with X), so correct configs come before and after the faults.

- out_of_resources: Triton's OutOfResources, as a config over the shared-memory limit raises it;
- compile_error: the first launch raises, as a config that does not compile;
- hang: never finishes;
- illegal_access: CUDA's "an illegal memory access was encountered", as torch raises it once a kernel wrote out of
  bounds (a CPU cannot fault like that; tests/fake_kernels/oob.py makes the real one on a GPU);
- wrong, unwritten, mutate: wrong values, part of the output left unwritten, a write into an input;
- crash: the worker process dies (os._exit).
"""
from fake_kernels import attention, log_launch

ILLEGAL_ACCESS = "CUDA error: an illegal memory access was encountered"


def launch(q, k, v, config=None, *, causal=False, scale=None, out=None):
    log_launch(config)
    if config["MODE"] == "illegal_access":
        raise RuntimeError(ILLEGAL_ACCESS)
    return attention(q, k, v, causal, out, config["MODE"], delay_s=0.002 * config["X"])


FAULTS = ["out_of_resources", "compile_error", "hang", "illegal_access", "wrong", "unwritten", "mutate", "crash"]
SPACE = {"MODE": ["ok"] + FAULTS, "X": [1, 2, 3]}


def keep(config, problem):
    if config["MODE"] != "ok" and config["X"] != 1:
        return "one trial of each fault is enough"
    return None


DEFAULT = {"MODE": "ok", "X": 3}
