"""Recording which buckets a program's attention calls hit, so that `tunebench tune --from-record` tunes those.

    with tunebench.record("shapes.json"):
        model.generate(...)                     # every flash_attention / paged_attention call is counted

or, for a program one cannot edit, `TUNEBENCH_RECORD=shapes.json python serve.py` (written when the program exits).

The file holds each distinct bucket with its number of calls. Recording never changes what a call computes: the
dispatcher counts the call's shape key (one dict lookup once a shape has been seen) and works out its bucket only the
first time. Calls made inside torch.compile'd code are counted too, since the kernels run as opaque custom ops.
"""
from __future__ import annotations

import atexit
import contextlib
import dataclasses
import json
import os
import pathlib

from ..shapes import DTYPES, KV_DTYPES, Problem, bucket, bucket_key

FORMAT = "tunebench-record"
# 2: problems have a page; 3: and a kv_dtype (an fp8 cache). Older files still load: a paged entry without a page
# has page 16, an entry without a kv_dtype has None (its cache in the problem's dtype).
VERSION = 3
VERSIONS = (1, 2, 3)
ADDED = {1: {"page", "kv_dtype"}, 2: {"kv_dtype"}, 3: set()}     # the fields each older version's problems lack
MAX_ENTRIES = 10_000
MAX_FILE_BYTES = 16 * 1024 * 1024
_LIMITS = {"B": 1 << 16, "Hq": 1024, "Hkv": 1024, "Nq": 1 << 22, "Nk": 1 << 24, "D": 1024}


class RecordError(ValueError):
    """A record file that cannot be tuned from: missing, truncated, or holding an entry tunebench does not accept."""


class Recorder:
    """Call counts per shape key; the Problem of a key is worked out on its first call only."""

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        self.calls: dict[tuple, list] = {}           # shape key -> [calls, Problem]

    def count(self, key: tuple, problem) -> None:
        """Counts one call. ``problem`` is a function returning the call's Problem, called on a key's first call."""
        seen = self.calls.get(key)
        if seen is None:
            self.calls[key] = [1, problem()]
        else:
            seen[0] += 1

    def buckets(self) -> list[tuple[Problem, int]]:
        """(bucket, calls) for every distinct bucket, most-called first."""
        totals: dict[str, list] = {}
        for calls, problem in self.calls.values():
            entry = totals.setdefault(bucket_key(problem), [bucket(problem), 0])
            entry[1] += calls
        return sorted(((p, n) for p, n in totals.values()), key=lambda e: (-e[1], bucket_key(e[0])))

    def write(self) -> pathlib.Path:
        entries = [{"problem": dataclasses.asdict(p), "calls": n} for p, n in self.buckets()]
        text = json.dumps({"format": FORMAT, "version": VERSION, "entries": entries}, indent=1)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(text + "\n")
        tmp.replace(self.path)                         # a crash mid-write leaves the old file, never half a file
        return self.path


_ACTIVE: Recorder | None = None


def active() -> Recorder | None:
    return _ACTIVE


@contextlib.contextmanager
def record(path: str | os.PathLike):
    """Counts the buckets of every tunebench attention call in the block and writes them to ``path`` at its end."""
    global _ACTIVE
    if _ACTIVE is not None:
        raise RuntimeError(f"tunebench is already recording to {_ACTIVE.path}; recordings do not nest")
    recorder = _ACTIVE = Recorder(path)
    try:
        yield recorder
    finally:
        _ACTIVE = None
        recorder.write()


def start_from_environment() -> None:
    """TUNEBENCH_RECORD=path: record the whole program, written when it exits."""
    global _ACTIVE
    path = os.environ.get("TUNEBENCH_RECORD")
    if path and _ACTIVE is None:
        _ACTIVE = Recorder(path)
        atexit.register(_ACTIVE.write)


# -- reading a record back


def load(path: str | os.PathLike, known_kernels) -> list[tuple[Problem, int]]:
    """(problem, calls) of every entry, most-called first. Raises RecordError naming the file and the entry."""
    path = pathlib.Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise RecordError(f"{path}: {size} bytes is over the {MAX_FILE_BYTES}-byte limit of a record file")
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise RecordError(f"{path}: no such record file (write one with tunebench.record or TUNEBENCH_RECORD)")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise RecordError(f"{path}: not a readable record file ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("version") not in VERSIONS:
        raise RecordError(f"{path}: not a tunebench record (expected format {FORMAT!r} version {VERSION})")
    entries = data.get("entries")
    if not isinstance(entries, list) or not entries:
        raise RecordError(f"{path}: 'entries' must be a non-empty list")
    if len(entries) > MAX_ENTRIES:
        raise RecordError(f"{path}: {len(entries)} entries is over the limit of {MAX_ENTRIES}")
    out = [_entry(path, i, e, set(known_kernels), data["version"]) for i, e in enumerate(entries)]
    return sorted(out, key=lambda e: (-e[1], bucket_key(e[0])))


def _entry(path, index: int, entry, known_kernels: set, version: int = VERSION) -> tuple[Problem, int]:
    where = f"{path}: entry {index}"
    if not isinstance(entry, dict) or set(entry) != {"problem", "calls"}:
        raise RecordError(f"{where}: must be an object with 'problem' and 'calls'")
    fields, calls = entry["problem"], entry["calls"]
    if type(calls) is not int or calls < 1:
        raise RecordError(f"{where}: 'calls' must be a positive integer, got {str(calls)[:50]!r}")
    names = {f.name for f in dataclasses.fields(Problem)} - ADDED[version]
    if not isinstance(fields, dict) or set(fields) != names:
        raise RecordError(f"{where}: 'problem' must have exactly the fields {sorted(names)}")
    if fields["kernel"] not in known_kernels:
        raise RecordError(f"{where}: unknown kernel {str(fields['kernel'])[:50]!r}; "
                          f"known: {', '.join(sorted(known_kernels))}")
    if fields["dtype"] not in DTYPES or type(fields["causal"]) is not bool:
        raise RecordError(f"{where}: dtype must be one of {DTYPES} and causal a bool")
    if fields.get("page") is not None and type(fields["page"]) is not int:
        raise RecordError(f"{where}: page must be an integer or null, got {str(fields['page'])[:50]!r}")
    if fields.get("kv_dtype") is not None and fields["kv_dtype"] not in KV_DTYPES:
        raise RecordError(f"{where}: kv_dtype must be null or one of {KV_DTYPES}, got {str(fields['kv_dtype'])[:50]!r}")
    for name, limit in _LIMITS.items():
        value = fields[name]
        if type(value) is not int or not 1 <= value <= limit:
            raise RecordError(f"{where}: {name} must be an integer in [1, {limit}], got {str(value)[:50]!r}")
    try:
        problem = Problem(**fields)
    except ValueError as e:
        raise RecordError(f"{where}: {e}") from None
    return bucket(problem), calls
