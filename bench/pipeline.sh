#!/usr/bin/env bash
# The README's main job (make run) timed end to end, then its validation metrics against the targets of issue [6/7].
# Usage: bash bench/pipeline.sh [run-name]      (run after `make install`; prints wall time and the figures)
set -euo pipefail
cd "$(dirname "$0")/.."
name=${1:-bench-pipeline}
flags=$(make -s run-flags)
start=$(date +%s.%N)
.venv/bin/stockdistill distill --run-name "$name" $flags > "runs/$name.log" 2>&1 || { tail -30 "runs/$name.log"; exit 1; }
end=$(date +%s.%N)
echo "machine: $(nproc) cores, $(uname -m); flags: $flags"
grep -E "fine-tuning" "runs/$name.log"
.venv/bin/python - "$name" "$start" "$end" <<'PY'
import json, sys
from collections import Counter
name, start, end = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
m = json.load(open(f'runs/{name}/metrics.json'))
a = m['after']
teacher_dirs = Counter(r['teacher'] for r in m.get('records', []))
majority = max(teacher_dirs.values())/sum(teacher_dirs.values()) if teacher_dirs else float('nan')
rows = [('wall time (s)', end - start, 300, 'max'), ('BLEU', a['bleu'], 0.4519, 'min'), ('ROUGE-L', a['rougeL'], 0.5123, 'min'),
        ('embedding', a['embed'], 0.8921, 'min'), ('JSON valid', a['json_valid'], 0.95, 'min'),
        ('direction agreement with teacher', a['direction_agreement'], 0.70, 'min')]
print(f"{'figure':36s} {'measured':>9s} {'target':>8s}")
for k, v, t, how in rows:
    ok = v <= t if how == 'max' else v >= t
    print(f"{k:36s} {v:9.4f} {('<=' if how == 'max' else '>=')}{t:7.4f}  {'ok' if ok else 'MISSED'}")
print(f"{'teacher majority-direction rate':36s} {majority:9.4f}   (the rate of always answering the teacher's most common direction)")
print(f"val examples: {m['n']}; student accuracy vs realized moves {a.get('accuracy', float('nan')):.3f} (MCC {a.get('mcc', float('nan')):.3f}); "
      f"teacher {m.get('teacher', {}).get('accuracy', float('nan')):.3f}; baselines " +
      ', '.join(f"{k} {v['accuracy']:.3f}" for k, v in m.get('baselines', {}).items()))
PY
