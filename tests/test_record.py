"""Recording a program's buckets and reading the record back: round trip, counts, and clear errors."""
import dataclasses
import json

import pytest

from tunebench.runtime import record
from tunebench.shapes import Problem, bucket

KNOWN = ("flash_v2", "flash_v1", "paged_attention")
PREFILL = Problem("flash_v2", 3, 8, 2, 100, 100, 64, "float16", True)
DECODE = Problem("paged_attention", 5, 8, 2, 1, 1000, 64, "float16")


def test_round_trip_counts_calls_per_bucket_most_called_first(tmp_path):
    path = tmp_path / "shapes.json"
    with record.record(path) as rec:
        for _ in range(3):
            rec.count(("a",), lambda: PREFILL)
        rec.count(("b",), lambda: Problem("flash_v2", 4, 8, 2, 128, 128, 64, "float16", True))  # same bucket
        for _ in range(7):
            rec.count(("c",), lambda: DECODE)
    assert record.active() is None
    assert record.load(path, KNOWN) == [(bucket(DECODE), 7), (bucket(PREFILL), 4)]


def test_a_problem_is_worked_out_only_on_a_shapes_first_call(tmp_path):
    rec, made = record.Recorder(tmp_path / "r.json"), []
    for _ in range(5):
        rec.count(("k",), lambda: made.append(1) or PREFILL)
    assert made == [1] and rec.calls[("k",)][0] == 5


def test_recordings_do_not_nest(tmp_path):
    with record.record(tmp_path / "a.json"):
        with pytest.raises(RuntimeError, match="already recording"):
            with record.record(tmp_path / "b.json"):
                pass


def write(tmp_path, data) -> str:
    path = tmp_path / "bad.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


def entry(**problem):
    fields = dict(kernel="flash_v2", B=1, Hq=8, Hkv=2, Nq=64, Nk=64, D=64, dtype="float16", causal=False, page=None,
                  kv_dtype=None)
    return {"problem": dict(fields, **problem), "calls": 1}


def doc(*entries):
    return {"format": record.FORMAT, "version": record.VERSION, "entries": list(entries)}


@pytest.mark.parametrize("data, message", [
    ('{"format": "tunebench-record", "version": 1, "entries": [', "not a readable record"),   # truncated
    ({"entries": []}, "not a tunebench record"),
    (doc(), "non-empty list"),
    (doc(entry(kernel="evil_kernel")), "entry 0: unknown kernel 'evil_kernel'"),
    (doc(entry(), entry(Nk=10 ** 12)), "entry 1: Nk must be an integer in"),
    (doc(entry(B=0)), "entry 0: B must be"),
    (doc(entry(Hq=7, Hkv=2)), "entry 0: Hq \\(7\\) must be a multiple"),
    (doc(entry(dtype="int8")), "entry 0: dtype must be"),
    (doc(entry(page=16)), "entry 0: page is the KV page size of a paged problem"),
    (doc(entry(kernel="paged_attention", Nq=1, page=24)), "entry 0: page .* must be a power of two in 8..128"),
    (doc(entry(kernel="paged_attention", Nq=1, page="16")), "entry 0: page must be an integer or null"),
    (doc(entry(kernel="paged_attention", Nq=1, kv_dtype="int8")), "entry 0: kv_dtype must be null or one of"),
    (doc(entry(kv_dtype="float8_e4m3fn")), "entry 0: kv_dtype is the KV cache's dtype of a paged decode"),
    (doc({"problem": entry()["problem"], "calls": -3}), "entry 0: 'calls' must be a positive integer"),
    ("[" * 100_000, "not a readable record"),
])
def test_a_bad_record_names_the_file_and_the_entry(tmp_path, data, message):
    path = write(tmp_path, data)
    with pytest.raises(record.RecordError, match=message) as e:
        record.load(path, KNOWN)
    assert path in str(e.value)


def test_a_missing_record_says_how_to_make_one(tmp_path):
    with pytest.raises(record.RecordError, match="no such record file.*TUNEBENCH_RECORD"):
        record.load(tmp_path / "none.json", KNOWN)


def test_recording_counts_real_calls_and_never_changes_results(tmp_path, device):
    import torch
    import tunebench
    q = torch.randn(1, 2, 40, 32).half().to(device)
    k, v = torch.randn(1, 1, 40, 32).half().to(device), torch.randn(1, 1, 40, 32).half().to(device)
    plain = tunebench.flash_attention(q, k, v, causal=True)
    with tunebench.record(tmp_path / "calls.json"):
        recorded = [tunebench.flash_attention(q, k, v, causal=True) for _ in range(3)]
    assert all(torch.equal(r, plain) for r in recorded)
    [(problem, calls)] = record.load(tmp_path / "calls.json", KNOWN)
    assert calls == 3 and problem == bucket(Problem("flash_v2", 1, 2, 1, 40, 40, 32, "float16", True))


def test_the_page_round_trips_and_each_page_is_its_own_bucket(tmp_path):
    path = tmp_path / "shapes.json"
    page32 = Problem("paged_attention", 5, 8, 2, 1, 1000, 64, "float16", page=32)
    with record.record(path) as rec:
        rec.count(("a",), lambda: DECODE)
        rec.count(("b",), lambda: page32)
    assert sorted(p.page for p, _ in record.load(path, KNOWN)) == [16, 32]


def test_a_version_1_record_without_pages_loads_with_page_16(tmp_path):
    old = {k: v for k, v in entry(kernel="paged_attention", Nq=1)["problem"].items() if k not in ("page", "kv_dtype")}
    path = write(tmp_path, {"format": record.FORMAT, "version": 1, "entries": [{"problem": old, "calls": 2}]})
    ((problem, calls),) = record.load(path, KNOWN)
    assert (problem.page, calls) == (16, 2)


def test_a_version_2_record_without_kv_dtype_loads_as_a_cache_of_the_problems_dtype(tmp_path):
    old = {k: v for k, v in entry(kernel="paged_attention", Nq=1, page=32)["problem"].items() if k != "kv_dtype"}
    path = write(tmp_path, {"format": record.FORMAT, "version": 2, "entries": [{"problem": old, "calls": 3}]})
    ((problem, calls),) = record.load(path, KNOWN)
    assert (problem.page, problem.kv_dtype, calls) == (32, None, 3)


def test_an_fp8_call_records_its_own_bucket_beside_the_fp16_one(tmp_path):
    import torch
    import tunebench
    from tunebench.paged_inputs import fp8_paged_inputs
    fp8 = Problem("paged_attention", 2, 4, 2, 1, 40, 16, "float16", page=8, kv_dtype="float8_e5m2")
    q, kc, vc, bt, cl, ks, vs = fp8_paged_inputs(fp8, "cpu", 0, torch.float8_e5m2, per_head=False,
                                                 context_lens=[40, 40], extra_columns=0)
    path = tmp_path / "shapes.json"
    with tunebench.record(path):
        for _ in range(2):
            tunebench.paged_attention(q, kc, vc, bt, cl, k_scale=ks, v_scale=vs)
        tunebench.paged_attention(q, kc.to(torch.float16), vc.to(torch.float16), bt, cl)
    assert json.loads(path.read_text())["entries"][0]["problem"]["kv_dtype"] == "float8_e5m2"
    assert record.load(path, KNOWN) == [(bucket(fp8), 2), (bucket(dataclasses.replace(fp8, kv_dtype=None)), 1)]
