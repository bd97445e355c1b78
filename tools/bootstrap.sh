#!/usr/bin/env bash
# Creates .venv with pinned versions and installs dinosys with its test extras (idempotent:
# a second call with unchanged pyproject.toml and constraints is instant).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.dinosys-install
want=$(cat pyproject.toml constraints-cpu.txt | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[bootstrap] installing dinosys and its pinned dependencies into .venv" >&2
  .venv/bin/pip install -q --disable-pip-version-check -c constraints-cpu.txt -e ".[test]"
  echo "$want" > "$stamp"
fi
