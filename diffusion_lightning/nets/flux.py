"""The components of Flux: a flow-matching transformer conditioned on a CLIP and a T5 text encoder.

FLUX.1 (Black Forest Labs, 2024) denoises packed latents (2x2 patches of the VAE's latents, one
token each) with an MM-DiT, ``FluxTransformer2DModel``. Its conditioning comes from two text
encoders: the T5 encoder's last hidden states are the sequence it attends to jointly with the image
tokens (``joint_attention_dim`` wide), and the CLIP encoder's pooled output enters the timestep
embedding (``pooled_projection_dim`` wide). Guidance-distilled checkpoints (FLUX.1-dev) also embed
a guidance value (``guidance_embeds=True``). A pipeline folder has seven parts: ``transformer``,
``vae``, ``text_encoder`` (CLIP), ``text_encoder_2`` (T5), ``tokenizer``, ``tokenizer_2`` and
``scheduler`` (a ``FlowMatchEulerDiscreteScheduler`` that shifts its noise levels by resolution).

:func:`load_flux_components` reads them from a folder or hub id; :func:`build_flux_components`
builds small random ones from keyword dictionaries (:class:`FluxComponents`, what the tests and
``configs/smoke/flux_tiny.yaml`` use), with the byte-level CLIP tokenizer of
:mod:`~diffusion_lightning.nets.latent` and a character-level T5 tokenizer written offline
(:func:`write_t5_tokenizer`). Both check that the transformer fits the encoders and the VAE
(:func:`check_flux_components`), which diffusers would otherwise report only at the first forward
pass, as a shape error.
"""

from __future__ import annotations

import functools
import inspect
import os
import string
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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

__all__ = [
    "FLUX_SCHEDULER",
    "FLUX_SUBFOLDERS",
    "FluxComponents",
    "build_flux_components",
    "check_flux_components",
    "load_flux_components",
    "write_t5_tokenizer",
]

#: Subfolders of a Flux pipeline folder that the Flux module reads.
FLUX_SUBFOLDERS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
#: FLUX.1's scheduler config: the noise levels shift with the number of image tokens (``mu`` of
#: ``FluxPipeline.__call__``), from ``base_shift`` at 256 tokens to ``max_shift`` at 4096.
FLUX_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}


def write_t5_tokenizer(folder: str | os.PathLike[str], model_max_length: int = 512, words: Sequence[str] = ()) -> Path:
    """Write a T5 tokenizer (a ``tokenizers`` Unigram model over printable ASCII characters) to ``folder``.

    Real checkpoints ship a 32k-piece SentencePiece vocabulary; this one exists so that tiny models
    run offline through the real ``T5TokenizerFast`` code path (``</s>`` appended, ``<pad>`` = 0,
    other characters ``<unk>``). ``words`` become single pieces, as in the byte-level CLIP tokenizer.
    """
    from transformers import T5TokenizerFast

    characters = sorted(set(string.ascii_letters + string.digits + string.punctuation))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -5.0) for c in characters] + [("\u2581" + w, -1.0) for w in dict.fromkeys(words)]
    tokenizer = T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=model_max_length)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    return folder


@functools.cache
def _t5_tokenizer_folder(model_max_length: int, words: tuple[str, ...] = ()) -> Path:
    return write_t5_tokenizer(Path(tempfile.mkdtemp(prefix="t5-tokenizer-")), model_max_length, words)


def _tiny_transformer() -> dict[str, Any]:
    return {
        "num_layers": 1,
        "num_single_layers": 1,
        "attention_head_dim": 8,
        "num_attention_heads": 2,
        "axes_dims_rope": [2, 2, 4],
        "guidance_embeds": True,
    }


def _tiny_flux_vae() -> dict[str, Any]:
    return {
        "block_out_channels": [8, 16],
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
        "latent_channels": 4,
        "norm_num_groups": 4,
        "layers_per_block": 1,
        "shift_factor": 0.1,
        "scaling_factor": 0.5,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
    }


