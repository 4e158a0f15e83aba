"""Per-token cross-attention maps of a text-conditioned UNet, accumulated while it samples (in the spirit of DAAM).

DAAM (Tang et al., 2023, "What the DAAM: Interpreting Stable Diffusion Using Cross Attention")
explains which image regions a prompt word drives by summing, over denoising steps, layers and
heads, the cross-attention probabilities ``softmax(QK^T / sqrt(d))`` of each text token, each
layer's ``h*w`` query map upsampled to one resolution. :class:`CrossAttentionAccumulator`
installs :class:`CrossAttentionMapProcessor` s on the cross-attention layers (``attn2``) and keeps
only running sums: one per query-grid size (upsampling is linear, so the grids are upsampled once,
when the maps are read), plus per-step sums for the chosen steps. Memory stays
``O(prompts * tokens * h * w)`` whatever the number of steps.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont
import torch
import torch.nn.functional as F

from diffusion_lightning.utils.attention import (
    AttentionRecorder,
    RecordingAttnProcessor,
    attention_processors,
    layer_name,
)
from diffusion_lightning.utils.images import to_pil

__all__ = [
    "CrossAttentionAccumulator",
    "CrossAttentionMapProcessor",
    "TokenMaps",
    "cross_attention_layers",
    "normalize_maps",
    "overlay",
    "prompt_tokens",
    "token_strip",
]

_MIN_TILE = 64  # strip tiles are upscaled (nearest) to at least this many pixels a side
_PAD = 4


def cross_attention_layers(model: torch.nn.Module) -> list[str]:
    """Processor names of the ``Attention`` modules of ``model`` whose keys come from ``encoder_hidden_states``."""
    names = []
    for name in attention_processors(model):
        attn = model.get_submodule(layer_name(name))
        if getattr(attn, "is_cross_attention", layer_name(name).endswith("attn2")):
            names.append(name)
    return names


def prompt_tokens(tokenizer: Any, prompt: str) -> tuple[list[int], list[int], list[str]]:
    """The real tokens of ``prompt`` as the pipelines encode it (padded to ``model_max_length``).

    Returns:
        Positions in the padded sequence, token ids, and token texts (decoded, ``</w>`` stripped),
        skipping start, end and padding tokens.
    """
    ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True).input_ids
    special = set(tokenizer.all_special_ids)
    positions = [i for i, token in enumerate(ids) if token not in special]
    token_ids = [int(ids[i]) for i in positions]
    texts = []
    for token in token_ids:
        text = tokenizer.decode([token]).replace("</w>", "").strip()
        texts.append(text or tokenizer.convert_ids_to_tokens(token).replace("</w>", ""))
    return positions, token_ids, texts


def normalize_maps(maps: torch.Tensor) -> torch.Tensor:
    """Each map of ``(N, H, W)`` stretched to ``[0, 1]`` (its min to 0, its max to 1; a constant map becomes 0)."""
    flat = maps.float().flatten(1)
    low, high = flat.min(dim=1, keepdim=True).values, flat.max(dim=1, keepdim=True).values
    return ((flat - low) / (high - low).clamp_min(1e-12)).reshape(maps.shape)


@dataclass
class TokenMaps:
    """The cross-attention maps of one prompt's tokens over its generated image."""

    prompt: str
    image: torch.Tensor
    """The generated image ``(3, H, W)`` in ``[0, 1]``."""
    positions: list[int]
    """Position of each token in the padded text sequence (the key index)."""
    token_ids: list[int]
    tokens: list[str]
    """Each token's text (decoded, ``</w>`` stripped)."""
    maps: torch.Tensor
    """Raw maps ``(tokens, R, R)``: attention probabilities averaged over heads, layers and all steps."""
    step_maps: dict[int, torch.Tensor] = field(default_factory=dict)
    """Raw maps ``(tokens, R, R)`` of single denoising steps (loop indices), averaged over heads and layers."""

    def normalized(self, step: int | None = None) -> torch.Tensor:
        """The maps of all steps (``step=None``) or of one step, each stretched to ``[0, 1]``."""
        return normalize_maps(self.maps if step is None else self.step_maps[step])


