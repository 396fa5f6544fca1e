"""The runtime dispatcher: which config a call gets, from which database, and that the call is right."""
import dataclasses
import sys
import subprocess
import warnings

import pytest
import torch

import tunebench
from tunebench.runtime import dispatch, winners
from tunebench.correctness import close_enough
from tunebench.device import DeviceIdentity
from tunebench.registry import kernel_module, kernel_identity
from tunebench.shapes import Problem
from tunebench.store import Store, TrialResult
import tunebench.reference as ref

V2_TUNED = {"BLOCK_M": 16, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1, "USE_TMA": False}


def _device():
    return DeviceIdentity.current(interpret=not torch.cuda.is_available())


@pytest.fixture
def db(user_db):
    return Store(f"sqlite:///{user_db}")


def _put(store, problem, config, ms=1.0, hash_=None):
    store.upsert_winner(_device(), problem.kernel, hash_ or kernel_identity(problem.kernel), problem, config, ms, 1.3)


def _problem(nq=40, nk=40, causal=True):
    return Problem("flash_v2", 1, 2, 1, nq, nk, 32, "float16", causal=causal)


def test_tuned_winner_is_launched_and_correct(db, device):
    p = _problem()
    assert kernel_module("flash_v2").keep(V2_TUNED, p) is None
    _put(db, p, V2_TUNED)
    q = torch.randn(1, 2, 40, 32).half().to(device)
    k, v = torch.randn(1, 1, 40, 32).half().to(device), torch.randn(1, 1, 40, 32).half().to(device)
    assert "exact winner" in tunebench.explain(q, k, causal=True) and "'BLOCK_M': 16" in tunebench.explain(q, k, causal=True)
    out = tunebench.flash_attention(q, k, v, causal=True)
    assert close_enough(out, ref.attention(q, k, v, True), ref.attention(q, k, v, True, dtype=q.dtype)).ok


def _timed(store, problem, *timings):
    """Stores ok trials: (config, median ms) pairs, as a tuning run of that bucket would."""
    for number, (config, ms) in enumerate(timings):
        store.record_trial(_device(), problem.kernel, kernel_identity(problem.kernel), problem,
                           TrialResult(number, config, "ok", median_ms=ms))


def test_untuned_buckets_get_a_safe_transfer_or_default(db):
    default = kernel_module("flash_v2").DEFAULT
    _put(db, _problem(64, 64), V2_TUNED)
    _timed(db, _problem(64, 64), (default, 1.0), (V2_TUNED, 0.8))
    why = tunebench.explain(_problem(256, 256))
    assert "DEFAULT: no exact winner and no safe transfer" in why        # one neighbour is not enough evidence
    _timed(db, _problem(1024, 1024), (default, 2.0), (V2_TUNED, 1.5))
    dispatch.reload()
    why = tunebench.explain(_problem(256, 256))
    assert f"-> {V2_TUNED}:" in why and "transferred from buckets" in why and "Nq64" in why and "1.33x" in why
    assert "DEFAULT" in tunebench.explain(_problem(256, 256, causal=False))   # causality never substituted
    _timed(db, _problem(128, 128), (default, 1.0), (V2_TUNED, 1.1))      # the nearest neighbour says it loses
    dispatch.reload()
    assert "no safe transfer" in tunebench.explain(_problem(256, 256))


PAGED_TUNED = {"BLOCK_N": 16, "PARTITION": 0, "num_warps": 2, "num_stages": 1, "RESTAGE_V": 0}


def _paged_call(page: int, device="cpu", n=40):
    """A decode call's tensors on a cache of pages of ``page`` tokens (q, k_cache, v_cache, tables, lens)."""
    from tunebench.paged_inputs import pack_paged
    q = torch.randn(1, 2, 32).half().to(device)
    k, v = torch.randn(1, 1, n, 32).half().to(device), torch.randn(1, 1, n, 32).half().to(device)
    lens = torch.tensor([n], dtype=torch.int32, device=device)
    return (q, *pack_paged(k, v, lens, page), lens)


