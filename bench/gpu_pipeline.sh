#!/usr/bin/env bash
# `stockdistill distill` end to end on a CUDA machine (issue #20): the quick start with the embedded pretrained student,
# then a randomly initialised student folder of Qwen1.5-7B's layer shape (hidden 4096, 32 layers, MLP 11008) on the
# embedded tokenizer, a few steps; the stage times of both from metrics.json.
#   bash bench/gpu_pipeline.sh          (on the GPU machine; wheels it lacks in .whlp/, see README "GPUs")
# Between the two, bench/answer_agreement.py compares the tuned student's compiled batched answers with one-by-one eager
# ones (SKIP_AGREEMENT=1 leaves it out).
# Bitsandbytes is not carried (QLoRA off: bf16 LoRA), nor plotly (report without figures) nor MiniLM (--embed-model off).
set -u
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/gpu_pipeline}; mkdir -p "$out"
source bench/_gpu_env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
common="--no-load-in-4bit --embed-model off --overwrite --runs-dir $out/runs"
quiet() { grep -v -iE "warn|it/s\]|Loading weights|^\s*$"; }
t0=$(date +%s)
# 1. the quick start, embedded student (`make run`'s flags)
timeout 240 python3 -m stockdistill.distill --run-name gpu-tiny $(make -s run-flags | sed 's/--overwrite//') $common 2>&1 \
  | tee "$out/gpu-tiny.log" | grep -E "^\[|stage times|fine-tuning|error" | quiet
echo "quick start wall: $(( $(date +%s) - t0 )) s"
# 1b. its validation answers, compiled and batched (the default on CUDA) against one by one and eager (the seed's way)
[ -n "${SKIP_AGREEMENT:-}" ] || timeout 240 python3 bench/answer_agreement.py "$out/runs/gpu-tiny" --json "$out/agreement.json" 2>&1 \
  | tr '\r' '\n' | quiet | grep -vE "^(one by one|batched), .*:.*\|" | tee "$out/agreement.log"
# 2. a random student of Qwen1.5-7B's layer shape, a few steps
t1=$(date +%s)
python3 - <<'PY'
import torch, time
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM
from stockdistill.embedded import EMBEDDED_BASE, keep_tokenizer_class
t0 = time.time()
tok = AutoTokenizer.from_pretrained(str(EMBEDDED_BASE))
cfg = Qwen2Config(vocab_size=len(tok), hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=32, max_position_embeddings=4096, tie_word_embeddings=False, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
torch.manual_seed(0)
with torch.device('cuda'): model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
model.config.prompt_format = 'answer'
model.generation_config.eos_token_id, model.generation_config.pad_token_id = tok.eos_token_id, tok.pad_token_id
model.save_pretrained('/tmp/q7-random'); tok.save_pretrained('/tmp/q7-random'); keep_tokenizer_class('/tmp/q7-random')
print(f"random 7B-shaped student: {model.num_parameters()/1e9:.2f}B parameters, saved in {time.time() - t0:.0f} s", flush=True)
PY
timeout 420 python3 -m stockdistill.distill --run-name gpu-7b --student /tmp/q7-random --windows 2 --max-steps 5 \
  --max-new-tokens 64 --gen-batch-size 64 $common 2>&1 | tee "$out/gpu-7b.log" | grep -E "^\[|stage times|fine-tuning|error" | quiet
echo "7B-shaped wall (build included): $(( $(date +%s) - t1 )) s"
python3 - "$out" <<'PY'
import json, sys
from pathlib import Path
rows = {}
for run in ('gpu-tiny', 'gpu-7b'):
    p = Path(sys.argv[1])/'runs'/run
    if not (p/'metrics.json').exists(): print(run, 'did not finish'); continue
    m, s = json.loads((p/'metrics.json').read_text()), json.loads((p/'lora_adapter'/'train_summary.json').read_text())
    rows[run] = {**m.get('stage_seconds', {}), 'val answers': m['n'], 'train steps': s['steps'], 'train tokens/s': s.get('tokens_per_s'),
                 'agreement after': round(m['after']['direction_agreement'], 3), 'JSON after': round(m['after']['json_valid'], 3)}
keys = list(dict.fromkeys(k for r in rows.values() for k in r))
print('| run | ' + ' | '.join(keys) + ' |'); print('|---' * (len(keys) + 1) + '|')
for run, r in rows.items(): print(f'| {run} | ' + ' | '.join(str(r.get(k, '')) for k in keys) + ' |')
json.dump(rows, open(Path(sys.argv[1])/'gpu_pipeline.json', 'w'), indent=1)
PY
