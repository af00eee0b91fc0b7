#!/usr/bin/env bash
# The main job: the whole PRIOR-vs-NTP experiment on the built-in data (see experiments/main.py --help).
set -euo pipefail
cd "$(dirname "$0")"
source setup.sh
exec .venv/bin/python -m experiments.main "$@"
