"""Temporal consistency: steady where the scene is steady, fresh where it moves, no ghosts.

Each frame is stylized on its own, so brush strokes shimmer from frame to frame. This stage carries the
previous *output* along the motion of the *source*: optical flow (OpenCV's DIS, on small grey frames)
warps the previous output onto the current frame, and the result is blended with the fresh stylization,
weighted per pixel by how much the warp can be trusted — the warped previous source must match the
current source (photometric check) and the flow back and forth must agree (occlusion check). Occluded
and newly revealed areas take the fresh stylization, so nothing trails behind moving objects; a scene cut
starts afresh.

The output is a motion-compensated running average with weight ``temporal`` (the option, 0..1): the past
reaches ``warmup_frames(temporal)`` frames forward before it fades below 2%, which is how many frames a
task decodes and stylizes before its range so that two tasks meet at a segment boundary in the same state.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np

# Flow is estimated on grey frames this wide. Big Buck Bunny at 640 px (benchmarks/temporal.py): E_warp 0.52x
# per-frame and ghosting 3.9 levels at 320, 0.47x and 3.5 at 480. The two DIS flows cost 8 ms a frame at 320
# and 17 ms at 480, whatever the frame size; a first version's 640 measured no better than 480.
FLOW_WIDTH = 480
# DIS (opencv-python-headless 5.0) crashed the process on frames under 16 pixels tall and 40 or more wide, and
# refuses frames under 12 on both sides: smaller frames are scaled up to this for the flow. Where that would
# make them wider than FLOW_LIMIT (an extreme aspect ratio), frames are left as stylized.
FLOW_MIN_SIDE, FLOW_LIMIT = 16, 960
# DIS presets measured on bikes.mp4 at 320 px: E_warp 0.57x per-frame with ULTRAFAST, 0.49x with FAST, 0.34x
# with MEDIUM.
FLOW_PRESET = cv2.DISOPTICAL_FLOW_PRESET_MEDIUM
PHOTOMETRIC_SCALE = 0.06  # grey difference (0..1) at which the warp's trust has fallen to 1/e
CUT_BELOW = 0.1  # a scene cut: less than a tenth of the frame has a trustworthy match in the previous one
FADE = 0.02  # what is left of a past state after the warm-up


def warmup_frames(temporal: float) -> int:
    """Frames a task stylizes before its range (and does not emit) so segment boundaries do not pop."""
    if temporal <= 0:
        return 0
    return math.ceil(math.log(FADE) / math.log(min(temporal, 0.99)))


class TemporalBlender:
    """Blends each stylized frame with the previous output warped along the source's motion.

    Call :meth:`blend` with frames in presentation order: ``source`` and ``stylized`` are [H,W,3] uint8 RGB
    arrays of the same size; it returns the frame to emit.
    """

    def __init__(self, temporal: float) -> None:
        self.temporal = temporal
        self._flow = cv2.DISOpticalFlow_create(FLOW_PRESET)
        self._forward_flow = cv2.DISOpticalFlow_create(FLOW_PRESET)  # a DIS object is not for two threads at once
        # (small grey source, output before rounding): rounded to whole levels at every frame, the running average
        # had a dead zone (a difference under 0.5 / (1 - temporal) levels between two states never decayed), so on
        # a steady camera pan two tasks were still 0.3-0.65 levels apart after the warm-up, and slow changes moved
        # in steps.
        self._previous: tuple[np.ndarray, np.ndarray] | None = None
        self.cuts = 0  # scene cuts seen (the state was reset)

    def blend(self, source: np.ndarray, stylized: np.ndarray) -> np.ndarray:
        grey = _small_grey(source)
        if grey is None:
            return stylized
        if self._previous is None or self._previous[0].shape != grey.shape:
            self._previous = (grey, stylized.astype(np.float32))
            return stylized
        previous_grey, previous_output = self._previous
        flow, confidence = self._trust(grey, previous_grey)
        if confidence.mean() < CUT_BELOW:
            self.cuts += 1
            self._previous = (grey, stylized.astype(np.float32))
            return stylized
        height, width = stylized.shape[:2]
        # everything that needs judgement happens on the small frames; at full size only the warp and the blend
        flow = cv2.resize(flow, (width, height), interpolation=cv2.INTER_LINEAR) * (width / grey.shape[1])
        grid_x, grid_y = _grid((height, width))
        warped = cv2.remap(previous_output, grid_x + flow[..., 0], grid_y + flow[..., 1], cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_REPLICATE)
        weight = cv2.resize(confidence, (width, height), interpolation=cv2.INTER_LINEAR) * np.float32(self.temporal)
        output = cv2.blendLinear(warped, stylized.astype(np.float32), weight, 1 - weight)
        self._previous = (grey, output)
        return cv2.convertScaleAbs(output)  # rounded to the nearest level (the values are never negative)

    def _trust(self, grey: np.ndarray, previous_grey: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The backward flow (this frame → the previous one) and, per pixel, a confidence in 0..1 that the
        previous frame's pixel it points at is this one's, both at the small frames' size."""
        # The two flows at once, one in another thread (OpenCV lets go of the GIL): DIS spreads one flow over the
        # cores only so far (bikes, 2 cores: the pair took 10.1 ms one after the other, 8.3 ms side by side).
        forward = _FLOW_THREAD.submit(self._forward_flow.calc, previous_grey, grey, None)
        backward = self._flow.calc(grey, previous_grey, None)
        forward = forward.result()
        grid_x, grid_y = _grid(grey.shape)
        map_x, map_y = grid_x + backward[..., 0], grid_y + backward[..., 1]
        # occlusion: going back along `backward` then forward along `forward` must return to the start
        ahead = cv2.remap(forward, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        loop = _squared_length(backward + ahead)
        moved = _squared_length(backward)  # squared length of each pixel's motion
        consistent = loop <= 0.01 * (moved + _squared_length(ahead)) + 0.25
        # motion boundaries (Ruder et al. 2016): where the flow changes fast across the picture, the edge of
        # something moving, its warp smears one side onto the other; kept one pixel wider, because the small
        # frames blur that edge. This mask, rather than eroding all of the confidence, took Big Buck Bunny's
        # ghosting from 5.2 to 3.5 levels at E_warp 0.49 → 0.47x per-frame (erosion: 3.3 levels at 0.54x).
        gradients = sum(np.square(cv2.Sobel(backward[..., c], cv2.CV_32F, dx, 1 - dx, ksize=1))
                        for c in (0, 1) for dx in (0, 1)) / 4  # central differences, squared
        still = (gradients <= 0.01 * moved + 0.002).astype(np.uint8)
        off_edges = cv2.erode(still, _SQUARE_3) > 0
        inside = (map_x >= 0) & (map_x <= grey.shape[1] - 1) & (map_y >= 0) & (map_y <= grey.shape[0] - 1)
        # photometric: the previous frame carried here must look like this one
        warped = cv2.remap(previous_grey, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        error = cv2.absdiff(grey, warped).astype(np.float32) / (255 * PHOTOMETRIC_SCALE)
        return backward, (np.exp(-np.square(error)) * (consistent & off_edges & inside)).astype(np.float32)


def _small_grey(rgb: np.ndarray) -> np.ndarray | None:
    """The grey frame the flow is computed on: at most FLOW_WIDTH wide, at least FLOW_MIN_SIDE on either side;
    None where no such frame keeps the aspect ratio."""
    height, width = rgb.shape[:2]
    scale = max(min(1.0, FLOW_WIDTH / width), FLOW_MIN_SIDE / min(height, width))
    size = (max(FLOW_MIN_SIDE, round(width * scale)), max(FLOW_MIN_SIDE, round(height * scale)))
    if max(size) > FLOW_LIMIT:
        return None
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    if size == (width, height):
        return grey
    return cv2.resize(grey, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)


def _squared_length(flow: np.ndarray) -> np.ndarray:
    # per channel: numpy's sum over a last axis of 2 took 2 ms a call at 480x204, this 0.3
    x, y = flow[..., 0], flow[..., 1]
    return x * x + y * y


_SQUARE_3 = np.ones((3, 3), np.uint8)
_GRIDS: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}


def _grid(shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    key = (shape[0], shape[1])
    if key not in _GRIDS:
        ys, xs = np.mgrid[0:key[0], 0:key[1]].astype(np.float32)
        _GRIDS[key] = (xs, ys)
    return _GRIDS[key]


def _new_flow_thread() -> None:
    global _FLOW_THREAD
    _FLOW_THREAD = ThreadPoolExecutor(1, thread_name_prefix="forward-flow")  # starts its thread on first use


# One thread for every blender in the process (a task runs one range at a time); a forked child gets its own,
# as the parent's thread does not exist there.
_FLOW_THREAD: ThreadPoolExecutor
_new_flow_thread()
if hasattr(os, "register_at_fork"):  # POSIX only
    os.register_at_fork(after_in_child=_new_flow_thread)
