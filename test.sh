#!/usr/bin/env bash
# The test suite (pytest; CPU only). Extra arguments go to pytest, e.g. bash test.sh tests/test_loss.py
set -euo pipefail
cd "$(dirname "$0")"
source setup.sh
# Test-only packages (requirements-test.txt): installed on first use and again when the file changes.
if [ requirements-test.txt -nt .venv/.installed-test ]; then
  echo "installing requirements-test.txt into .venv..." >&2
  .venv/bin/pip install -q --disable-pip-version-check -r requirements-test.txt 2> >(grep -v "^WARNING: Location" >&2)
  touch .venv/.installed-test
fi
exec .venv/bin/python -m pytest "$@"
