"""Labelled columns of images side by side in one PNG: the figures of the encryption demo, the privacy audit and the
demo's sample sheet all go through :func:`save_image_columns`."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..atomic import atomic_write

_LABEL_CHARS = 18  # characters per line of a column label
_CHAR_WIDTH = 6  # pixels per character of PIL's default font


def ciphertext_pixels(cipher: torch.Tensor) -> torch.Tensor:
    """``cipher`` as uint8 for display: a float ciphertext rescaled from its own range to ``[0, 255]``; uint8 as it
    is."""
    if cipher.dtype == torch.uint8:
        return cipher
    low, high = float(cipher.float().min()), float(cipher.float().max())
    return ((cipher.float() - low) / max(high - low, 1e-6) * 255).round().to(torch.uint8)


def _wrap(label: str) -> str:
    words, line, lines = label.split(), "", []
    for word in words:
        if len(line) + len(word) + 1 > _LABEL_CHARS and line:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    lines.append(line)
    return "\n".join(lines)


def save_image_columns(path: str, columns: Sequence[tuple], row_labels: Optional[Sequence[str]] = None) -> None:
    """Write labelled columns of images side by side as a PNG: ``columns`` is ``[(label, uint8 [R, C, H, W])]``
    with C = 1 (gray) or 3 (RGB), the same C, H, W in every column; a column with fewer than R images leaves its last
    cells blank. ``row_labels`` (optional, R strings) are written left of the rows. Written atomically."""
    from PIL import Image, ImageDraw

    labels, images = zip(*columns)
    R = max(batch.shape[0] for batch in images)
    C, H, W = images[0].shape[1:]
    gap, label_height, scale = 6, 14 * max(1, len(max(labels, key=len)) // _LABEL_CHARS + 1), max(1, 96 // max(H, W))
    margin = 0 if not row_labels else _CHAR_WIDTH * max(len(label) for label in row_labels) + gap
    mode = "L" if C == 1 else "RGB"
    ink, paper = (0, 255) if mode == "L" else ((0, 0, 0), (255, 255, 255))
    cell_w = max(W * scale, 96)
    canvas = Image.new(mode, (margin + len(columns) * (cell_w + gap) - gap, label_height + R * (H * scale + gap)),
                       paper)
    draw = ImageDraw.Draw(canvas)
    for r, label in enumerate(row_labels or ()):
        draw.text((0, label_height + r * (H * scale + gap) + 2), label, fill=ink)
    for c, (label, batch) in enumerate(columns):
        left = margin + c * (cell_w + gap)
        draw.text((left + 2, 1), _wrap(label), fill=ink)
        for r in range(batch.shape[0]):
            array = batch[r].permute(1, 2, 0).numpy() if C == 3 else batch[r, 0].numpy()
            tile = Image.fromarray(array).resize((W * scale, H * scale), Image.NEAREST)
            canvas.paste(tile, (left, label_height + r * (H * scale + gap)))
    with atomic_write(path) as handle:
        canvas.save(handle, format="PNG")
