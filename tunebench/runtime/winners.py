"""What the dispatcher knows: the winners and the ok trials stored for this GPU, and how it picks a config from them.

They are read once, lazily, on the first call: from the user's database (TUNEBENCH_DB, else the per-user database that
`tunebench tune` writes) layered over the results.db shipped in the package; user winners take precedence. Only rows
measured on this GPU, with the kernel's current identity, count. A bucket with a winner runs it; one without runs a
config that safe transfer (transfer.py) finds in the neighbouring buckets' trials, or else DEFAULT.

Reading them never raises into a user's call: a database that cannot be read is ignored with a warning naming it, and
a row that cannot be read is skipped with one (the store's StoreWarning); DEFAULT then runs.
"""
from __future__ import annotations

import dataclasses
import os
from importlib import resources

from ..registry import checked_config, kernel_identity
from ..shapes import Problem, bucket, bucket_key, family
from ..text import clip
from . import transfer
from .warn import warn_user

INTERPRETER = "cpu-interpreter"     # the device name of runs under the Triton interpreter (no GPU)


def tune_hint(device_name: str) -> str:
    """What to run to get winners for this device."""
    if device_name == INTERPRETER:
        return ("run `tunebench tune --interpret` to tune them for the Triton interpreter (it checks the pipeline; "
                "its times are not a speed measurement)")
    return "run `tunebench tune` on this GPU to tune them"


def packaged_db_path():
    path = resources.files("tunebench") / "results.db"
    return path if path.is_file() else None


def database_urls() -> list[str]:
    """Databases to read, highest precedence first."""
    from ..store import default_db_path, resolve_url
    urls = []
    user = os.environ.get("TUNEBENCH_DB")
    if user:
        urls.append(resolve_url(user))
    elif default_db_path().exists():
        urls.append(resolve_url(str(default_db_path())))
    packaged = packaged_db_path()
    if packaged is not None:
        urls.append(resolve_url(str(packaged)))
    return urls


def current_device_name() -> str:
    import torch
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return INTERPRETER


def _shown(url: str) -> str:
    """A database URL for a message: without its password, control characters escaped."""
    try:
        from sqlalchemy.engine import make_url
        return clip(make_url(url).render_as_string(hide_password=True))
    except Exception:  # noqa: BLE001 - not a URL SQLAlchemy reads: say so rather than echo it
        return "(an unreadable URL)"


@dataclasses.dataclass
class Choice:
    config: dict
    why: str


