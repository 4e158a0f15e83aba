"""The components of Stable Diffusion XL: two CLIP text encoders and a UNet that also reads sizes and crops.

SDXL (Podell et al., 2023) conditions its UNet on two CLIP text encoders: their penultimate hidden
states, concatenated feature-wise, are the cross-attention ``encoder_hidden_states``, and the
second encoder's pooled, projected embedding (``CLIPTextModelWithProjection.text_embeds``) enters
the timestep embedding (``addition_embed_type="text_time"``) together with six integers per image:
the original image size, the top-left corner of the crop taken from it, and the target size
(:func:`build_time_ids`), each embedded with ``addition_time_embed_dim`` sinusoidal features. A
pipeline folder has seven parts: ``unet``, ``vae``, ``text_encoder``, ``text_encoder_2``,
``tokenizer``, ``tokenizer_2`` and ``scheduler``.

:func:`load_xl_components` reads them from a folder or hub id; :func:`build_xl_components` builds
small random ones from keyword dictionaries (:class:`XLComponents`, what the tests and
``configs/smoke/sdxl_tiny.yaml`` use), with the byte-level tokenizer of
:mod:`~diffusion_lightning.nets.latent`. Both check that the UNet fits the encoders
(:func:`check_xl_components`), which diffusers would otherwise report only at the first forward
pass, as a shape error.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from diffusion_lightning.nets.latent import (
    LatentComponents,
    _tiny_text_encoder,
    _tiny_unet,
    as_components,
    check_latent_channels,
    check_subfolders,
    clip_text_config,
    component_scheduler,
    component_tokenizer,
    component_vae,
    load_subfolders,
    seeded,
    vae_source,
)

__all__ = [
    "NUM_TIME_IDS",
    "XL_SUBFOLDERS",
    "XLComponents",
    "build_time_ids",
    "build_xl_components",
    "check_xl_components",
    "load_xl_components",
]

#: Subfolders of a Stable Diffusion XL pipeline folder that the SDXL module reads.
XL_SUBFOLDERS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
#: Integers of SDXL's size and crop conditioning per image: original (h, w), crop (top, left), target (h, w).
NUM_TIME_IDS = 6
#: SDXL's ``addition_time_embed_dim``, used when a built UNet config does not set one.
SDXL_TIME_EMBED_DIM = 256


def _tiny_xl_unet() -> dict[str, Any]:
    unet = {key: value for key, value in _tiny_unet().items() if key != "cross_attention_dim"}  # follows the encoders
    return {**unet, "addition_embed_type": "text_time", "addition_time_embed_dim": 8}


def _tiny_text_encoder_2() -> dict[str, Any]:
    return {**_tiny_text_encoder(), "projection_dim": 32}


@dataclass
class XLComponents(LatentComponents):
    """Keyword arguments of each part of an SDXL model built from scratch (see :class:`LatentComponents`).

    The defaults make a model small enough to train on a CPU in seconds: the tiny UNet of
    :class:`LatentComponents` made SDXL-style (``addition_embed_type="text_time"``, 8 features per
    time id), two 2-layer CLIP text encoders of width 32 (the second with a 32-wide projection),
    and the byte-level tokenizer for both.
    """

    unet: dict[str, Any] = field(default_factory=_tiny_xl_unet)
    """``UNet2DConditionModel`` arguments. Unless given: ``in_channels``/``out_channels`` follow the
    VAE's latents, ``cross_attention_dim`` the two encoders' widths summed,
    ``addition_embed_type`` is ``text_time``, ``addition_time_embed_dim`` 256 and
    ``projection_class_embeddings_input_dim`` the second encoder's ``projection_dim`` plus
    6 x ``addition_time_embed_dim``."""
    text_encoder_2: dict[str, Any] = field(default_factory=_tiny_text_encoder_2)
    """``CLIPTextConfig`` arguments of the second text encoder (a ``CLIPTextModelWithProjection``, whose
    ``projection_dim`` is the width of the pooled embedding); it shares the tokenizer's vocabulary."""


