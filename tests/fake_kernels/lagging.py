"""Three correct configs for the hand-off tests: on a runner DEFAULT (X=3) is slow (0.4 s a launch) and the others
fast, while in a compile worker it is the other way round. So DEFAULT is the first config ready to run, and while it
runs the others are compiled and wait for the runner: all that is left of the problem is to run them."""
import multiprocessing

from fake_kernels import attention, log_launch


def launch(q, k, v, config=None, *, causal=False, scale=None, out=None):
    log_launch(config)
    on_runner = multiprocessing.current_process().name.startswith("tunebench-run")
    slow = (config["X"] == 3) == on_runner
    return attention(q, k, v, causal, out, delay_s=0.4 if slow else 0.001 * config["X"])


SPACE = {"X": [1, 2, 3]}


def keep(config, problem):
    return None


DEFAULT = {"X": 3}
