#!/usr/bin/env bash
# The GPU proof of issue 15 on a lent device machine (one run, under 7 minutes): see
# benchmarks/bench_gpu.py for what it measures. Writes $OUT/gpu.json and $OUT/gpu.log.
#
# The machine has torch, transformers, peft, pillow, numpy, pyarrow, typer, rich but no
# pycocotools: its wheel travels in .whl/ (bash benchmarks/gpu_wheels.sh fetches it here) and is
# installed into /tmp/site. Ray (~70 MB of wheels) cannot travel (64 MiB per call), so curation
# runs its Ray stages' functions in-process. The project is not pip-installed: PYTHONPATH=$PWD.
set -o pipefail
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  git log -1 --format='commit %H %s' 2>/dev/null
} 2>&1 | tee "$OUT/gpu.log"
# A hard stop well inside the call's limit; the JSON is rewritten after every section.
timeout 420 python3 benchmarks/bench_gpu.py --json "$OUT/gpu.json" "$@" 2>&1 | tee -a "$OUT/gpu.log"
