#!/usr/bin/env bash
# The one command for a lent GPU machine (see BENCHMARKS.md): installs diffusers from wheels carried in .whl/
# (the machine has torch and transformers but no diffusers, and no network), then runs bench/gpu.py.
#   device run: bash bench/gpu.sh        (carry .whl; results land in $OUT/gpu.json)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench-out}
mkdir -p "$out"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"
timeout "${BENCH_TIMEOUT:-460}" python3 -m bench.gpu --out "$out/gpu.json" --budget "${BENCH_BUDGET:-420}" "$@" 2>&1 | tee "$out/gpu.log"
