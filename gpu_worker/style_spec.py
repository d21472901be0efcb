"""The style spec: one parser for the CLI, the HTTP API and blob metadata.

A spec is a built-in style (`7`), a blend of built-ins (`3:0.5,12:0.5`), or a style image (a local path
or an http(s) URL) for any painting; plus `strength` (0–1 mix with the original frame),
`preserve_color` (keep the original colours, take the stylized luminance) and `temporal` (0–1: how much
of the previous output, carried along the motion, steadies each frame; 0 is off). Pure Python: the
Function App imports it without torch.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from gpu_worker.errors import InputError

NUM_STYLES = 26
# The default of `temporal`: the value that met both targets of benchmarks/temporal.py on every clip
# (E_warp at most half the per-frame output's, ghosting at most half the peer's; README, "Steady video").
DEFAULT_TEMPORAL = 0.9
MAX_TEMPORAL = 0.95  # at 1 the first frame's strokes would never change
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_BLEND_PART = re.compile(r"^\s*(\d+)\s*(?::\s*([^,]*?)\s*)?$")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
_SPEC_HELP = (
    f"use a built-in style 0-{NUM_STYLES - 1} (e.g. 7), a blend (e.g. 3:0.5,12:0.5), "
    f"or a style image path or http(s) URL ending in {', '.join(IMAGE_SUFFIXES[:3])}, …"
)


@dataclass(frozen=True)
class StyleSpec:
    """A parsed style. Exactly one of ``weights`` (26 floats summing to 1) and ``image`` is set."""

    weights: tuple[float, ...] | None = None
    image: str | None = None
    strength: float = 1.0
    preserve_color: bool = False
    temporal: float = DEFAULT_TEMPORAL

    @property
    def is_builtin(self) -> bool:
        return self.weights is not None

    def describe(self) -> str:
        """The spec as a user would write it (round-trips through :func:`parse_style`)."""
        if self.image is not None:
            return self.image
        assert self.weights is not None
        parts = [(i, w) for i, w in enumerate(self.weights) if w > 0]
        if len(parts) == 1:
            return str(parts[0][0])
        return ",".join(f"{i}:{w:.6g}" for i, w in parts)


def parse_style(spec: object, strength: object = 1.0, preserve_color: object = False,
                temporal: object = DEFAULT_TEMPORAL) -> StyleSpec:
    """Parse a style spec and its options; raises :class:`InputError` naming the bad part."""
    return StyleSpec(
        **_parse_spec(spec),
        strength=parse_strength(strength),
        preserve_color=parse_flag(preserve_color, "preserve_color"),
        temporal=parse_temporal(temporal),
    )


def _parse_spec(spec: object) -> dict:
    if isinstance(spec, bool) or not isinstance(spec, (int, str)):
        raise InputError(f"bad style {spec!r}: {_SPEC_HELP}", field="style")
    text = str(spec).strip()
    if not text:
        raise InputError(f"style is empty: {_SPEC_HELP}", field="style")
    if _looks_like_image(text):
        if any(ord(c) < 32 for c in text):
            raise InputError("style image name has control characters", field="style")
        return {"image": text}
    if not text[0].isdigit():
        raise InputError(f"bad style {text!r}: {_SPEC_HELP}", field="style")
    weights = [0.0] * NUM_STYLES
    for part in text.split(","):
        match = _BLEND_PART.match(part)
        if not match:
            raise InputError(f"bad style part {part.strip()!r} in {text!r}: {_SPEC_HELP}", field="style")
        index, weight_text = int(match.group(1)), match.group(2)
        if index >= NUM_STYLES:
            raise InputError(
                f"style {index} does not exist: built-in styles are 0-{NUM_STYLES - 1}", field="style"
            )
        weight = 1.0 if weight_text is None else _number(weight_text, f"weight of style {index}", "style")
        if weight < 0:
            raise InputError(f"weight of style {index} is negative ({weight_text})", field="style")
        weights[index] += weight
    total = sum(weights)
    if total <= 0:
        raise InputError(f"style weights in {text!r} add up to 0: give at least one positive weight",
                         field="style")
    return {"weights": tuple(w / total for w in weights)}


def _looks_like_image(text: str) -> bool:
    lowered = text.lower().split("?", 1)[0]
    return lowered.startswith(("http://", "https://")) or lowered.endswith(IMAGE_SUFFIXES)


def parse_strength(value: object) -> float:
    """0 keeps the original frame, 1 is fully stylized."""
    strength = _number(value, "strength", "strength")
    if not 0.0 <= strength <= 1.0:
        raise InputError(f"strength must be between 0 and 1, got {value}", field="strength")
    return strength


def parse_temporal(value: object) -> float:
    """0 (each frame on its own) to MAX_TEMPORAL (the steadiest)."""
    temporal = _number(value, "temporal", "temporal")
    if not 0.0 <= temporal <= MAX_TEMPORAL:
        raise InputError(f"temporal must be between 0 (off) and {MAX_TEMPORAL}, got {value}", field="temporal")
    return temporal


def parse_flag(value: object, name: str) -> bool:
    """A boolean from JSON, a CLI flag or blob metadata (where everything is a string)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise InputError(f"{name} must be true or false, got {value!r}", field=name)


def _number(value: object, what: str, field: str) -> float:
    if isinstance(value, bool):
        raise InputError(f"{what} must be a number, got {value!r}", field=field)
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise InputError(f"{what} must be a number, got {value!r}", field=field) from None
    if not math.isfinite(number):
        raise InputError(f"{what} must be a finite number, got {value!r}", field=field)
    return number
