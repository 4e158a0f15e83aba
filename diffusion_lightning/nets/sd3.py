"""The components of Stable Diffusion 3: an MM-DiT conditioned on two CLIP encoders and a T5 encoder.

SD3 (Esser et al., 2024) is trained by flow matching like Flux and shares its VAE convention
(``shift_factor``) and its T5 encoder; what differs is the conditioning: the two CLIP encoders'
penultimate hidden states, side by side and zero-padded to the T5 width, are followed by the T5
hidden states in one text sequence (``joint_attention_dim`` wide), and both CLIP encoders' projected
pooled embeddings, side by side, are the ``pooled_projections``. The transformer patchifies the
latents itself (``patch_size``). A pipeline folder has ten parts: ``transformer``, ``vae``,
``text_encoder``, ``text_encoder_2``, ``text_encoder_3``, their tokenizers and ``scheduler``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from diffusion_lightning.nets.flux import _t5_tokenizer, _tiny_flux_vae, _tiny_t5, init_defaults, t5_text_config
from diffusion_lightning.nets.latent import (
    _tiny_text_encoder,
    as_components,
    check_subfolders,
    clip_text_config,
    component_tokenizer,
    component_vae,
    load_subfolders,
    seeded,
    vae_source,
)

__all__ = ["SD3Components", "SD3_SUBFOLDERS", "build_sd3_components", "check_sd3_components", "load_sd3_components"]

#: Subfolders of a Stable Diffusion 3 pipeline folder that the SD3 module reads.
SD3_SUBFOLDERS = (
    "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3",
    "tokenizer", "tokenizer_2", "tokenizer_3", "scheduler",
)  # fmt: skip


def _tiny_sd3_transformer() -> dict[str, Any]:
    return {
        "sample_size": 8,
        "patch_size": 2,
        "num_layers": 1,
        "attention_head_dim": 8,
        "num_attention_heads": 2,
        "caption_projection_dim": 16,
        "pos_embed_max_size": 8,
    }


def _tiny_clip() -> dict[str, Any]:
    return {**_tiny_text_encoder(), "projection_dim": 16}


@dataclass
class SD3Components:
    """Keyword arguments of each part of an SD3 model built from scratch (tiny defaults, trainable on a CPU)."""

    transformer: dict[str, Any] = field(default_factory=_tiny_sd3_transformer)
    """``SD3Transformer2DModel`` arguments. Unless given: ``in_channels``/``out_channels`` follow the
    VAE's latents, ``joint_attention_dim`` the T5 encoder's ``d_model``, ``pooled_projection_dim`` the
    two CLIP encoders' ``projection_dim`` summed. A given dictionary replaces the tiny defaults as a
    whole (diffusers' defaults are SD3's full size)."""
    vae: dict[str, Any] = field(default_factory=_tiny_flux_vae)
    """``AutoencoderKL`` arguments (not used with ``pretrained_vae``)."""
    pretrained_vae: str | None = None
    """An ``AutoencoderKL`` folder or hub id to use instead of a random ``vae``."""
    text_encoder: dict[str, Any] = field(default_factory=_tiny_clip)
    """``CLIPTextConfig`` arguments of the first CLIP encoder (a ``CLIPTextModelWithProjection``)."""
    text_encoder_2: dict[str, Any] = field(default_factory=_tiny_clip)
    """``CLIPTextConfig`` arguments of the second CLIP encoder (a ``CLIPTextModelWithProjection``)."""
    text_encoder_3: dict[str, Any] = field(default_factory=lambda: {**_tiny_t5(), "d_model": 64})
    """``T5Config`` arguments of the T5 encoder; its ``d_model`` must hold both CLIP widths side by side."""
    tokenizer: str = "byte-level"
    """A CLIP tokenizer folder (for both CLIP encoders), or ``byte-level``."""
    tokenizer_3: str = "character-level"
    """A T5 tokenizer folder, or ``character-level``."""
    model_max_length: int = 77
    """Maximum prompt length in tokens of the ``byte-level`` CLIP tokenizer."""
    words: list[str] = field(default_factory=list)
    """Words the offline tokenizers keep whole (lower-case ASCII letters)."""
    scheduler: dict[str, Any] = field(default_factory=lambda: {"shift": 3.0})
    """``FlowMatchEulerDiscreteScheduler`` arguments (SD3's shift is 3.0)."""
    seed: int = 0
    """Seed of the random initialisation: the same config always builds the same weights."""


def build_sd3_components(config: SD3Components | dict[str, Any] | None = None) -> dict[str, Any]:
    """The nine SD3 components built from ``config`` (seeded: the same config gives the same weights)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    config = as_components(config, SD3Components)  # type: ignore[type-var]
    tokenizer, tokenizer_2 = component_tokenizer(config), component_tokenizer(config)  # type: ignore[arg-type]
    tokenizer_3 = _t5_tokenizer(config, "tokenizer_3")  # type: ignore[arg-type]
    clip, clip_2 = (
        clip_text_config(tokenizer, config.text_encoder),
        clip_text_config(tokenizer_2, config.text_encoder_2),
    )
    t5 = t5_text_config(tokenizer_3, config.text_encoder_3)
    with seeded(config.seed):
        vae = component_vae(config)  # type: ignore[arg-type]
        text_encoder = CLIPTextModelWithProjection(clip)
        text_encoder_2 = CLIPTextModelWithProjection(clip_2)
        text_encoder_3 = T5EncoderModel(t5)
        kwargs = {
            "in_channels": vae.config.latent_channels,
            "out_channels": vae.config.latent_channels,
            "joint_attention_dim": t5.d_model,
            "pooled_projection_dim": clip.projection_dim + clip_2.projection_dim,
            **config.transformer,
        }
        defaults = init_defaults(SD3Transformer2DModel)
        sources = ("components.transformer", "components.text_encoder", "components.text_encoder_2")
        check_sd3_components(
            {**defaults, **kwargs},
            (clip, clip_2, t5),
            vae.config.latent_channels,
            (*sources, "components.text_encoder_3", vae_source(config)),  # type: ignore[arg-type]
        )
        transformer = SD3Transformer2DModel(**kwargs)
    return {
        "transformer": transformer,
        "vae": vae,
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "text_encoder_3": text_encoder_3,
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer_2,
        "tokenizer_3": tokenizer_3,
        "scheduler": FlowMatchEulerDiscreteScheduler(**config.scheduler),
    }


def load_sd3_components(
    pretrained: str, revision: str | None = None, variant: str | None = None, torch_dtype: Any = None
) -> dict[str, Any]:
    """The nine components of a Stable Diffusion 3 pipeline folder or hub repository, checked to fit together."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    check_subfolders(pretrained, SD3_SUBFOLDERS, "StableDiffusion3Pipeline")
    classes = {
        "tokenizer": CLIPTokenizer,
        "tokenizer_2": CLIPTokenizer,
        "tokenizer_3": T5TokenizerFast,
        "text_encoder": CLIPTextModelWithProjection,
        "text_encoder_2": CLIPTextModelWithProjection,
        "text_encoder_3": T5EncoderModel,
        "vae": AutoencoderKL,
        "transformer": SD3Transformer2DModel,
        "scheduler": FlowMatchEulerDiscreteScheduler,
    }
    parts = load_subfolders(pretrained, classes, revision, variant, torch_dtype)
    where = f"pretrained={pretrained!r}"
    names = ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae")
    check_sd3_components(
        parts["transformer"].config,
        (parts["text_encoder"].config, parts["text_encoder_2"].config, parts["text_encoder_3"].config),
        parts["vae"].config.latent_channels,
        tuple(f"the {name} of {where}" for name in names),
    )
    return parts


def check_sd3_components(
    transformer: Mapping[str, Any], encoders: tuple[Any, Any, Any], latent_channels: int, sources: tuple[str, ...]
) -> None:
    """Raise a ``ValueError`` naming the field when the transformer does not take what the encoders and VAE give.

    ``joint_attention_dim`` must be the T5 encoder's ``d_model``, wide enough for both CLIP
    encoders' hidden states side by side; ``pooled_projection_dim`` the two CLIP ``projection_dim``
    summed; ``in_channels``/``out_channels`` the VAE's ``latent_channels``.
    """
    clip, clip_2, t5 = encoders
    transformer_source, text_source, text_2_source, text_3_source, vae_where = sources
    joint = transformer.get("joint_attention_dim")
    if joint != t5.d_model:
        raise ValueError(
            f"{transformer_source} has joint_attention_dim={joint!r} but the T5 encoder's hidden states "
            f"({text_3_source}.d_model) are {t5.d_model} wide; set joint_attention_dim: {t5.d_model}."
        )
    clip_width = clip.hidden_size + clip_2.hidden_size
    if clip_width > t5.d_model:
        raise ValueError(
            f"{text_3_source}.d_model={t5.d_model} is narrower than the two CLIP encoders' hidden states side by side "
            f"({text_source}.hidden_size + {text_2_source}.hidden_size = {clip_width}); SD3 zero-pads those to the "
            f"T5 width: use d_model >= {clip_width}."
        )
    pooled = clip.projection_dim + clip_2.projection_dim
    if transformer.get("pooled_projection_dim") != pooled:
        raise ValueError(
            f"{transformer_source} has pooled_projection_dim={transformer.get('pooled_projection_dim')!r} but the "
            f"pooled embeddings ({text_source}.projection_dim + {text_2_source}.projection_dim) are {pooled} wide; "
            f"set pooled_projection_dim: {pooled}."
        )
    channels = transformer.get("in_channels"), transformer.get("out_channels")
    if channels != (latent_channels, latent_channels):
        raise ValueError(
            f"{transformer_source} has in_channels={channels[0]!r}, out_channels={channels[1]!r} but the VAE of "
            f"{vae_where} makes latents of latent_channels={latent_channels}; set both to {latent_channels}."
        )
