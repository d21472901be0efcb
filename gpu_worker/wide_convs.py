"""The style networks' thin convolutions, rewritten as wide ones for the CPU: the same sums, faster.

oneDNN runs a convolution with few channels far below its speed on wide ones, and both transformers end
in three of them at full size: two nearest x2 upsamplings each followed by a 3x3 conv (8 or 16 output
channels), and a 9x9 conv to RGB. Two exact rewrites put the work on wide convolutions:

* nearest x2 + 3x3 conv is one 3x3 conv on the frame before upsampling, with one set of output channels
  per position in a 2x2 block, then a pixel shuffle: 4x fewer multiply-adds, no upsampled copy;
* the 9x9 conv is one 12x12 conv with stride 4 and one set of output channels per position in a 4x4
  block, then a pixel shuffle: 48 output channels instead of 3.

Compiled (AOTInductor, 2 cores, the two builds timed in turn on the same frames), multistyle26 went from
61 to 48 ms a frame at 640x272 and from 332 to 256 ms at 1280x720; the outputs differ by at most one
level. On the GPU the direct form stays: not measured there.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Output positions per input pixel side in the 9x9 rewrite; the networks' frames are padded to a multiple.
LAST_CONV_BLOCK = 4


def reflect_conv(conv: nn.Conv2d, x: torch.Tensor, *, upsample: bool) -> torch.Tensor:
    """``conv`` (reflect-padded) of ``x``, after a nearest x2 upsampling when ``upsample``, in the form that
    is fastest where it runs; within float32 rounding (1e-4 relative) of the direct form.

    The 9x9 rewrite needs sides that divide by 4, as the networks' do (they pad to 4s). Checking it here
    would put a guard into the compiled graph, so it is the caller's promise.
    """
    if x.device.type == "cpu":
        if upsample and conv.kernel_size == (3, 3):
            return _upsampled_conv3x3(x, conv.weight, conv.bias)
        if not upsample and conv.kernel_size == (9, 9) and conv.out_channels <= 4:
            return _strided_block_conv(x, conv.weight, conv.bias, LAST_CONV_BLOCK)
    return conv(upsample2x(x) if upsample else x)


def upsample2x(x: torch.Tensor) -> torch.Tensor:
    # Nearest-neighbour x2; the ONNX Resize ops use "asymmetric" + "floor",
    # which is exactly what torch's "nearest" does.
    return F.interpolate(x, scale_factor=2.0, mode="nearest")


def _upsampled_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A reflect-padded 3x3 conv of ``x`` upsampled x2, computed on ``x``.

    Each pixel of the upsampled frame sees a 2x2 neighbourhood of ``x``. A reflect pad of an upsampled
    frame repeats its edge pixels, so ``x`` is padded by repeating its edges.
    """
    x = torch.cat([x[:, :, :1], x, x[:, :, -1:]], dim=2)  # F.pad's "replicate" did not export with
    x = torch.cat([x[:, :, :, :1], x, x[:, :, :, -1:]], dim=3)  # symbolic sizes (torch 2.13)
    taps = _UPSAMPLED_TAPS.to(weight.dtype)
    cout, cin = weight.shape[:2]
    phased = torch.einsum("ayk,bxl,oikl->aboiyx", taps, taps, weight).reshape(4 * cout, cin, 3, 3)
    bias = None if bias is None else bias.repeat(4)
    return pixel_shuffle(F.conv2d(x, phased.contiguous(memory_format=torch.channels_last), bias), 2)


# [phase, tap on x (-1, 0, +1), tap of the 3x3 kernel]: rows 2i-1, 2i, 2i+1 of the upsampled frame are rows
# i-1, i, i of x (phase 0); rows 2i, 2i+1, 2i+2 are rows i, i, i+1 (phase 1). Columns likewise.
_UPSAMPLED_TAPS = torch.tensor([[[1, 0, 0], [0, 1, 1], [0, 0, 0]],
                                [[0, 0, 0], [1, 1, 0], [0, 0, 1]]], dtype=torch.float32)


def _strided_block_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        block: int) -> torch.Tensor:
    """A reflect-padded KxK conv, ``block``x``block`` output pixels at a time: a (K+block-1)² conv with
    stride ``block``. (Cutting ``x`` into 4x4 tiles and running a 3x3 conv on them was slower: the tiling
    copy, compiled, cost more than the conv.)"""
    cout, cin, k, _ = weight.shape
    x = F.pad(x, [k // 2] * 4, mode="reflect")
    # Output pixel (a, b) of a block sees kernel tap (dy, dx) at (a + dy, b + dx) of the block's window.
    spread = block - 1
    blocked = torch.stack([F.pad(weight, (b, spread - b, a, spread - a)) for a in range(block) for b in range(block)])
    blocked = blocked.reshape(block * block * cout, cin, k + spread, k + spread)
    bias = None if bias is None else bias.repeat(block * block)
    y = F.conv2d(x, blocked.contiguous(memory_format=torch.channels_last), bias, stride=block)
    return pixel_shuffle(y, block)


def pixel_shuffle(y: torch.Tensor, block: int) -> torch.Tensor:
    """[N, block*block*C, h, w] -> [N, C, h*block, w*block], channels_last.

    Unlike F.pixel_shuffle, the position in the block is the major part of the channel: in channels_last
    memory each output row of a block then copies one contiguous run of channels (compiled, the network was
    7% faster than with F.pixel_shuffle's order). Spelled with reshape: F.pixel_shuffle did not export with
    symbolic sizes either.
    """
    n, c, h, w = y.shape
    c //= block * block
    y = y.reshape(n, block, block, c, h, w).permute(0, 3, 4, 1, 5, 2).reshape(n, c, h * block, w * block)
    return y.contiguous(memory_format=torch.channels_last)
