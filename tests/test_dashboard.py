"""What optuna-dashboard shows of `tunebench tune`'s studies: names that read as kernel/dtype/D/causal/bucket @ device,
the kernel identity kept as a study attribute (a study of another identity is never resumed), and the confirmed
winner written to its study, equal to the store's."""
import pathlib
import sys
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))  # fake_kernels, here and in the spawned workers

from tunebench import registry  # noqa: E402
from tunebench.device import DeviceIdentity  # noqa: E402
from tunebench.shapes import Problem, bucket_key  # noqa: E402
from tunebench.store import Store  # noqa: E402
from tunebench.tune.options import TuneOptions  # noqa: E402
from tunebench.tune.run import tune  # noqa: E402
from tunebench.tune.study import open_storage, open_study, study_name  # noqa: E402

H200 = SimpleNamespace(name="NVIDIA H200")
HASH = "0123456789abcdef"


@pytest.mark.parametrize("problem, shape", [
    (Problem("flash_v2", 3, 32, 8, 4000, 4000, 128, "bfloat16", causal=True), "causal/B4-H32x8-N4096"),
    (Problem("flash_v1", 1, 2, 2, 48, 80, 16, "float32"), "full/B1-H2x2-Nq64-Nk128"),
    (Problem("paged_attention", 16, 32, 8, 1, 4096, 128, "bfloat16"), "full/B16-H32x8-Nq1-Nk4096"),
])
def test_study_names_read_as_kernel_dtype_d_causal_bucket_at_device(problem, shape):
    name = study_name(H200, problem.kernel, HASH, problem)
    assert name == f"{problem.kernel}/{problem.dtype}/D{problem.D}/{shape} @ NVIDIA H200 #01234567"


def test_names_tell_apart_what_the_store_tells_apart():
    p = Problem("flash_v2", 4, 32, 8, 4096, 4096, 128, "bfloat16", causal=True)
    others = [Problem("flash_v2", 4, 32, 4, 4096, 4096, 128, "bfloat16", causal=True),
              Problem("flash_v2", 4, 32, 8, 4096, 4096, 128, "bfloat16", causal=False),
              Problem("flash_v2", 4, 32, 8, 2048, 4096, 128, "bfloat16", causal=True)]
    names = {study_name(H200, q.kernel, HASH, q) for q in [p] + others}
    names |= {study_name(SimpleNamespace(name="NVIDIA H100"), p.kernel, HASH, p),
              study_name(H200, p.kernel, "fedcba9876543210", p)}
    assert len(names) == 6


def test_a_study_keeps_its_identity_and_is_resumed_only_for_it():
    import optuna
    storage = optuna.storages.InMemoryStorage()
    p = Problem("flash_v2", 1, 2, 1, 64, 64, 32, "float16", causal=True)
    study = open_study(storage, None, H200, HASH, p)
    assert study.user_attrs == {"kernel_identity": HASH, "kernel": "flash_v2", "device": "NVIDIA H200",
                                "bucket": bucket_key(p)}
    study.enqueue_trial({"x": 1})
    assert len(open_study(storage, None, H200, HASH, p).trials) == 1          # resumed
    assert len(open_study(storage, None, H200, "fedcba9876543210", p).trials) == 0   # another identity: new study
    same_prefix = HASH[:8] + "ffffffff"                                          # its name, another identity
    with pytest.raises(RuntimeError, match="holds trials of kernel identity 0123456789abcdef"):
        open_study(storage, None, H200, same_prefix, p)


@pytest.mark.interpreter
def test_the_confirmed_winner_is_written_to_its_study(tmp_path, monkeypatch):
    import optuna
    monkeypatch.setitem(registry.KERNELS, "fake_plain", "fake_kernels.plain")
    problem = Problem("fake_plain", 1, 2, 1, 24, 40, 16, "float32", causal=True)
    db = tmp_path / "results.db"
    [result] = tune([problem], TuneOptions(interpret=True, trials=3, db=str(db), timeout=60.0))
    device = DeviceIdentity.current(interpret=True)
    shash = registry.kernel_identity("fake_plain")
    study = optuna.load_study(study_name=study_name(device, "fake_plain", shash, problem),
                              storage=open_storage(None, f"sqlite:///{db}"))
    assert study.user_attrs["kernel_identity"] == shash
    [stored] = Store(str(db), readonly=True).winners(kernel="fake_plain")
    winner = study.user_attrs["winner"]
    assert winner["config"] == stored.config == result.config
    assert winner["median_ms"] == stored.median_ms and winner["speedup_vs_default"] == stored.speedup_vs_default
    assert study.trials[winner["trial"]].params == result.config
