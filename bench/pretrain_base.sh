#!/usr/bin/env bash
# Rebuild the embedded base (#13) on a lent GPU: the corpus from today's personas, encoded with the SHIPPED tokenizer
# (so tiny_teacher keeps sharing the vocabulary), then one pretraining per step count in STEPS, side by side on the GPU.
#   STEPS="1339 2000" bash bench/pretrain_base.sh   # CORPUS=<folder> with a corpus.npz: reuse it (build it on the CPU
#                                                   # machine beforehand and carry it, to spare ~220 s of device time)
#                                                   # $OUT/base-<steps>/{config.json,model.safetensors,pretrain_summary.json},
#                                                   # $OUT/corpus_stats.json, $OUT/pretrain.log (at most 8 files come back)
# Package the chosen one on the CPU machine (the shipped folder serves as the tokenizer folder):
#   mkdir -p c && cp <out>/corpus_stats.json c/ && cp -r stockdistill/assets/tiny_base c/tokenizer
#   python -m stockdistill.embedded package --weights <out>/base-<steps> --corpus c --out stockdistill/assets/tiny_base
# The shipped base (2026-12-03) is STEPS=2000: 184 s of pretraining on one H200 (the corpus step 110-232 s there).
set -eu
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/pretrain_base}; mkdir -p "$out"
WHEELS=${WHEELS:-.whl} source bench/_gpu_env.sh     # transformers 5.24 and fastcore from .whl/, offline environment
corpus=${CORPUS:-/tmp/embedded}
t0=$(date +%s)
if [ -f "$corpus/corpus.npz" ]; then
  echo "corpus: reusing $corpus (built beforehand, e.g. on the CPU machine with the same command)" > "$out/pretrain.log"
else
  python3 -m stockdistill.embedded corpus --out "$corpus" --workers "${WORKERS:-$(nproc)}" --tokenizer stockdistill/assets/tiny_base \
    > "$out/pretrain.log" 2>&1 || { tail -20 "$out/pretrain.log"; exit 1; }
fi
cp "$corpus/corpus_stats.json" "$out/"
echo "corpus in $(( $(date +%s) - t0 )) s: $(tr -d '\n ' < "$corpus/corpus_stats.json" | cut -c1-300)"
for s in ${STEPS:-2000}; do
  python3 -m stockdistill.embedded pretrain --corpus "$corpus" --role base --out "/tmp/base-$s" --steps "$s" \
    --batch-size 128 --lr 3e-3 --log-every 500 > "/tmp/base-$s.log" 2>&1 &
done
wait
for s in ${STEPS:-2000}; do
  mkdir -p "$out/base-$s"; cp /tmp/base-$s/{config.json,model.safetensors,pretrain_summary.json} "$out/base-$s/"
  grep -E "^\[base\]|^\{" "/tmp/base-$s.log" | tee -a "$out/pretrain.log" | cut -c1-600
done
