#!/usr/bin/env bash
# Sets up .venv and tunes the default suite on this machine's GPU (`tunebench tune`). Extra arguments go to it.
set -euo pipefail
. "$(dirname "$0")/setup.sh"
exec tunebench tune "$@"
