"""Style networks compiled ahead of time for this machine's CPU: once per machine, loaded in milliseconds.

``torch.compile`` inside each task cost 12-15 s before the first frame even with its caches warm (57 s
cold), which is more than scoring a short segment. Instead each transformer, as the worker runs it (a
:class:`~gpu_worker.networks.FrameStylizer`: RGB bytes in and out), is
exported once with symbolic height and width and compiled by AOTInductor into a shared library (weights
frozen in), which every later process loads in a few milliseconds, at every frame size.

An artifact is keyed by everything that makes it valid: torch's version, this CPU (architecture, model
and instruction-set flags: a library built with AVX-512 crashes where there is none), the network and
its weights. It is checked against the eager network when it is built, written atomically, and built
by one process at a time (a file lock); a process that finds another building waits for its result.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from gpu_worker import weights
from gpu_worker.networks import MIN_SIDE, SIZE_MULTIPLE, FrameStylizer

# Bump when the export or the wrapper changes, so old artifacts are not reused.
FORMAT_VERSION = 4  # 3: the thin convolutions rewritten wide (gpu_worker.wide_convs); 4: flat planes in the norms
TRANSFORMERS = ("multistyle26", "arbitrary_transform")
CONDITION_SIZE = {"multistyle26": 26, "arbitrary_transform": 100}
# Exported for sides of MIN_SIDE (8) to 8192 pixels in multiples of 4 (frames are padded up to one); larger
# frames run eagerly.
MAX_SIDE = 8192
CHECK_SIZES = ((64, 96), (136, 240))  # checked against eager at build time, one of them not square
CHECK_TOLERANCE = 1  # levels of 255: float32 differences of ~3e-6 can flip a rounding, no more


def compiled_dir() -> Path:
    """``$GPU_WORKER_COMPILED`` or ``~/.cache/gpu_worker/compiled``: per machine, shared by all its tasks."""
    env = os.environ.get("GPU_WORKER_COMPILED")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "gpu_worker" / "compiled"


def cpu_fingerprint() -> str:
    """What an artifact compiled here needs of the CPU it runs on (architecture, model, ISA flags)."""
    flags, model = "", ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "flags" and not flags:
                flags = " ".join(sorted(value.split()))
            elif key.strip() == "model name" and value.strip():
                model = value.strip()
    # platform.processor() forks `uname -p`: only where /proc/cpuinfo names no model
    return f"{platform.machine()}|{model or platform.processor()}|{flags}"


def artifact_path(name: str) -> Path:
    """Where the compiled ``name`` lives for this torch, this CPU and these weights."""
    key = "|".join((str(FORMAT_VERSION), torch.__version__, cpu_fingerprint(), weights.cache_key(name)))
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    return compiled_dir() / f"{name}-cpu-{digest}.pt2"


class CompiledNetwork:
    """A compiled :class:`~gpu_worker.networks.FrameStylizer`, called as the eager one: RGB bytes
    [N,H,W,3] and the style's condition in, RGB bytes out.

    Frames are reflect-padded to a multiple of 4 here, as the network itself would pad them, and cropped
    back, so the compiled graph only ever sees the shapes it was exported for.
    """

    def __init__(self, run: Callable[[list[torch.Tensor]], list[torch.Tensor]], source: str) -> None:
        self._run = run
        self.source = source  # "compiled" (built by this process) or "cached" (loaded)

    @staticmethod
    def accepts(height: int, width: int) -> bool:
        return min(height, width) >= MIN_SIDE and max(height, width) <= MAX_SIDE

    def __call__(self, frames: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        n, h, w, _ = frames.shape
        ph, pw = (-h) % SIZE_MULTIPLE, (-w) % SIZE_MULTIPLE
        if ph or pw:
            frames = F.pad(frames.permute(0, 3, 1, 2), (0, pw, 0, ph), mode="reflect").permute(0, 2, 3, 1)
        frames = frames.contiguous()
        rows = condition.float().reshape(n if condition.dim() == 2 else 1, -1)
        outputs = [self._run([frames[i:i + 1], rows[min(i, len(rows) - 1)].contiguous()])[0] for i in range(n)]
        y = outputs[0] if n == 1 else torch.cat(outputs)
        return y[:, :h, :w]


def load(name: str, *, build: bool = True, announce: Callable[[str], None] | None = None) -> CompiledNetwork | None:
    """The compiled ``name`` for this CPU: loaded from the cache, or built once (``build``) and cached.

    Returns None where it cannot be had (building off and no artifact, or the build failed: the reason is
    announced); the caller then runs the network eagerly.
    """
    path = artifact_path(name)
    if not path.is_file() and build:
        try:
            _build_once(name, path, announce)
        except Exception as exc:  # no C++ compiler, an unwritable cache, an inductor bug: eager still works
            if announce:
                announce(f"compiling {name} failed ({type(exc).__name__}: {exc}); running it eagerly")
            return None
    if not path.is_file():
        return None
    try:
        return CompiledNetwork(_load_runner(path), "cached")
    except Exception as exc:  # a damaged file: drop it, the next task builds it again
        path.unlink(missing_ok=True)
        if announce:
            announce(f"the compiled {name} could not be loaded ({exc}); removed it and running eagerly")
        return None


def prepare(names: tuple[str, ...] = TRANSFORMERS, announce: Callable[[str], None] | None = None) -> list[Path]:
    """Build the artifacts for this machine now (install time), so no task pays for them."""
    paths = []
    for name in names:
        path = artifact_path(name)
        if not path.is_file():
            _build_once(name, path, announce)
        paths.append(path)
    return paths


def _load_runner(path: Path) -> Callable[[list[torch.Tensor]], list[torch.Tensor]]:
    # The loader unpacks the package into a folder of its own under $TMPDIR and removes it only in its
    # destructor, which a worker leaving by os._exit never runs: every task left 3 MB in /tmp. Once loaded (its
    # shared library mapped) the folder is not needed, so it goes into one of ours, removed at once.
    scratch = tempfile.mkdtemp(prefix="stylize-aoti-")
    previous = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = scratch
    try:
        # The package loader itself: torch's aoti_load_package first compares the machine with the package by
        # compiling and running instruction-set probes (2.2 s here), which the artifact's key already settles.
        loader_class = getattr(getattr(torch._C, "_aoti", None), "AOTIModelPackageLoader", None)
        if loader_class is None:
            model = torch._inductor.aoti_load_package(str(path))
            return lambda args: [model(*args)]
        return loader_class(str(path), "model", False, 1, -1).boxed_run
    finally:
        if previous is None:
            del os.environ["TMPDIR"]
        else:
            os.environ["TMPDIR"] = previous
        shutil.rmtree(scratch, ignore_errors=True)


def _build_once(name: str, path: Path, announce: Callable[[str], None] | None) -> None:
    """Build under a lock; whoever waited on another builder uses its result."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    lock = os.open(path.parent, os.O_RDONLY)  # the folder is the lock: nothing to leave behind
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if announce:
                announce(f"waiting for another process compiling {name} for this machine")
            fcntl.flock(lock, fcntl.LOCK_EX)
        if path.is_file():
            return
        if announce:
            announce(f"compiling {name} for this machine's CPU (once per machine and torch version, ~1 min)")
        began = time.perf_counter()
        _build(name, path)
        if announce:
            announce(f"compiled {name} in {time.perf_counter() - began:.0f} s: {path}")
    finally:
        os.close(lock)  # closing releases the lock


