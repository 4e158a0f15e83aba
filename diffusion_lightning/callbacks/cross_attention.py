"""Log per-token cross-attention heatmaps of text-to-image samples during training (in the spirit of DAAM)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import PIL.Image
import torch
from typing_extensions import override

from diffusion_lightning.callbacks.sampling import SamplingCallback
from diffusion_lightning.loggers.media import log_image
from diffusion_lightning.modules.base import DiffusionModule
from diffusion_lightning.utils.attention import SUPPORTED_PROCESSORS, attention_processors, layer_name, match_layers
from diffusion_lightning.utils.cross_attention import (
    CrossAttentionAccumulator,
    TokenMaps,
    cross_attention_layers,
    overlay,
    prompt_tokens,
    token_strip,
)

__all__ = ["CrossAttentionHeatmapLogger"]


class CrossAttentionHeatmapLogger(SamplingCallback):
    """Generate fixed prompts every few epochs and log, per prompt token, where the image attended to it.

    At the end of every ``every_n_epochs``-th validation epoch (rank 0, not in the sanity check)
    the callback installs accumulating processors
    (:class:`~diffusion_lightning.utils.cross_attention.CrossAttentionMapProcessor`) on the
    cross-attention layers (``attn2``) of the module's UNet, generates one image per prompt with
    the module's pipeline (image ``i`` from seed ``seed + i``), and
    puts the original processors back (also when sampling fails). Each layer call's attention
    probabilities ``softmax(QK^T / sqrt(d))`` over the text tokens are averaged over heads
    (under classifier-free guidance only the conditional half counts), laid out on the layer's
    query grid, upsampled bilinearly to ``resolution`` and averaged over layers and all denoising
    steps; only running sums are kept.

    Per prompt ``i`` it logs ``attention/cross/<i>``: the image, then one overlay per real token
    (start, end and padding tokens are skipped) labelled with the token's text, each map
    stretched to ``[0, 1]`` and drawn with ``colormap`` at opacity ``alpha``; with
    ``timestep_maps`` also ``attention/cross/<i>/t=<step>`` from single steps. The strips are
    saved as ``<default_root_dir>/attention/cross/step=<global_step>/<i>.png`` (and
    ``<i>_t=<step>.png``) with the prompt in ``<i>.txt``. The raw maps of the last pass are in
    :attr:`maps` (one :class:`~diffusion_lightning.utils.cross_attention.TokenMaps` per prompt);
    :meth:`record` runs a pass on demand.

    A module without a tokenizer or without cross-attention layers (the class-conditioned DDPM)
    is a configuration error: ``setup`` raises ``ValueError``. With ``EMAWeightAveraging`` list
    this callback before the EMA callback so the averaged weights are in place.

    Args:
        prompts: The prompts to generate; default the module's ``validation_prompts``.
        negative_prompts: One negative prompt per prompt, or one for all; default none.
        every_n_epochs: Log after every n-th epoch's validation (>= 1).
        seed: Image ``i`` is generated from seed ``seed + i``.
        layers: Glob patterns over the cross-attention layer names (``up_blocks.*``,
            ``mid_block.attentions.0.transformer_blocks.0.attn2``); default every cross-attention layer.
        resolution: Height and width of the maps; default the image size.
        timestep_maps: Maps of single denoising steps as well: ``None`` or ``0`` for none, an
            integer ``K`` for ``K`` evenly spaced steps (first and last included; at most every
            step), or a list of step indices (loop indices, negative ones count from the end).
        num_inference_steps: Denoising steps; default the module's ``num_inference_steps``.
        guidance_scale: Classifier-free guidance scale; default the module's ``guidance_scale``.
        scheduler: Sampling scheduler (``ddpm``, ``ddim``, ``dpm``, ``euler``, ``euler_a``,
            ``unipc``); default the module's ``sampler``.
        colormap: A matplotlib colormap name for the overlays.
        alpha: Opacity of the heatmap over the image, in ``[0, 1]``.
    """

    def __init__(
        self,
        prompts: list[str] | None = None,
        negative_prompts: list[str] | None = None,
        every_n_epochs: int = 1,
        seed: int = 0,
        layers: list[str] | None = None,
        resolution: int | None = None,
        timestep_maps: int | list[int] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        scheduler: str | None = None,
        colormap: str = "jet",
        alpha: float = 0.5,
    ) -> None:
        from matplotlib import colormaps

        super().__init__(
            every_n_epochs, None, prompts, negative_prompts, seed, num_inference_steps, guidance_scale, scheduler
        )
        if layers is not None and len(layers) == 0:
            raise ValueError("layers=[] is empty; give glob patterns, or None for every cross-attention layer.")
        if resolution is not None and resolution < 1:
            raise ValueError(f"resolution={resolution!r} must be >= 1, or None for the image size.")
        if isinstance(timestep_maps, bool) or (isinstance(timestep_maps, int) and timestep_maps < 0):
            raise ValueError(f"timestep_maps={timestep_maps!r} must be a count >= 0, a list of step indices or None.")
        if isinstance(timestep_maps, list) and len(timestep_maps) == 0:
            raise ValueError("timestep_maps=[] is empty; give step indices, a count, or None for aggregated maps only.")
        if colormap not in colormaps:
            raise ValueError(f"colormap={colormap!r} is not a matplotlib colormap (e.g. 'jet', 'inferno').")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha={alpha!r} must be in [0, 1].")
        self.layers = None if layers is None else list(layers)
        self.resolution = resolution
        self.timestep_maps = list(map(int, timestep_maps)) if isinstance(timestep_maps, list) else timestep_maps
        self.colormap = colormap
        self.alpha = alpha
        self.maps: list[TokenMaps] = []
        """The maps of the last pass, one entry per prompt."""

    # ------------------------------------------------------------------ validation of the module

    def _layer_names(self, module: DiffusionModule) -> list[str]:
        """The cross-attention processor names to record; ``ValueError`` when the module is not text-conditioned."""
        denoiser = module.denoiser
        names = cross_attention_layers(denoiser)
        lacks = [] if getattr(module, "tokenizer", None) is not None else ["no tokenizer"]
        if not names:
            lacks.append(f"no cross-attention layers (attn2) in its {type(denoiser).__name__}")
        if lacks:
            raise ValueError(
                f"CrossAttentionHeatmapLogger needs a text-conditioned module (a tokenizer, and cross-attention "
                f"layers in its denoiser); {type(module).__name__} has {' and '.join(lacks)}. Use it with a "
                "LatentDiffusionModule, or AttentionHeatmapLogger for self-attention."
            )
        names = match_layers(names, self.layers)
        processors = attention_processors(denoiser)
        unsupported = {
            layer_name(n): type(processors[n]).__name__
            for n in names
            if not isinstance(processors[n], SUPPORTED_PROCESSORS)
        }
        if unsupported:
            raise ValueError(
                f"layers={self.layers!r} selects layers with processors {unsupported}; attention can be recorded only "
                f"from {[p.__name__ for p in SUPPORTED_PROCESSORS]} (use attention='sdpa' or 'default', not xformers)."
            )
        return names

    def _steps(self, num_inference_steps: int) -> list[int]:
        """The steps whose own maps are kept, as loop indices; ``ValueError`` when one is out of range."""
        n, chosen = num_inference_steps, self.timestep_maps
        if not chosen:
            return []
        if isinstance(chosen, int):
            return sorted({int(i) for i in torch.linspace(0, n - 1, min(chosen, n)).round().long()})
        bad = [i for i in chosen if not -n <= i < n]
        if bad:
            raise ValueError(
                f"timestep_maps={chosen!r} has {bad}; with num_inference_steps={n} indices lie in {-n}..{n - 1}."
            )
        return sorted({i % n for i in chosen})

    @override
    def check(self, trainer: pl.Trainer, pl_module: DiffusionModule) -> None:
        self._layer_names(pl_module)
        self._steps(self.sampling_args(pl_module)[0])

    # ------------------------------------------------------------------ recording

    def record(self, pl_module: DiffusionModule) -> list[TokenMaps]:
        """Generate the prompts at the module's current weights; return (and keep in :attr:`maps`) their token maps."""
        names = self._layer_names(pl_module)
        conditions = self.conditions(pl_module)
        num_steps = self.sampling_args(pl_module)[0]
        pipeline = self.pipeline(pl_module)
        size = getattr(pl_module, "image_size", None) or pipeline.unet.config.sample_size * pipeline.vae_scale_factor
        accumulator = CrossAttentionAccumulator(self.resolution or size, self._steps(num_steps), len(conditions))

        def advance(pipe: Any, i: int, t: Any, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            accumulator.step = i + 1
            return {}

        generators = [torch.Generator().manual_seed(self.seed + i) for i in range(len(conditions))]
        with accumulator.attached(pl_module.denoiser, names):
            images = self.sample(
                pl_module, conditions, pipeline=pipeline, generator=generators, callback_on_step_end=advance
            )
        total = accumulator.maps()
        per_step = {step: accumulator.maps(step) for step in accumulator.steps_recorded}
        self.maps = []
        for i, prompt in enumerate(conditions.values):
            positions, ids, texts = prompt_tokens(pl_module.tokenizer, prompt)
            self.maps.append(
                TokenMaps(
                    prompt=prompt,
                    image=images[i],
                    positions=positions,
                    token_ids=ids,
                    tokens=texts,
                    maps=total[i, positions],
                    step_maps={step: maps[i, positions] for step, maps in per_step.items()},
                )
            )
        return self.maps

    # ------------------------------------------------------------------ rendering and logging

    def render(self, maps: TokenMaps, step: int | None = None) -> PIL.Image.Image:
        """The strip of one prompt: its image, then each token's normalised map over it, labelled."""
        heats = maps.normalized(step)
        tiles = [maps.image] + [overlay(maps.image, heat, self.colormap, self.alpha) for heat in heats]
        title = maps.prompt if step is None else f"{maps.prompt}  (step {step})"
        return token_strip(tiles, ["image", *maps.tokens], title)

    @override
    def on_sample(self, trainer: pl.Trainer, pl_module: DiffusionModule) -> None:
        folder = Path(trainer.default_root_dir) / "attention" / "cross" / f"step={trainer.global_step:06d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i, maps in enumerate(self.record(pl_module)):
            strips = {f"attention/cross/{i}": (self.render(maps), f"{i:02d}.png")}
            for step in maps.step_maps:
                strips[f"attention/cross/{i}/t={step}"] = (self.render(maps, step), f"{i:02d}_t={step}.png")
            for key, (strip, name) in strips.items():
                log_image(trainer, key, strip)
                strip.save(folder / name)
            (folder / f"{i:02d}.txt").write_text(maps.prompt + "\n", encoding="utf-8")
