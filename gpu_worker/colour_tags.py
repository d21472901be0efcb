"""The video's colour description — primaries, transfer, matrix, range — carried from the source into the output.

Players choose the YUV→RGB matrix, the range and the gamut from these tags, so an output without them shows other
colours than its source: a full-range source looks washed out, HD BT.709 shifts hue when read as BT.601. The
worker converts with the source's own matrix and range both ways (the stylized picture sits where the source's
did), tags the encoder with the source's description, and the stitch copies the stream and with it the tags.

The output is 8-bit 4:2:0 H.264, as players expect: deeper sources lose their extra bits, and an HDR source
(PQ or HLG) is tone-mapped to SDR BT.709 on the way in, because 8-bit PQ bands badly and a player shown SDR
tags on PQ pixels shows them grey and flat. Both are said in the stitch's report (:func:`describe`).
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import av

# FFmpeg's codes and names (libavutil/pixfmt.h, av_color_*_name) for the values that occur in practice.
PRIMARIES = {1: "bt709", 4: "bt470m", 5: "bt470bg", 6: "smpte170m", 7: "smpte240m", 8: "film", 9: "bt2020",
             10: "smpte428", 11: "smpte431", 12: "smpte432", 22: "ebu3213"}
TRANSFERS = {1: "bt709", 4: "gamma22", 5: "gamma28", 6: "smpte170m", 7: "smpte240m", 8: "linear", 13: "iec61966-2-1",
             14: "bt2020-10", 15: "bt2020-12", 16: "smpte2084", 17: "smpte428", 18: "arib-std-b67"}
MATRICES = {0: "gbr", 1: "bt709", 4: "fcc", 5: "bt470bg", 6: "smpte170m", 7: "smpte240m", 8: "ycgco", 9: "bt2020nc",
            10: "bt2020c"}
UNSPECIFIED = 2
HDR_TRANSFERS = {16: "PQ", 18: "HLG"}
# The matrices the worker converts with (media.rgb_matrix's names) and the codes it tags when the source has none.
_MATRIX_CODE = {"itu709": 1, "itu601": 6, "smpte170m": 6, "smpte240m": 7, "bt2020": 9}
# Primaries and transfer that go with a matrix, for a source that tags only its matrix (or nothing): what a
# player assumes for it too.
_WITH_MATRIX = {1: (1, 1), 5: (5, 6), 6: (6, 6), 7: (7, 7), 9: (9, 14), 10: (9, 14)}


@dataclass(frozen=True)
class ColourTags:
    primaries: int
    transfer: int
    matrix: int
    full_range: bool

    def to_dict(self) -> dict[str, str]:
        return {"primaries": PRIMARIES.get(self.primaries, str(self.primaries)),
                "transfer": TRANSFERS.get(self.transfer, str(self.transfer)),
                "matrix": MATRICES.get(self.matrix, str(self.matrix)), "range": "pc" if self.full_range else "tv"}


SDR_BT709 = ColourTags(primaries=1, transfer=1, matrix=1, full_range=False)


def is_hdr(frame: av.VideoFrame) -> bool:
    return frame.color_trc in HDR_TRANSFERS


def is_full_range(frame: av.VideoFrame) -> bool:
    return frame.color_range == 2 or frame.format.name.startswith("yuvj")


def tags_for_matrix(matrix: str, full_range: bool = False) -> ColourTags:
    """The description of video converted with ``matrix`` (media.rgb_matrix's name) and nothing else known."""
    code = _MATRIX_CODE.get(matrix, 1)
    return ColourTags(*_WITH_MATRIX[code], matrix=code, full_range=full_range)


def output_tags(frame: av.VideoFrame, matrix: str) -> ColourTags:
    """What the encoder is told for a source whose (SDR, or already converted) frames look like ``frame``, converted
    with ``matrix`` (media.rgb_matrix's choice): the frame's own tags where it has them; where it has none, the
    matrix the conversion assumed and the primaries and transfer that go with it, as a player assumes them."""
    code = frame.colorspace if frame.colorspace in _WITH_MATRIX else _MATRIX_CODE.get(matrix, 1)
    primaries, transfer = _WITH_MATRIX.get(code, (1, 1))
    if frame.color_primaries in PRIMARIES:
        primaries = frame.color_primaries
    if frame.color_trc in TRANSFERS and frame.color_trc not in HDR_TRANSFERS:
        transfer = frame.color_trc
    return ColourTags(primaries, transfer, code, is_full_range(frame))


class SdrConverter:
    """HDR frames → 8-bit limited-range BT.709 SDR, through libavfilter's ``scale``: when the transfer and the
    primaries change, swscale (FFmpeg 8) takes its colour-managed path, which tone-maps and gamut-maps. Its lookup
    table costs a few seconds of one core once per process (3.5 s on the 2-core test machine, whatever the frame
    size); each frame after that costs what a plain conversion does. Call it from one thread."""

    def __init__(self) -> None:
        self._graph: av.filter.Graph | None = None
        self._key: tuple | None = None

    def __call__(self, frame: av.VideoFrame) -> av.VideoFrame:
        key = (frame.width, frame.height, frame.format.name, frame.colorspace, frame.color_range)
        if key != self._key:  # a stream can change size or format mid-way: the graph is built for one
            self._graph, self._key = self._build(frame), key
        assert self._graph is not None
        self._graph.push(frame)
        out = self._graph.pull()
        out.pts = frame.pts
        return out

    @staticmethod
    def _build(frame: av.VideoFrame) -> av.filter.Graph:
        graph = av.filter.Graph()
        source = graph.add("buffer", video_size=f"{frame.width}x{frame.height}",
                           pix_fmt=str(int(av.VideoFormat(frame.format.name))), time_base=str(frame.time_base
                                                                                              or Fraction(1, 1000)),
                           pixel_aspect="1/1", colorspace=str(frame.colorspace), range=str(frame.color_range))
        scale = graph.add("scale", "out_primaries=bt709:out_transfer=bt709:out_color_matrix=bt709:out_range=tv")
        pixels = graph.add("format", "yuv420p")
        sink = graph.add("buffersink")
        source.link_to(scale)
        scale.link_to(pixels)
        pixels.link_to(sink)
        graph.configure()
        return graph


def describe(source: av.VideoStream, output: av.VideoStream) -> dict:
    """The output video as the stitch's report gives it: codec, size, pixel format, colour description, and what
    was converted on the way from ``source`` (bit depth, chroma subsampling, HDR → SDR, …)."""
    src, out = source.codec_context, output.codec_context
    tags = ColourTags(out.color_primaries, out.color_trc, out.colorspace, out.color_range == 2)
    converted = []
    tone_mapped = src.color_trc in HDR_TRANSFERS and out.color_trc not in HDR_TRANSFERS
    if tone_mapped:
        converted.append(f"HDR ({HDR_TRANSFERS[src.color_trc]}) → SDR ({TRANSFERS.get(out.color_trc, 'bt709')})")
    if src.format is not None and out.format is not None:
        bits, out_bits = _bits(src.format), _bits(out.format)
        if bits > out_bits:
            converted.append(f"{bits}-bit → {out_bits}-bit")
        sampling, out_sampling = _sampling(src.format), _sampling(out.format)
        if sampling != out_sampling:
            converted.append(f"{sampling} → {out_sampling}")
    if src.colorspace in MATRICES and src.colorspace != out.colorspace and not tone_mapped:
        converted.append(f"matrix {MATRICES[src.colorspace]} → {MATRICES.get(out.colorspace, out.colorspace)}")
    return {"codec": out.codec.canonical_name, "width": out.width, "height": out.height,
            "pixel_format": out.format.name if out.format else None, "colour": tags.to_dict(), "converted": converted}


def _bits(fmt: av.VideoFormat) -> int:
    return max((c.bits for c in fmt.components), default=8)


def _sampling(fmt: av.VideoFormat) -> str:
    """"4:2:0", "4:2:2", "4:4:4", "RGB" or "grey", from the chroma planes' size relative to the luma's."""
    if fmt.is_rgb:
        return "RGB"
    planes = av.VideoFormat(fmt.name, 64, 64).components
    if len(planes) < 3:
        return "grey"
    across, down = planes[1].width < 64, planes[1].height < 64
    return "4:2:0" if across and down else "4:2:2" if across else "4:4:4"
