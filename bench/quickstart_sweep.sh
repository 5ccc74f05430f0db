#!/usr/bin/env bash
# Variants of the quick start (`make run`) side by side on a many-core machine's CPUs, two torch threads each, and one
# table of their metrics (issue #13: which recipe reaches the targets in five minutes on 2 cores).
#   SPECS="w48:--windows 48 --epochs 1;ctx:--context indicators" bash bench/quickstart_sweep.sh
#   each spec is name:extra-flags, added after `base` below (the quick start's flags before 2026-12-03: --windows 16, the
#   preset's 3 epochs, no indicator line; today's `make run` is the spec '--context indicators --windows 48 --epochs 1.5'); runs/sweep-<name> hold the runs, and each
#   run's line goes to $OUT/sweep.txt as it ends (so a sweep cut off by a time limit keeps the runs that finished)
#   JOBS=n   runs at most n at once (default: cores / 2); PYTHON=... the interpreter (default .venv/bin/python, else python3)
# On the lent GPU machine: CUDA_VISIBLE_DEVICES= keeps the runs on its CPUs; carry .whlp for the packages it lacks.
# The embedding score is left out (--embed-model off): the sweep compares BLEU, ROUGE-L and direction agreement.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d .whlp ] && [ ! -x .venv/bin/python ]; then source bench/_gpu_env.sh; fi
py=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
base="--windows 16 --max-new-tokens 160 --gen-batch-size 66 --overwrite --embed-model off"
jobs=${JOBS:-$(( $(nproc) / 2 ))}
out=${OUT:-runs}; mkdir -p runs "$out"
export OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false TRANSFORMERS_NO_ADVISORY_WARNINGS=1
row() {   # one run's line of the table (the header with no argument), appended to $OUT/sweep.txt as the run ends
  $py - "$@" <<'PY' | tee -a "$out/sweep.txt"
import json, sys
from collections import Counter
if len(sys.argv) == 1:
    print(f"{'run':22s} {'flags':55s} {'BLEU':>6s} {'ROUGE':>6s} {'agree':>6s} {'JSON':>5s} {'fields':>6s} {'major':>6s} {'val':>4s} {'train s':>7s}")
for name in sys.argv[1:]:
    try: m, c = json.load(open(f'runs/{name}/metrics.json')), json.load(open(f'runs/{name}/config.json'))
    except FileNotFoundError: print(f"{name:22s} (no metrics)"); continue
    a, d = m['after'], Counter(r['after'] for r in m['records'])
    flags = ' '.join(f"{k}={c[k]}" for k in ('windows', 'epochs', 'lr', 'batch_size', 'lora_r', 'seed', 'context') if c.get(k) not in (None, '', 0))
    print(f"{name:22s} {flags:55s} {a['bleu']:6.4f} {a['rougeL']:6.4f} {a['direction_agreement']:6.4f} {a['json_valid']:5.3f} "
          f"{a['fields_complete']:6.3f} {max(d.values())/sum(d.values()):6.3f} {m['n']:4d} {m['stage_seconds']['train']:7.1f}")
PY
}
IFS=';' read -ra specs <<< "${SPECS:?set SPECS=\"name:flags;name:flags\"}"
row
for spec in "${specs[@]}"; do
  name=sweep-${spec%%:*}; flags=${spec#*:}
  while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do sleep 2; done
  # shellcheck disable=SC2086
  ( s=$(date +%s); if $py -m stockdistill.cli distill --run-name "$name" $base $flags > "runs/$name.log" 2>&1; then
      row "$name" | sed "s/\$/   ($(( $(date +%s) - s )) s)/"; else echo "$name FAILED"; tail -5 "runs/$name.log"; fi ) &
done
wait
