"""Flux fine-tuning: :class:`LatentDiffusionModule` with Flux's transformer, two text encoders and packed latents.

A subclass rather than a sibling, because nearly everything a latent model needs is the latent
module's unchanged: VAE latents (shifted by the VAE's ``shift_factor``, scaled by its
``scaling_factor``), the ``full`` and ``lora`` training modes with peft adapters, prompt dropout,
the latent cache, trained-weights-only checkpoints, LoRA and merged exports. What Flux changes is
the denoiser call (:meth:`FluxModule.forward`), done as diffusers' ``train_dreambooth_lora_flux.py``
and ``FluxPipeline`` do it: the latents are packed into 2x2-patch tokens with the pipeline's own
static methods, the transformer gets position ids per token, the CLIP encoder's pooled output and
the T5 encoder's hidden states, the timestep as ``sigma`` and, for guidance-distilled checkpoints
(FLUX.1-dev), a constant guidance value. The objective is always flow matching.
"""

from __future__ import annotations

from typing import Any, ClassVar, NoReturn

import torch
from typing_extensions import override

from diffusion_lightning.losses import FLOW
from diffusion_lightning.modules.base import SamplerName
from diffusion_lightning.modules.latent import LatentDiffusionModule
from diffusion_lightning.nets.flux import FluxComponents, build_flux_components, load_flux_components

__all__ = ["FLUX_SEQUENCE_LENGTH", "FluxModule"]

#: T5 tokens per prompt: ``FluxPipeline``'s default ``max_sequence_length``, so that training sees
#: the padded sequence the pipelines (the module's, the exported one) sample with.
FLUX_SEQUENCE_LENGTH = 512
#: The one sampler ``FluxPipeline`` drives: it sets sigmas and the resolution shift ``mu`` on the scheduler.
FLUX_SAMPLERS = ("euler",)


