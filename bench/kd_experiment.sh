#!/usr/bin/env bash
# The experiment of 05c_kd (issue #16): SFT vs KD on the embedded models, equal labels (rule:balanced) and equal
# optimizer steps (1 epoch = 32 steps of 8), then calibration of each run; EXTRA="name|flags ..." adds runs.
# Usage: bash bench/kd_experiment.sh   (after `make install`); then bench/kd_experiment.py collects the table.
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
COMMON="--student stockdistill/assets/tiny_base --lora-r 32 --lora-alpha 64 --lora-dropout 0 --lr 3e-3 --batch-size 8 --grad-accum 1 --epochs 1 --no-gradient-checkpointing --windows 16 --max-new-tokens 160 --gen-batch-size 66 --teacher rule --overwrite"
for spec in "kdx-sft|--method sft" "kdx-kd|--method kd --kd-teacher tiny-teacher --kd-alpha 0.5 --kd-temperature 1 --kd-loss forward" ${EXTRA:-}; do
  name=${spec%%|*}; flags=${spec#*|}
  echo "$(date -u +%T) start $name: $flags"
  # shellcheck disable=SC2086
  nice -n 19 .venv/bin/stockdistill distill --run-name "$name" $COMMON $flags > "runs/$name.log" 2>&1; echo "$(date -u +%T) $name exit $?"
  nice -n 19 .venv/bin/python -m stockdistill.kd calibrate "runs/$name" >> "runs/$name.log" 2>&1; echo "$(date -u +%T) $name calibrated exit $?"
done
