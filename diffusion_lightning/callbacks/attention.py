"""Log attention heatmaps and attention statistics of a sampling pass during training."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import lightning.pytorch as pl
import PIL.Image
import torch
from typing_extensions import override

from diffusion_lightning.callbacks.samples import row_label
from diffusion_lightning.callbacks.sampling import SamplingCallback
from diffusion_lightning.loggers.media import log_image
from diffusion_lightning.losses import check_choice
from diffusion_lightning.modules.base import DiffusionModule
from diffusion_lightning.utils.attention import (
    SUPPORTED_PROCESSORS,
    AttentionRecord,
    AttentionRecorder,
    attention_processors,
    attention_statistics,
    layer_name,
    match_layers,
)
from diffusion_lightning.utils.images import label_grid, make_grid

__all__ = ["HEATMAPS", "AttentionHeatmapLogger"]

#: What a self-attention tile shows: ``received`` = mean attention each key location receives
#: over all queries; ``center`` = the attention of the centre query.
HEATMAPS: tuple[str, ...] = ("received", "center")

_MIN_TILE = 32  # heatmap tiles are upscaled (nearest) to at least this many pixels a side


class AttentionHeatmapLogger(SamplingCallback):
    """Record the attention of a fixed sampling pass every few epochs; log heatmaps and statistics.

    At the end of every ``every_n_epochs``-th validation epoch, rank 0 installs recording
    processors (:class:`~diffusion_lightning.utils.attention.RecordingAttnProcessor`) on the chosen
    diffusers ``Attention`` layers of the module's ``denoiser``, generates one image per class of
    ``classes`` with the module's pipeline and a generator seeded by ``seed``, and puts the
    original processors back (also when sampling fails). The images are of ``classes`` for a
    class-conditioned model and of ``prompts`` for a text-to-image one (its ``UNet2DConditionModel``
    has self-attention ``attn1`` and cross-attention ``attn2`` layers; both are recorded). Under
    classifier-free guidance only the conditional half of the batch is kept.

    For each layer and recorded step it logs one image, ``attention/<layer>/t=<step>`` (``step``
    is the index in the sampling loop), with one row per class or prompt and one column per head. For
    self-attention a tile is a map over the feature map: with ``heatmap="received"`` the mean
    attention each location receives from all queries (where the layer looks, whatever asks),
    with ``"center"`` the attention of the centre query. For cross-attention (keys are text
    tokens) the columns are tokens and a tile is that token's attention over the image, averaged
    over heads (for per-token maps averaged over layers and steps and overlaid on the generated
    images, see :class:`~diffusion_lightning.callbacks.cross_attention.CrossAttentionHeatmapLogger`).
    Every tile is contrast-stretched to its own min..max; the scalars carry the absolute levels.

    Scalars, averaged over the recorded steps, the images and the queries:
    ``attention/<layer>/entropy`` (``-sum p log p`` over keys, in ``[0, log(keys)]``),
    ``attention/<layer>/sparsity`` (probability mass on the top ``top_fraction`` of keys),
    ``attention/<layer>/output_norm`` (L2 norm of the projected attention output, before the
    residual), and the same per head under ``attention/<layer>/head<h>/`` (the head's norm is that
    of its ``probs @ V``). Loggers without images (CSV) get the scalars and a one-time warning.

    A model without ``Attention`` modules (the default UNet has ``attention_levels: []``) is a
    configuration error: ``setup`` raises ``ValueError`` naming the model class. Probabilities are
    kept on the CPU as ``(images, heads, queries, keys)`` per layer and step, so pick ``layers``
    and ``timestep_indices`` narrowly for large feature maps. With ``EMAWeightAveraging`` list
    this callback before the EMA callback so the averaged weights are in place.

    Args:
        every_n_epochs: Record after every n-th epoch's validation (>= 1).
        classes: The classes to generate, one image each (the heatmap rows); default all.
        prompts: The prompts of a text-to-image model (the rows); default its ``validation_prompts``.
        negative_prompts: One negative prompt per prompt, or one for all.
        seed: Seed of the sampling noise.
        layers: Glob patterns over the attention processor names (``mid_block.*``,
            ``down_blocks.1.attentions.0``); default every attention layer.
        timestep_indices: Denoising steps to record, as indices into the sampling loop (negative
            ones count from the end); default the first, middle and last step.
        heatmap: Self-attention tiles: ``received`` or ``center`` (see above).
        num_inference_steps: Denoising steps; default the module's ``num_inference_steps``.
        guidance_scale: Classifier-free guidance scale; default the module's ``guidance_scale``.
        scheduler: Sampling scheduler (``ddpm``, ``ddim``, ``dpm``, ``euler``, ``euler_a``,
            ``unipc``); default the module's ``sampler``.
        top_fraction: Fraction of keys whose probability mass is the sparsity, in ``(0, 1]``.
        colormap: A matplotlib colormap name for the heatmaps.
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        classes: list[int] | None = None,
        prompts: list[str] | None = None,
        negative_prompts: list[str] | None = None,
        seed: int = 0,
        layers: list[str] | None = None,
        timestep_indices: list[int] | None = None,
        heatmap: str = "received",
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        scheduler: str | None = None,
        top_fraction: float = 0.1,
        colormap: str = "viridis",
    ) -> None:
        from matplotlib import colormaps

        super().__init__(
            every_n_epochs, classes, prompts, negative_prompts, seed, num_inference_steps, guidance_scale, scheduler
        )
        check_choice("heatmap", heatmap, HEATMAPS)
        if layers is not None and len(layers) == 0:
            raise ValueError("layers=[] is empty; give glob patterns, or None for every attention layer.")
        if timestep_indices is not None and len(timestep_indices) == 0:
            raise ValueError("timestep_indices=[] is empty; give step indices, or None for first, middle and last.")
        if not 0.0 < top_fraction <= 1.0:
            raise ValueError(f"top_fraction={top_fraction!r} must be in (0, 1].")
        if colormap not in colormaps:
            raise ValueError(f"colormap={colormap!r} is not a matplotlib colormap (e.g. 'viridis', 'magma').")
        self.layers = None if layers is None else list(layers)
        self.timestep_indices = None if timestep_indices is None else [int(i) for i in timestep_indices]
        self.heatmap = heatmap
        self.top_fraction = top_fraction
        self.colormap = colormap

    # ------------------------------------------------------------------ validation of the model

    def _layer_names(self, pl_module: DiffusionModule) -> list[str]:
        """The processor names to record; raises ``ValueError`` when the model cannot be recorded."""
        denoiser = pl_module.denoiser
        processors = attention_processors(denoiser)
        if not processors:
            raise ValueError(
                f"AttentionHeatmapLogger: the denoiser of {type(pl_module).__name__} ({type(denoiser).__name__}) has "
                "no diffusers Attention modules; build it with attention (net.attention_levels, net.mid_attention) "
                "or remove the callback."
            )
        names = match_layers(processors, self.layers)
        unsupported = {
            layer_name(n): type(processors[n]).__name__
            for n in names
            if not isinstance(processors[n], SUPPORTED_PROCESSORS)
        }
        if unsupported:
            raise ValueError(
                f"layers={self.layers!r} selects layers with processors {unsupported}; attention can be recorded "
                f"only from {[p.__name__ for p in SUPPORTED_PROCESSORS]}."
            )
        return names

    def _steps(self, num_inference_steps: int) -> list[int]:
        """``timestep_indices`` as non-negative loop indices; raises ``ValueError`` when one is out of range."""
        n = num_inference_steps
        if self.timestep_indices is None:
            return sorted({0, n // 2, n - 1})
        bad = [i for i in self.timestep_indices if not -n <= i < n]
        if bad:
            raise ValueError(
                f"timestep_indices={self.timestep_indices!r} has {bad}; with num_inference_steps={n} "
                f"indices lie in {-n}..{n - 1}."
            )
        return sorted({i % n for i in self.timestep_indices})

    @override
    def check(self, trainer: pl.Trainer, pl_module: DiffusionModule) -> None:
        self._layer_names(pl_module)
        self._steps(self.sampling_args(pl_module)[0])

    # ------------------------------------------------------------------ recording

    def record(self, pl_module: DiffusionModule) -> list[AttentionRecord]:
        """Run the fixed sampling pass at the module's current weights and return what was recorded."""
        return self._record(pl_module)[0]

    def _record(self, pl_module: DiffusionModule) -> tuple[list[AttentionRecord], list[str]]:
        names = self._layer_names(pl_module)
        conditions = self.conditions(pl_module)
        recorder = AttentionRecorder(self._steps(self.sampling_args(pl_module)[0]), keep_last=len(conditions))

        def advance(pipe: Any, i: int, t: Any, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            recorder.step = i + 1
            return {}

        with recorder.attached(pl_module.denoiser, names):
            self.sample(pl_module, conditions, callback_on_step_end=advance)
        return recorder.records, [row_label(name) for name in conditions.names]

    @override
    def on_sample(self, trainer: pl.Trainer, pl_module: DiffusionModule) -> None:
        records, row_labels = self._record(pl_module)
        images, scalars = self._render(records, row_labels)
        for key, image in images.items():
            log_image(trainer, key, image)
        # one value per layer and statistic; rank 0 only, like the images (the pass runs there alone)
        pl_module.log_dict(scalars, on_step=False, on_epoch=True, rank_zero_only=True)

    # ------------------------------------------------------------------ rendering

    def _render(
        self, records: list[AttentionRecord], row_labels: list[str] | None = None
    ) -> tuple[dict[str, PIL.Image.Image], dict[str, float]]:
        """Heatmap images by logging key and scalar statistics by logging key, from records.

        Several records of one layer and step (schedulers that call the network twice per step)
        are averaged.
        """
        groups: dict[tuple[str, int], list[AttentionRecord]] = defaultdict(list)
        for record in records:
            groups[(record.layer, record.step)].append(record)
        images: dict[str, PIL.Image.Image] = {}
        per_layer: dict[str, list[dict[str, torch.Tensor]]] = defaultdict(list)
        for (layer, step), group in groups.items():
            merged = _merge(group)
            images[f"attention/{layer}/t={step}"] = self._heatmap_image(merged, row_labels)
            stats = attention_statistics(merged.probs, self.top_fraction)
            stats["output_norm"] = merged.head_output_norm.mean(dim=0)
            stats["layer_output_norm"] = merged.output_norm.mean()
            per_layer[layer].append(stats)
        scalars: dict[str, float] = {}
        for layer, stats_list in per_layer.items():
            mean = {k: torch.stack([s[k] for s in stats_list]).mean(dim=0) for k in stats_list[0]}
            scalars[f"attention/{layer}/entropy"] = float(mean["entropy"].mean())
            scalars[f"attention/{layer}/sparsity"] = float(mean["sparsity"].mean())
            scalars[f"attention/{layer}/output_norm"] = float(mean["layer_output_norm"])
            for head in range(mean["entropy"].numel()):
                for name in ("entropy", "sparsity", "output_norm"):
                    scalars[f"attention/{layer}/head{head}/{name}"] = float(mean[name][head])
        return images, scalars

    def _maps(self, record: AttentionRecord) -> torch.Tensor:
        """The tiles of one record, ``(rows, columns, h, w)``."""
        probs = record.probs
        if record.is_cross:  # columns are tokens: each token's attention over the query map
            maps = probs.mean(dim=1).transpose(1, 2)
            hw = record.query_hw or (1, probs.shape[2])
        else:  # columns are heads: a map over the key locations (= the query grid)
            if self.heatmap == "received":
                maps = probs.mean(dim=2)
            else:
                h, w = record.query_hw or (1, probs.shape[2])
                maps = probs[:, :, (h // 2) * w + w // 2, :]
            hw = record.query_hw or (1, probs.shape[3])
        return maps.reshape(*maps.shape[:2], *hw)

    def _heatmap_image(self, record: AttentionRecord, row_labels: list[str] | None) -> PIL.Image.Image:
        from matplotlib import colormaps

        maps = self._maps(record)
        rows, cols, h, w = maps.shape
        flat = maps.reshape(rows * cols, h * w)
        low, high = flat.min(dim=1, keepdim=True).values, flat.max(dim=1, keepdim=True).values
        flat = (flat - low) / (high - low).clamp_min(1e-12)
        rgb = torch.from_numpy(colormaps[self.colormap](flat.numpy())[..., :3]).float()
        tiles = rgb.reshape(rows * cols, h, w, 3).permute(0, 3, 1, 2)
        grid = make_grid(tiles, nrow=cols)
        scale = max(1, -(-_MIN_TILE // max(h, w)))
        labels = row_labels if row_labels is not None and len(row_labels) == rows else None
        return label_grid(grid, labels, scale=scale)


def _merge(group: list[AttentionRecord]) -> AttentionRecord:
    """One record whose tensors are the mean of the group's."""
    if len(group) == 1:
        return group[0]
    first = group[0]
    return AttentionRecord(
        layer=first.layer,
        step=first.step,
        probs=torch.stack([r.probs for r in group]).mean(dim=0),
        query_hw=first.query_hw,
        is_cross=first.is_cross,
        head_output_norm=torch.stack([r.head_output_norm for r in group]).mean(dim=0),
        output_norm=torch.stack([r.output_norm for r in group]).mean(dim=0),
    )
