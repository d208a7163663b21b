"""Labelled columns of images side by side in one PNG (the encryption demo's and the privacy audit's figures)."""
from __future__ import annotations

from typing import Sequence

from ..atomic import atomic_write


def save_image_columns(path: str, columns: Sequence[tuple]) -> None:
    """Write labelled columns of images side by side as a PNG: ``columns`` is ``[(label, uint8 [R, C, H, W])]``
    with C = 1 (gray) or 3 (RGB), the same R, H, W in every column. Written atomically."""
    from PIL import Image, ImageDraw

    labels, images = zip(*columns)
    R, C, H, W = images[0].shape
    gap, label_height, scale = 6, 14 * max(1, len(max(labels, key=len)) // 18 + 1), max(1, 96 // max(H, W))
    mode = "L" if C == 1 else "RGB"
    cell_w = max(W * scale, 96)
    canvas = Image.new(mode, (len(columns) * (cell_w + gap) - gap, label_height + R * (H * scale + gap)),
                       255 if mode == "L" else (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for c, (label, batch) in enumerate(columns):
        words, line, text_lines = label.split(), "", []
        for word in words:
            if len(line) + len(word) + 1 > 18 and line:
                text_lines.append(line)
                line = word
            else:
                line = f"{line} {word}".strip()
        text_lines.append(line)
        draw.text((c * (cell_w + gap) + 2, 1), "\n".join(text_lines), fill=0 if mode == "L" else (0, 0, 0))
        for r in range(R):
            array = batch[r].permute(1, 2, 0).numpy() if C == 3 else batch[r, 0].numpy()
            tile = Image.fromarray(array).resize((W * scale, H * scale), Image.NEAREST)
            canvas.paste(tile, (c * (cell_w + gap), label_height + r * (H * scale + gap)))
    with atomic_write(path) as handle:
        canvas.save(handle, format="PNG")
