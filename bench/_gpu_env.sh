# Sourced by the GPU benches (gpu_pipeline.sh, variants_gpu.sh, pretrain_base.sh): install the wheels the GPU machine
# lacks, carried in ${WHEELS:-.whlp}/ (see README "GPUs"), into /tmp/site, and set the offline, unbuffered environment
# the runs expect.
if ls "${WHEELS:-.whlp}"/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "${WHEELS:-.whlp}"/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false TRANSFORMERS_NO_ADVISORY_WARNINGS=1