def _build(name: str, path: Path) -> None:
    from torch.export import Dim

    module = FrameStylizer(weights.build(name).to(memory_format=torch.channels_last)).eval()
    size = CONDITION_SIZE[name]
    example = (torch.zeros(1, 64, 96, 3, dtype=torch.uint8), torch.full((size,), 1.0 / size))
    quarter_h = Dim("quarter_height", min=MIN_SIDE // SIZE_MULTIPLE, max=MAX_SIDE // SIZE_MULTIPLE)
    quarter_w = Dim("quarter_width", min=MIN_SIDE // SIZE_MULTIPLE, max=MAX_SIDE // SIZE_MULTIPLE)
    shapes = ({1: SIZE_MULTIPLE * quarter_h, 2: SIZE_MULTIPLE * quarter_w}, None)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".pt2", dir=path.parent)
    os.close(fd)
    try:
        with torch.inference_mode():
            exported = torch.export.export(module, example, dynamic_shapes=shapes)
            torch._inductor.aoti_compile_and_package(exported, package_path=tmp, inductor_configs={"freezing": True})
            _check(CompiledNetwork(_load_runner(Path(tmp)), "compiled"), module, size)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _check(compiled: CompiledNetwork, module: torch.nn.Module, condition_size: int) -> None:
    """Known inductor bugs have broken instance norm before: trust the build only once it agrees with eager."""
    generator = torch.Generator().manual_seed(0)
    condition = torch.rand(condition_size, generator=generator)
    condition /= condition.sum()
    for h, w in CHECK_SIZES:
        frames = torch.randint(0, 256, (1, h, w, 3), dtype=torch.uint8, generator=generator)
        got, want = compiled(frames, condition), module(frames, condition)
        diff = (got.int() - want.int()).abs().max().item()
        if not diff <= CHECK_TOLERANCE:
            raise RuntimeError(f"compiled output differs from eager by {diff} levels at {w}x{h}")