class FluxModule(LatentDiffusionModule):
    """Fine-tune a Flux model (VAE + CLIP and T5 text encoders + ``FluxTransformer2DModel``) by flow matching.

    Takes the arguments of :class:`~diffusion_lightning.modules.latent.LatentDiffusionModule`;
    what differs:

    - ``pretrained`` is a Flux pipeline folder or hub id (``transformer``, ``vae``,
      ``text_encoder``, ``text_encoder_2``, ``tokenizer``, ``tokenizer_2``, ``scheduler``), e.g.
      ``black-forest-labs/FLUX.1-dev``; ``components`` is a
      :class:`~diffusion_lightning.nets.flux.FluxComponents`.
    - ``prediction_type`` is ``flow_prediction`` (the default; any other is refused): ``x_t = (1 -
      sigma) x_0 + sigma * noise``, target ``noise - x_0``, with the core's ``weighting_scheme``.
      FLUX.1's scheduler shifts its noise levels by resolution at sampling only, so training is
      unshifted (``flow_shift`` 1) unless ``flow_shift`` is given.
    - ``training_mode`` is ``full`` or ``lora`` (adapters on the transformer's attention
      projections, ``lora_target_modules``); the text encoders stay frozen (``text_encoder``
      mode, ``train_text_encoder`` and ``lora_text_encoder`` are refused).
    - ``attention`` is ``sdpa`` (Flux's attention processors are built on it); ``sampler`` is
      ``euler`` (``FlowMatchEulerDiscreteScheduler`` with the source's scheduler config, dynamic
      shifting included, which is what ``FluxPipeline`` drives).
    - ``guidance_scale`` (default 3.5) is what the pipelines pass as ``FluxPipeline``'s
      ``guidance_scale``: the embedded guidance of a distilled checkpoint, not classifier-free
      guidance; ``training_guidance_scale`` is the value the transformer embeds in training.
    - ``prompt_dropout`` defaults to 0: a guidance-distilled model samples without an
      unconditional branch (``FluxPipeline`` runs one only with ``true_cfg_scale > 1``).
    - Pre-tokenized batches need ``input_ids`` (CLIP, 77 tokens) and ``input_ids_2`` (T5,
      :data:`FLUX_SEQUENCE_LENGTH` tokens).
    - Sampling (``build_pipeline``, the sampling callbacks, ``evaluate``, ``sample``) and export use
      ``FluxPipeline``; a LoRA export is the file ``FluxPipeline.load_lora_weights`` reads.

    Args:
        pretrained: A Flux pipeline folder or hub id; ``None`` builds the parts from ``components``.
        components: Parts built from scratch, used when ``pretrained`` is ``None``.
        training_guidance_scale: Guidance value embedded in training when the transformer has
            ``guidance_embeds`` (diffusers' Flux training scripts use 3.5 for FLUX.1-dev); unused otherwise.
        guidance_scale: ``FluxPipeline``'s ``guidance_scale`` when sampling (FLUX.1-dev's default is 3.5).
        prompt_dropout: Probability of training a caption as the empty prompt (see above).
        sampler: ``euler``, the one ``FluxPipeline`` drives.
        **kwargs: The arguments of :class:`~diffusion_lightning.modules.latent.LatentDiffusionModule`.
    """

    DENOISER: ClassVar[str] = "transformer"
    TEXT_ENCODERS: ClassVar[tuple[str, ...]] = ("text_encoder", "text_encoder_2")
    TOKENIZERS: ClassVar[tuple[str, ...]] = ("tokenizer", "tokenizer_2")
    transformer: Any
    text_encoder_2: Any
    tokenizer_2: Any

    def __init__(
        self,
        pretrained: str | None = None,
        components: FluxComponents | None = None,
        training_guidance_scale: float = 3.5,
        guidance_scale: float = 3.5,
        prompt_dropout: float = 0.0,
        sampler: SamplerName = "euler",
        **kwargs: Any,
    ) -> None:
        _refuse = self._refuse
        if kwargs.get("prediction_type") not in (None, FLOW):
            _refuse("prediction_type", kwargs["prediction_type"], f"it is trained by flow matching: use {FLOW!r}")
        kwargs["prediction_type"] = FLOW
        if kwargs.get("training_mode", "full") not in ("full", "lora"):
            _refuse("training_mode", kwargs["training_mode"], "it trains the transformer: use 'full' or 'lora'")
        for name in ("train_text_encoder", "lora_text_encoder"):
            if kwargs.get(name):
                _refuse(name, kwargs[name], "the CLIP and T5 text encoders stay frozen: use false")
        if kwargs.get("attention", "sdpa") != "sdpa":
            _refuse("attention", kwargs["attention"], "its attention processors are PyTorch's: use 'sdpa'")
        if sampler not in FLUX_SAMPLERS:
            _refuse("sampler", sampler, f"{self.pipeline_class().__name__} samples with one of {list(FLUX_SAMPLERS)}")
        if training_guidance_scale < 0:
            _refuse("training_guidance_scale", training_guidance_scale, "give a value >= 0 (FLUX.1-dev's is 3.5)")
        super().__init__(
            pretrained=pretrained,
            components=components,
            guidance_scale=guidance_scale,
            prompt_dropout=prompt_dropout,
            sampler=sampler,
            **kwargs,
        )
        self.training_guidance_scale = training_guidance_scale
        # frozen parts in inference mode from the start: a T5 built from its config is in training mode,
        # and its dropout would make the module's prompt embeddings differ from a loaded pipeline's
        self.train(self.training)
        packed = 2 * self.vae_scale_factor
        if self.image_size % packed:
            _refuse(
                "image_size",
                self.image_size,
                f"the transformer reads 2x2 patches of the VAE's {self.vae_scale_factor}x-downsampled latents: use a "
                f"multiple of {packed}",
            )

    def _refuse(self, name: str, value: Any, accepted: str) -> NoReturn:
        """Raise the ``ValueError`` of an argument this class does not take: its name, its value, what it accepts."""
        raise ValueError(f"{name}={value!r} is not accepted by {type(self).__name__}; {accepted}.")

    @classmethod
    @override
    def load_parts(cls, pretrained: str, revision: str | None = None, variant: str | None = None) -> dict[str, Any]:
        return load_flux_components(pretrained, revision, variant)

    @classmethod
    @override
    def build_parts(cls, components: Any = None) -> dict[str, Any]:
        return build_flux_components(components)

    @override
    def default_image_size(self) -> int:
        """``FluxPipeline``'s default: 128 latent pixels per side (1024 px with FLUX.1's VAE)."""
        return 128 * self.vae_scale_factor

    # ------------------------------------------------------------------ conditioning

    @override
    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """CLIP ids, then T5 ids (:data:`FLUX_SEQUENCE_LENGTH` of them), padded as ``FluxPipeline`` pads them."""
        clip = self._tokenize(self.tokenizer, prompts)
        return torch.cat([clip, self._tokenize(self.tokenizer_2, prompts, FLUX_SEQUENCE_LENGTH)], dim=1)

    @override
    def encode_prompt(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(prompt_embeds, pooled_prompt_embeds)`` of both tokenizers' ids side by side, as ``FluxPipeline`` does.

        ``prompt_embeds`` ``(B, L, d_model)``: the T5 encoder's last hidden states;
        ``pooled_prompt_embeds`` ``(B, hidden_size)``: the CLIP encoder's pooled output.
        """
        clip_length = self.tokenizer.model_max_length
        expected = clip_length + FLUX_SEQUENCE_LENGTH
        if input_ids.shape[1] != expected:
            raise ValueError(
                f"input_ids has {input_ids.shape[1]} tokens per prompt; expected {clip_length} + "
                f"{FLUX_SEQUENCE_LENGTH} = {expected} (the CLIP tokenizer's ids, then the T5 tokenizer's)."
            )
        ids, ids_2 = input_ids.to(self.device).split([clip_length, FLUX_SEQUENCE_LENGTH], dim=1)
        with self.text_gradients():
            pooled = self.text_encoder(ids, output_hidden_states=False).pooler_output
            hidden = self.text_encoder_2(ids_2, output_hidden_states=False)[0]
        return hidden, pooled

    # ------------------------------------------------------------------ the denoiser

    @override
    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """The transformer's velocity for latents ``(B, C, H, W)``, packed and unpacked as ``FluxPipeline`` does."""
        from diffusers import FluxPipeline

        batch, channels, height, width = noisy.shape
        if height % 2 or width % 2:
            raise ValueError(
                f"latents of {height}x{width}: Flux packs 2x2 patches, so both sides must be even (images a "
                f"multiple of {2 * self.vae_scale_factor} pixels)."
            )
        hidden, pooled = self.prompt_embeddings(condition)
        packed = FluxPipeline._pack_latents(noisy, batch, channels, height, width)
        image_ids = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, noisy.device, noisy.dtype)
        text_ids = torch.zeros(hidden.shape[1], 3, device=noisy.device, dtype=noisy.dtype)
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full((batch,), self.training_guidance_scale, device=noisy.device, dtype=torch.float32)
        velocity = self.transformer(
            hidden_states=packed,
            encoder_hidden_states=hidden,
            pooled_projections=pooled,
            timestep=timesteps / self.noise_scheduler.config.num_train_timesteps,
            img_ids=image_ids,
            txt_ids=text_ids,
            guidance=guidance,
            return_dict=False,
        )[0]
        # the latents' own size: a VAE factor of 1 makes the pipeline's pixel-to-latent conversion the identity
        return FluxPipeline._unpack_latents(velocity, height, width, 1)

    # ------------------------------------------------------------------ pipelines

    @override
    def pipeline_class(self) -> type[Any]:
        from diffusers import FluxPipeline

        return FluxPipeline

    @override
    def pipeline_options(self) -> dict[str, Any]:
        """No IP-Adapter image encoder."""
        return {"image_encoder": None, "feature_extractor": None}

    @override
    def sampling_scheduler(self, name: str | None = None):
        """``FlowMatchEulerDiscreteScheduler`` with the source's config (FLUX.1's shifts by resolution)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        name = name or self.sampler
        if name not in FLUX_SAMPLERS:
            self._refuse("sampler", name, f"{self.pipeline_class().__name__} samples with one of {list(FLUX_SAMPLERS)}")
        return FlowMatchEulerDiscreteScheduler.from_config(self.source_scheduler_config)

    @override
    def lora_state_dicts(self) -> dict[str, dict[str, torch.Tensor]]:
        """The transformer's adapters as ``transformer_lora_layers`` (peft names, which ``load_lora_weights`` reads)."""
        from peft.utils import get_peft_model_state_dict

        return {"transformer_lora_layers": get_peft_model_state_dict(self.transformer)}
