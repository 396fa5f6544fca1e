"""Test-only kernel modules for the tuner's tests, one module per search space.

The tests register them into tunebench.registry.KERNELS (monkeypatch) and the spawned workers import them by name
(tests/ is on sys.path in the workers too: spawn hands them the parent's sys.path). Each follows the kernel module
convention (launch, SPACE, keep, DEFAULT), but the "kernel" is torch: a config's MODE is a behaviour to plant in a
trial, not a Triton program. Every launch appends its config (and process id) to the file named by
$TUNEBENCH_FAKE_LOG, if set, so a test can see what was launched, and where.
"""
import json
import os
import time

import torch

import tunebench.reference as ref


def admitted_grid_order(module, seed: int, problem) -> list[dict]:
    """The configs `tune --sampler grid` evaluates, in order: the tuner's grid order without repeats or configs
    keep() rejects."""
    from tunebench.registry import config_key
    from tunebench.tune.study import grid_order
    order, keys = [], set()
    for config in grid_order(module.SPACE, module.DEFAULT, seed):
        if config_key(config) not in keys and module.keep(config, problem) is None:
            keys.add(config_key(config))
            order.append(config)
    return order


def log_launch(config: dict) -> None:
    path = os.environ.get("TUNEBENCH_FAKE_LOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"config": config, "pid": os.getpid()}, sort_keys=True) + "\n")


def _entries(path) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f]


def launched(path) -> list[dict]:
    """The configs launched, in order, by any process."""
    return [e["config"] for e in _entries(path)]


def launching_processes(path) -> set[int]:
    return {e["pid"] for e in _entries(path)}


def attention(q, k, v, causal, out, mode: str = "ok", delay_s: float = 0.0):
    """Correct attention (float32, cast to q's dtype) into out, or one planted fault."""
    if mode == "crash":
        os._exit(7)                              # the worker dies mid-trial
    if mode == "hang":
        time.sleep(3600)                         # never finishes
    if mode == "compile_error":
        raise RuntimeError("fake: this config does not compile")
    if mode == "out_of_resources":
        from triton.runtime.errors import OutOfResources
        raise OutOfResources(300_000, 232_448, "shared memory")
    result = ref.attention(q, k, v, causal, dtype=torch.float32).to(q.dtype)
    if mode == "wrong":
        result = result + 0.5
    if mode == "unwritten":
        half = result.shape[2] // 2
        out[:, :, :half] = result[:, :, :half]   # the rest stays NaN-poisoned
    else:
        out.copy_(result)
    if mode == "mutate":
        k.add_(1.0)                              # writes into an input
    if delay_s:
        time.sleep(delay_s)
    return out
