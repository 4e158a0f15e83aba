"""Stable Diffusion 3 fine-tuning: the training of :class:`~diffusion_lightning.modules.flux.FluxModule`, SD3's inputs.

SD3 and Flux share everything but the denoiser call: flow matching with the VAE's shift and scale,
frozen CLIP and T5 encoders, ``full`` and ``lora`` training of a transformer, the
``FlowMatchEulerDiscreteScheduler`` sampler, LoRA files of ``transformer_lora_layers``. What SD3
changes is done as diffusers' ``StableDiffusion3Pipeline.encode_prompt`` and
``train_dreambooth_lora_sd3.py`` do it: three encoders (two CLIP with projection, one T5), a text
sequence of the CLIP hidden states (zero-padded to the T5 width) followed by the T5 ones, pooled
embeddings of both CLIP encoders side by side, unpacked latents (the transformer patchifies them)
and the timestep ``sigma * 1000``; no guidance embedding: SD3 samples with classifier-free guidance.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from typing_extensions import override

from diffusion_lightning.modules.base import SamplerName
from diffusion_lightning.modules.flux import FluxModule
from diffusion_lightning.nets.sd3 import SD3Components, build_sd3_components, load_sd3_components

__all__ = ["SD3_SEQUENCE_LENGTH", "StableDiffusion3Module"]

#: T5 tokens per prompt: ``StableDiffusion3Pipeline``'s default ``max_sequence_length``.
SD3_SEQUENCE_LENGTH = 256


class StableDiffusion3Module(FluxModule):
    """Fine-tune a Stable Diffusion 3 model (VAE + two CLIP and one T5 encoder + ``SD3Transformer2DModel``).

    Takes the arguments of :class:`~diffusion_lightning.modules.flux.FluxModule` (``training_guidance_scale``
    is unused: SD3 has no guidance embedding); what differs:

    - ``pretrained`` is an SD3 pipeline folder or hub id (``transformer``, ``vae``, ``text_encoder``,
      ``text_encoder_2``, ``text_encoder_3``, their tokenizers, ``scheduler``), e.g.
      ``stabilityai/stable-diffusion-3-medium-diffusers``; ``components`` is an
      :class:`~diffusion_lightning.nets.sd3.SD3Components`. A pretrained scheduler's ``shift`` (3.0)
      is also the training shift.
    - ``guidance_scale`` (default 7.0) is classifier-free guidance; the unconditional branch is the
      empty prompt's, which ``prompt_dropout`` trains.
    - Pre-tokenized batches need ``input_ids``, ``input_ids_2`` (CLIP) and ``input_ids_3`` (T5,
      :data:`SD3_SEQUENCE_LENGTH` tokens).
    - Sampling and export use ``StableDiffusion3Pipeline``.
    """

    TEXT_ENCODERS: ClassVar[tuple[str, ...]] = ("text_encoder", "text_encoder_2", "text_encoder_3")
    TOKENIZERS: ClassVar[tuple[str, ...]] = ("tokenizer", "tokenizer_2", "tokenizer_3")
    text_encoder_3: Any
    tokenizer_3: Any

    def __init__(
        self,
        pretrained: str | None = None,
        components: SD3Components | None = None,
        guidance_scale: float = 7.0,
        prompt_dropout: float = 0.0,
        sampler: SamplerName = "euler",
        **kwargs: Any,
    ) -> None:
        super().__init__(
            pretrained=pretrained,
            components=components,  # type: ignore[arg-type]
            guidance_scale=guidance_scale,
            prompt_dropout=prompt_dropout,
            sampler=sampler,
            **kwargs,
        )

    @classmethod
    @override
    def load_parts(cls, pretrained: str, revision: str | None = None, variant: str | None = None) -> dict[str, Any]:
        return load_sd3_components(pretrained, revision, variant)

    @classmethod
    @override
    def build_parts(cls, components: Any = None) -> dict[str, Any]:
        return build_sd3_components(components)

    @override
    def default_image_size(self) -> int:
        """The transformer's ``sample_size`` in pixels (1024 for SD3 medium)."""
        return int(self.transformer.config.sample_size) * self.vae_scale_factor

    @override
    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """Both CLIP tokenizers' ids, then the T5 ids (:data:`SD3_SEQUENCE_LENGTH`), padded as the pipeline does."""
        clip = [self._tokenize(tokenizer, prompts) for tokenizer in (self.tokenizer, self.tokenizer_2)]
        return torch.cat([*clip, self._tokenize(self.tokenizer_3, prompts, SD3_SEQUENCE_LENGTH)], dim=1)

    @override
    def encode_prompt(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(prompt_embeds, pooled_prompt_embeds)`` as ``StableDiffusion3Pipeline.encode_prompt`` makes them."""
        lengths = [self.tokenizer.model_max_length, self.tokenizer_2.model_max_length, SD3_SEQUENCE_LENGTH]
        if input_ids.shape[1] != sum(lengths):
            raise ValueError(
                f"input_ids has {input_ids.shape[1]} tokens per prompt; expected {' + '.join(map(str, lengths))} "
                "(the ids of tokenizer, tokenizer_2 and tokenizer_3, each padded to its length)."
            )
        ids, ids_2, ids_3 = input_ids.to(self.device).split(lengths, dim=1)
        with self.text_gradients():
            first = self.text_encoder(ids, output_hidden_states=True)
            second = self.text_encoder_2(ids_2, output_hidden_states=True)
            t5 = self.text_encoder_3(ids_3, output_hidden_states=False)[0]
        clip = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return torch.cat([clip, t5], dim=-2), torch.cat([first[0], second[0]], dim=-1)

    @override
    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """The transformer's velocity for latents ``(B, C, H, W)``; it patchifies them itself."""
        hidden, pooled = self.prompt_embeddings(condition)
        return self.transformer(
            hidden_states=noisy,
            timestep=timesteps,
            encoder_hidden_states=hidden,
            pooled_projections=pooled,
            return_dict=False,
        )[0]

    @override
    def pipeline_class(self) -> type[Any]:
        from diffusers import StableDiffusion3Pipeline

        return StableDiffusion3Pipeline