class CrossAttentionAccumulator(AttentionRecorder):
    """Running sums of head-averaged cross-attention maps over layers and denoising steps.

    Install with :meth:`attached` (the originals come back after, also on error); the caller
    advances :attr:`step` once per denoising step. Every call of every installed layer adds its
    head-averaged probabilities ``(images, tokens, h, w)`` to the sum of its query-grid size; the
    steps in ``keep_steps`` also get sums of their own.

    Args:
        resolution: Height and width ``(R, R)`` or ``R`` of the maps :meth:`maps` returns.
        keep_steps: Denoising step indices whose own maps are kept; ``None`` keeps none.
        keep_last: Keep only the last ``keep_last`` batch entries (the conditional half under
            classifier-free guidance); ``None`` keeps the batch.
    """

    def __init__(
        self,
        resolution: int | tuple[int, int],
        keep_steps: Iterable[int] | None = None,
        keep_last: int | None = None,
    ) -> None:
        super().__init__(steps=None, keep_last=keep_last)
        self.resolution: tuple[int, int] = (
            (resolution, resolution) if isinstance(resolution, int) else (int(resolution[0]), int(resolution[1]))
        )
        if min(self.resolution) < 1:
            raise ValueError(f"resolution={resolution!r} must be >= 1.")
        self.keep_steps = set() if keep_steps is None else {int(s) for s in keep_steps}
        self.latent_hw: tuple[int, int] | None = None
        self.reset()

    def reset(self) -> None:
        """Forget every sum and start counting steps from 0 again."""
        super().reset()
        self._sums: dict[tuple[int, int], torch.Tensor] = {}
        self._count = 0
        self._step_sums: dict[int, dict[tuple[int, int], torch.Tensor]] = {}
        self._step_counts: dict[int, int] = {}

    @property
    def steps_recorded(self) -> list[int]:
        """The kept steps that have maps."""
        return sorted(self._step_sums)

    def processors(self, originals: dict[str, Any], names: Iterable[str]) -> dict[str, Any]:
        """A full processor dict: accumulating processors for ``names``, the originals elsewhere."""
        chosen = set(names)
        unknown = chosen - set(originals)
        if unknown:
            raise ValueError(f"no attention processor named {sorted(unknown)}; available: {sorted(originals)}.")
        return {
            name: CrossAttentionMapProcessor(self, layer_name(name), proc) if name in chosen else proc
            for name, proc in originals.items()
        }

    @contextlib.contextmanager
    def attached(self, model: torch.nn.Module, names: Iterable[str]) -> Iterator[CrossAttentionAccumulator]:
        """Install the processors on ``names`` of ``model`` for the duration; also notes the input's spatial size."""

        def note_size(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            sample = args[0] if args else kwargs.get("sample")
            if isinstance(sample, torch.Tensor) and sample.ndim == 4:
                self.latent_hw = (int(sample.shape[-2]), int(sample.shape[-1]))

        handle = model.register_forward_pre_hook(note_size, with_kwargs=True)
        try:
            with super().attached(model, names):
                yield self
        finally:
            handle.remove()

    def _grid(self, queries: int, query_hw: tuple[int, int] | None) -> tuple[int, int]:
        """The ``(h, w)`` grid of ``queries`` pixels: the input size halved (rounding up) 0, 1, 2... times."""
        if self.latent_hw is not None:
            h, w = self.latent_hw
            for _ in range(16):
                if h * w == queries:
                    return h, w
                h, w = math.ceil(h / 2), math.ceil(w / 2)
        if query_hw is not None and query_hw[0] * query_hw[1] == queries:
            return query_hw
        raise ValueError(f"cannot lay {queries} query pixels out on a grid (input size {self.latent_hw}).")

    def accumulate(self, layer: str, probs: torch.Tensor, heads: int, query_hw: tuple[int, int] | None) -> None:
        """Add one layer call's probabilities ``(batch * heads, queries, tokens)`` to the sums."""
        batch = probs.shape[0] // heads
        grid = self._grid(probs.shape[1], query_hw)
        maps = probs.detach().float().reshape(batch, heads, *probs.shape[1:]).mean(dim=1)
        if self.keep_last:
            maps = maps[-self.keep_last :]
        maps = maps.transpose(1, 2).reshape(maps.shape[0], maps.shape[2], *grid)
        _add(self._sums, grid, maps)
        self._count += 1
        if self.step in self.keep_steps:
            _add(self._step_sums.setdefault(self.step, {}), grid, maps)
            self._step_counts[self.step] = self._step_counts.get(self.step, 0) + 1

    def maps(self, step: int | None = None) -> torch.Tensor:
        """Mean maps ``(images, tokens, R, R)`` on the CPU, over all recorded calls (``step=None``) or one kept step."""
        if step is None:
            sums, count = self._sums, self._count
        elif step in self._step_sums:
            sums, count = self._step_sums[step], self._step_counts[step]
        else:
            raise KeyError(f"step {step} has no maps; kept steps with maps: {self.steps_recorded}.")
        if not count:
            raise ValueError("no cross-attention was recorded: did the model run with the processors attached?")
        total = torch.stack([_resize(s, self.resolution) for s in sums.values()]).sum(dim=0)
        return (total / count).cpu()


def _add(sums: dict[tuple[int, int], torch.Tensor], grid: tuple[int, int], maps: torch.Tensor) -> None:
    sums[grid] = maps if grid not in sums else sums[grid] + maps


def _resize(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(N, C, h, w)`` bilinearly resized to ``size`` (unchanged when it has that size)."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)


class CrossAttentionMapProcessor(RecordingAttnProcessor):
    """Computes like diffusers' ``AttnProcessor`` and adds the probabilities to a :class:`CrossAttentionAccumulator`.

    Args:
        recorder: The accumulator.
        layer: The layer name.
        original: The processor this one replaces (its output is reproduced).
    """

    recorder: CrossAttentionAccumulator

    def __init__(self, recorder: CrossAttentionAccumulator, layer: str, original: Any) -> None:
        super().__init__(recorder, layer, original)

    def _record(
        self,
        heads: int,
        probs: torch.Tensor,
        heads_out: torch.Tensor,
        output: torch.Tensor,
        query_hw: tuple[int, int] | None,
        is_cross: bool,
    ) -> None:
        if is_cross:
            self.recorder.accumulate(self.layer, probs, heads, query_hw)


def overlay(image: torch.Tensor, heat: torch.Tensor, colormap: str = "jet", alpha: float = 0.5) -> torch.Tensor:
    """``image`` ``(3, H, W)`` in ``[0, 1]`` blended with ``heat`` ``(h, w)`` in ``[0, 1]`` coloured by ``colormap``."""
    from matplotlib import colormaps

    heat = _resize(heat[None, None].float(), (image.shape[-2], image.shape[-1]))[0, 0].clamp(0, 1)
    rgb = torch.from_numpy(colormaps[colormap](heat.numpy())[..., :3]).float().permute(2, 0, 1)
    return (1 - alpha) * image.float().cpu() + alpha * rgb


def token_strip(tiles: Sequence[torch.Tensor], labels: Sequence[str], title: str | None = None) -> PIL.Image.Image:
    """Tiles ``(3, H, W)`` side by side, each labelled below (labels cut to the tile width), titled above."""
    if len(tiles) != len(labels):
        raise ValueError(f"{len(tiles)} tiles but {len(labels)} labels; give one label per tile.")
    height, width = tiles[0].shape[-2:]
    scale = max(1, math.ceil(_MIN_TILE / max(height, width)))
    tile_w, tile_h = width * scale, height * scale
    font = PIL.ImageFont.load_default()
    line = 14
    top = line + _PAD if title else _PAD
    canvas = PIL.Image.new("RGB", (len(tiles) * (tile_w + _PAD) + _PAD, top + tile_h + line + _PAD), "white")
    draw = PIL.ImageDraw.Draw(canvas)
    if title:
        draw.text((_PAD, _PAD + line // 2), _fit(draw, title, canvas.width - 2 * _PAD, font), "black", font, "lm")
    for i, (tile, label) in enumerate(zip(tiles, labels)):
        x = _PAD + i * (tile_w + _PAD)
        canvas.paste(to_pil(tile).convert("RGB").resize((tile_w, tile_h), PIL.Image.Resampling.NEAREST), (x, top))
        text = _fit(draw, label, tile_w, font)
        draw.text((x + tile_w / 2, top + tile_h + line / 2 + 1), text, "black", font, "mm")
    return canvas


def _fit(draw: PIL.ImageDraw.ImageDraw, text: str, width: int, font: Any) -> str:
    """``text``, shortened with an ellipsis until it is at most ``width`` pixels wide."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."