def test_paged_winners_are_exact_per_page_size(db, device):
    q, kc, vc, tables, lens = _paged_call(32, device)
    problem = dispatch._paged_problem(q, kc, tables)
    assert problem.page == 32 and kernel_module("paged_attention").keep(PAGED_TUNED, problem) is None
    _put(db, problem, PAGED_TUNED)
    dispatch.reload()
    assert "exact winner" in tunebench.explain(q, kc, block_tables=tables) and "page32" in tunebench.explain(
        q, kc, block_tables=tables)
    out = tunebench.paged_attention(q, kc, vc, tables, lens)
    assert close_enough(out, *(ref.paged_attention(q, kc, vc, tables, lens, dtype=d) for d in (torch.float64, q.dtype))).ok
    q16, kc16, _, tables16, _ = _paged_call(16, device)      # same shape, pages of 16: the page-32 winner is not used
    why = tunebench.explain(q16, kc16, block_tables=tables16)
    assert "page16" in why and "DEFAULT: no exact winner" in why and str(PAGED_TUNED) not in why


def test_safe_transfer_never_crosses_page_sizes(db):
    default = kernel_module("paged_attention").DEFAULT

    def decode(b, page):
        return Problem("paged_attention", b, 2, 1, 1, 64, 32, "float16", page=page)
    for b in (1, 4):                                      # two tuned neighbours at page 32, both say PAGED_TUNED wins
        _timed(db, decode(b, 32), (default, 2.0), (PAGED_TUNED, 1.0))
    dispatch.reload()
    assert "transferred from buckets" in tunebench.explain(decode(2, 32))
    why = tunebench.explain(decode(2, 16))
    assert "DEFAULT" in why and str(PAGED_TUNED) not in why


def test_no_winners_warns_once_with_the_tune_command(db):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tunebench.explain(_problem())
        tunebench.explain(_problem(64, 64))
    msgs = [str(w.message) for w in caught if "tunebench tune" in str(w.message)]
    assert len(msgs) == 1


def test_stale_kernel_hash_is_ignored_with_a_warning(db):
    _put(db, _problem(), V2_TUNED, hash_="0" * 16)
    with pytest.warns(UserWarning, match="source changed"):
        assert "DEFAULT" in tunebench.explain(_problem())


def test_user_db_takes_precedence_over_packaged(tmp_path, monkeypatch):
    packaged, user = Store(f"sqlite:///{tmp_path / 'pkg.db'}"), Store(f"sqlite:///{tmp_path / 'user.db'}")
    other = dict(V2_TUNED, BLOCK_N=16)
    _put(packaged, _problem(), other)
    _put(user, _problem(), V2_TUNED)
    default, admits = kernel_module("flash_v2").DEFAULT, (lambda c: True)
    w = winners.Winners.load(_device().name, [user.url, packaged.url])
    assert w.choose(_problem(), default, admits).config == V2_TUNED
    w = winners.Winners.load(_device().name, [packaged.url])
    assert w.choose(_problem(), default, admits).config == other


def test_bad_inputs_and_variant_are_rejected(device):
    q = torch.randn(1, 2, 8, 16).half().to(device)
    with pytest.raises(ValueError, match="variant"):
        tunebench.flash_attention(q, q, q, variant="v9")
    with pytest.raises(ValueError, match="4-d"):
        tunebench.flash_attention(q[0], q[0], q[0])


