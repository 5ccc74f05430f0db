#!/usr/bin/env bash
# The GPU figures of issues #16 and #20 on a lent H200, in parts that each fit one device call:
#   bash bench/gpu_suite.sh train   # bench/train_throughput.py: seed / previous / anchor / new set-ups, Qwen1.5-7B shape, 12 steps (STEPS=n)
#                                   # (SETUPS=a,b to choose, PROFILE=a to print one step's costliest kernels)
#   bash bench/gpu_suite.sh gen     # bench/generate_throughput.py GPU suite + bench/kd_throughput.py (32B teacher, 7B student)
#   bash bench/gpu_suite.sh genonly # the generation suite alone (GEN_ARGS='--skip-eager --profile' etc. passed on)
#   bash bench/gpu_suite.sh test    # the CUDA-only tests (tests/test_gpu.py), skipped on CPU machines
#   bash bench/gpu_suite.sh smoke   # the same scripts on tiny shapes (CPU), to check them before spending device time
# Wheels the GPU machine lacks (transformers 5.24, bitsandbytes, liger-kernel, fastcore) travel in .whl/ (see README).
set -u
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/gpu_suite}; mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
py=${PY:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
$py -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
quiet() { grep -v -iE "warn|it/s\]|Loading weights"; }
case ${1:-} in
  train) timeout ${TRAIN_TIMEOUT:-570} $py bench/train_throughput.py --shape qwen1.5-7b --seq-len 2048 --steps ${STEPS:-12} --folder /tmp/q7 \
           --setups "${SETUPS:-seed,previous,anchor,new,new-unfused,qlora-new}" --profile "${PROFILE:-}" \
           --json "$out/train.json" 2>&1 | tee "$out/train.log" | quiet ;;
  gen|genonly) (cd bench && timeout ${GEN_TIMEOUT:-330} $py generate_throughput.py --shape qwen1.5-7b --prompts 64 --batch-size 64 \
           --max-new-tokens 128 --one-by-one 4 --answers 1000 ${GEN_ARGS:-}) 2>&1 | tee "$out/gen.log" | quiet
         [ "$1" = gen ] || exit 0
         (cd bench && timeout 200 $py kd_throughput.py --teacher qwen2.5-32b --student qwen2.5-7b --seq-len 2048 --batch 2 \
           --steps 5 --json "$out/kd.json") 2>&1 | tee "$out/kd.log" | quiet ;;
  test) timeout ${TEST_TIMEOUT:-300} $py -m pytest tests/test_gpu.py -q -p no:cacheprovider 2>&1 | tee "$out/test.log" | tail -15 ;;
  smoke) $py bench/train_throughput.py --shape tiny --seq-len 256 --steps 3 --setups previous,new,new-pack 2>&1 | quiet | tail -5
         (cd bench && $py kd_throughput.py --steps 3 --seq-len 256) 2>&1 | quiet | tail -4 ;;
  *) echo "usage: bash bench/gpu_suite.sh train|gen|genonly|test|smoke"; exit 2 ;;
esac
