#!/usr/bin/env bash
# The experiment of 05c_kd (issue #16): SFT vs KD on the embedded models with the same labels (rule:balanced), the same
# student set-up and the same optimizer steps (1 epoch = 32 steps of 8). Each run is `stockdistill distill`, stopped once
# training is done (FULL_EVAL=1 keeps the pipeline's generation evaluation: 2 x 132 answers, ~35 min per run on a loaded
# 2-core machine), then calibrated (`python -m stockdistill.kd calibrate`, one scoring pass, no generation), then collected
# by bench/kd_experiment.py into nbs/results/kd_embedded.json.   Usage: bash bench/kd_experiment.sh   (after `make install`)
#   EXTRA="name|flags ..." adds runs, e.g. EXTRA="kdx-jsd|--method kd --kd-teacher tiny-teacher --kd-loss jsd"
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
COMMON="--student stockdistill/assets/tiny_base --lora-r 32 --lora-alpha 64 --lora-dropout 0 --lr 3e-3 --batch-size 8 --grad-accum 1 --epochs 1 --no-gradient-checkpointing --windows 16 --max-new-tokens 160 --gen-batch-size 66 --teacher rule --overwrite"
names=()
for spec in "kdx-sft|--method sft" "kdx-kd|--method kd --kd-teacher tiny-teacher --kd-alpha 0.5 --kd-temperature 1 --kd-loss forward" ${EXTRA:-}; do
  name=${spec%%|*}; flags=${spec#*|}; names+=("runs/$name")
  echo "$(date -u +%T) start $name: $flags"
  # shellcheck disable=SC2086
  nice -n 19 .venv/bin/stockdistill distill --run-name "$name" $COMMON $flags > "runs/$name.log" 2>&1 &
  pid=$!
  while kill -0 $pid 2>/dev/null; do
    if [ -z "${FULL_EVAL:-}" ] && grep -q '^\[evaluate\]' "runs/$name.log"; then kill $pid; echo "$(date -u +%T) $name trained"; break; fi
    sleep 5
  done
  nice -n 19 .venv/bin/python -m stockdistill.kd calibrate "runs/$name" > "runs/$name.cal.log" 2>&1; echo "$(date -u +%T) $name calibrated: $?"
done
nice -n 19 .venv/bin/python bench/kd_experiment.py "${names[@]}" --out nbs/results/kd_embedded