def test_import_is_light():
    code = ("import sys, tunebench; "
            "print(sorted(m for m in ('optuna', 'sqlalchemy', 'hypothesis', 'transformers') if m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"


def test_the_command_line_and_tuner_load_without_torch():
    # `tunebench tune` spawns its workers before it imports torch (2-3 s), so that they start meanwhile.
    code = ("import sys, tunebench.cli, tunebench.tune.run, tunebench.tune.pool; "
            "print(sorted(m for m in ('torch', 'triton') if m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"


@pytest.mark.gpu
def test_both_entry_points_work_under_torch_compile_fullgraph():
    from tunebench.paged_inputs import pack_paged
    q = torch.randn(2, 4, 100, 64, device="cuda", dtype=torch.float16)
    k, v = torch.randn(2, 2, 100, 64, device="cuda", dtype=torch.float16), torch.randn(2, 2, 100, 64, device="cuda", dtype=torch.float16)

    @torch.compile(fullgraph=True)
    def prefill(q, k, v):
        return tunebench.flash_attention(q * 1.0, k, v, causal=True) + 1.0

    expect = tunebench.flash_attention(q, k, v, causal=True) + 1.0
    torch.testing.assert_close(prefill(q, k, v), expect)
    qd = torch.randn(3, 8, 64, device="cuda", dtype=torch.bfloat16)
    kd, vd = (torch.randn(3, 2, 70, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    lens = torch.tensor([70, 1, 33], dtype=torch.int32, device="cuda")
    kc, vc, tables = pack_paged(kd, vd, lens, 16)

    @torch.compile(fullgraph=True)
    def decode(q, kc, vc, tables, lens):
        return tunebench.paged_attention(q, kc, vc, tables, lens) * 2.0

    torch.testing.assert_close(decode(qd, kc, vc, tables, lens), tunebench.paged_attention(qd, kc, vc, tables, lens) * 2.0)


# --- variant="auto": the tuner picks the kernel ---------------------------------------------------------------------

V3_CONFIG = {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "STAGES": 2, "OVERLAP": False, "WARP_SPECIALIZE": False,
             "PRODUCER_REGS": 24}


def _auto_winners(monkeypatch, times: dict[str, float], v3_versus_v2: float | None = None):
    """A dispatcher whose winners are exact for the auto test shape, one per kernel, with these tuned times (and
    flash_v3's speedup over flash_v2 timed beside it, if given)."""
    rows = [(dataclasses.replace(_problem(), kernel=kernel), V3_CONFIG if kernel == "flash_v3" else V2_TUNED, "test",
             ms, v3_versus_v2 if kernel == "flash_v3" else None) for kernel, ms in times.items()]
    monkeypatch.setattr(dispatch, "_DISPATCHER", dispatch.Dispatcher(winners.Winners(_device().name, rows)))


def _auto_inputs(device):
    g = torch.Generator().manual_seed(3)
    return [torch.randn(1, h, 40, 32, generator=g).half().to(device) for h in (2, 1, 1)]


def _as_on_hopper(monkeypatch):
    """flash_v3 takes the test's inputs and admits its winner, as on a Hopper GPU (its head dim 32 aside)."""
    import tunebench.kernels.flash_v3 as v3
    registered = dispatch.kernel_module
    monkeypatch.setattr(dispatch, "_refusal", lambda kernel, q, k, v: None)
    monkeypatch.setattr(dispatch, "kernel_module", lambda name: v3 if name == "flash_v3" else registered(name))
    monkeypatch.setattr(v3, "keep", lambda config, problem: None)


@pytest.mark.parametrize("v3_ms, expected", [(1.0, "flash_v3"), (3.0, "flash_v2")])
def test_auto_runs_the_kernel_tuned_fastest_for_the_bucket(monkeypatch, device, v3_ms, expected):
    _as_on_hopper(monkeypatch)
    _auto_winners(monkeypatch, {"flash_v2": 2.0, "flash_v3": v3_ms})
    kernel, why = dispatch.auto_kernel(*_auto_inputs(device), True)
    other = "flash_v2 2 ms" if expected == "flash_v3" else "flash_v3 3 ms"
    assert kernel == expected and "fastest tuned winner" in why and other in why and "--replace" in why, why


@pytest.mark.parametrize("versus, ms, replaced_ms, runs", [
    (1.0, 9.0, 1.0, True), (0.99, 1.0, 9.0, False),         # the head-to-head figure decides, whatever the times say
    (None, 1.0, 2.0, True), (None, 2.0, 1.0, False), (None, 1.0, 1.0, False),   # else the faster time; a tie: replaced
    (None, 1.0, None, False), (None, None, 1.0, False), (None, None, None, False)])  # a lone winner: no evidence
def test_the_auto_rule(versus, ms, replaced_ms, runs):
    from tunebench.registry import replacement_runs
    assert replacement_runs(versus, ms, replaced_ms) is runs
    assert replacement_runs(versus, ms, replaced_ms, captured=True) is runs


@pytest.mark.parametrize("versus, ms, replaced_ms", [(1.2, 0.05, None), (None, 0.05, 0.08)])
def test_the_auto_rule_keeps_eager_calls_under_the_host_bound_floor_on_the_fallback(versus, ms, replaced_ms):
    """A winner faster on the GPU but under EAGER_MIN_MS runs only in a CUDA graph: eager calls of it wait on its
    launch's host time (H200, 2026-12-07: flash_v3 at N 1k 1.68-2.55x its graph time launched one call at a time)."""
    from tunebench.registry import EAGER_MIN_MS, replacement_runs
    assert replacement_runs(versus, ms, replaced_ms) is False
    assert replacement_runs(versus, ms, replaced_ms, captured=True) is True
    assert replacement_runs(versus, EAGER_MIN_MS, replaced_ms and 2 * EAGER_MIN_MS) is True


@pytest.mark.parametrize("captured, expected", [(False, "flash_v2"), (True, "flash_v3")])
@pytest.mark.parametrize("versus", [1.08, None])
def test_auto_explains_a_host_bound_winner(monkeypatch, device, captured, expected, versus):
    _as_on_hopper(monkeypatch)
    _auto_winners(monkeypatch, {"flash_v2": 0.06, "flash_v3": 0.0557}, v3_versus_v2=versus)
    kernel, why = dispatch.auto_kernel(*_auto_inputs(device), True, captured)
    assert kernel == expected, why
    assert ("waits on its launch's host time, so flash_v2 runs" in why) == (not captured), why


@pytest.mark.parametrize("versus, expected", [(1.2, "flash_v3"), (0.8, "flash_v2")])
@pytest.mark.parametrize("times", [{"flash_v2": 2.0, "flash_v3": 1.0}, {"flash_v2": 1.0, "flash_v3": 2.0},
                                   {"flash_v3": 1.0}])
def test_auto_goes_by_the_head_to_head_timing_over_the_two_winners_times(monkeypatch, device, times, versus,
                                                                          expected):
    """flash_v3's winner timed beside flash_v2's config when it was tuned (speedup_vs_peer) decides, whatever the two
    winners' times from their own runs say, and whether or not flash_v2 has a winner: on the H100 at N 1k flash_v3's
    lone winner ran though flash_v2's DEFAULT was faster."""
    _as_on_hopper(monkeypatch)
    _auto_winners(monkeypatch, times, v3_versus_v2=versus)
    kernel, why = dispatch.auto_kernel(*_auto_inputs(device), True)
    assert kernel == expected and f"{versus:.2f}x flash_v2's config beside it" in why, why
    assert ("so flash_v2 runs" in why) == (expected == "flash_v2"), why


def test_auto_does_not_go_by_a_head_to_head_figure_of_a_winner_keep_rejects(monkeypatch, device):
    import tunebench.kernels.flash_v3 as v3
    _as_on_hopper(monkeypatch)
    monkeypatch.setattr(v3, "keep", lambda config, problem: "measured wrong")
    _auto_winners(monkeypatch, {"flash_v2": 2.0, "flash_v3": 1.0}, v3_versus_v2=1.5)
    kernel, why = dispatch.auto_kernel(*_auto_inputs(device), True)
    assert kernel == "flash_v2" and "beside it" not in why, why


def test_auto_does_not_compare_a_winner_keep_rejects(monkeypatch, device):
    """A stored flash_v3 winner that keep() now refuses (flash_v3 OVERLAP on a causal problem) would run as DEFAULT,
    not at its tuned time: auto leaves it out and runs flash_v2's winner."""
    import tunebench.kernels.flash_v3 as v3
    _as_on_hopper(monkeypatch)
    monkeypatch.setattr(v3, "keep", lambda config, problem: "measured wrong")
    _auto_winners(monkeypatch, {"flash_v2": 2.0, "flash_v3": 1.0})
    kernel, why = dispatch.auto_kernel(*_auto_inputs(device), True)
    assert kernel == "flash_v2" and "only tuned winner" in why and "flash_v3 has no winner it can run" in why, why


def test_auto_does_not_run_a_lone_winner_never_timed_beside_the_fallback(monkeypatch, device):
    """flash_v3's winner alone (flash_v2 untuned for the bucket, no head-to-head figure): flash_v2 runs, and auto says
    why. On an H100 at N 1k causal that lone winner took 1.06x flash_v2's DEFAULT time (graph-timed, 2026-12-07)."""
    _as_on_hopper(monkeypatch)
    _auto_winners(monkeypatch, {"flash_v3": 1.0})
    kernel, why = dispatch.auto_kernel(*_auto_inputs(device), True)
    assert kernel == "flash_v2" and "flash_v3's winner for this bucket (1 ms) was never timed beside flash_v2" in why
    assert "--replace" in why, why


def test_auto_without_exact_winners_runs_flash_v2(monkeypatch, device):
    _as_on_hopper(monkeypatch)
    _auto_winners(monkeypatch, {})
    kernel, why = dispatch.auto_kernel(*_auto_inputs(device), True)
    assert kernel == "flash_v2" and "no kernel has an exact winner" in why


def test_auto_never_runs_flash_v3_where_it_cannot_run(monkeypatch, device):
    """Off Hopper (and in the interpreter) flash_v3 is not registered: even a faster flash_v3 winner for the bucket
    leaves the call on flash_v2, which computes it right, and explain says why."""
    if torch.cuda.is_available():
        import tunebench.kernels.flash_v3 as v3
        monkeypatch.setattr(v3, "unavailable", lambda: "it needs a Hopper GPU (this test pretends there is none)")
    _auto_winners(monkeypatch, {"flash_v2": 2.0, "flash_v3": 1.0})
    q, k, v = _auto_inputs(device)
    kernel, why = dispatch.auto_kernel(q, k, v, True)
    assert kernel == "flash_v2" and "flash_v3 cannot run it" in why and "Hopper" in why, why
    assert "[auto: flash_v2" in tunebench.explain(q, k, causal=True)
    out = tunebench.flash_attention(q, k, v, causal=True)
    ref64 = ref.attention(q, k, v, True)
    verdict = close_enough(out, ref64, ref.attention(q, k, v, True, dtype=q.dtype))
    assert verdict.ok, verdict.reason


def test_auto_asks_flash_v3_about_these_tensors(monkeypatch, device):
    """A layout flash_v3's TMA refuses (a last dim with stride 2) is refused by name, so auto stays on flash_v2."""
    module = pytest.importorskip("tunebench.kernels.flash_v3")
    monkeypatch.setattr(module, "unavailable", lambda: None)
    q = torch.randn(1, 2, 40, 128, device=device).half()
    assert module.refusal(q, q, q) is None
    strided = torch.randn(1, 2, 40, 256, device=device).half()[..., ::2]
    assert "contiguous last dim" in module.refusal(strided, q, q)
    assert "head dim" in module.refusal(q[..., :96], q[..., :96], q[..., :96])
    assert "float16 or bfloat16" in module.refusal(q.float(), q.float(), q.float())


def test_auto_builds_no_per_call_key_where_only_flash_v2_is_registered(monkeypatch, device):
    """Off Hopper auto is flash_v2 for every call: the strides-and-alignment key (~0.8 us) is not built."""
    monkeypatch.setattr(dispatch, "_AUTO_ALONE", [True])
    monkeypatch.setattr(dispatch, "_auto_key", lambda *a: pytest.fail("auto built a per-call key"))
    q, k, v = _auto_inputs(device)
    out = tunebench.flash_attention(q, k, v, causal=True)
    verdict = close_enough(out, ref.attention(q, k, v, True), ref.attention(q, k, v, True, dtype=q.dtype))
    assert verdict.ok, verdict.reason
    if not torch.cuda.is_available():
        monkeypatch.setattr(dispatch, "_AUTO_ALONE", [])
        assert dispatch._auto_alone()      # the interpreter registers no flash_v3


def test_auto_names_a_non_tensor_before_it_reads_strides(monkeypatch, device):
    """Where flash_v3 is registered, auto reads every input's strides for its key: a list there is the input rule's
    TypeError naming it, with grad on or off, never an AttributeError."""
    monkeypatch.setattr(dispatch, "_AUTO_ALONE", [False])
    monkeypatch.setattr(dispatch, "_refusal", lambda kernel, q, k, v: None)
    q, k, v = _auto_inputs(device)
    for grad in (True, False):
        with torch.set_grad_enabled(grad), pytest.raises(TypeError, match="^v must be a torch.Tensor, got list$"):
            tunebench.flash_attention(q, k, v.tolist(), causal=True)


def test_shipped_flash_v3_winners_are_read_where_flash_v3_is_not_yet_registered():
    """The H200's flash_v3 winners in the shipped results.db are read by the dispatcher's loader before anything
    registered flash_v3 (it is registered on first use, on Hopper only). The loader skipped them as an unknown kernel
    on an H100, so variant="auto" never compared them (bench run, 2026-12-06; the shipped flash_v3 rows are the
    H200's since 2026-12-07). Reading them registers nothing."""
    from tunebench import registry
    from tunebench.shapes import suite
    from tunebench.store import resolve_url
    assert "flash_v3" not in registry.known_kernels()
    with warnings.catch_warnings():
        warnings.simplefilter("error")                        # no row of the shipped file is skipped
        loaded = winners.Winners.load("NVIDIA H200", urls=[resolve_url(str(winners.packaged_db_path()))])
    headline = [dataclasses.replace(p, kernel="flash_v3") for p in suite("headline")
                if p.kernel == "flash_v2" and p.dtype == "bfloat16" and p.D in (64, 128)]
    assert headline and all(loaded.exact_ms(p) for p in headline), [p.label() for p in headline
                                                                     if not loaded.exact_ms(p)]
    assert "flash_v3" not in registry.known_kernels()
