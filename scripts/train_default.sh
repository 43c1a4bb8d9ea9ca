#!/usr/bin/env bash
# Reproduces fastdiff/assets/digits.safetensors, the default model of `fastdiff sample`: a 1.19M-
# parameter UNet (the "digits" preset with channels 32, 64, 64) trained on scikit-learn's digits
# at 16x16 with v prediction, a cosine schedule and min-SNR-5 weighting; 4000 steps of batch 64
# (49 minutes on one thread of a shared 2-core CPU). The EMA weights are exported in half precision.
# Usage: scripts/train_default.sh [extra flags, e.g. --device cuda]
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" "$PY" -m fastdiff train \
    --data digits --out runs/digits --preset digits --model '{"channels": [32, 64, 64]}' \
    --prediction v --schedule cosine --min-snr-gamma 5 \
    --steps 4000 --batch-size 64 --lr 5e-4 --warmup 100 --grad-clip 1 --ema-decay 0.999 \
    --seed 0 --save-every 250 --keep 3 --sample-every 0 \
    --export fastdiff/assets/digits.safetensors "$@"
