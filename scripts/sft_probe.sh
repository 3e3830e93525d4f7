#!/usr/bin/env bash
# One SFT probe of docs/experiments.md: train SIGMA with config overrides on a finished default
# run's upstream stages (data, baselines, grounding, tokenization are linked, not recomputed;
# tasks and training run anew), then print the learning curve.
#   scripts/sft_probe.sh NAME [--set key=value ...]
# Needs runs/default up to tokenization (make run, or sigma run --profile default --until tasks).
set -euo pipefail
cd "$(dirname "$0")/.."
name=$1; shift
base=${BASE_RUN:-runs/default}
out=runs/probe/$name
mkdir -p "$out"
for st in data baselines grounding tokenization; do
  [ -e "$out/$st" ] || ln -s "$(realpath "$base/$st")" "$out/$st"
done
start=$(date +%s)
HF_HUB_OFFLINE=1 .venv/bin/sigma run --profile default --out "$out" --until training "$@"
echo "[probe] $name wall $(( $(date +%s) - start )) s" >&2
.venv/bin/python scripts/learning_curve.py "$out"
