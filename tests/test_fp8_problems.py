"""The KV cache's dtype is part of a paged decode problem (Problem.kv_dtype, issue 19): validated, its own bucket and
transfer family, counted in bytes, stored (old rows read back as None), built into the tuner's and the bench's inputs,
and tuned, recorded and dispatched end to end under the interpreter."""
import dataclasses
import math
import shutil
import sqlite3

import pytest
import torch

import tunebench
from tunebench.cli import main
from tunebench.inputs import Workload, make_inputs, reference_for
from tunebench.registry import kernel_module
from tunebench.runtime import transfer
from tunebench.shapes import Problem, bucket_distance, bucket_key, family, suite
from tunebench.store import SCHEMA_VERSION, Store

from test_dispatch import PAGED_TUNED, _timed, db  # noqa: F401  (db is a fixture)

BF16 = Problem("paged_attention", 16, 32, 8, 1, 16384, 128, "bfloat16", page=16)
FP8 = dataclasses.replace(BF16, kv_dtype="float8_e4m3fn")
SMALL = Problem("paged_attention", 2, 4, 2, 1, 40, 16, "float16", page=8, kv_dtype="float8_e4m3fn")
PAGED_CONFIG = {"BLOCK_N": 16, "PARTITION": 0, "num_warps": 2, "num_stages": 1, "RESTAGE_V": 0}


@pytest.mark.parametrize("kwargs, message", [
    (dict(kernel="flash_v2", Nq=64, Nk=64, page=None), "flash_v2 takes kv_dtype=None"),
    (dict(kernel="paged_prefill", Nq=8, causal=True), "paged_prefill takes kv_dtype=None"),
    (dict(kv_dtype="int8"), "must be None .* or one of"),
    (dict(kv_dtype="float16"), "must be None \\(the same as dtype, bfloat16\\)"),
])
def test_a_bad_kv_dtype_is_refused_by_name(kwargs, message):
    fields = dict(dataclasses.asdict(FP8), **kwargs)
    with pytest.raises(ValueError, match=message):
        Problem(**fields)


def test_fp8_and_bf16_caches_of_one_shape_are_different_buckets_and_families():
    assert dataclasses.replace(BF16, kv_dtype="bfloat16") == BF16 and BF16.kv_dtype is None   # same dtype: None
    assert bucket_key(FP8) == bucket_key(BF16) + "|kvfloat8_e4m3fn"
    assert bucket_key(FP8) != bucket_key(dataclasses.replace(FP8, kv_dtype="float8_e5m2"))
    assert bucket_key(dataclasses.replace(FP8, B=13)) == bucket_key(FP8)           # B still rounds up
    assert family(FP8) != family(BF16)
    assert bucket_distance(FP8, BF16) == math.inf == transfer.distance(FP8, BF16)
    assert transfer.distance(FP8, dataclasses.replace(FP8, B=32)) == 1.0
    assert FP8.label().endswith("page16 kv float8_e4m3fn") and "kv" not in BF16.label()


def test_safe_transfer_never_crosses_cache_dtypes(db):
    default = kernel_module("paged_attention").DEFAULT

    def decode(b, kv_dtype):
        return Problem("paged_attention", b, 2, 1, 1, 64, 32, "float16", page=16, kv_dtype=kv_dtype)
    for b in (1, 4):                              # two tuned fp16-cache neighbours, both say PAGED_TUNED wins
        _timed(db, decode(b, None), (default, 2.0), (PAGED_TUNED, 1.0))
    tunebench.runtime.dispatch.reload()
    assert "transferred from buckets" in tunebench.explain(decode(2, None))
    why = tunebench.explain(decode(2, "float8_e4m3fn"))
    assert "kv float8_e4m3fn" in why and "DEFAULT" in why and str(PAGED_TUNED) not in why
    for b in (1, 4):                              # fp8 neighbours are evidence for an fp8 bucket
        _timed(db, decode(b, "float8_e4m3fn"), (default, 2.0), (PAGED_TUNED, 1.0))
    tunebench.runtime.dispatch.reload()
    assert "transferred from buckets" in tunebench.explain(decode(2, "float8_e4m3fn"))


def test_an_fp8_cache_is_counted_at_one_byte_per_element():
    assert FP8.kv_bytes == BF16.kv_bytes / 2 == 2 * 16 * 8 * 16384 * 128
    assert FP8.throughput(1.0) == pytest.approx(BF16.throughput(1.0) / 2)
    assert FP8.min_bytes == FP8.kv_bytes + 2 * 16 * 32 * 128 * 2


