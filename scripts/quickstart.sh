#!/usr/bin/env bash
# Set up, then simulate a federation on this machine: one aggregator and four node processes on
# 127.0.0.1, each training on one organisation of the built-in corpus. Extra arguments go to
# `fedpt simulate` (e.g. --rounds 10 --inner-steps 20 --outer nesterov).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/fedpt simulate "$@"
