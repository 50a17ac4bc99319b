#!/usr/bin/env bash
# Worked study (docs/objective.md, "Sweeps"): global batch x negative-pool source on Multi30k,
# tiny model.
# 4 runs x 400 steps on 8 simulated CPU devices (~7 min on 2 busy cores); runs go to $OUT,
# the summary (csv, md, json, png) is copied to bench/results/study_negatives/.
#   bash bench/study_negatives.sh [OUT]
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/multi30k}
OUT=${1:-/tmp/study_negatives}
PY=${PYTHON:-python}
export XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu
# one tokenizer for all runs (2k pieces on the training captions)
[ -f "$OUT/tok/spm.model" ] || $PY -m bepa_jax.cli.tokenizer train \
  --input "aligned:$DATA/train.{en,de,fr,cs}" --vocab-size 2000 --out "$OUT/tok"
$PY -m bepa_jax.cli.sweep --config configs/quickstart.py \
  --grid 'train.global_batch=16,64' --grid 'loss.negatives=global,local' \
  --set "data.source=aligned:$DATA/train.{en,de,fr,cs}" \
  --set "tokenizer.path=$OUT/tok/spm.model" \
  --set checkpoint.async_save=False --steps 400 \
  --eval-parallel "$DATA/test_2016_flickr.en.gz" "$DATA/test_2016_flickr.de.gz" \
  --out "$OUT/sweep"
mkdir -p bench/results/study_negatives
cp "$OUT"/sweep/sweep.{csv,md,json} "$OUT"/sweep/sweep_*.png bench/results/study_negatives/
