#!/usr/bin/env bash
# Sourced by ci/test.sh and ci/tune.sh: creates .venv (or $TUNEBENCH_VENV) from the project's own files and
# activates it. With TUNEBENCH_NO_INSTALL=1 it uses the current python as it is (e.g. a GPU image with no registry).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
if [ "${TUNEBENCH_NO_INSTALL:-0}" != 1 ]; then
  venv=${TUNEBENCH_VENV:-$root/.venv}
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  . "$venv/bin/activate"
  # Whether a package is installed, without importing it (torch warns on import when numpy is missing).
  has() { python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)"; }
  if ! has torch; then
    # On a CPU machine this takes the CPU wheel that is already on disk; on a GPU host, pip's own choice.
    python -m pip install -q "torch==2.13.0" || python -m pip install -q torch
  fi
  # numpy before torch is first imported (below): torch does not depend on it, and imported without it prints
  # "Failed to initialize NumPy". The CPU gate's pin (numpy < 2.4) holds until the install below sets the rest.
  has numpy || python -m pip install -q -c ci/constraints-cpu.txt numpy
  if python -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    python -m pip install -q -e ".[test]"
  else
    python -m pip install -q -c ci/constraints-cpu.txt -e ".[test]"
  fi
fi