def build_xl_components(config: XLComponents | dict[str, Any] | None = None) -> dict[str, Any]:
    """The seven SDXL components built from ``config`` (seeded: the same config gives the same weights)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    config = as_components(config, XLComponents)
    tokenizer, tokenizer_2 = component_tokenizer(config), component_tokenizer(config)
    text_config = clip_text_config(tokenizer, config.text_encoder)
    text_config_2 = clip_text_config(tokenizer_2, config.text_encoder_2)
    with seeded(config.seed):
        vae = component_vae(config)
        text_encoder = CLIPTextModel(text_config)
        text_encoder_2 = CLIPTextModelWithProjection(text_config_2)
        time_dim = config.unet.get("addition_time_embed_dim", SDXL_TIME_EMBED_DIM)
        unet = UNet2DConditionModel(
            **{
                "in_channels": vae.config.latent_channels,
                "out_channels": vae.config.latent_channels,
                "cross_attention_dim": text_config.hidden_size + text_config_2.hidden_size,
                "addition_embed_type": "text_time",
                "addition_time_embed_dim": time_dim,
                "projection_class_embeddings_input_dim": text_config_2.projection_dim + NUM_TIME_IDS * time_dim,
                **config.unet,
            }
        )
    parts = {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer_2,
        "scheduler": component_scheduler(config),
    }
    check_xl_components(parts, "components.unet", "components.text_encoder", "components.text_encoder_2")
    check_latent_channels(unet, vae, "components.unet", vae_source(config))
    return parts


def load_xl_components(
    pretrained: str, revision: str | None = None, variant: str | None = None, torch_dtype: Any = None
) -> dict[str, Any]:
    """The seven components of a Stable Diffusion XL pipeline folder or hub repository, checked to fit together."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    check_subfolders(pretrained, XL_SUBFOLDERS, "StableDiffusionXLPipeline")
    classes = {
        "tokenizer": CLIPTokenizer,
        "tokenizer_2": CLIPTokenizer,
        "text_encoder": CLIPTextModel,
        "text_encoder_2": CLIPTextModelWithProjection,
        "vae": AutoencoderKL,
        "unet": UNet2DConditionModel,
        "scheduler": DDPMScheduler,
    }
    parts = load_subfolders(pretrained, classes, revision, variant, torch_dtype)
    where = f"pretrained={pretrained!r}"
    check_xl_components(parts, f"the unet of {where}", f"the text_encoder of {where}", f"the text_encoder_2 of {where}")
    check_latent_channels(parts["unet"], parts["vae"], f"the unet of {where}", f"the vae of {where}")
    return parts