def test_the_suites_hold_the_headline_decode_shapes_with_an_fp8_cache():
    fp8 = suite("fp8")
    assert {(p.B, p.Nk) for p in fp8} == {(64, 4096), (16, 16384), (128, 1024), (1, 32768)}
    assert all(p.kv_dtype == "float8_e4m3fn" and p.dtype == "bfloat16" and p.page == 16 for p in fp8)
    for name in ("headline", "default", "decode"):
        assert {bucket_key(p) for p in fp8} <= {bucket_key(p) for p in suite(name)}
    headline = {bucket_key(p) for p in suite("headline")}      # one bench run times both caches of each shape
    assert {bucket_key(dataclasses.replace(p, kv_dtype=None)) for p in fp8} <= headline


def test_fp8_and_bf16_winners_of_one_bucket_are_stored_apart_and_read_back(tmp_path):
    from test_store import H100
    with Store(str(tmp_path / "r.db")) as store:
        for problem, ms in ((BF16, 1.0), (FP8, 0.5)):
            store.upsert_winner(H100, "paged_attention", "h", problem, PAGED_CONFIG, ms, 1.0)
        got = {w.problem.kv_dtype: w.median_ms for w in store.winners()}
    assert got == {None: 1.0, "float8_e4m3fn": 0.5}


def as_version_2(path) -> None:
    """Takes a schema-3 file back to schema 2 (its problems table without kv_dtype), as the shipped results.db was
    before 2026-12-06. Schema 2 had no fp8 cache: the rows of problems with one (the shipped H100 fp8 winners, since
    2026-12-06) are dropped first."""
    c = sqlite3.connect(path, isolation_level=None)
    ddl = c.execute("SELECT sql FROM sqlite_master WHERE name = 'problems'").fetchone()[0]
    v2 = ddl.replace("kv_dtype VARCHAR(256) NOT NULL, ", "").replace(", kv_dtype)", ")")
    assert v2 != ddl and "kv_dtype" not in v2
    fp8 = "SELECT id FROM problems WHERE kv_dtype != ''"
    c.executescript(f"BEGIN; DELETE FROM winners WHERE problem_id IN ({fp8}); DELETE FROM trials WHERE problem_id "
                    f"IN ({fp8}); DELETE FROM problems WHERE kv_dtype != ''; COMMIT;")
    columns = 'id, kernel, "B", "Hq", "Hkv", "Nq", "Nk", "D", dtype, causal, page'
    c.executescript(f"PRAGMA foreign_keys = OFF; BEGIN; CREATE TABLE p2 AS SELECT {columns} FROM problems; "
                    f"DROP TABLE problems; {v2}; INSERT INTO problems SELECT * FROM p2; DROP TABLE p2; "
                    f"UPDATE schema_version SET version = 2; COMMIT;")
    c.close()


def test_a_version_2_results_db_loads_as_kv_dtype_none(tmp_path):
    """The shipped results.db's rows taken back to schema 2 (as it shipped until 2026-12-06): read-only through an
    in-memory migrated copy, file untouched; writable, migrated in place."""
    from test_store import H100
    from tunebench.runtime.winners import packaged_db_path
    copy = tmp_path / "shipped.db"
    shutil.copyfile(packaged_db_path(), copy)
    as_version_2(copy)
    assert sqlite3.connect(copy).execute("SELECT version FROM schema_version").fetchone() == (2,)
    before = copy.read_bytes()
    with Store(str(copy), readonly=True) as store:             # read through a migrated copy in memory
        read_only = [(bucket_key(w.problem), w.config) for w in store.winners()]
        assert read_only and all(w.problem.kv_dtype is None for w in store.winners())
        assert all(p.kv_dtype is None for _, _, p, _, _ in store.timings(store.winners()[0].device))
    assert copy.read_bytes() == before
    with Store(str(copy)) as store:                            # opened writable: migrated in place
        assert [(bucket_key(w.problem), w.config) for w in store.winners()] == read_only
        for problem in (BF16, FP8):                            # one bucket, two caches: two rows, no unique-key clash
            assert store.upsert_winner(H100, "paged_attention", "h", problem, PAGED_CONFIG, 0.1, 1.0)
        assert len(store.winners()) == len(read_only) + 2
    assert sqlite3.connect(copy).execute("SELECT version FROM schema_version").fetchone() == (SCHEMA_VERSION,) == (3,)


def test_the_tuners_fp8_workload_packs_a_quantised_cache_and_checks_on_its_dequantised_values(device):
    module = kernel_module("paged_attention")
    work = Workload(SMALL, seed=3, device=device)
    _, k_cache, v_cache, _, _ = work.args(module.DEFAULT)
    assert k_cache.dtype == v_cache.dtype == torch.float8_e4m3fn
    assert set(work.kwargs()) == {"k_scale", "v_scale"} and work.kwargs()["k_scale"].shape == (SMALL.Hkv,)
    assert work.check(module, dict(module.DEFAULT)).ok
    bf16_ref = Workload(dataclasses.replace(SMALL, kv_dtype=None), seed=3, device=device).references()[0]
    assert not torch.allclose(work.references()[0], bf16_ref, atol=1e-4)     # the reference is the quantised cache's
    compile_only = Workload(SMALL, seed=3, device=device, fill=False)
    assert [t.dtype for t in compile_only.args(module.DEFAULT)[1:3]] == [torch.float8_e4m3fn] * 2
    assert set(compile_only.kwargs()) == {"k_scale", "v_scale"}


