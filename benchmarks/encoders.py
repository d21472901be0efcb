"""Does one x264 use every core of a node, or would several encoders on sub-ranges encode faster (issue 11)?

    python benchmarks/encoders.py                        # 1080p, 300 frames, 1 encoder against 2..4
    python benchmarks/encoders.py --frames 600 --counts 2,4,8

The worker's writer (gpu_worker.media.SegmentWriter, veryfast, CRF 18) encodes the same decoded 1080p frames,
held in memory so that only encoding is timed: once as one stream with x264's own frame threads on all cores,
then split into k equal sub-ranges encoded side by side, one thread and one x264 each with its share of the
threads (as one process with k encoders fed by one decoder would run them). Each k is given as a ratio to the
one-encoder time measured in the same round. On a 2-core machine x264's frame threads already fill both cores;
the question is for a GPU node's 16-40 cores, where gpu_check.sh runs this.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import threading
import time
from fractions import Fraction
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import av
import numpy as np

from benchmarks.commands import cpu_description
from benchmarks.worker import make_clip
from gpu_worker.media import SegmentWriter


def decoded_planes(clip: Path) -> tuple[list[tuple[int, np.ndarray]], Fraction, Fraction]:
    with av.open(str(clip)) as container:
        stream = container.streams.video[0]
        planes = [(f.pts, f.reformat(format="yuv420p").to_ndarray()) for f in container.decode(stream)]
        return planes, stream.time_base, stream.average_rate


def encode_split(planes: list, count: int, threads: int, time_base: Fraction, rate: Fraction, work: Path) -> float:
    """Seconds to encode ``planes`` as ``count`` sub-ranges side by side, each x264 with ``threads`` threads
    (0: x264's own choice, 1.5 per core)."""
    height, width = planes[0][1].shape[0] * 2 // 3, planes[0][1].shape[1]
    size = math.ceil(len(planes) / count)
    pieces = [planes[i:i + size] for i in range(0, len(planes), size)]

    def encode(index: int) -> None:
        writer = SegmentWriter(work / f"part{index}.mp4", width=width, height=height, time_base=time_base,
                               sample_aspect_ratio=Fraction(1), frame_rate=rate, matrix="itu709", threads=threads)
        for pts, picture in pieces[index]:
            writer.write(picture, pts)
        writer.commit(continues=index < len(pieces) - 1)

    began = time.perf_counter()
    workers = [threading.Thread(target=encode, args=(i,)) for i in range(len(pieces))]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return time.perf_counter() - began


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=300)
    parser.add_argument("--counts", default="2,3,4", help="numbers of encoders to compare with one")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        planes, time_base, rate = decoded_planes(make_clip(work / "clip.mp4", 1920, 1080, args.frames))
        counts = [int(c) for c in args.counts.split(",") if c]
        times: dict[str, list[float]] = {"1": []}
        for _ in range(args.rounds):  # interleaved, so a slow spell of the machine hits every variant alike
            times["1"].append(encode_split(planes, 1, 0, time_base, rate, work))
            for count in counts:
                threads = max(1, round(1.5 * cores / count))
                times.setdefault(str(count), []).append(encode_split(planes, count, threads, time_base, rate, work))
    one = median(times["1"])
    rows = [{"encoders": int(k), "threads_each": 0 if k == "1" else max(1, round(1.5 * cores / int(k))),
             "seconds": round(median(v), 3), "fps": round(args.frames / median(v), 1),
             "speed_vs_one": round(one / median(v), 3), "rounds_s": [round(t, 3) for t in v]} for k, v in times.items()]
    cpu = cpu_description()
    print(f"cpu: {cpu['model']}, {cores} cores, flags: {cpu['flags']}")
    print(f"1920x1080, {args.frames} frames, veryfast CRF 18, encode only (frames in memory)")
    print("| encoders | x264 threads each | seconds (median) | fps | speed vs one encoder |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['encoders']} | {row['threads_each'] or 'auto'} | {row['seconds']} | {row['fps']} | "
              f"{row['speed_vs_one']}x |")
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu, "frames": args.frames, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
