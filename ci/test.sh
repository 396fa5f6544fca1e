#!/usr/bin/env bash
# The correctness gate. On a CPU it runs every kernel under the Triton interpreter (small shapes, fp16/fp32); on a
# GPU it also runs the tests marked `gpu` (bf16, long sequences, head dim 256, compiled kernels).
# Extra arguments go to pytest.
set -euo pipefail
. "$(dirname "$0")/setup.sh"
set +e
# -P: the repo root is not put on sys.path, where its kernels/ folder (installed as tunebench.kernels) would shadow
# the `kernels` distribution that transformers >= 5.2x imports.
python -P -m pytest -q "$@"
rc=$?
set -e
if [ "$rc" = 5 ]; then
  echo "ci/test.sh: pytest collected no tests: that is a failure, not a pass" >&2
  exit 1
fi
exit "$rc"
