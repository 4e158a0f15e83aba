"""Image grids and files: tensors in ``[0, 1]`` to labelled PNGs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont
import torch
from torchvision.utils import make_grid as _tv_make_grid

GRID_PADDING = 2


def make_grid(images: torch.Tensor, nrow: int, padding: int = GRID_PADDING) -> torch.Tensor:
    """Tile ``(B, C, H, W)`` images in ``[0, 1]`` into a ``(C, H', W')`` grid, ``nrow`` per row."""
    if images.ndim != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}.")
    grid = _tv_make_grid(images.float().clamp(0, 1), nrow=nrow, padding=padding, pad_value=1.0)
    if images.shape[1] == 1:
        grid = grid[:1]
    return grid


def to_pil(image: torch.Tensor) -> PIL.Image.Image:
    """A ``(C, H, W)`` tensor in ``[0, 1]`` as a PIL image (mode ``L`` for one channel)."""
    arr = (image.detach().float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
    if arr.shape[0] == 1:
        return PIL.Image.fromarray(arr[0], mode="L")
    return PIL.Image.fromarray(arr.transpose(1, 2, 0), mode="RGB")


def label_grid(
    grid: torch.Tensor,
    row_labels: Sequence[str] | None,
    scale: int = 1,
    padding: int = GRID_PADDING,
) -> PIL.Image.Image:
    """The grid as a PIL image, upscaled by ``scale`` and with a label left of each row."""
    if scale < 1:
        raise ValueError(f"scale={scale!r} must be >= 1.")
    image = to_pil(grid).convert("RGB")
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), PIL.Image.NEAREST)
    if not row_labels:
        return image
    font = PIL.ImageFont.load_default()
    draw_probe = PIL.ImageDraw.Draw(image)
    margin = 8 + max(int(draw_probe.textlength(str(label), font=font)) for label in row_labels)
    canvas = PIL.Image.new("RGB", (image.width + margin, image.height), "white")
    canvas.paste(image, (margin, 0))
    draw = PIL.ImageDraw.Draw(canvas)
    row_height = (image.height - padding * scale) / len(row_labels)
    for r, label in enumerate(row_labels):
        y = padding * scale + r * row_height + row_height / 2
        draw.text((4, y), str(label), fill="black", font=font, anchor="lm")
    return canvas


def save_images(images: torch.Tensor, labels: torch.Tensor, out_dir: str | Path, prefix: str = "digit") -> list[Path]:
    """Write each image to ``out_dir/<prefix>=<label>/sample=<i>.png``; returns the paths."""
    out_dir = Path(out_dir)
    counters: dict[int, int] = {}
    paths = []
    for image, label in zip(images, labels.tolist()):
        index = counters.get(label, 0)
        counters[label] = index + 1
        path = out_dir / f"{prefix}={label}" / f"sample={index:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        to_pil(image).save(path)
        paths.append(path)
    return paths
