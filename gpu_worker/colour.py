"""YUV 4:2:0 ↔ RGB on the scorer's device, in torch.

Colour conversion is as much work per pixel as a small network layer, and on a GPU node the CPU is the
scarce resource (it decodes and encodes), so frames travel as the codec's own 8-bit 4:2:0 planes — half the
bytes of RGB — and are converted where the model runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# (Kr, Kb) luma coefficients by matrix name (the names swscale and media.rgb_matrix use)
_LUMA = {"itu709": (0.2126, 0.0722), "itu601": (0.299, 0.114), "smpte170m": (0.299, 0.114),
         "smpte240m": (0.212, 0.087), "bt2020": (0.2627, 0.0593)}


def _coefficients(matrix: str) -> tuple[float, float, float]:
    kr, kb = _LUMA.get(matrix, _LUMA["itu709"])
    return kr, 1.0 - kr - kb, kb


def yuv420_to_rgb(planes: torch.Tensor, matrix: str, full_range: bool = False) -> torch.Tensor:
    """[N, H*3/2, W] uint8 I420 (as PyAV lays out yuv420p) → [N,3,H,W] float32 RGB in 0..1."""
    n, rows, width = planes.shape
    height = rows * 2 // 3
    flat = planes.reshape(n, -1).float()
    y = flat[:, : height * width].reshape(n, 1, height, width)
    chroma = flat[:, height * width:].reshape(n, 2, height // 2, width // 2)
    # nearest-neighbour up here and a 2x2 mean down in rgb_to_yuv420 undo each other exactly, so chroma
    # that the model leaves alone comes back unblurred and unshifted, whatever the source's chroma siting
    chroma = chroma.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    if full_range:
        y, chroma = y / 255.0, (chroma - 128.0) / 255.0
    else:
        y, chroma = (y - 16.0) / 219.0, (chroma - 128.0) / 224.0
    cb, cr = chroma[:, 0:1], chroma[:, 1:2]
    kr, kg, kb = _coefficients(matrix)
    r = y + 2 * (1 - kr) * cr
    g = y - (2 * kb * (1 - kb) / kg) * cb - (2 * kr * (1 - kr) / kg) * cr
    b = y + 2 * (1 - kb) * cb
    return torch.cat((r, g, b), dim=1).clamp_(0, 1)


def rgb_to_yuv420(rgb: torch.Tensor, matrix: str, size: tuple[int, int] | None = None,
                  full_range: bool = False) -> torch.Tensor:
    """[N,3,H,W] RGB in 0..1 → [N, H'*3/2, W'] uint8 I420, resized to ``size`` (even sides); limited range unless
    ``full_range`` (a full-range source is encoded full-range, as it came)."""
    rgb = rgb.float()
    if size is not None and tuple(rgb.shape[2:]) != size:
        rgb = F.interpolate(rgb, size=size, mode="bilinear", align_corners=False)
    n, _, height, width = rgb.shape
    kr, kg, kb = _coefficients(matrix)
    r, g, b = rgb[:, 0:1], rgb[:, 1:2], rgb[:, 2:3]
    luma = kr * r + kg * g + kb * b
    cb = (b - luma) / (2 * (1 - kb))
    cr = (r - luma) / (2 * (1 - kr))
    chroma = F.avg_pool2d(torch.cat((cb, cr), dim=1), 2)
    y_scale, c_scale, y_zero = (255.0, 255.0, 0.0) if full_range else (219.0, 224.0, 16.0)
    y = (luma * y_scale + y_zero).round_().clamp_(0, 255)
    c = (chroma * c_scale + 128.0).round_().clamp_(0, 255)
    out = torch.cat((y.reshape(n, -1), c.reshape(n, -1)), dim=1).to(torch.uint8)
    return out.reshape(n, height * 3 // 2, width)


def to_floats(frames: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[N,H,W,3] uint8 RGB → [N,3,H,W] in 0..1 (channels_last in memory: no copy of the layout)."""
    return frames.permute(0, 3, 1, 2).to(dtype).div_(255)


def to_bytes(rgb: torch.Tensor) -> torch.Tensor:
    """[N,3,H,W] in 0..1 (any float type) → [N,H,W,3] uint8 RGB, rounded in float32."""
    return rgb.float().mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
