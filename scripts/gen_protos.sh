#!/usr/bin/env bash
# Regenerate the Python stubs from protos/federation.proto (grpcio-tools from .venv).
# With --check, generate into a temporary folder and fail if the committed stubs differ.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
root=.
[ "${1:-}" = "--check" ] && root=$(mktemp -d)
# -I. makes the generated import read `from protos import federation_pb2`.
"$PY" -m grpc_tools.protoc -I. --python_out="$root" --pyi_out="$root" --grpc_python_out="$root" \
  protos/federation.proto
if [ "$root" != . ]; then
  status=0
  for f in federation_pb2.py federation_pb2.pyi federation_pb2_grpc.py; do
    if ! cmp -s "$root/protos/$f" "protos/$f"; then
      echo "protos/$f is out of date: run scripts/gen_protos.sh and commit the result" >&2
      status=1
    fi
  done
  rm -rf "$root"
  [ $status = 0 ] && echo "generated stubs are current"
  exit $status
fi