def check_xl_components(parts: dict[str, Any], unet_source: str, text_source: str, text_2_source: str) -> None:
    """Raise a ``ValueError`` naming the field when the UNet does not take what the two text encoders give.

    An SDXL UNet needs ``addition_embed_type='text_time'``, a ``cross_attention_dim`` equal to the
    two encoders' hidden sizes summed (their hidden states are concatenated), and a
    ``projection_class_embeddings_input_dim`` equal to the pooled embedding's width (the second
    encoder's ``projection_dim``) plus ``6 * addition_time_embed_dim``; the two tokenizers must
    pad to the same length (the hidden states are concatenated token by token).
    """
    unet = parts["unet"].config
    text, text_2 = parts["text_encoder"].config, parts["text_encoder_2"].config
    if unet.get("addition_embed_type") != "text_time":
        raise ValueError(
            f"{unet_source} has addition_embed_type={unet.get('addition_embed_type')!r}; an SDXL UNet takes "
            "'text_time' (the pooled text embedding and the size/crop time ids). A UNet with one CLIP text "
            "encoder trains with LatentDiffusionModule."
        )
    width = text.hidden_size + text_2.hidden_size
    cross = unet.get("cross_attention_dim")
    if any(dim != width for dim in (cross if isinstance(cross, Sequence) else [cross])):
        raise ValueError(
            f"{unet_source} has cross_attention_dim={cross!r} but the concatenated hidden states of the two text "
            f"encoders are {text.hidden_size} ({text_source}.hidden_size) + {text_2.hidden_size} "
            f"({text_2_source}.hidden_size) = {width} wide; set cross_attention_dim: {width}."
        )
    time_dim = unet.get("addition_time_embed_dim")
    if not isinstance(time_dim, int) or time_dim < 1:
        raise ValueError(
            f"{unet_source} has addition_time_embed_dim={time_dim!r}; an SDXL UNet embeds each of its "
            f"{NUM_TIME_IDS} time ids with that many features: give a positive integer (SDXL's is 256)."
        )
    pooled = text_2.projection_dim
    expected = pooled + NUM_TIME_IDS * time_dim
    given = unet.get("projection_class_embeddings_input_dim")
    if given != expected:
        raise ValueError(
            f"{unet_source} has projection_class_embeddings_input_dim={given!r} but the pooled text embedding "
            f"({text_2_source}.projection_dim={pooled}) and {NUM_TIME_IDS} time ids of addition_time_embed_dim="
            f"{time_dim} make {pooled} + {NUM_TIME_IDS} * {time_dim} = {expected}; set "
            f"projection_class_embeddings_input_dim: {expected}."
        )
    lengths = parts["tokenizer"].model_max_length, parts["tokenizer_2"].model_max_length
    if lengths[0] != lengths[1]:
        raise ValueError(
            f"the tokenizers pad to model_max_length={lengths[0]} (tokenizer) and {lengths[1]} (tokenizer_2); "
            "SDXL concatenates the two encoders' hidden states token by token: they must be equal."
        )


def _size_pairs(value: Any, name: str, batch_size: int) -> torch.Tensor:
    """``value`` as a ``(batch_size, 2)`` integer tensor, or a ``ValueError`` naming the batch key ``name``."""
    pairs = torch.as_tensor(value)
    if pairs.shape != (batch_size, 2) or pairs.is_floating_point() or pairs.is_complex():
        raise ValueError(
            f"batch[{name!r}] has shape {tuple(pairs.shape)} and dtype {pairs.dtype}; expected an integer tensor "
            f"of shape ({batch_size}, 2), one pair per image."
        )
    return pairs.long()


def build_time_ids(
    target_size: tuple[int, int],
    batch_size: int,
    original_size: Any = None,
    crop_top_left: Any = None,
) -> torch.Tensor:
    """SDXL's size and crop conditioning of a batch: ``(B, 6)`` integers per image, on the CPU.

    Each row is ``(original height, original width, crop top, crop left, target height, target
    width)``, the order of diffusers' ``StableDiffusionXLPipeline._get_add_time_ids`` and
    ``train_text_to_image_sdxl.py``.

    Args:
        target_size: ``(height, width)`` of the training images (what the model generates).
        batch_size: Number of images.
        original_size: ``(B, 2)`` height and width of each image before it was resized and cropped;
            ``None``: the target size (an image used as it is).
        crop_top_left: ``(B, 2)`` top and left pixel of each crop, in the resized image; ``None``: ``(0, 0)``.

    Raises:
        ValueError: When ``original_size`` or ``crop_top_left`` is not ``(B, 2)`` integers.
    """
    target = torch.tensor(target_size, dtype=torch.long).expand(batch_size, 2)
    original = target if original_size is None else _size_pairs(original_size, "original_size", batch_size)
    crop = (
        torch.zeros(batch_size, 2, dtype=torch.long)
        if crop_top_left is None
        else _size_pairs(crop_top_left, "crop_top_left", batch_size)
    )
    return torch.cat([original.cpu(), crop.cpu(), target], dim=1)
