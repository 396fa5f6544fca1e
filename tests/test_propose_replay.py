"""bench/propose_replay.py: TPE replayed on recorded landscapes (CPU, offline). Small landscapes written to a store."""
import json
import warnings

import pytest

from bench_scripts import load
from tunebench.device import DeviceIdentity
from tunebench.registry import kernel_module
from tunebench.shapes import Problem
from tunebench.store import Store, TrialResult
from tunebench.tune.study import all_configs

H200 = DeviceIdentity("NVIDIA H200", "9.0", 132, 150_000_000_000, "550.54.15", "2.13.0", "3.6.0", True)
PROBLEM = Problem("flash_v2", 4, 32, 8, 4096, 4096, 128, "float16", causal=True)
SMALL = Problem("flash_v2", 1, 32, 8, 4096, 4096, 128, "float16", causal=True)

replay = load("propose_replay")


@pytest.fixture(scope="module")
def module():
    module = kernel_module("flash_v2")
    admitted = [c for c in all_configs(module.SPACE) if module.keep(c, PROBLEM) is None]
    return module, [module.DEFAULT] + [c for c in admitted if c != module.DEFAULT][:23]


def key(config: dict) -> str:
    return json.dumps(config, sort_keys=True)


def recorded_db(tmp_path, configs: list[dict]) -> str:
    """PROBLEM with each config timed (twice for the first: its faster time counts), SMALL with 3 configs."""
    db = str(tmp_path / "results.db")
    with Store(db) as store:
        for n, config in enumerate(configs):
            store.record_trial(H200, "flash_v2", "h", PROBLEM, TrialResult(n, config, "ok", 1.0 + n))
        store.record_trial(H200, "flash_v2", "h", PROBLEM, TrialResult(99, configs[0], "ok", 0.5))
        store.record_trial(H200, "flash_v2", "h", PROBLEM, TrialResult(98, configs[1], "pruned"))
        for n, config in enumerate(configs[:3]):
            store.record_trial(H200, "flash_v2", "h", SMALL, TrialResult(n, config, "ok", 1.0))
    return db


def test_a_landscape_is_each_ok_configs_fastest_time_in_buckets_with_enough_configs(tmp_path, module):
    _, configs = module
    [(bucket, ms)] = replay.landscapes(recorded_db(tmp_path, configs), "flash_v2", min_configs=20).items()
    assert bucket[2] == PROBLEM and len(ms) == 24
    assert ms[key(configs[0])] == 0.5 and ms[key(configs[5])] == 6.0


def test_an_unrecorded_admitted_config_takes_its_nearest_recorded_neighbours_time(module):
    kernel, configs = module
    recorded = {key(c): 1.0 + n for n, c in enumerate(configs)}
    imputed = replay.whole(recorded, kernel, PROBLEM, "imputed")
    only = replay.whole(recorded, kernel, PROBLEM, "recorded")
    assert len(imputed) == len(only) == len(all_configs(kernel.SPACE))
    assert sum(ms is not None for ms in only.values()) == 24
    for config in all_configs(kernel.SPACE):
        if kernel.keep(config, PROBLEM) is not None:
            assert imputed[key(config)] is None
        elif key(config) in recorded:
            assert imputed[key(config)] == recorded[key(config)]
        else:
            assert min(recorded.values()) <= imputed[key(config)] <= max(recorded.values())


def test_a_queued_start_and_avoiding_tpe_ask_fewer_and_every_start_keeps_defaults_time(module):
    # DEFAULT is the fastest here and queued first: every start finds it. Only 24 of 320 configs are admitted: TPE's
    # own random start spends asks on rejected ones, a queued one does not, and an avoiding TPE fewer after it.
    kernel, configs = module
    landscape = replay.whole({key(c): 1.0 + n for n, c in enumerate(configs)}, kernel, PROBLEM, "recorded")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = replay.compare([landscape], kernel.SPACE, kernel.DEFAULT, budget=9, seeds=range(3))
    assert set(result) == set(replay.STARTS)
    assert all(r["mean"] == r["worst"] == 1.0 and r["hits"] == 1.0 for r in result.values())
    assert result["avoid"]["asks_per_eval"] < result["queued"]["asks_per_eval"] < result["own"]["asks_per_eval"]