def test_the_benchs_fp8_inputs_run_through_the_dispatcher_and_pass_the_reference(device):
    inputs = make_inputs(SMALL, device, seed=1)
    assert inputs.k_cache.dtype == torch.float8_e4m3fn and inputs.k_scale.shape == (SMALL.Hkv,)
    out = tunebench.paged_attention(inputs.q, inputs.k_cache, inputs.v_cache, inputs.block_tables,
                                    inputs.context_lens, k_scale=inputs.k_scale, v_scale=inputs.v_scale)
    assert reference_for(inputs).check(out).ok


@pytest.mark.interpreter
def test_an_fp8_call_is_recorded_tuned_and_then_dispatched_its_exact_winner(tmp_path, monkeypatch, capsys, device):
    from tunebench.paged_inputs import fp8_paged_inputs
    from tunebench.runtime import dispatch
    from tunebench.runtime.dispatch import Dispatcher, Winners
    q, kc, vc, bt, cl, ks, vs = fp8_paged_inputs(SMALL, device, 0, torch.float8_e4m3fn, per_head=True,
                                                 context_lens=[40, 40], extra_columns=0)
    shapes, db = tmp_path / "shapes.json", tmp_path / "results.db"
    with tunebench.record(shapes):
        tunebench.paged_attention(q, kc, vc, bt, cl, k_scale=ks, v_scale=vs)
    assert main(["tune", "--interpret", "--from-record", str(shapes), "--trials", "2", "--db", str(db)]) == 0
    with Store(str(db), readonly=True) as store:
        (winner,) = store.winners(device_name="cpu-interpreter")
        lookup = Winners.load("cpu-interpreter", [store.url])
    call = dispatch._paged_problem(q, kc, bt)
    assert winner.problem.kv_dtype == "float8_e4m3fn" and bucket_key(winner.problem) == bucket_key(call)
    choice = Dispatcher(lookup).choose(call)
    assert choice.config == winner.config and "exact winner" in choice.why and "kvfloat8_e4m3fn" in choice.why
    fp16_call = dispatch._paged_problem(q, kc.to(torch.float16), bt)    # same shape, fp16 cache: not its winner
    assert Dispatcher(lookup).choose(fp16_call).why.startswith("DEFAULT: no exact winner")


def test_the_bench_runs_an_fp8_row_with_the_providers_that_read_its_cache(device):
    from tunebench.bench import providers
    from tunebench.bench.measure import OK, run_problem
    assert [pr.name for pr in providers.PROVIDERS if pr.applies(SMALL)] == ["tunebench-paged",
                                                                             "tunebench-paged-default"]
    assert "sdpa-dense-flash" in [pr.name for pr in providers.PROVIDERS if pr.applies(dataclasses.replace(
        SMALL, kv_dtype=None))]
    chosen = [pr for pr in providers.PROVIDERS if pr.applies(SMALL)]

    def timer(fn):
        fn()
        return (1.0, 1.0, 1.0)
    got = {m.provider: m for m in run_problem(SMALL, chosen, device=device, timer=timer, graph_timer=timer)}
    assert all(m.status == OK for m in got.values()), {n: m.note for n, m in got.items()}


def test_the_page_recommendation_weighs_one_cache_dtype_at_a_time():
    from tunebench.runtime.pages import recommend
    from tunebench.runtime.winners import Winners
    fast_fp8 = [(dataclasses.replace(FP8, page=page), PAGED_CONFIG, "test", ms) for page, ms in ((16, 9.0), (128, 0.1))]
    w = Winners("gpu", [(BF16, PAGED_CONFIG, "test", 1.0), *fast_fp8])
    assert [r.page for r in recommend(w, 8, 128, "bfloat16").rows] == [16]        # fp8 times say nothing of bf16
    assert recommend(w, 8, 128, "bfloat16", kv_dtype="float8_e4m3fn").pick == 128


def test_the_bench_summary_states_the_fp8_caches_time_against_the_bf16_caches():
    from tunebench.bench import tables
    from tunebench.bench.measure import GRAPH, OK, Measurement
    ms = [Measurement(p, "tunebench-paged", False, OK, t, timed_by=GRAPH, launch_ms=t * 1.2)
          for p, t in ((BF16, 0.5), (FP8, 0.26))]
    rs = tables.rows(ms, None)
    assert [r["kv_dtype"] for r in rs] == [None, "float8_e4m3fn"]
    (line,) = [x for x in tables.summary(rs) if x.startswith("fp8 ")]
    assert "0.520x the time of the bfloat16 cache's row, graph-timed (goal <= 0.55x)" in line
    assert "n/a (not timed in this run) the time" in tables.summary(tables.rows(ms[1:], None))[-1]
