#!/usr/bin/env bash
# Set up, then train a tiny model on the built-in corpus, evaluate it and sample from it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
RUN=${RUN:-runs/quickstart-$(date +%Y%m%d-%H%M%S)}
.venv/bin/fedpt train --data builtin --preset tiny --steps "${STEPS:-300}" --out "$RUN" --eval-every 100
.venv/bin/fedpt eval --checkpoint "$RUN" --data builtin --seq-len 128
.venv/bin/fedpt generate --checkpoint "$RUN" --prompt "def " --max-new-tokens 120 --temperature 0.7
echo "run folder: $RUN"
