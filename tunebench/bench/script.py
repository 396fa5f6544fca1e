"""What the GPU benchmark scripts in bench/ share: the device a run goes to (or the reason it cannot run), and how
their rows are written.

It imports nothing heavy, so a script can call it before the kernels are imported (the Triton interpreter is chosen
by an environment variable read at their import)."""
from __future__ import annotations

import csv
import os
import pathlib
import sys

GPU_ONLY = "it times kernels, and the Triton interpreter's times say nothing about a GPU"
SMALL_ON_CPU = "--small runs tiny sizes on the CPU under the Triton interpreter: a check of the plumbing, no GPU times"


def script_device(script: str, small: bool | None = None) -> str | None:
    """'cuda' where there is a GPU; else, for a script run with --small (small=True), 'cpu' with the Triton
    interpreter switched on; else None, after saying on stderr why the script needs a GPU. small=None: the script
    has no --small mode."""
    import torch
    if torch.cuda.is_available():
        return "cuda"
    if small:
        os.environ.setdefault("TRITON_INTERPRET", "1")       # read when the kernels are imported, after this
        return "cpu"
    print(f"{script} needs a CUDA GPU: {GPU_ONLY if small is None else SMALL_ON_CPU}.", file=sys.stderr)
    return None


def checked_run(run, wrong: tuple = (AssertionError,)) -> int:
    """A script's exit status for run(): 0, or 1 after saying on stderr what failed when it raised one of ``wrong``
    (an output that failed its check, before anything was timed)."""
    try:
        run()
    except wrong as e:
        print(f"FAILED before timing: {e}", file=sys.stderr)
        return 1
    return 0


def write_csv(path, fields: list[str], rows: list[dict]) -> pathlib.Path:
    """Writes rows under their declared columns (None as an empty cell), making the folder; returns the path."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in rows)
    return path
