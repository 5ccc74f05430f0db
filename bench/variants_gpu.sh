#!/usr/bin/env bash
# The variant experiments of #14 (reasoning SFT), #16 (KD / KD+hidden / GKD / SFT→GKD) and #17 (graph retrieval) at full
# scale, run side by side on one GPU machine (one process per run; tiny models leave the GPU mostly idle, so a dozen
# processes share it well). Every run is the embedded pretrained student on the quick start's windows (--windows 16,
# 252 training / 132 validation windows, full 30-day prompts, the tiny preset: LoRA r32/alpha 64, lr 3e-3, batch 8,
# 3 epochs = 96 steps), bf16 LoRA (no bitsandbytes there), no embedding score (scored afterwards on the CPU).
#   bash bench/variants_gpu.sh PART[,PART] [SEEDS]   PART: main (reasoning + graph + KD seed 0) | graph | kd (KD methods, SEEDS) |
#                                              ind (#13: quick start with/without --context indicators, SEEDS) |
#                                              wall (SFT at the KD methods' wall time, SEEDS)
# Results: $OUT/runs.tgz (run folders without weights, extract at / : they live in /tmp/vruns) and $OUT/logs.tgz.
# Then here: bench/reasoning_experiment.py embed/table --runs-dir /tmp/vruns, bench/graph_experiment.py --collect,
# bench/kd_experiment.py (see each script).
set -u
cd "$(dirname "$0")/.."
part=${1:-main}; seeds=${2:-0}
out=${OUT:-/tmp/variants_out}; R=/tmp/vruns; mkdir -p "$out" "$R"
source bench/_gpu_env.sh
export OMP_NUM_THREADS=1
if [ -z "${NO_MPS:-}" ] && nvidia-cuda-mps-control -d 2>/dev/null; then   # MPS: kernels of many processes run at once
  if timeout 90 python3 -c "import torch; torch.ones(1, device='cuda').sum().item()"; then echo "CUDA MPS on"
  else echo quit | nvidia-cuda-mps-control; echo "CUDA MPS failed its check: off"; fi
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null
LIMIT=${LIMIT:-530}
T0=$(date +%s)
job() {   # job NAME CMD...: run in the background under the time limit, log to $R/NAME.log
  local name=$1; shift
  ( s=$(date +%s); timeout $(( LIMIT - ($(date +%s) - T0) )) "$@" > "$R/$name.log" 2>&1; rc=$?
    echo "$name rc=$rc $(( $(date +%s) - s )) s" | tee -a "$R/done.txt" ) &
}
D="python3 -m stockdistill.distill"
GPU="--no-load-in-4bit --embed-model off --runs-dir $R --overwrite"
TINY="--student stockdistill/assets/tiny_base --lora-r 32 --lora-alpha 64 --lora-dropout 0 --lr 3e-3 --batch-size 8 --grad-accum 1 --no-gradient-checkpointing --windows 16 --max-new-tokens 160 --gen-batch-size 66 --teacher rule"
KDT="--kd-teacher tiny-teacher"
kdrun() {   # kdrun NAME FLAGS...: a pipeline run, then its calibration
  local name=$1; shift
  $D --run-name "$name" $TINY $GPU "$@" && python3 -m stockdistill.kd calibrate "$R/$name"
}
kd_methods() {   # one seed: SFT then SFT→GKD (chained: it starts from the SFT adapter), KD, KD+hidden, GKD
  local s=$1 e=${2:-3}
  job kd-sft-s$s bash -c "$(declare -f kdrun); D='$D' TINY='$TINY' GPU='$GPU' R='$R'; kdrun kd-sft-s$s --method sft --epochs $e --seed $s && kdrun kd-sftgkd-s$s --method gkd $KDT --kd-init-adapter $R/kd-sft-s$s/lora_adapter --epochs $e --seed $s"
  job kd-kd-s$s bash -c "$(declare -f kdrun); D='$D' TINY='$TINY' GPU='$GPU' R='$R'; kdrun kd-kd-s$s --method kd $KDT --epochs $e --seed $s"
  job kd-hid-s$s bash -c "$(declare -f kdrun); D='$D' TINY='$TINY' GPU='$GPU' R='$R'; kdrun kd-hid-s$s --method kd-hidden $KDT --epochs $e --seed $s"
  job kd-gkd-s$s bash -c "$(declare -f kdrun); D='$D' TINY='$TINY' GPU='$GPU' R='$R'; kdrun kd-gkd-s$s --method gkd $KDT --epochs $e --seed $s"
}
graph_conditions() {   # #17: retrieval none/local/global/both with the rule teacher, local/global/both with the rule-graph teacher
  for c in none:rule local:rule global:rule both:rule local:rule-graph global:rule-graph both:rule-graph; do
    job "graph-${c/:/-}" python3 bench/graph_experiment.py --only "$c" --out "$R/graph_${c/:/-}.json" --student tiny $GPU
  done
}
for part in ${part//,/ }; do
case $part in
  main)
    job r14 python3 bench/reasoning_experiment.py run --runs-dir "$R" --json "$R/reasoning_experiment.json"
    graph_conditions
    kd_methods 0 ;;
  graph) graph_conditions ;;
  ind)    # #13: the quick start with and without the seed's indicators (MA5/MA10/MACD) as a context line
    for s in $seeds; do
      job "q-plain-s$s" $D --run-name "q-plain-s$s" $TINY $GPU --epochs 3 --seed "$s"
      job "q-ind-s$s" $D --run-name "q-ind-s$s" $TINY $GPU --epochs 3 --seed "$s" --context indicators
    done ;;
  kd) for s in $seeds; do kd_methods "$s"; done ;;
  wall)   # SFT given each method's training wall time (epochs from the measured seconds per SFT epoch: WALL_EPOCHS)
    for s in ${WALL_SEEDS:-$seeds}; do for e in ${WALL_EPOCHS:-3.5 6 12}; do
      job "kd-sftw$e-s$s" bash -c "$(declare -f kdrun); D='$D' TINY='$TINY' GPU='$GPU' R='$R'; kdrun kd-sftw$e-s$s --method sft --epochs $e --seed $s"
    done; done ;;
  *) echo "unknown part '$part' (main, graph, kd, wall, ind)"; exit 2 ;;
esac
done
while [ "$(jobs -r | wc -l)" -gt 0 ]; do sleep 15; echo "$(( $(date +%s) - T0 )) s: $(jobs -r | wc -l) running; done: $(cat "$R/done.txt" 2>/dev/null | tr '\n' ' ')"; done
echo "all done after $(( $(date +%s) - T0 )) s"
# without weights, prompts, raw labels or pages (16 MB per file comes back): the cleaned labels of one run stand for all
tar czf "$out/runs.tgz" --exclude='*.safetensors' --exclude='*.bin' --exclude='*.pt' --exclude='*.npz' --exclude='checkpoint-*' \
  --exclude='prompts_*.jsonl' --exclude='*.html' --exclude='labeled_data.jsonl' --exclude='val_labeled_data.jsonl' "$R" 2>/dev/null
tar czf "$out/logs.tgz" "$R"/*.log "$R"/done.txt 2>/dev/null
ls -la "$out"
