"""Every in-process fault a trial can meet, plus fast and slow correct configs; keep rejects X == 3."""
from fake_kernels import attention, log_launch


def launch(q, k, v, config=None, *, causal=False, scale=None, out=None):
    log_launch(config)
    return attention(q, k, v, causal, out, config["MODE"], delay_s=0.002 * config["X"])


SPACE = {"MODE": ["ok", "wrong", "unwritten", "mutate", "compile_error", "out_of_resources"], "X": [1, 2, 3]}


def keep(config, problem):
    if config["X"] == 3:
        return "X=3 is over the pretend shared-memory limit"
    return None


DEFAULT = {"MODE": "ok", "X": 2}
