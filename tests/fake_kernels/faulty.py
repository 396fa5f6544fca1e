"""Faults that take the worker down: a crash (os._exit) and a hang; two correct configs around them."""
from fake_kernels import attention, log_launch


def launch(q, k, v, config=None, *, causal=False, scale=None, out=None):
    log_launch(config)
    return attention(q, k, v, causal, out, config["MODE"], delay_s=0.002 * config["X"])


SPACE = {"MODE": ["ok", "crash", "hang"], "X": [1, 2]}


def keep(config, problem):
    if config["MODE"] != "ok" and config["X"] == 2:
        return "one of each fault is enough"
    return None


DEFAULT = {"MODE": "ok", "X": 2}
