"""How far the CUDA fast path (fp16, channels_last) strays from fp32 on the CPU, in 8-bit levels.

    python benchmarks/precision.py   # needs a CUDA GPU; prints max / mean / p99.9 differences per network
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.worker import SIZES, make_clip
from gpu_worker.scoring import StyleScorer
from gpu_worker.style_spec import parse_style


def main() -> int:
    import tempfile

    import av

    width, height = SIZES[720]
    clip = make_clip(Path(tempfile.mkdtemp()) / "clip.mp4", width, height, 30)
    with av.open(str(clip)) as src:
        frames = [f.to_ndarray(format="rgb24") for _, f in zip(range(30), src.decode(video=0), strict=False)]
    x = torch.from_numpy(frames[-1])[None]  # RGB bytes, as the runner gives every scorer
    style_image = Path(tempfile.mkdtemp()) / "style.png"
    from PIL import Image

    Image.fromarray(frames[5]).save(style_image)
    for spec in ("7", "3:0.5,12:0.5", str(style_image)):
        cpu = StyleScorer(parse_style(spec), device="cpu").score(x).float()
        gpu = StyleScorer(parse_style(spec), device="cuda").score(x.cuda()).float().cpu()
        diff = (cpu - gpu).abs()  # levels of 255: both outputs are bytes
        print(f"style {Path(spec).name:<14} fp16 CUDA vs fp32 CPU: max {diff.max():.2f}, mean {diff.mean():.3f}, "
              f"p99.9 {diff.flatten().kthvalue(int(diff.numel() * 0.999)).values:.2f} levels of 255")
    return 0


if __name__ == "__main__":
    sys.exit(main())
