#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs what it needs (venv, Slurm via apt),
# brings up the local Slurm cluster, runs ruff and pytest, and stops Slurm again.
# Extra arguments go to pytest (e.g. tools/test.sh -m "not slow"). When pytest passes, the mutation
# check follows (tools/mutation_check.py, 5 CPU-minutes); DINOSYS_SKIP_MUTATION=1 skips it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/bootstrap.sh
# an assignment (unlike eval "$(...)") fails under set -e when the cluster does not come up
slurm_env=$(bash tools/slurm_local.sh start)
eval "$slurm_env"
trap 'bash tools/slurm_local.sh stop >/dev/null 2>&1 || true' EXIT
export DINOSYS_REQUIRE_SLURM=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
.venv/bin/ruff check .
# pytest exits 5 when it collected no test: that is a failure here, as is any other non-zero code
.venv/bin/python -m pytest "$@"
if [ "${DINOSYS_SKIP_MUTATION:-0}" = "1" ]; then
  echo "mutation check skipped (DINOSYS_SKIP_MUTATION=1)"
else
  .venv/bin/python tools/mutation_check.py
fi
