"""Worker memory: peak RSS of `python -m gpu_worker stylize` against the length of the clip, at 1080p on the CPU.

    python benchmarks/worker_memory.py                # identity 60,180,480 frames; style 24,72 (~5 min on 2 CPUs)
    python benchmarks/worker_memory.py --quick        # identity 30,120; style 8,24 (~1.5 min)
    python benchmarks/worker_memory.py --identity-frames 60,1200 --style-frames 0
    python benchmarks/worker_memory.py --env MALLOC_MMAP_THRESHOLD_=1048576   # try an allocator setting

Every run is the real CLI in a fresh process, as a compute task runs it, on a synthetic H.264 clip of its own
length (ffmpeg's moving testsrc2 pattern, 25 fps). Peak RSS is taken twice, independently:

* "self": the worker's own --json ``peak_rss_mb``, getrusage(RUSAGE_SELF).ru_maxrss at the end of run_range
  (start-up, imports and model load included; Linux counts KiB, the worker divides by 1024);
* "OS": the kernel's ru_maxrss for that one child, returned by os.wait4 when it is reaped (so interpreter
  shut-down is included too, and nothing depends on the worker's report).

A psutil sampler also reads the child's RSS every 0.2 s; the median over the second half of the run is the
steady-state figure. A high-water mark is the maximum of a fluctuating series, so it creeps up a little with
the number of frames even when nothing accumulates; a steady figure that stays put says nothing does.
Prints a table and the longest/shortest ratios per scorer, and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import av
import imageio_ffmpeg
import psutil

REPO = Path(__file__).resolve().parents[1]
FFMPEG = imageio_ffmpeg.get_ffmpeg_exe()
SAMPLE_SECONDS = 0.2


def make_clip(path: Path, width: int, height: int, frames: int, rate: int) -> Path:
    """``frames`` frames of a moving test pattern as H.264 (yuv420p, a keyframe every 250 frames, x264 defaults)."""
    subprocess.run([FFMPEG, "-hide_banner", "-loglevel", "error", "-y", "-f", "lavfi", "-i",
                    f"testsrc2=size={width}x{height}:rate={rate}", "-frames:v", str(frames), "-c:v", "libx264",
                    "-preset", "veryfast", "-crf", "20", "-pix_fmt", "yuv420p", str(path)], check=True)
    return path


def run_worker(clip: Path, output: Path, scorer: str, style: str, device: str, env: dict[str, str]) -> dict:
    """One `python -m gpu_worker stylize ... --json` in a fresh process; its summary and its memory as the OS saw it."""
    command = [sys.executable, "-m", "gpu_worker", "stylize", str(clip), str(output), "--style", style,
               "--scorer", scorer, "--device", device, "--json"]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = time.perf_counter()
        proc = subprocess.Popen(command, stdout=out, stderr=err, cwd=REPO, env={**os.environ, **env})
        samples: list[tuple[float, float]] = []
        done = threading.Event()
        sampler = threading.Thread(target=_sample, args=(proc.pid, started, samples, done), daemon=True)
        sampler.start()
        # Reap it ourselves (never proc.wait/poll, which would take the rusage away): ru_maxrss of this child alone.
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
        done.set()
        sampler.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        raise RuntimeError(f"worker exited {proc.returncode}: {stderr.strip()[-2000:]}")
    summary = json.loads(stdout.strip().splitlines()[-1])
    second_half = [rss for t, rss in samples if t >= wall / 2]
    return {
        "summary": summary, "wall_s": wall, "peak_rss_os_mb": usage.ru_maxrss / 1024,
        "rss_p50_second_half_mb": statistics.median(second_half) if second_half else None,
        "rss_max_sampled_mb": max((rss for _, rss in samples), default=None), "samples": len(samples),
        "user_s": usage.ru_utime, "system_s": usage.ru_stime,
    }


def _sample(pid: int, started: float, samples: list, done: threading.Event) -> None:
    try:
        process = psutil.Process(pid)
        while not done.is_set():
            rss = process.memory_info().rss
            if rss:  # a zombie awaiting wait4 reads as 0
                samples.append((time.perf_counter() - started, rss / 2**20))
            done.wait(SAMPLE_SECONDS)
    except psutil.Error:
        pass


def _frames(text: str) -> list[int]:
    return [int(n) for n in text.split(",") if n.strip() and int(n) > 0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1920x1080", help="WIDTHxHEIGHT of the synthetic clips")
    parser.add_argument("--rate", type=int, default=25, help="frames per second of the synthetic clips")
    parser.add_argument("--identity-frames", default="60,180,480", help="clip lengths for the codec-only path")
    parser.add_argument("--style-frames", default="24,72", help="clip lengths for the style network (0: skip)")
    parser.add_argument("--style", default="7")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="identity 30,120 and style 8,24 frames")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment for the worker processes (repeatable)")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/worker-memory-cpu.json"))
    args = parser.parse_args()
    if args.quick:
        args.identity_frames, args.style_frames = "30,120", "8,24"
    width, height = (int(v) for v in args.size.lower().split("x"))
    env = dict(item.split("=", 1) for item in args.env)
    plan = [("identity", n) for n in _frames(args.identity_frames)] + [("style", n) for n in _frames(args.style_frames)]

    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        work = Path(tmp)
        clips: dict[int, Path] = {}
        for scorer, frames in plan:
            if frames not in clips:
                clips[frames] = make_clip(work / f"clip{frames}.mp4", width, height, frames, args.rate)
            run = run_worker(clips[frames], work / "out.mp4", scorer, args.style, args.device, env)
            summary = run["summary"]
            if summary["frames"] != frames:
                raise RuntimeError(f"the worker wrote {summary['frames']} frames of {frames}")
            rows.append({
                "scorer": scorer, "size": f"{width}x{height}", "frames": frames, "device": summary["device"],
                "batch": summary["batch_size"], "wall_s": round(run["wall_s"], 1), "fps": summary["fps"],
                "peak_rss_self_mb": summary["peak_rss_mb"], "peak_rss_os_mb": round(run["peak_rss_os_mb"], 1),
                "rss_p50_second_half_mb": run["rss_p50_second_half_mb"] and round(run["rss_p50_second_half_mb"], 1),
                "rss_max_sampled_mb": run["rss_max_sampled_mb"] and round(run["rss_max_sampled_mb"], 1),
                "rss_samples": run["samples"], "cpu_user_s": round(run["user_s"], 1),
                "cpu_system_s": round(run["system_s"], 1), "clip_bytes": clips[frames].stat().st_size,
            })
            print(json.dumps(rows[-1]), flush=True)
            (work / "out.mp4").unlink(missing_ok=True)
    ratios = longest_over_shortest(rows)
    print_table(rows, ratios, env)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
        "memory_mb": round(psutil.virtual_memory().total / 2**20), "python": platform.python_version(),
        "av": av.__version__, "command": " ".join(["python", *sys.argv]), "env": env,
        "definitions": {
            "peak_rss_self_mb": "the worker's --json peak_rss_mb: getrusage(RUSAGE_SELF).ru_maxrss / 1024 at the "
                                "end of run_range",
            "peak_rss_os_mb": "ru_maxrss of the child alone from os.wait4 when it was reaped, / 1024",
            "rss_p50_second_half_mb": f"median of psutil RSS samples (every {SAMPLE_SECONDS} s) over the second "
                                      "half of the run's wall time",
        },
        "rows": rows, "longest_over_shortest": ratios,
    }, indent=1))
    print(f"wrote {args.json}")
    return 0


def longest_over_shortest(rows: list[dict]) -> dict:
    ratios = {}
    for scorer in dict.fromkeys(r["scorer"] for r in rows):
        mine = sorted((r for r in rows if r["scorer"] == scorer), key=lambda r: r["frames"])
        if len(mine) < 2:
            continue
        short, long = mine[0], mine[-1]
        ratios[scorer] = {"frames": f"{long['frames']}/{short['frames']}"} | {
            key: round(long[key] / short[key], 3) if long[key] and short[key] else None
            for key in ("peak_rss_os_mb", "peak_rss_self_mb", "rss_p50_second_half_mb")
        } | {"peak_rss_os_delta_mb": round(long["peak_rss_os_mb"] - short["peak_rss_os_mb"], 1)}
    return ratios


def print_table(rows: list[dict], ratios: dict, env: dict[str, str]) -> None:
    print(f"\n{'scorer':<9} {'size':>9} {'frames':>6} {'wall s':>7} {'fps':>6} {'peak RSS MiB':>13} "
          f"{'peak RSS MiB':>13} {'RSS p50 MiB':>12}")
    print(f"{'':<9} {'':>9} {'':>6} {'':>7} {'':>6} {'(self)':>13} {'(OS)':>13} {'(2nd half)':>12}")
    for r in rows:
        steady = r["rss_p50_second_half_mb"]
        print(f"{r['scorer']:<9} {r['size']:>9} {r['frames']:>6} {r['wall_s']:>7.1f} {r['fps']:>6.2f} "
              f"{r['peak_rss_self_mb']:>13.1f} {r['peak_rss_os_mb']:>13.1f} "
              f"{steady if steady is not None else float('nan'):>12.1f}")
    for scorer, r in ratios.items():
        print(f"{scorer}: peak RSS {r['frames']} frames = {r['peak_rss_os_mb']}x (OS, "
              f"{r['peak_rss_os_delta_mb']:+.1f} MiB), {r['peak_rss_self_mb']}x (self); "
              f"steady RSS {r['rss_p50_second_half_mb']}x")
    if env:
        print("worker environment:", " ".join(f"{k}={v}" for k, v in env.items()))


if __name__ == "__main__":
    sys.exit(main())
