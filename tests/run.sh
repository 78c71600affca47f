#!/usr/bin/env bash
# Run stablecore's test tiers on this machine: reference (always), interpret (Triton kernels on
# CPU), gpu (only where CUDA is present), and a smoke run of every benchmark.
# Usage: bash tests/run.sh [extra pytest args]
set -uo pipefail
cd "$(dirname "$0")/.."
failed=0

# One torch thread per test process, and one process per core (pytest-xdist, in the dev extra):
# on a 2-core machine this halves the wall time; oversubscribed threads would double it.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
parallel=()
if python -c "import xdist" 2>/dev/null; then
  parallel=(-n "$(python -c 'import os; print(min(4, os.cpu_count() or 1))')")
fi

# pytest exits 5 when a selection holds no test; that is not a failure of the suite.
run() {
  echo; echo "== $1"; shift
  "$@"
  local code=$?
  if [ "$code" -ne 0 ] && [ "$code" -ne 5 ]; then failed=1; fi
}

run "reference tier" python -m pytest tests -q -m "not interpret and not gpu" -p no:cacheprovider "${parallel[@]}" "$@"
run "interpret tier (TRITON_INTERPRET=1)" env TRITON_INTERPRET=1 python -m pytest tests -q -m interpret -p no:cacheprovider "${parallel[@]}" "$@"
if python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  run "gpu tier" python -m pytest tests -q -m gpu -p no:cacheprovider "$@"
fi
smoke_json=$(mktemp -d)/bench-smoke.json
run "benchmark smoke run (tiny sizes, CPU)" python -m stablecore bench --smoke --json "$smoke_json" -- \
  --benchmark-max-time=0.02 --benchmark-min-rounds=1 --benchmark-warmup=off
exit $failed
