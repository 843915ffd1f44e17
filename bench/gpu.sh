#!/usr/bin/env bash
# The one command for a lent GPU machine (see BENCHMARKS.md): installs diffusers from wheels carried in .whl/
# (the machine has torch and transformers but no diffusers, and no network), then runs bench/gpu.py.
#   device run: bash bench/gpu.sh        (carry .whl; results land in $OUT/gpu.json and $OUT/gpu.log)
# Make .whl/ here first (pure-Python wheels; the GPU image has the rest), and keep it out of git:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
#       diffusers==0.42.1 importlib_metadata==10.2.0
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
