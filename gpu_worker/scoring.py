"""Scorers: the models the frame pipeline runs. Style transfer is the first; the interface is generic.

Each scorer takes uint8 RGB frames [N,H,W,3] and returns the same shape, so the runner never needs to
know what the model is. Models load lazily on the first batch, and CUDA runs use fp16 in
channels_last (normalisation statistics stay fp32 inside the networks).
"""

from __future__ import annotations

import io
import os
import sys
import urllib.request
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch

from gpu_worker.errors import InputError
from gpu_worker.networks import MIN_SIDE, FrameStylizer, apply_options
from gpu_worker.source_auth import open_url
from gpu_worker.style_spec import StyleSpec

MAX_STYLE_IMAGE_BYTES = 50 * 1024 * 1024
# A 656 KB PNG can declare 13000x13000 (2.9 GB decoded, in every task); the predictor looks at 256x256 anyway.
MAX_STYLE_IMAGE_PIXELS = 40_000_000
STYLE_IMAGE_SIZE = 256  # the style predictor's input side
# Rough activation bytes per pixel per frame in flight on the GPU (32 fp16 channels, several live tensors,
# cuDNN workspace); used only to pick a batch size that leaves headroom.
_GPU_BYTES_PER_PIXEL = 1024
MEMORY_SHARE_ENV = "GPU_WORKER_MEMORY_SHARE"  # how many processes share the GPU's free memory


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("device cuda was asked for but torch finds no CUDA GPU on this machine (none, or its "
                         "NVIDIA driver is missing or too old); use --device cpu", field="device")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise InputError(f"unknown device {device!r}: use auto, cpu or cuda", field="device") from None
    if resolved.type == "cuda":
        _check_gpu(resolved)
    return resolved


def _check_gpu(device: torch.device) -> None:
    """A GPU that is there and that this torch build has kernels for: otherwise the task would fail later
    with an internal error (retried for nothing), e.g. a V100 node under a torch that dropped its generation."""
    count = torch.cuda.device_count()
    index = device.index or 0
    if index >= count:
        raise InputError(f"no GPU {device}: this machine has {count}", field="device")
    major, minor = torch.cuda.get_device_capability(index)
    # older than every architecture the build has kernels for (a newer GPU may still run them, or their PTX)
    built = [int(arch[3:]) for arch in torch.cuda.get_arch_list() if arch.startswith("sm_") and arch[3:].isdigit()]
    if built and major * 10 + minor < min(built):
        raise InputError(f"GPU {torch.cuda.get_device_name(index)} (compute capability {major}.{minor}) is older "
                         f"than this torch build supports (sm_{min(built)} and newer); use a newer GPU size",
                         field="device")


class IdentityScorer:
    """Returns frames unchanged: measures the codec path alone and tests the pipeline without a model."""

    name = "identity"

    def __init__(self, device: str = "cpu") -> None:
        self.torch_device = resolve_device(device)
        self.device = self.torch_device.type

    def batch_size(self, height: int, width: int) -> int:
        return 4

    def score(self, frames: torch.Tensor) -> torch.Tensor:
        return frames  # RGB bytes, as every scorer receives them: the codec path is the same for all

    def peak_device_memory_mb(self) -> float | None:
        return None


