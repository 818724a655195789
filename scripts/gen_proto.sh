#!/usr/bin/env bash
# Regenerate the protobuf/gRPC Python modules in mesh/api (committed; a test checks they are fresh).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-.}"
python=${PYTHON:-.venv/bin/python}
"$python" -m grpc_tools.protoc -I. --python_out="$out" --mypy_out="$out" \
    --grpc_python_out="$out" --mypy_grpc_out="$out" mesh/api/mesh.proto mesh/api/node.proto
