"""Latent text-to-image fine-tuning (Stable Diffusion): full UNet, text encoder or LoRA adapters.

The training core is :class:`~diffusion_lightning.modules.base.DiffusionModule`'s; this module
adds what a latent model needs around it: images become latents through a frozen VAE (scaled by
its ``scaling_factor``, shifted by ``shift_factor`` when it has one), captions become
``encoder_hidden_states`` through a CLIP text encoder, and prompt dropout trains the unconditional
branch of classifier-free guidance. Only trained weights go into Lightning checkpoints; frozen
parts are rebuilt from their source (the pretrained folder or the seeded component config) when a
checkpoint is loaded. Stable Diffusion XL (two text encoders, size and crop conditioning) is
:class:`~diffusion_lightning.modules.latent_xl.StableDiffusionXLModule`, a subclass; so is Flux
(:class:`~diffusion_lightning.modules.flux.FluxModule`), whose denoiser is a transformer: the
network's attribute and pipeline component name is the class's ``DENOISER``.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args

import torch
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from diffusion_lightning.losses import FLOW, PredictionType, check_choice
from diffusion_lightning.modules.base import BetaSchedule, DiffusionModule
from diffusion_lightning.modules.prior import PriorImages, prepare_prior, prior_training_step
from diffusion_lightning.modules.text_caching import TextEmbeddingCaching
from diffusion_lightning.modules.trained_weights import TrainedWeightsCheckpoint
from diffusion_lightning.nets.latent import (
    LatentComponents,
    add_lora_adapters,
    build_components,
    fused_lora_pipeline,
    load_components,
    lora_layers,
    set_attention,
)
from diffusion_lightning.pipelines.conditioning import ConditionSpec
from diffusion_lightning.pipelines.sampling_defaults import write_sampling_defaults
from diffusion_lightning.schedulers import flow_shift_of, is_flow
from diffusion_lightning.utils.io import atomic_directory
from diffusion_lightning.utils.latent_cache import LatentCache
from diffusion_lightning.utils.model_card import ModelCardOptions, write_model_card
from diffusion_lightning.utils.text_cache import Embeddings

__all__ = ["ATTENTION", "TRAINING_MODES", "AttentionBackend", "LatentDiffusionModule", "TrainingMode"]

TrainingMode = Literal["full", "text_encoder", "lora"]
AttentionBackend = Literal["sdpa", "xformers", "default"]
TRAINING_MODES: tuple[str, ...] = get_args(TrainingMode)
ATTENTION: tuple[str, ...] = get_args(AttentionBackend)
UNET_LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")
TEXT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
#: The flow-matching samplers that Stable Diffusion (XL) pipelines can drive.
FLOW_UNET_SAMPLERS = ("dpm", "unipc")


class LatentDiffusionModule(TextEmbeddingCaching, TrainedWeightsCheckpoint, DiffusionModule):
    """Fine-tune a latent text-to-image model (VAE + CLIP text encoder + ``UNet2DConditionModel``).

    Batches are dicts with ``images`` (``(B, 3, H, W)`` in ``[-1, 1]``) and ``captions`` (strings)
    or ``input_ids`` (already tokenized); ``keys`` (a stable id per image) enable the latent cache.

    Args:
        pretrained: A Stable Diffusion pipeline folder or hub id (``unet``, ``vae``,
            ``text_encoder``, ``tokenizer``, ``scheduler`` subfolders); its scheduler config sets
            the noise schedule. ``None`` builds the parts from ``components``.
        components: Parts built from scratch (:class:`~diffusion_lightning.nets.latent.LatentComponents`),
            used when ``pretrained`` is ``None``.
        revision: Hub revision of ``pretrained``.
        variant: Weights variant of ``pretrained`` (e.g. ``fp16``).
        training_mode: ``full`` (the UNet; plus the text encoder with ``train_text_encoder``),
            ``text_encoder`` (only the text encoder) or ``lora`` (peft adapters on the UNet's
            attention, plus the text encoder's with ``lora_text_encoder``).
        train_text_encoder: In ``full`` mode, also train the text encoder.
        text_encoder_learning_rate: Learning rate of the text encoder; default ``learning_rate``.
        lora_rank: Rank of the LoRA adapters.
        lora_alpha: LoRA scaling numerator (``alpha / rank`` scales the update); default the rank.
        lora_dropout: Dropout inside the adapters.
        lora_target_modules: UNet modules that get adapters (names or suffixes).
        lora_text_encoder: In ``lora`` mode, also adapt the text encoder.
        text_encoder_lora_target_modules: Text-encoder modules that get adapters.
        prompt_dropout: Probability of replacing a caption by the empty prompt (trains the
            unconditional prediction classifier-free guidance needs).
        gradient_checkpointing: Recompute activations in the backward pass (less memory, ~30% slower).
        attention: ``sdpa`` (PyTorch's fused attention, diffusers' default), ``xformers`` (needs
            the package) or ``default`` (the plain implementation).
        latent_cache_dir: Cache each image's VAE posterior here (keyed by the batch's ``keys``, the
            image size and the VAE's weights), so the VAE runs once per image; needs deterministic
            crops and no flips.
        text_embedding_cache_dir: Cache each prompt's embeddings here (keyed by its token ids and the
            text encoders' weights); at the start of fitting, the captions of every split of the data
            module (and the class images', and the empty prompt) are encoded into it, so the frozen
            text encoders do not run in the training steps. Needs frozen text encoders.
        image_size: Height and width of generated images (linked from the data module's resolution).
        in_channels: Image channels (linked from the data module; must be 3).
        validation_prompts: The model's default prompts: what the sampling callbacks
            (``SampleGridLogger``, ``GenerationMonitor``, the attention loggers, ``PeriodicEvaluation``)
            and ``evaluate --ckpt`` generate when they are given no prompts.
        validation_negative_prompts: One negative prompt per validation prompt (or one for all).
        validation_seed: Unused (kept so earlier checkpoints load); the sampling callbacks have a ``seed``.
        num_classes: Accepted for the CLI's data links; unused.
        class_names: Accepted for the CLI's data links; unused.
        prediction_type: ``epsilon``, ``v_prediction``, ``sample`` or ``flow_prediction`` (flow
            matching; see :class:`~diffusion_lightning.modules.base.DiffusionModule`; it samples and
            exports with DPM-Solver++ or UniPC in their flow mode); default the pretrained
            scheduler's (a flow scheduler's: flow matching with its shift; else ``epsilon``).
        prior_data_dir: DreamBooth prior preservation (:mod:`~diffusion_lightning.modules.prior`): a folder
            of class images with a ``metadata.jsonl`` (``file_name``, ``text``); each training batch gets as
            many of them, and their loss counts ``prior_loss_weight`` times (logged as
            ``train/instance_loss`` and ``train/prior_loss``).
        prior_prompts: Prompts the base model draws missing class images from, at the start of training.
        num_prior_images: Top ``prior_data_dir`` up to this many images; ``None``: use it as it is.
        prior_loss_weight: Weight of the class images' loss.
        **kwargs: Training-core options of :class:`~diffusion_lightning.modules.base.DiffusionModule`
            (learning rate, optimizer, min-SNR, noise offset, input perturbation, sampler, ...).
    """

    def __init__(
        self,
        pretrained: str | None = None,
        components: LatentComponents | None = None,
        revision: str | None = None,
        variant: str | None = None,
        training_mode: TrainingMode = "full",
        train_text_encoder: bool = False,
        text_encoder_learning_rate: float | None = None,
        lora_rank: int = 4,
        lora_alpha: float | None = None,
        lora_dropout: float = 0.0,
        lora_target_modules: list[str] | None = None,
        lora_text_encoder: bool = False,
        text_encoder_lora_target_modules: list[str] | None = None,
        prompt_dropout: float = 0.1,
        gradient_checkpointing: bool = False,
        attention: AttentionBackend = "sdpa",
        latent_cache_dir: str | None = None,
        text_embedding_cache_dir: str | None = None,
        image_size: int | None = None,
        in_channels: int = 3,
        validation_prompts: list[str] | None = None,
        validation_negative_prompts: list[str] | None = None,
        validation_seed: int = 0,
        num_classes: int | None = None,
        class_names: list[str] | None = None,
        prediction_type: PredictionType | None = None,
        beta_schedule: BetaSchedule = "scaled_linear",
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        prior_data_dir: str | None = None,
        prior_prompts: list[str] | None = None,
        num_prior_images: int | None = None,
        prior_loss_weight: float = 1.0,
        **kwargs: Any,
    ) -> None:
        # The CLI checks these from the annotations; a Python caller is checked here.
        check_choice("training_mode", training_mode, TRAINING_MODES)
        check_choice("attention", attention, ATTENTION)
        if not 0.0 <= prompt_dropout < 1.0:
            raise ValueError(f"prompt_dropout={prompt_dropout!r} must be in [0, 1).")
        if lora_rank < 1:
            raise ValueError(f"lora_rank={lora_rank!r} must be >= 1.")
        if in_channels != 3:
            raise ValueError(f"in_channels={in_channels!r}: the VAE encodes RGB images; use 3.")
        if prior_loss_weight < 0:
            raise ValueError(f"prior_loss_weight={prior_loss_weight!r} must be >= 0.")
        if (prior_prompts is not None or num_prior_images is not None) and not prior_data_dir:
            raise ValueError("prior_prompts and num_prior_images need prior_data_dir, the folder of the class images.")
        if text_encoder_learning_rate is not None and text_encoder_learning_rate <= 0:
            raise ValueError(f"text_encoder_learning_rate={text_encoder_learning_rate!r} must be > 0 or None.")
        negatives, positives = len(validation_negative_prompts or []), len(validation_prompts or [])
        if negatives and positives and negatives not in (1, positives):
            raise ValueError(
                f"validation_negative_prompts has {negatives} entries; expected 1 or one per validation prompt "
                f"({positives})."
            )
        parts = self.load_parts(pretrained, revision, variant) if pretrained else self.build_parts(components)
        scheduler_config = dict(parts["scheduler"].config) if pretrained else {}
        if is_flow(scheduler_config):  # a flow-matching checkpoint trains on its own objective and shift
            prediction_type = prediction_type or FLOW
            # a dynamically shifting scheduler (Flux's) shifts per resolution at sampling only: it trains unshifted
            dynamic = bool(scheduler_config.get("use_dynamic_shifting"))
            kwargs.setdefault("flow_shift", 1.0 if dynamic else flow_shift_of(scheduler_config))
        prediction_type = prediction_type or scheduler_config.get("prediction_type") or "epsilon"
        super().__init__(
            num_train_timesteps=scheduler_config.get("num_train_timesteps", kwargs.pop("num_train_timesteps", 1000)),
            beta_schedule=scheduler_config.get("beta_schedule", beta_schedule),
            beta_start=scheduler_config.get("beta_start", beta_start),
            beta_end=scheduler_config.get("beta_end", beta_end),
            prediction_type=prediction_type,
            **kwargs,
        )
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        # SD's convention: "leading" spacing with an offset of one, as the checkpoints' schedulers have.
        # (built anew: from_config would treat a registered steps_offset as a default and drop it)
        if not self.is_flow:
            config = {k: v for k, v in self.noise_scheduler.config.items() if not k.startswith("_")}
            config["steps_offset"] = scheduler_config.get("steps_offset", 1)
            self.noise_scheduler = type(self.noise_scheduler)(**config)
        setattr(self, self.DENOISER, parts[self.DENOISER])
        self.vae = parts["vae"]
        #: The source's scheduler config (pretrained or built), for samplers that need more than the noise schedule.
        self.source_scheduler_config = dict(parts["scheduler"].config)
        for name in (*self.TEXT_ENCODERS, *self.TOKENIZERS):
            setattr(self, name, parts[name])
        self.num_classes, self.class_names = num_classes, class_names  # not class-conditional: kept as given
        self.training_mode = training_mode
        self.train_text_encoder = training_mode == "text_encoder" or (training_mode == "full" and train_text_encoder)
        self.lora_text_encoder = training_mode == "lora" and lora_text_encoder
        self.text_encoder_learning_rate = text_encoder_learning_rate
        self.prompt_dropout = prompt_dropout
        self.latent_cache_dir = latent_cache_dir
        if text_embedding_cache_dir and self.trains_text:
            raise ValueError(
                f"text_embedding_cache_dir={text_embedding_cache_dir!r} needs frozen text encoders, but "
                f"training_mode={training_mode!r} trains one (train_text_encoder={train_text_encoder!r}, "
                f"lora_text_encoder={lora_text_encoder!r}); its embeddings would go stale. Drop the cache or "
                "freeze them."
            )
        self.text_embedding_cache_dir = text_embedding_cache_dir
        self.image_size = image_size or self.default_image_size()
        self.validation_prompts = list(validation_prompts or [])
        self.validation_negative_prompts = list(validation_negative_prompts or [])
        self.validation_seed = validation_seed
        self.lora_config = {"r": lora_rank, "lora_alpha": lora_alpha or lora_rank, "lora_dropout": lora_dropout}
        self._freeze(
            list(lora_target_modules or UNET_LORA_TARGETS), list(text_encoder_lora_target_modules or TEXT_LORA_TARGETS)
        )
        if gradient_checkpointing:
            self.denoiser.enable_gradient_checkpointing()
            if self.trains_text:
                for encoder in self.text_encoders:
                    # transformers 5 renamed it (the old name warns); older versions have only the old one
                    enable = getattr(encoder, "activation_checkpointing_enable", None)
                    (enable or encoder.gradient_checkpointing_enable)()
        set_attention(self.denoiser, attention)
        self._empty_ids: torch.Tensor | None = None
        self._warned_truncation = False
        self._latent_cache: LatentCache | None = None
        self.prior_loss_weight = prior_loss_weight
        self.prior = PriorImages(prior_data_dir, prior_prompts, num_prior_images) if prior_data_dir else None

    # ------------------------------------------------------------------ set-up

    #: Attribute (and pipeline component) name of the denoising network.
    DENOISER: ClassVar[str] = "unet"
    #: Attribute names of the text encoders, in the order their embeddings are concatenated.
    TEXT_ENCODERS: ClassVar[tuple[str, ...]] = ("text_encoder",)
    #: Attribute names of their tokenizers (one per text encoder, same order).
    TOKENIZERS: ClassVar[tuple[str, ...]] = ("tokenizer",)
    text_encoder: Any
    tokenizer: Any

    @classmethod
    def load_parts(cls, pretrained: str, revision: str | None = None, variant: str | None = None) -> dict[str, Any]:
        """The components of the ``pretrained`` pipeline folder or hub id (one per pipeline component name)."""
        return load_components(pretrained, revision, variant)

    @classmethod
    def build_parts(cls, components: Any = None) -> dict[str, Any]:
        """Components built from the ``components`` config (seeded: the same config gives the same weights)."""
        return build_components(components)

    @property
    def text_encoders(self) -> list[Any]:
        return [getattr(self, name) for name in self.TEXT_ENCODERS]

    @property
    def tokenizers(self) -> list[Any]:
        return [getattr(self, name) for name in self.TOKENIZERS]

    @property
    def trains_text(self) -> bool:
        """Whether any text-encoder weight (its own or its adapters') trains."""
        return self.train_text_encoder or self.lora_text_encoder

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def default_image_size(self) -> int:
        """Height and width of images when ``image_size`` is not given: the UNet's ``sample_size``, in pixels."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    def _freeze(self, unet_targets: list[str], text_targets: list[str]) -> None:
        self.vae.requires_grad_(False)
        self.denoiser.requires_grad_(self.training_mode == "full")
        for encoder in self.text_encoders:
            encoder.requires_grad_(self.train_text_encoder)
        if self.training_mode == "lora":
            adapted = self.text_encoders if self.lora_text_encoder else []
            add_lora_adapters(self.denoiser, self.lora_config, unet_targets, adapted, text_targets)

    @override
    def train(self, mode: bool = True) -> LatentDiffusionModule:
        super().train(mode)
        self.vae.eval()  # frozen parts stay in inference mode (dropout off) while the rest trains
        if not self.trains_text:
            for encoder in self.text_encoders:
                encoder.eval()
        return self

    @property
    @override
    def denoiser(self) -> torch.nn.Module:
        return getattr(self, self.DENOISER)

    # ------------------------------------------------------------------ conditioning

    @override
    def condition_spec(self) -> ConditionSpec:
        """Text prompts; callers that name none get ``validation_prompts`` (and ``validation_negative_prompts``)."""
        return ConditionSpec(
            "prompt",
            default_prompts=tuple(self.validation_prompts),
            default_negative_prompts=tuple(self.validation_negative_prompts) or None,
        )

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """Token ids ``(B, model_max_length)``, one block per tokenizer side by side.

        Prompts longer than ``model_max_length`` tokens are truncated, with one warning.
        """
        return torch.cat([self._tokenize(tokenizer, prompts) for tokenizer in self.tokenizers], dim=1)

    def _tokenize(self, tokenizer: Any, prompts: list[str], max_length: int | None = None) -> torch.Tensor:
        max_length = max_length or tokenizer.model_max_length
        if not self._warned_truncation:
            lengths = [len(ids) for ids in tokenizer(list(prompts)).input_ids]
            too_long = [p for p, n in zip(prompts, lengths) if n > max_length]
            if too_long:
                self._warned_truncation = True
                rank_zero_warn(
                    f"{len(too_long)} prompt(s) exceed the tokenizer's {max_length} tokens and are truncated "
                    f"(first: {too_long[0][:60]!r}...); this warning is shown once."
                )
        ids = tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
        )
        return ids.input_ids.to(self.device)

    def text_gradients(self) -> contextlib.AbstractContextManager[None]:
        """A context that keeps gradients through the text encoders only when one of them trains."""
        return torch.set_grad_enabled(torch.is_grad_enabled() and self.trains_text)

    def encode_prompt(self, input_ids: torch.Tensor) -> Embeddings:
        """``(prompt_embeds, pooled_prompt_embeds)`` of token ids, as the pipeline makes them.

        Stable Diffusion 1.x/2.x has no pooled embeddings: ``None``. With gradients only when the
        text encoder trains.
        """
        with self.text_gradients():
            return self.text_encoder(input_ids.to(self.device), return_dict=False)[0], None

    def encode_prompt_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``encoder_hidden_states`` of token ids: the ``prompt_embeds`` of :meth:`encode_prompt`."""
        return self.encode_prompt(input_ids)[0]

    @property
    def empty_prompt_ids(self) -> torch.Tensor:
        if self._empty_ids is None or self._empty_ids.device != self.device:
            self._empty_ids = self.tokenize([""])[0]
        return self._empty_ids

    @override
    def drop_condition(self, condition: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Replace the prompt of some rows (probability ``prompt_dropout``) by the empty prompt's token ids.

        The prompt is the first columns of ``condition``; any columns after it (a subclass's extra
        conditioning) are kept: only the text is dropped.
        """
        if self.prompt_dropout == 0:
            return condition
        drop = torch.rand(condition.shape[0], generator=generator, device=condition.device) < self.prompt_dropout
        empty = self.empty_prompt_ids.to(condition.device)
        prompts = torch.where(drop.unsqueeze(1), empty, condition[:, : empty.shape[0]])
        return torch.cat([prompts, condition[:, empty.shape[0] :]], dim=1)

    # ------------------------------------------------------------------ latents

    @torch.no_grad()
    def posterior_parameters(self, images: torch.Tensor, keys: list[str] | None = None) -> torch.Tensor:
        """The VAE posterior's ``(mean, logvar)`` of each image, from the latent cache when enabled."""
        images = images.to(self.device, self.vae.dtype)

        def encode(x: torch.Tensor) -> torch.Tensor:
            return self.vae.encode(x).latent_dist.parameters

        if not self.latent_cache_dir or keys is None:
            return encode(images)
        if self._latent_cache is None:
            from diffusion_lightning.metrics.features import state_fingerprint

            self._latent_cache = LatentCache(self.latent_cache_dir, f"vae-{state_fingerprint(self.vae)}")
        return self._latent_cache.get(images, list(keys), encode).to(self.device)

    def encode_images(
        self, images: torch.Tensor, generator: torch.Generator | None = None, keys: list[str] | None = None
    ) -> torch.Tensor:
        """Scaled latents of images in ``[-1, 1]``: a posterior sample, shifted and scaled as the VAE's config says."""
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        latents = DiagonalGaussianDistribution(self.posterior_parameters(images, keys)).sample(generator)
        config = self.vae.config
        shift = getattr(config, "shift_factor", None) or 0.0
        return ((latents - shift) * config.scaling_factor).to(self.denoiser.dtype)

    def id_keys(self) -> tuple[str, ...]:
        """The batch keys of pre-tokenized ids, one per tokenizer: ``input_ids``, ``input_ids_2``, ..."""
        return tuple("input_ids" if i == 0 else f"input_ids_{i + 1}" for i in range(len(self.TOKENIZERS)))

    def prompt_ids(self, batch: Any) -> torch.Tensor:
        """Every tokenizer's ids side by side: the batch's (:meth:`id_keys`) when it has all, else its captions'."""
        keys = self.id_keys()
        if all(batch.get(key) is not None for key in keys):
            return torch.cat([batch[key] for key in keys], dim=1).to(self.device)
        if batch.get("captions") is None:
            present = [key for key in keys if batch.get(key) is not None]
            raise ValueError(
                f"the batch has {present or 'no token ids'} and no 'captions'; {type(self).__name__} needs "
                f"'captions', or all of {list(keys)} (one per tokenizer: {list(self.TOKENIZERS)})."
            )
        return self.tokenize(batch["captions"]).to(self.device)

    @override
    def unpack_batch(self, batch: Any, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode_images(batch["images"], generator, batch.get("keys")), self.prompt_ids(batch)

    @override
    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        """The core's step; with prior preservation, on the batch plus as many class images (DreamBooth's loss)."""
        if self.prior is None:
            return super().training_step(batch, batch_idx)
        return prior_training_step(self, batch, batch_idx)

    @override
    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        hidden = self.prompt_embeddings(condition)[0]
        return self.unet(noisy, timesteps, encoder_hidden_states=hidden, return_dict=False)[0]

    # ------------------------------------------------------------------ optimization

    @override
    def parameter_groups(self) -> list[dict[str, Any]]:
        text_params = [p for encoder in self.text_encoders for p in encoder.parameters()]
        text_ids = {id(p) for p in text_params}
        groups: list[dict[str, Any]] = []
        for params, lr in (
            ([p for p in self.parameters() if p.requires_grad and id(p) not in text_ids], self.learning_rate),
            ([p for p in text_params if p.requires_grad], self.text_encoder_learning_rate),
        ):
            lr = lr or self.learning_rate
            decay = [p for p in params if p.ndim > 1]
            no_decay = [p for p in params if p.ndim <= 1]
            if decay:
                groups.append({"params": decay, "lr": lr})
            if no_decay:
                groups.append({"params": no_decay, "lr": lr, "weight_decay": 0.0})
        if not groups:
            raise ValueError(f"training_mode={self.training_mode!r} leaves no parameter to train.")
        return groups

    @override
    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.prior is not None:
            prepare_prior(self)
        data = getattr(self.trainer, "datamodule", None)
        self.fill_text_cache_for_fit(self.prior.captions if self.prior is not None else [])
        if self.latent_cache_dir and (getattr(data, "random_flip", False) or not getattr(data, "center_crop", True)):
            raise ValueError(
                f"latent_cache_dir={self.latent_cache_dir!r} caches one latent per image, which would freeze the "
                "data module's random crop/flip; set center_crop: true and random_flip: false, or drop the cache."
            )

    # ------------------------------------------------------------------ pipelines and export

    def pipeline_class(self) -> type[Any]:
        """The diffusers pipeline class of this model: what ``build_pipeline`` and ``export`` make."""
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline

    def pipeline_options(self) -> dict[str, Any]:
        """Arguments of the pipeline besides its components (no safety checker: this is a training library)."""
        return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}

    def pipeline_components(self) -> dict[str, Any]:
        """The module's own VAE, denoiser, text encoders and tokenizers, by their pipeline component names."""
        names = ("vae", self.DENOISER, *self.TEXT_ENCODERS, *self.TOKENIZERS)
        return {name: getattr(self, name) for name in names}

    def make_pipeline(self, parts: dict[str, Any]) -> Any:
        """A :meth:`pipeline_class` pipeline of ``parts`` (every component, the scheduler included)."""
        return self.pipeline_class()(**parts, **self.pipeline_options())

    @override
    def build_pipeline(self, scheduler: str | None = None) -> Any:
        return self.make_pipeline({**self.pipeline_components(), "scheduler": self.sampling_scheduler(scheduler)})

    @override
    def sampling_scheduler(self, name: str | None = None):
        """The named sampler; a flow-matching model's must be one the Stable Diffusion pipelines can drive.

        ``StableDiffusionPipeline`` and ``StableDiffusionXLPipeline`` scale the initial noise by the
        scheduler's ``init_noise_sigma`` and call its ``scale_model_input``, which diffusers' FlowMatch
        schedulers do not have; DPM-Solver++ and UniPC in their flow mode have both.
        """
        name = name or self.sampler
        if self.is_flow and name not in FLOW_UNET_SAMPLERS:
            raise ValueError(
                f"sampler={name!r}: a flow-matching {self.pipeline_class().__name__} samples with one of "
                f"{list(FLOW_UNET_SAMPLERS)} (diffusers' FlowMatch schedulers lack the init_noise_sigma and "
                "scale_model_input that pipeline calls)."
            )
        return super().sampling_scheduler(name)

    def lora_state_dicts(self) -> dict[str, dict[str, torch.Tensor]]:
        """The adapters in diffusers' layout: ``unet_lora_layers`` (and ``text_encoder_lora_layers``, ...)."""
        return lora_layers(self.unet, *(self.text_encoders if self.lora_text_encoder else []))

    def lora_metadata(self) -> dict[str, dict[str, Any]]:
        """Each adapted network's LoRA config (rank, alpha, targets), as ``save_lora_weights``'s ``*_adapter_metadata``.

        Stored in the file, it is what ``load_lora_weights`` builds the adapters from; without it
        diffusers takes ``lora_alpha`` to be the rank, and adapters trained with another alpha
        would load with the wrong scale.
        """
        names = [self.DENOISER, *(self.TEXT_ENCODERS if self.lora_text_encoder else [])]
        return {f"{name}_lora_adapter_metadata": getattr(self, name).peft_config["default"].to_dict() for name in names}

    def base_components(self) -> dict[str, Any]:
        """Fresh, adapter-free components from this module's source (the pretrained folder or the config)."""
        hparams = self.hparams
        if hparams.get("pretrained"):
            return self.load_parts(hparams["pretrained"], hparams.get("revision"), hparams.get("variant"))
        return self.build_parts(hparams.get("components"))

    @override
    def export_pipeline(
        self,
        path: str | os.PathLike[str],
        scheduler: str | None = None,
        merge_lora: bool = False,
        card: ModelCardOptions | None = None,
    ) -> Path:
        """Write a pipeline folder, atomically.

        ``full`` and ``text_encoder`` modes write a complete :meth:`pipeline_class` folder. ``lora``
        mode writes the adapters alone (``pytorch_lora_weights.safetensors``, loadable with
        ``load_lora_weights`` on the base model), or with ``merge_lora`` a complete pipeline whose
        weights have the adapters fused in (built on fresh base components, so no adapter layer
        names reach the saved weights). Every folder holds its model card ``README.md`` (see
        :meth:`DiffusionModule.export_pipeline`).
        """
        if self.training_mode != "lora":
            return super().export_pipeline(path, scheduler, card=card)
        with atomic_directory(path) as tmp:
            adapters = {**self.lora_state_dicts(), **self.lora_metadata()}
            self.pipeline_class().save_lora_weights(tmp, **adapters, safe_serialization=True)
            if merge_lora:
                parts = {**self.base_components(), "scheduler": self.sampling_scheduler(scheduler)}
                merged = fused_lora_pipeline(self.make_pipeline(parts), tmp)
                (Path(tmp) / "pytorch_lora_weights.safetensors").unlink()
                merged.save_pretrained(tmp, safe_serialization=True)
                write_sampling_defaults(tmp, self)
                write_model_card(tmp, self, path, "pipeline", merged, card)
            else:
                drawn = self.build_pipeline(scheduler) if card is not None and card.samples else None
                write_model_card(tmp, self, path, "lora", drawn, card)
        return Path(path)