class StyleScorer:
    """Fast neural style transfer: 26 built-in styles and blends, or any painting as the style."""

    name = "style"

    def __init__(
        self, spec: StyleSpec, device: str = "auto", max_batch: int = 16,
        http_headers: Mapping[str, str] | None = None,
    ) -> None:
        self.spec = spec
        self.torch_device = resolve_device(device)
        self.device = self._device_label()
        self.max_batch = max_batch
        self._dtype = torch.float16 if self.torch_device.type == "cuda" else torch.float32
        self._http_headers = http_headers
        self._net: FrameStylizer | CompiledOnDevice | None = None
        self._compiled = None  # gpu_worker.compiled.CompiledNetwork, on the CPU
        self._condition: torch.Tensor | None = None
        self._name = ""
        self.network = "not loaded"  # how the network runs: "compiled (cached)", "eager", … (for reports)
        self.announce: Callable[[str], None] = _to_stderr
        if spec.image is not None:
            self._style_image = load_style_image(spec.image, http_headers)  # fail fast on a bad image

    def _device_label(self) -> str:
        if self.torch_device.type == "cuda":
            return f"cuda ({torch.cuda.get_device_name(self.torch_device)})"
        return "cpu"

    def batch_size(self, height: int, width: int) -> int:
        if self.torch_device.type != "cuda":
            return 1  # the CPU gains nothing from batching and pays in latency and memory
        free, _ = torch.cuda.mem_get_info(self.torch_device)
        # processes that share the GPU (gpu_worker.parallel) all look at once, before any has loaded its model
        share = max(1, int(os.environ.get(MEMORY_SHARE_ENV, "1")))
        return int(max(1, min(self.max_batch, free // 2 // share // (height * width * _GPU_BYTES_PER_PIXEL))))

    def peak_device_memory_mb(self) -> float | None:
        if self.torch_device.type != "cuda":
            return None
        return torch.cuda.max_memory_allocated(self.torch_device) / 2**20

    def _load(self) -> None:
        from gpu_worker import networks, weights

        if self.spec.weights is not None:
            name = "multistyle26"
            self._condition = torch.tensor(self.spec.weights, device=self.torch_device, dtype=self._dtype)
        else:
            name = "arbitrary_transform"
            predictor = weights.build("arbitrary_predict", self.torch_device, torch.float32)
            with torch.inference_mode():
                vector = predictor(_image_tensor(self._style_image, self.torch_device))
            self._condition = vector.to(self._dtype)
        self._name = name
        if self.torch_device.type == "cpu":
            networks.tune_glibc_malloc()
            if os.environ.get("GPU_WORKER_CPU_COMPILE", "1") != "0":
                from gpu_worker import compiled

                self._compiled = compiled.load(name, announce=self.announce)
                if self._compiled is not None:
                    self.network = f"compiled ({self._compiled.source})"
                    return  # the eager network is built only if a frame is too small for the compiled one
        self._net = self._eager()

    def _eager(self) -> torch.nn.Module:
        from gpu_worker import weights

        self.network = "eager"
        net = weights.build(self._name, self.torch_device, self._dtype).to(memory_format=torch.channels_last)
        module = FrameStylizer(net)
        if self.torch_device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # one frame size per task: tuning pays off after a batch
            # Off by default: compiling takes 20-35 s per process and, with the codec path the bottleneck
            # (H200, 1080p: network 548 fps compiled vs 156 eager, but decode+encode ~110-140 fps), it only
            # pays on long segments. GPU_WORKER_CUDA_COMPILE=1 turns it on.
            if os.environ.get("GPU_WORKER_CUDA_COMPILE", "0") == "1":
                self.network = "torch.compile"
                return CompiledOnDevice(module)
        return module

    @torch.inference_mode()
    def score(self, frames: torch.Tensor) -> torch.Tensor:
        """Frames in, frames out, in pieces of at most ``max_batch``; on running out of device memory the
        piece is halved, and so is ``max_batch`` for every later call."""
        if self._condition is None:
            self._load()
        done: list[torch.Tensor] = []
        start = 0
        while start < len(frames):
            piece = frames[start:start + self.max_batch]
            try:
                done.append(self._score(piece))
            except torch.cuda.OutOfMemoryError:
                pass  # handled below, once the failed attempt's tensors are gone with the exception
            else:
                start += len(piece)
                continue
            if len(piece) == 1:
                height, width = frames.shape[1:3]
                raise InputError(f"one {width}x{height} frame does not fit in this GPU's memory; scale the video "
                                 "down with max_size (--max-size)", field="max_size")
            self.max_batch = max(1, len(piece) // 2)
            if isinstance(self._net, CompiledOnDevice):
                self._net.shrink(self.max_batch)
            torch.cuda.empty_cache()
        return done[0] if len(done) == 1 else torch.cat(done)

    def _score(self, frames: torch.Tensor) -> torch.Tensor:
        condition = self._condition
        if condition is not None and condition.dim() == 2:
            condition = condition.expand(len(frames), -1)
        height, width = frames.shape[1:3]
        grown = _with_edges_repeated(frames, MIN_SIDE)
        if self._compiled is not None and self._compiled.accepts(*grown.shape[1:3]):
            styled = self._compiled(grown, condition)
        else:
            if self._net is None:
                self._net = self._eager()
            styled = self._net(grown, condition)
        return apply_options(styled[:, :height, :width], frames, self.spec.strength, self.spec.preserve_color)


class CompiledOnDevice:
    """``torch.compile`` for a fixed batch shape: inductor fuses each instance norm's statistics, affine and
    activation, which in eager mode are separate passes over full-resolution activations.

    Short last batches are padded to the compiled size, so a task compiles once. The first compiled batch
    is checked against eager (instance-norm bugs have shipped in inductor before); on any failure or
    disagreement it warns and stays eager.
    """

    # Mean absolute difference, outputs in 0..1. Not the max: these networks amplify rounding differences at
    # a few stroke edges (compiled vs eager fp16 at 1080p: max 0.67 on real frames) while the picture agrees.
    TOLERANCE = 0.02

    def __init__(self, net: torch.nn.Module) -> None:
        self.net = net
        self._compiled = torch.compile(net, dynamic=False)
        self._batch = 0
        self._checked = False

    def shrink(self, batch: int) -> None:
        """Compile for ``batch`` frames from now on (after running out of memory at the larger size): padding
        short batches back up to the old size would run out again."""
        self._batch = batch

    def __call__(self, frames: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        if self._compiled is None:
            return self.net(frames, condition)
        n = frames.shape[0]
        self._batch = max(self._batch, n)
        if n < self._batch:  # pad, rather than compile a second graph for the last batch
            frames = torch.cat([frames, frames[-1:].expand(self._batch - n, -1, -1, -1)])
            if condition.dim() == 2:
                condition = torch.cat([condition, condition[-1:].expand(self._batch - n, -1)])
        try:
            y = self._compiled(frames, condition)
            if not self._checked:
                self._checked = True
                eager = self.net(frames, condition)
                diff = (y.float() - eager.float()).abs().mean().item() / 255
                if not diff <= self.TOLERANCE:
                    raise RuntimeError(f"compiled output differs from eager by {diff:.3g} on average")
        except torch.cuda.OutOfMemoryError:
            raise  # not the compiler's fault: the scorer halves the batch
        except Exception as exc:  # no compiler in the image, an inductor bug, a mismatch: eager still works
            warnings.warn(f"torch.compile not used ({type(exc).__name__}: {exc}); running eagerly",
                          RuntimeWarning, stacklevel=2)
            self._compiled = None
            return self.net(frames[:n], condition[:n] if condition.dim() == 2 else condition)
        return y[:n]


def _with_edges_repeated(frames: torch.Tensor, side: int) -> torch.Tensor:
    """[N,H,W,C] frames grown to at least ``side`` pixels each way by repeating their last row and column
    (a video may be as small as 2x2); the scored frames are cropped back."""
    height, width = frames.shape[1:3]
    if height >= side and width >= side:
        return frames
    rows = torch.arange(max(side, height), device=frames.device).clamp(max=height - 1)
    columns = torch.arange(max(side, width), device=frames.device).clamp(max=width - 1)
    return frames[:, rows][:, :, columns].contiguous()


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def load_style_image(ref: str, http_headers: Mapping[str, str] | None = None):
    """A style image from a path or an http(s) URL, as an RGB PIL image (alpha flattened on white)."""
    from PIL import Image, ImageOps

    name = Path(ref.split("?", 1)[0]).name
    try:
        if ref.startswith(("http://", "https://")):
            request = urllib.request.Request(ref, headers=dict(http_headers or {}))
            with open_url(request, timeout=60) as response:
                data = response.read(MAX_STYLE_IMAGE_BYTES + 1)
        else:
            data = Path(ref).read_bytes()
    except FileNotFoundError:
        raise InputError(f"style image not found: {ref}", field="style") from None
    except OSError as exc:
        raise InputError(f"cannot read style image {name}: {getattr(exc, 'reason', exc)}", field="style") from None
    if len(data) > MAX_STYLE_IMAGE_BYTES:
        raise InputError(f"style image {name} is larger than {MAX_STYLE_IMAGE_BYTES >> 20} MB", field="style")
    try:
        with warnings.catch_warnings():  # Pillow's own bomb warning: the check below says it in one line
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))  # the header only: the size is known before any pixel is decoded
        if image.width * image.height > MAX_STYLE_IMAGE_PIXELS:
            raise InputError(f"style image {name} is {image.width}x{image.height}: at most "
                             f"{MAX_STYLE_IMAGE_PIXELS // 10**6} megapixels (it is seen at 256x256)", field="style")
        image = ImageOps.exif_transpose(image)
        image.load()
    except (OSError, Image.DecompressionBombError, SyntaxError):
        raise InputError(f"style image {name} is not an image this service can read (use JPEG, PNG or WebP)",
                         field="style") from None
    if min(image.size) < 16:
        raise InputError(f"style image {name} is {image.width}x{image.height}: at least 16 px a side, please",
                         field="style")
    if image.mode in ("RGBA", "LA", "P", "PA"):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
    return image.convert("RGB")


def _image_tensor(image, device: torch.device) -> torch.Tensor:
    """Centre square crop at the predictor's size, as a [1,3,256,256] float tensor in 0..1."""
    from PIL import Image

    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    square = image.crop((left, top, left + side, top + side)).resize(
        (STYLE_IMAGE_SIZE, STYLE_IMAGE_SIZE), Image.LANCZOS
    )
    array = np.asarray(square, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)[None].to(device)
