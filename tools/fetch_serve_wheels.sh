#!/usr/bin/env bash
# Download the wheels trtllm-serve (and bench/bench_serve.py's client) needs, for a
# machine without network: CPython 3.12, x86_64 Linux (the lent GPU machine).
#
#   tools/fetch_serve_wheels.sh [OUT_DIR]          (default: .whl/ at the repository root, git-ignored)
#
# Then, on the machine without network (PYTHONPATH=$PWD as usual):
#   pip install --no-index --find-links .whl fastapi uvicorn prometheus-client httpx uvloop httptools
#   pip install --no-index --find-links .whl --no-deps xgrammar apache-tvm-ffi jsonschema \
#       jsonschema-specifications referencing rpds-py attrs      (structured output: the guided extra)
# pip keeps what is already installed when it satisfies the requirements (e.g. pydantic)
# and takes the rest from .whl/. uvloop and httptools are optional speed-ups that uvicorn
# picks up by itself. Versions are the ones the serve tests passed with.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="${1:-$REPO_ROOT/.whl}"
mkdir -p "$OUT_DIR"

WHEELS=(
    fastapi==0.165.0
    starlette==1.10.0
    annotated-doc==0.0.7
    opentelemetry-api==1.45.2
    uvicorn==0.54.0
    h11==0.16.0
    click==8.5.1
    uvloop==0.23.0
    httptools==0.9.0
    pydantic==2.13.4
    pydantic-core==2.46.4
    annotated-types==0.7.0
    typing-inspection==0.4.2
    typing-extensions==4.16.0
    anyio==4.16.0
    sniffio==1.3.1
    idna==3.20
    prometheus-client==0.26.0
    httpx==0.28.1
    httpcore==1.0.9
    certifi==2026.5.20
    # the guided extra (xgrammar's other requirements, torch / transformers / triton, are there)
    xgrammar==0.2.9
    apache-tvm-ffi==0.1.15.post2
    jsonschema==4.26.0
    jsonschema-specifications==2025.9.1
    referencing==0.37.0
    rpds-py==0.30.0
    attrs==26.1.0
)

for wheel in "${WHEELS[@]}"; do
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$OUT_DIR" "$wheel"
done
ls -1 "$OUT_DIR"
# every requirement of the set resolves from OUT_DIR alone (what the offline machine will do)
python3 -m pip install --isolated --quiet --dry-run --ignore-installed --no-index --find-links "$OUT_DIR" --only-binary=:all: \
    --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --target "$(mktemp -d)" fastapi uvicorn prometheus-client httpx uvloop httptools
echo "wheels in $OUT_DIR: $(ls -1 "$OUT_DIR" | wc -l) (check: all requirements resolve from them)"
