#!/usr/bin/env bash
# Makes .venv with requirements.txt on first use (about a minute) and again when requirements.txt changes;
# otherwise does nothing. run.sh and test.sh source it, so a fresh clone needs no other set-up step.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
if [ ! -x .venv/bin/python ] || [ requirements.txt -nt .venv/.installed ]; then
  echo "setting up .venv (first run only)..." >&2
  python3 -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check -r requirements.txt 2> >(grep -v "^WARNING: Location" >&2)
  touch .venv/.installed
fi
