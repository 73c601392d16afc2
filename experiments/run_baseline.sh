#!/usr/bin/env bash
# Run (or continue) one baseline run until it finishes; safe to start again after a kill.
# usage: experiments/run_baseline.sh RUN_NAME -- ARGS FOR `train` ...
# results go to results/baselines/RUN_NAME/ (config.json, metrics.jsonl, results.json, ...)
set -euo pipefail
cd "$(dirname "$0")/.."
name=$1; shift
[ "${1:-}" = "--" ] && shift
out=results/baselines/$name
mkdir -p "$out"
PY=${PYTHON:-.venv/bin/python}
for attempt in 1 2 3; do
    if "$PY" -m maddnet.train.cli train --out "$out" --no-progress "$@"; then
        exit 0
    fi
    echo "attempt $attempt failed; resuming from the last checkpoint" >&2
done
exit 1
