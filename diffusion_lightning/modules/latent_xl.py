"""Stable Diffusion XL fine-tuning: :class:`LatentDiffusionModule` with SDXL's two text encoders and size conditioning.

Everything but the conditioning is the latent module's: VAE latents, training modes, LoRA,
prompt dropout, prior preservation, the latent cache, trained-weights-only checkpoints and export.
What SDXL adds (see :mod:`~diffusion_lightning.nets.latent_xl`) is encoded as diffusers'
``StableDiffusionXLPipeline.encode_prompt`` and ``train_text_to_image_sdxl.py`` do it: the
prompt embeddings are the two encoders' penultimate hidden states side by side, the pooled
embedding is the second encoder's ``text_embeds``, and each image's original size, crop corner and
target size become the UNet's ``time_ids``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from typing_extensions import override

from diffusion_lightning.modules.latent import LatentDiffusionModule
from diffusion_lightning.nets.latent_xl import (
    NUM_TIME_IDS,
    XLComponents,
    build_time_ids,
    build_xl_components,
    load_xl_components,
)

__all__ = ["StableDiffusionXLModule"]


class StableDiffusionXLModule(LatentDiffusionModule):
    """Fine-tune a Stable Diffusion XL model (VAE + two CLIP text encoders + an SDXL ``UNet2DConditionModel``).

    Takes every argument of :class:`~diffusion_lightning.modules.latent.LatentDiffusionModule`;
    what differs:

    - ``pretrained`` is an SDXL pipeline folder or hub id (``unet``, ``vae``, ``text_encoder``,
      ``text_encoder_2``, ``tokenizer``, ``tokenizer_2``, ``scheduler``), e.g.
      ``stabilityai/stable-diffusion-xl-base-1.0``; ``components`` is an
      :class:`~diffusion_lightning.nets.latent_xl.XLComponents`.
    - Both text encoders follow the training mode: ``text_encoder`` mode and
      ``train_text_encoder`` train both, ``lora_text_encoder`` adapts both (saved as
      ``text_encoder_lora_layers`` and ``text_encoder_2_lora_layers``).
    - Batches may carry ``original_size`` and ``crop_top_left``, ``(B, 2)`` integer tensors
      (height/width of each image before resizing; top/left of its crop), which become the UNet's
      time ids; a batch without them conditions on the image's own ``(H, W)`` and ``(0, 0)``, as
      the pipeline does when sampling. Pre-tokenized batches need ``input_ids`` and ``input_ids_2``.
    - Prompt dropout replaces the prompt by the empty prompt for both encoders, so the dropped
      rows get the empty prompt's hidden states and pooled embedding (the latent module's
      convention, and ``train_text_to_image_sdxl.py``'s), not SDXL's zeroed embeddings. The
      pipelines it builds and exports therefore have ``force_zeros_for_empty_prompt=False``:
      classifier-free guidance's unconditional branch is the empty prompt's, as trained.
    - Sampling (``build_pipeline``, the sampling callbacks, ``evaluate``, ``sample``) and export use
      ``StableDiffusionXLPipeline``; a LoRA export is the file
      ``StableDiffusionXLPipeline.load_lora_weights`` reads.

    The condition a training step passes around is one integer tensor per batch: the first
    tokenizer's ids, the second's, then the :data:`~diffusion_lightning.nets.latent_xl.NUM_TIME_IDS`
    time ids, so that the shared code (prompt dropout, prior preservation's concatenation)
    handles it as the latent module's token ids.

    Args:
        pretrained: An SDXL pipeline folder or hub id; ``None`` builds the parts from ``components``.
        components: Parts built from scratch, used when ``pretrained`` is ``None``.
        **kwargs: The arguments of :class:`~diffusion_lightning.modules.latent.LatentDiffusionModule`.
    """

    TEXT_ENCODERS: ClassVar[tuple[str, ...]] = ("text_encoder", "text_encoder_2")
    TOKENIZERS: ClassVar[tuple[str, ...]] = ("tokenizer", "tokenizer_2")
    text_encoder_2: Any
    tokenizer_2: Any

    def __init__(self, pretrained: str | None = None, components: XLComponents | None = None, **kwargs: Any) -> None:
        super().__init__(pretrained=pretrained, components=components, **kwargs)

    @classmethod
    @override
    def load_parts(cls, pretrained: str, revision: str | None = None, variant: str | None = None) -> dict[str, Any]:
        return load_xl_components(pretrained, revision, variant)

    @classmethod
    @override
    def build_parts(cls, components: Any = None) -> dict[str, Any]:
        return build_xl_components(components)

    # ------------------------------------------------------------------ conditioning

    @override
    def encode_prompt(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(prompt_embeds, pooled_prompt_embeds)`` of both tokenizers' ids side by side, as SDXL's pipeline does.

        ``prompt_embeds`` ``(B, L, width_1 + width_2)``: the penultimate hidden states of both
        encoders, concatenated feature-wise; ``pooled_prompt_embeds`` ``(B, projection_dim)``: the
        second encoder's ``text_embeds``. With gradients only when a text encoder trains.
        """
        lengths = [tokenizer.model_max_length for tokenizer in self.tokenizers]
        if input_ids.shape[1] != sum(lengths):
            raise ValueError(
                f"input_ids has {input_ids.shape[1]} tokens per prompt; expected {' + '.join(map(str, lengths))} "
                "(the ids of tokenizer, then of tokenizer_2, each padded to its model_max_length)."
            )
        ids, ids_2 = input_ids.to(self.device).split(lengths, dim=1)
        with self.text_gradients():
            first = self.text_encoder(ids, output_hidden_states=True)
            second = self.text_encoder_2(ids_2, output_hidden_states=True)
        hidden = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
        return hidden, second.text_embeds

    def time_ids(self, batch: Any) -> torch.Tensor:
        """The batch's ``(B, 6)`` size and crop conditioning (see :func:`build_time_ids`).

        The target size is the images' ``(H, W)``; ``original_size`` and ``crop_top_left`` come from
        the batch when it has them.
        """
        images = batch["images"]
        height, width = images.shape[-2:]
        return build_time_ids(
            (int(height), int(width)), images.shape[0], batch.get("original_size"), batch.get("crop_top_left")
        ).to(self.device)

    @override
    def unpack_batch(self, batch: Any, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        latents, input_ids = super().unpack_batch(batch, generator)
        return latents, torch.cat([input_ids, self.time_ids(batch)], dim=1)

    @override
    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        hidden, pooled = self.prompt_embeddings(condition[:, :-NUM_TIME_IDS])
        added = {"text_embeds": pooled, "time_ids": condition[:, -NUM_TIME_IDS:].to(hidden.dtype)}
        return self.unet(noisy, timesteps, encoder_hidden_states=hidden, added_cond_kwargs=added, return_dict=False)[0]

    # ------------------------------------------------------------------ pipelines

    @override
    def pipeline_class(self) -> type[Any]:
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline

    @override
    def pipeline_options(self) -> dict[str, Any]:
        """The unconditional branch is the empty prompt's (as prompt dropout trains it); no invisible watermark."""
        return {"force_zeros_for_empty_prompt": False, "add_watermarker": False}
