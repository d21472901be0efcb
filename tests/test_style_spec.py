"""The one style-spec parser shared by the CLI, the HTTP API and blob metadata."""

from __future__ import annotations

import pytest

from gpu_worker.errors import InputError
from gpu_worker.style_spec import DEFAULT_TEMPORAL, NUM_STYLES, parse_flag, parse_style


def test_single_builtin_style() -> None:
    spec = parse_style("7")
    assert spec.is_builtin and spec.weights[7] == 1.0 and sum(spec.weights) == 1.0
    assert spec.describe() == "7"
    assert parse_style(7) == spec


def test_blend_is_normalised_and_round_trips() -> None:
    spec = parse_style(" 3:1, 12:3 ")
    assert spec.weights[3] == pytest.approx(0.25) and spec.weights[12] == pytest.approx(0.75)
    assert parse_style(spec.describe()) == spec


def test_repeated_index_adds_up() -> None:
    assert parse_style("3:0.5,3:0.5").weights[3] == 1.0


@pytest.mark.parametrize("ref", ["starry.jpg", "paintings/Monet.PNG", "https://example.org/a/b.webp?x=1",
                                 "http://example.org/style"])
def test_style_images(ref: str) -> None:
    spec = parse_style(ref, strength="0.5", preserve_color="true")
    assert (spec.image, spec.weights, spec.strength, spec.preserve_color) == (ref, None, 0.5, True)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("26", "style 26 does not exist: built-in styles are 0-25"),
        ("3:x", "weight of style 3 must be a number, got 'x'"),
        ("3:-1", "weight of style 3 is negative"),
        ("3:0,4:0", "add up to 0"),
        ("3:nan", "must be a finite number"),
        ("monet", "bad style 'monet': use a built-in style 0-25"),
        ("3;4", "bad style part '3;4' in '3;4'"),
        ("", "style is empty"),
        (True, "bad style True"),
        (None, "bad style None"),
        ("3:0.5,,4", "bad style part ''"),
    ],
)
def test_bad_specs_name_the_bad_part(spec: object, message: str) -> None:
    with pytest.raises(InputError) as err:
        parse_style(spec)
    assert message in str(err.value)
    assert err.value.field == "style"
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("strength", ["-0.1", 1.5, "abc", float("inf"), True])
def test_bad_strength(strength: object) -> None:
    with pytest.raises(InputError, match="strength") as err:
        parse_style("1", strength=strength)
    assert err.value.field == "strength"


@pytest.mark.parametrize(("text", "value"), [("true", True), ("No", False), ("1", True), ("", False), (True, True)])
def test_flags_from_metadata_strings(text: object, value: bool) -> None:
    assert parse_flag(text, "preserve_color") is value


def test_bad_flag() -> None:
    with pytest.raises(InputError, match="preserve_color must be true or false, got 'maybe'"):
        parse_style("1", preserve_color="maybe")


def test_every_builtin_index_parses() -> None:
    assert [parse_style(str(i)).weights.index(1.0) for i in range(NUM_STYLES)] == list(range(NUM_STYLES))


@pytest.mark.parametrize(("value", "expected"), [("0", 0.0), (0.5, 0.5), ("0.95", 0.95)])
def test_temporal_from_any_door(value: object, expected: float) -> None:
    assert parse_style("7", temporal=value).temporal == expected


def test_temporal_defaults_to_the_measured_best() -> None:
    assert parse_style("7").temporal == DEFAULT_TEMPORAL == 0.9


@pytest.mark.parametrize("value", ["-0.1", 1, "1.0", "abc", float("nan"), True])
def test_bad_temporal(value: object) -> None:
    with pytest.raises(InputError, match="temporal") as err:
        parse_style("1", temporal=value)
    assert err.value.field == "temporal" and "\n" not in str(err.value)
