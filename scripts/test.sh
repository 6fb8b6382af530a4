#!/usr/bin/env bash
# Set up (if needed), lint, and run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
# The optional extras whose tests would otherwise be skipped (flash-attn needs CUDA: not here).
FEDPT_EXTRAS=flower,hf,report,curation bash scripts/setup.sh
.venv/bin/ruff check .
bash scripts/gen_protos.sh --check
.venv/bin/python -m pytest -q "$@"
