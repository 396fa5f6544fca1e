"""Eight correct configs whose time grows with X (the resume test's search space)."""
from fake_kernels import attention, log_launch


def launch(q, k, v, config=None, *, causal=False, scale=None, out=None):
    log_launch(config)
    return attention(q, k, v, causal, out, delay_s=0.002 * config["X"])


SPACE = {"X": [1, 2, 3, 4, 5, 6, 7, 8]}


def keep(config, problem):
    return None


DEFAULT = {"X": 4}
