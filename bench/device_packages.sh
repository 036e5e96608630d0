#!/usr/bin/env bash
# The pure-Python packages the benches need beyond a GPU machine's image (torch, transformers,
# pyyaml and safetensors are there; pydantic, which the model configs are, is not), installed
# for that machine's Python into .device-packages/. Carry it with the run and put it on the path:
#   bash bench/device_packages.sh
#   (device run, carry [".device-packages"]) PYTHONPATH=.:.device-packages python bench/reader.py ...
set -euo pipefail
cd "$(dirname "$0")/.."
PY_VERSION="${DEVICE_PYTHON_VERSION:-3.12}"
VERSION="$(.venv/bin/python -c 'import pydantic; print(pydantic.VERSION)')"
rm -rf .device-packages
.venv/bin/python -m pip install --quiet --target .device-packages --python-version "$PY_VERSION" \
    --only-binary=:all: --platform manylinux2014_x86_64 "pydantic==$VERSION"
echo "installed pydantic $VERSION for Python $PY_VERSION in .device-packages/"