class Winners:
    """One device's winners by exact bucket, and its ok trials by family and bucket (the evidence for transfer).
    ``times`` holds each exact winner's median ms where the rows give it (the page-size recommendation reads it);
    ``versus_peer`` its speedup over the kernel it replaces (flash_v3 over flash_v2), timed beside it when it was
    tuned (tune/confirm.py), where the rows give it (variant="auto" reads it).
    The trials are read only when a call first misses an exact winner (``read_timings``): a process whose shapes
    are all tuned never pays for them (about 0.15 s for the shipped results.db's 1,300 ok trials on a CPU)."""

    def __init__(self, device_name: str, rows, timings=(), read_timings=None):
        self.device_name = device_name
        self.exact: dict[str, tuple[Problem, dict, str]] = {}
        self.times: dict[str, float] = {}
        self.versus_peer: dict[str, float] = {}
        for problem, config, origin, *timed in rows:
            key = bucket_key(problem)
            if key not in self.exact:                                  # highest precedence first
                self.exact[key] = (problem, config, origin)
                if timed and timed[0] is not None:
                    self.times[key] = timed[0]
                if len(timed) > 1 and timed[1] is not None:
                    self.versus_peer[key] = timed[1]
        self._timings, self._read_timings = timings, read_timings
        self._evidence: dict[tuple, dict[str, transfer.Evidence]] | None = None

    @property
    def evidence(self) -> dict[tuple, dict[str, transfer.Evidence]]:
        if self._evidence is None:
            timings = self._read_timings() if self._read_timings else self._timings
            self._evidence = {}
            for problem, config, median_ms in timings:
                buckets = self._evidence.setdefault(family(problem), {})
                buckets.setdefault(bucket_key(problem), transfer.Evidence(bucket(problem))).add(config, median_ms)
        return self._evidence

    @classmethod
    def load(cls, device_name: str | None = None, urls: list[str] | None = None) -> "Winners":
        from ..store import Store, StoreError
        device_name = device_name or current_device_name()
        rows, stale, identity, readable = [], set(), {}, []

        def current(kernel: str, source_hash: str) -> bool:
            if kernel not in identity:
                identity[kernel] = kernel_identity(kernel)
            return source_hash == identity[kernel]
        for url in database_urls() if urls is None else urls:
            try:
                found = Store(url, readonly=True).winners(device_name=device_name, check_config=checked_config)
            except StoreError as e:
                warn_user(f"tunebench: ignoring results database: {e}")
                continue
            except Exception as e:  # noqa: BLE001 - never into the user's call: whatever a hostile database raises
                warn_user(f"tunebench: ignoring results database {_shown(url)}: {type(e).__name__}: {clip(e)}")
                continue
            readable.append(url)
            for w in found:
                if current(w.kernel, w.source_hash):
                    rows.append((w.problem, w.config, url, w.median_ms, w.speedup_vs_peer))
                else:
                    stale.add(w.kernel)
        if stale:
            warn_user(f"tunebench: ignoring stored winners for {', '.join(sorted(stale))}: the kernel source changed "
                      f"since they were tuned; {tune_hint(device_name)}")

        def read_timings() -> list:
            timings = []
            for url in readable:
                try:
                    timed = Store(url, readonly=True).timings(device_name)
                except StoreError as e:
                    warn_user(f"tunebench: ignoring the trials of a results database: {e}")
                    continue
                except Exception as e:  # noqa: BLE001 - as above
                    warn_user(f"tunebench: ignoring the trials of results database {_shown(url)}: "
                              f"{type(e).__name__}: {clip(e)}")
                    continue
                for kernel, shash, problem, config, ms in timed:
                    try:
                        if current(kernel, shash):               # a config outside SPACE is never evidence
                            timings.append((problem, checked_config(kernel, config), ms))
                    except Exception:  # noqa: BLE001 - ValueError: outside SPACE; anything else: not a config
                        continue
            return timings
        return cls(device_name, rows, read_timings=read_timings)

    def exact_ms(self, problem: Problem, admits=None) -> float | None:
        """The tuned median ms of the problem's exact winner, or None (no exact winner, no time stored, or a winner
        ``admits`` (keep) rejects: it would not be run)."""
        return self._of_exact(self.times, problem, admits)

    def exact_versus_peer(self, problem: Problem, admits=None) -> float | None:
        """The exact winner's speedup over its peer kernel's config measured beside it when it was tuned, or None (no
        exact winner, none measured, or a winner ``admits`` rejects)."""
        return self._of_exact(self.versus_peer, problem, admits)

    def _of_exact(self, values: dict[str, float], problem: Problem, admits) -> float | None:
        key = bucket_key(problem)
        if key not in self.exact or (admits is not None and not admits(self.exact[key][1])):
            return None
        return values.get(key)

    def choose(self, problem: Problem, default: dict | None = None, admits=None) -> Choice | None:
        """The exact winner, else (given the DEFAULT to compare against, and keep as ``admits``) a safe transfer from
        buckets of the same family (a paged problem's page size included), else None: run DEFAULT."""
        key = bucket_key(problem)
        if key in self.exact:
            _, config, origin = self.exact[key]
            return Choice(config, f"exact winner for bucket {key} ({origin})")
        if default is None:
            return None
        evidence = list(self.evidence.get(family(problem), {}).values())
        found = transfer.choose(problem, evidence, default, admits or (lambda config: True))
        return Choice(found.config, f"no winner for bucket {key}; {found.why()}") if found else None