def _tiny_t5() -> dict[str, Any]:
    return {"d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4}


@dataclass
class FluxComponents:
    """Keyword arguments of each part of a Flux model built from scratch.

    The defaults make a model small enough to train on a CPU in seconds: a one double-stream, one
    single-stream block ``FluxTransformer2DModel`` with guidance embedding, a 2-level
    ``AutoencoderKL`` with Flux's ``shift_factor`` (no quant convs, as FLUX.1's), a 2-layer CLIP and a
    2-layer T5 encoder of width 32, and offline tokenizers.
    """

    transformer: dict[str, Any] = field(default_factory=_tiny_transformer)
    """``FluxTransformer2DModel`` arguments. Unless given: ``in_channels`` is 4 x the VAE's
    ``latent_channels`` (packed 2x2 patches), ``joint_attention_dim`` the T5 encoder's ``d_model``,
    ``pooled_projection_dim`` the CLIP encoder's ``hidden_size``. A given dictionary replaces the tiny
    defaults as a whole, and diffusers' own defaults are FLUX.1's full size (12B parameters): give
    every size argument."""
    vae: dict[str, Any] = field(default_factory=_tiny_flux_vae)
    """``AutoencoderKL`` arguments (not used with ``pretrained_vae``)."""
    pretrained_vae: str | None = None
    """An ``AutoencoderKL`` folder or hub id to use instead of a random ``vae``."""
    text_encoder: dict[str, Any] = field(default_factory=_tiny_text_encoder)
    """``CLIPTextConfig`` arguments of the CLIP text encoder (its pooled output conditions the timestep)."""
    text_encoder_2: dict[str, Any] = field(default_factory=_tiny_t5)
    """``T5Config`` arguments of the T5 encoder (vocabulary and special token ids follow ``tokenizer_2``)."""
    tokenizer: str = "byte-level"
    """A CLIP tokenizer folder, or ``byte-level`` for the offline byte-level BPE tokenizer."""
    tokenizer_2: str = "character-level"
    """A T5 tokenizer folder, or ``character-level`` for :func:`write_t5_tokenizer`'s."""
    model_max_length: int = 77
    """Maximum prompt length in tokens of the ``byte-level`` CLIP tokenizer."""
    words: list[str] = field(default_factory=list)
    """Words both offline tokenizers keep whole, one token each (lower-case ASCII letters)."""
    scheduler: dict[str, Any] = field(default_factory=dict)
    """``FlowMatchEulerDiscreteScheduler`` arguments over :data:`FLUX_SCHEDULER`."""
    seed: int = 0
    """Seed of the random initialisation: the same config always builds the same weights."""


def _t5_tokenizer(config: FluxComponents, name: str = "tokenizer_2") -> Any:
    """The T5 tokenizer that the field ``name`` of ``config`` names: the offline one, or a folder."""
    from transformers import T5TokenizerFast

    source = getattr(config, name)
    if source == "character-level":
        return T5TokenizerFast.from_pretrained(_t5_tokenizer_folder(512, tuple(config.words)))
    if not Path(source).is_dir():
        raise FileNotFoundError(f"components.{name}={source!r} is not a folder (or 'character-level').")
    return T5TokenizerFast.from_pretrained(source)


def build_flux_components(config: FluxComponents | dict[str, Any] | None = None) -> dict[str, Any]:
    """The seven Flux components built from ``config`` (seeded: the same config gives the same weights)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    config = as_components(config, FluxComponents)  # type: ignore[type-var]
    tokenizer = component_tokenizer(config)  # type: ignore[arg-type]
    tokenizer_2 = _t5_tokenizer(config)
    text_config = clip_text_config(tokenizer, config.text_encoder)
    t5_config = t5_text_config(tokenizer_2, config.text_encoder_2)
    with seeded(config.seed):
        vae = component_vae(config)  # type: ignore[arg-type]
        text_encoder = CLIPTextModel(text_config)
        text_encoder_2 = T5EncoderModel(t5_config)
        transformer_kwargs = {
            "in_channels": 4 * vae.config.latent_channels,
            "joint_attention_dim": t5_config.d_model,
            "pooled_projection_dim": text_config.hidden_size,
            **config.transformer,
        }
        # checked before it is built: a mistake here can mean a transformer of FLUX.1's 12B parameters
        defaults = init_defaults(FluxTransformer2DModel)
        sources = ("components.transformer", "components.text_encoder", "components.text_encoder_2")
        check_flux_components(
            {**defaults, **transformer_kwargs},
            text_config,
            t5_config,
            vae.config.latent_channels,
            (*sources, vae_source(config)),  # type: ignore[arg-type]
        )
        transformer = FluxTransformer2DModel(**transformer_kwargs)
    parts = {
        "transformer": transformer,
        "vae": vae,
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer_2,
        "scheduler": FlowMatchEulerDiscreteScheduler(**{**FLUX_SCHEDULER, **config.scheduler}),
    }
    return parts


def t5_text_config(tokenizer: Any, overrides: dict[str, Any]) -> Any:
    """A ``T5Config`` for an encoder of ``tokenizer``'s vocabulary and special tokens, with ``overrides``."""
    from transformers import T5Config

    return T5Config(
        **{
            "vocab_size": len(tokenizer),
            "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "decoder_start_token_id": tokenizer.pad_token_id,
            **overrides,
        }
    )


def init_defaults(cls: type) -> dict[str, Any]:
    """The default arguments of ``cls.__init__``: what a partial config falls back to."""
    return {
        name: parameter.default
        for name, parameter in inspect.signature(cls.__init__).parameters.items()
        if parameter.default is not inspect.Parameter.empty
    }


def load_flux_components(
    pretrained: str, revision: str | None = None, variant: str | None = None, torch_dtype: Any = None
) -> dict[str, Any]:
    """The seven components of a Flux pipeline folder or hub repository, checked to fit together."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    check_subfolders(pretrained, FLUX_SUBFOLDERS, "FluxPipeline")
    classes = {
        "tokenizer": CLIPTokenizer,
        "tokenizer_2": T5TokenizerFast,
        "text_encoder": CLIPTextModel,
        "text_encoder_2": T5EncoderModel,
        "vae": AutoencoderKL,
        "transformer": FluxTransformer2DModel,
        "scheduler": FlowMatchEulerDiscreteScheduler,
    }
    parts = load_subfolders(pretrained, classes, revision, variant, torch_dtype)
    where = f"pretrained={pretrained!r}"
    check_flux_components(
        parts["transformer"].config,
        parts["text_encoder"].config,
        parts["text_encoder_2"].config,
        parts["vae"].config.latent_channels,
        tuple(f"the {name} of {where}" for name in ("transformer", "text_encoder", "text_encoder_2", "vae")),
    )
    return parts


def check_flux_components(
    transformer: Mapping[str, Any], clip: Any, t5: Any, latent_channels: int, sources: tuple[str, str, str, str]
) -> None:
    """Raise a ``ValueError`` naming the field when the transformer does not take what the encoders and VAE give.

    ``joint_attention_dim`` must be the T5 encoder's ``d_model`` (its hidden states are the text
    tokens), ``pooled_projection_dim`` the CLIP encoder's ``hidden_size`` (its pooled output), and
    ``in_channels`` (and ``out_channels``, when set) four times the VAE's ``latent_channels`` with
    ``patch_size=1``: the transformer reads and predicts 2x2 patches of latents packed into tokens.

    Args:
        transformer: The transformer's config (or its complete keyword arguments).
        clip: The CLIP text encoder's config.
        t5: The T5 encoder's config.
        latent_channels: The VAE's ``latent_channels``.
        sources: Where the transformer, CLIP encoder, T5 encoder and VAE come from, for the messages.
    """
    transformer_source, text_source, text_2_source, vae_source = sources
    joint = transformer.get("joint_attention_dim")
    if joint != t5.d_model:
        raise ValueError(
            f"{transformer_source} has joint_attention_dim={joint!r} but the T5 encoder's hidden states "
            f"({text_2_source}.d_model) are {t5.d_model} wide; set joint_attention_dim: {t5.d_model}."
        )
    pooled = transformer.get("pooled_projection_dim")
    if pooled != clip.hidden_size:
        raise ValueError(
            f"{transformer_source} has pooled_projection_dim={pooled!r} but the CLIP encoder's pooled output "
            f"({text_source}.hidden_size) is {clip.hidden_size} wide; set pooled_projection_dim: {clip.hidden_size}."
        )
    patch = transformer.get("patch_size")
    if patch != 1:
        raise ValueError(
            f"{transformer_source} has patch_size={patch!r}; Flux packs 2x2 latent patches itself and accepts 1."
        )
    packed = 4 * latent_channels
    channels = transformer.get("in_channels"), transformer.get("out_channels") or transformer.get("in_channels")
    if channels != (packed, packed):
        raise ValueError(
            f"{transformer_source} has in_channels={channels[0]!r}, out_channels={transformer.get('out_channels')!r} "
            f"but the VAE of {vae_source} makes latents of latent_channels={latent_channels}, "
            f"packed in 2x2 patches: set in_channels: {packed} (and out_channels: {packed} or null)."
        )
