#!/usr/bin/env bash
# The test suite (pytest; CPU only). Extra arguments go to pytest, e.g. bash test.sh tests/test_loss.py
set -euo pipefail
cd "$(dirname "$0")"
source setup.sh
exec .venv/bin/python -m pytest "$@"
