"""The scorer layer: the compiled-model wrapper used on CUDA (exercised here on the CPU)."""

from __future__ import annotations

import pytest
import torch

from gpu_worker import weights
from gpu_worker.networks import FrameStylizer
from gpu_worker.scoring import CompiledOnDevice


@pytest.fixture(scope="module")
def net() -> torch.nn.Module:
    return FrameStylizer(weights.build("multistyle26"))


def _frames(n: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, 48, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))


def test_compiled_model_pads_short_batches_and_matches_eager(net: torch.nn.Module) -> None:
    style = torch.zeros(26)
    style[4] = 1.0
    frames = _frames(3)
    compiled = CompiledOnDevice(net)
    with torch.inference_mode():
        full = compiled(frames, style)
        short = compiled(frames[:2], style)  # the last batch of a task: padded, not recompiled
        eager = net(frames, style)
    assert compiled._compiled is not None
    assert full.shape == (3, 48, 64, 3) and short.shape == (2, 48, 64, 3) and full.dtype == torch.uint8
    assert (full.int() - eager.int()).abs().max() <= 1 and (short.int() - eager[:2].int()).abs().max() <= 1


def test_compiled_model_falls_back_to_eager_when_it_disagrees(net: torch.nn.Module, monkeypatch) -> None:
    # an inductor bug stand-in: the "compiled" model is off by a quarter of the range everywhere
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: lambda f, c: model(f, c) // 4)
    style = torch.zeros(26)
    style[4] = 1.0
    frames = _frames(2)
    compiled = CompiledOnDevice(net)
    with torch.inference_mode(), pytest.warns(RuntimeWarning, match="running eagerly"):
        out = compiled(frames, style)
    with torch.inference_mode():
        assert torch.equal(out, net(frames, style))
    assert compiled._compiled is None
