#!/usr/bin/env bash
# Create .venv and install fedpt with its dev tools. Safe to run again (it only fills gaps).
# torch is pinned and installed first: 2.13.0 is the CPU wheel on this machine class, and an
# unpinned torch would pull several GB of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install --quiet --disable-pip-version-check "torch==${FEDPT_TORCH_VERSION:-2.13.0}"
# FEDPT_EXTRAS: the optional extras to install besides the dev tools (the tests set "flower,hf,report,curation")
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[dev${FEDPT_EXTRAS:+,$FEDPT_EXTRAS}]"
.venv/bin/fedpt --help >/dev/null
echo "fedpt is installed in .venv (activate with: source .venv/bin/activate)"
