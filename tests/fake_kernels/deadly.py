"""A config that takes its whole tuning run down: MODE "kill_run" SIGKILLs the worker's parent (the `tune` process),
as a kernel that wedges the machine or draws the kernel's OOM killer would. The run leaves that trial RUNNING; the
next run must fail it, retry it once, and after a second loss record it crashed. "ok" configs are correct."""
import multiprocessing
import os
import signal

from fake_kernels import attention, log_launch


def launch(q, k, v, config=None, *, causal=False, scale=None, out=None):
    log_launch(config)
    if config["MODE"] == "kill_run":
        # The run: the process that started this worker (a forked worker's Unix parent is the forkserver).
        os.kill(multiprocessing.parent_process().pid, signal.SIGKILL)
        os._exit(9)
    return attention(q, k, v, causal, out, delay_s=0.002 * config["X"])


SPACE = {"MODE": ["ok", "kill_run"], "X": [1, 2, 3]}


def keep(config, problem):
    if config["MODE"] == "kill_run" and config["X"] != 1:
        return "one deadly config is enough"
    return None


DEFAULT = {"MODE": "ok", "X": 1}
