#!/usr/bin/env bash
# The README's main job (`make run`: the pretrained tiny base tuned on the rule teacher's labels of full 30-day
# windows) timed end to end, then its validation metrics against the targets of issue #13, before and after tuning.
# Usage: bash bench/pipeline.sh [run-name]      (after `make install`)
#   THREADS=1   runs torch on one thread (OMP_NUM_THREADS; train_student keeps it)
#   FLAGS="..." replaces `make run`'s flags (e.g. to time another recipe)
set -euo pipefail
cd "$(dirname "$0")/.."
name=${1:-bench-pipeline}
flags=${FLAGS:-$(make -s run-flags)}
export HF_HUB_OFFLINE=1 TRANSFORMERS_NO_ADVISORY_WARNINGS=1 TOKENIZERS_PARALLELISM=false
if [ -n "${THREADS:-}" ]; then export OMP_NUM_THREADS=$THREADS; fi
mkdir -p runs
load_before=$(cut -d' ' -f1 /proc/loadavg)
start=$(date +%s.%N)
# shellcheck disable=SC2086
.venv/bin/stockdistill distill --run-name "$name" $flags > "runs/$name.log" 2>&1 || { tail -30 "runs/$name.log"; exit 1; }
end=$(date +%s.%N)
echo "machine: $(nproc) cores, $(uname -m); load average before ${load_before}, after $(cut -d' ' -f1 /proc/loadavg); OMP_NUM_THREADS=${OMP_NUM_THREADS:-unset}"
echo "flags: $flags"
grep -E "fine-tuning|stage times" "runs/$name.log"
.venv/bin/python - "$name" "$start" "$end" <<'PY'
import json, sys
from collections import Counter
name, start, end = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
m = json.load(open(f'runs/{name}/metrics.json'))
s = json.load(open(f'runs/{name}/lora_adapter/train_summary.json'))
a, b = m['after'], m['before']
teacher = Counter(r['teacher'] for r in m['records'])
t_major = max(teacher.values())/sum(teacher.values())
share = lambda d: max(d.values())/sum(d.values()) if d else float('nan')
rows = [('wall time (s), install excluded', end - start, None, 300, 'max'),
        ('JSON valid', a['json_valid'], b['json_valid'], 0.98, 'min'),
        ('all three fields', a['fields_complete'], b['fields_complete'], 0.95, 'min'),
        ('direction agreement with teacher', a['direction_agreement'], b['direction_agreement'], 0.75, 'min'),
        ('BLEU', a['bleu'], b['bleu'], 0.4519, 'min'), ('ROUGE-L', a['rougeL'], b['rougeL'], 0.5123, 'min'),
        ('embedding', a.get('embed', float('nan')), b.get('embed', float('nan')), 0.8921, 'min'),
        ('largest predicted class share', share(a['directions']), share(b['directions']), max(0.70, t_major), 'max')]
print(f"{'figure':36s} {'after':>8s} {'target':>9s}         {'before':>7s}")
for k, v, before, tg, how in rows:
    ok = v <= tg if how == 'max' else v >= tg
    print(f"{k:36s} {v:8.4f} {('<=' if how == 'max' else '>=')}{tg:8.4f}  {'ok    ' if ok else 'MISSED'} "
          + (f"{before:7.4f}" if before is not None else ''))
print(f"val examples: {m['n']}; teacher's classes {dict(teacher)}; student's after {a['directions']}, before {b['directions']}")
print(f"realized {m.get('split', 'val')} moves: student accuracy {a.get('accuracy', float('nan')):.3f} (MCC {a.get('mcc', float('nan')):.3f}), "
      f"before {b.get('accuracy', float('nan')):.3f}; teacher {m.get('teacher', {}).get('accuracy', float('nan')):.3f}; baselines "
      + ', '.join(f"{k} {v['accuracy']:.3f}" for k, v in m.get('baselines', {}).items()))
print(f"training: {s['train_examples']} examples, {s['steps']} steps, {s['tokens']:,} tokens in {s['wall_s']:.0f}s "
      f"({s['tokens_per_s']:.0f} tokens/s), loss {s['first_loss']:.3f} -> {s['final_loss']:.3f}, eval loss {s['eval_loss']}")
print('stage seconds: ' + ', '.join(f"{k} {v}" for k, v in m.get('stage_seconds', {}).items()))
print('METRICS ' + json.dumps({k: round(a[k], 4) for k in ('json_valid', 'fields_complete', 'direction_agreement', 'bleu', 'rougeL', 'embed',
                                                          'accuracy', 'mcc') if k in a}))
PY
