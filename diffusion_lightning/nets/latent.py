"""The components of a latent text-to-image model: loaded from a pretrained folder or built from config.

A Stable Diffusion checkpoint is five parts (``unet``, ``vae``, ``text_encoder``, ``tokenizer``,
``scheduler``), each in its own subfolder of a diffusers pipeline folder or hub repository.
:func:`load_components` reads them with ``from_pretrained(..., subfolder=...)``;
:func:`build_components` builds small random ones from keyword dictionaries (what the tests and
``configs/smoke/sd_tiny.yaml`` use), seeded so that building twice gives the same weights.
:func:`write_byte_level_tokenizer` writes a working CLIP tokenizer (byte-level BPE over the 256
byte symbols, a handful of merges) without downloading a vocabulary.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

__all__ = [
    "SUBFOLDERS",
    "LatentComponents",
    "add_lora_adapters",
    "as_components",
    "build_components",
    "check_latent_channels",
    "check_not_sdxl",
    "check_subfolders",
    "clip_text_config",
    "component_scheduler",
    "component_tokenizer",
    "component_vae",
    "fused_lora_pipeline",
    "load_components",
    "load_subfolders",
    "lora_layers",
    "seeded",
    "set_attention",
    "vae_source",
    "write_byte_level_tokenizer",
]

#: Subfolders of a Stable Diffusion pipeline folder that the latent module reads.
SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
#: A few merges so that tokenization is real BPE (common words of digit captions).
MERGES = ("t h", "th e</w>", "o f</w>", "d i", "di g", "i t</w>", "dig it</w>", "h a", "n d")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from the 256 byte values to printable characters (the alphabet of byte-level BPE)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def _segment(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """BPE of one lower-case ASCII word under ``ranks`` (the merges so far), as ``CLIPTokenizer.bpe`` does it."""
    symbols = [*word[:-1], word[-1] + "</w>"]
    while len(symbols) > 1:
        rank, at = min((ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(symbols, symbols[1:])))
        if rank == len(ranks):
            break
        first, second = symbols[at], symbols[at + 1]
        merged, i = [], 0
        while i < len(symbols):  # every occurrence of the best pair, left to right
            if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == (first, second):
                merged.append(first + second)
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


def word_merges(words: Sequence[str], merges: Sequence[str] = MERGES) -> list[str]:
    """``merges`` plus the merges that make each of ``words`` one token (joining its pieces left to right)."""
    merges = list(merges)
    for word in words:
        if not (word.isascii() and word.isalpha() and word.islower()):
            raise ValueError(f"components.words: {word!r} is not accepted; expected lower-case ASCII letters.")
        ranks = {tuple(m.split()): i for i, m in enumerate(merges)}
        pieces = _segment(word, ranks)
        while len(pieces) > 1:
            merges.append(f"{pieces[0]} {pieces[1]}")
            pieces[:2] = [pieces[0] + pieces[1]]
    return merges


def write_byte_level_tokenizer(
    folder: str | os.PathLike[str], model_max_length: int = 77, words: Sequence[str] = ()
) -> Path:
    """Write a CLIP tokenizer over raw bytes (any text tokenizes; ~530 tokens) to ``folder``.

    Real checkpoints ship a 49k-token vocabulary; this one exists so that tiny models run
    offline with the real ``CLIPTokenizer`` code path. ``words`` become single tokens: a randomly
    initialised text encoder then gives each its own embedding, where spelled-out words that share
    letters ("three", "eight") start out close.
    """
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    characters = list(_bytes_to_unicode().values())
    tokens = characters + [c + "</w>" for c in characters]
    merges = word_merges(words)
    for merge in merges:
        merged = merge.replace(" ", "")
        if merged not in tokens:
            tokens.append(merged)
    tokens += [BOS, EOS]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False), "utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    tokenizer = CLIPTokenizer(
        vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"), model_max_length=model_max_length
    )
    tokenizer.save_pretrained(folder)
    return folder


@functools.cache
def _byte_level_tokenizer_folder(model_max_length: int, words: tuple[str, ...] = ()) -> Path:
    folder = Path(tempfile.mkdtemp(prefix="byte-level-tokenizer-"))
    return write_byte_level_tokenizer(folder, model_max_length, words)


def _tiny_unet() -> dict[str, Any]:
    return {
        "sample_size": 8,
        "block_out_channels": [16, 32],
        "layers_per_block": 1,
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "cross_attention_dim": 32,
        "attention_head_dim": 4,
        "norm_num_groups": 8,
    }


def _tiny_vae() -> dict[str, Any]:
    return {
        "block_out_channels": [8, 16],
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
        "latent_channels": 4,
        "norm_num_groups": 4,
        "layers_per_block": 1,
    }


def _tiny_text_encoder() -> dict[str, Any]:
    return {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}


@dataclass
class LatentComponents:
    """Keyword arguments of each part of a latent text-to-image model built from scratch.

    The defaults make a model small enough to train on a CPU in seconds: a 2-level
    ``UNet2DConditionModel`` with cross-attention at the first level, a 2-level ``AutoencoderKL``
    (one downsampling: 8x8 latents for 16x16 images), a 2-layer ``CLIPTextModel`` and the
    byte-level tokenizer.
    """

    unet: dict[str, Any] = field(default_factory=_tiny_unet)
    """``UNet2DConditionModel`` arguments (``in_channels``/``out_channels`` follow the VAE's latents,
    ``cross_attention_dim`` the text encoder's width)."""
    vae: dict[str, Any] = field(default_factory=_tiny_vae)
    """``AutoencoderKL`` arguments (not used with ``pretrained_vae``)."""
    pretrained_vae: str | None = None
    """An ``AutoencoderKL`` folder (e.g. what ``AutoencoderKLModule`` exports) or hub id to use instead
    of a random ``vae``; its ``scaling_factor`` scales the latents."""
    text_encoder: dict[str, Any] = field(default_factory=_tiny_text_encoder)
    """``CLIPTextConfig`` arguments (vocabulary size, token ids and positions follow the tokenizer)."""
    tokenizer: str = "byte-level"
    """A tokenizer folder, or ``byte-level`` for :func:`write_byte_level_tokenizer`'s."""
    model_max_length: int = 77
    """Maximum prompt length in tokens of the ``byte-level`` tokenizer."""
    words: list[str] = field(default_factory=list)
    """Words the ``byte-level`` tokenizer keeps whole, one token each (lower-case ASCII letters): the
    vocabulary of the captions, so that a random text encoder tells apart words that share letters."""
    scheduler: dict[str, Any] = field(default_factory=dict)
    """``DDPMScheduler`` arguments (the module's noise-schedule arguments apply on top)."""
    seed: int = 0
    """Seed of the random initialisation: the same config always builds the same weights."""


ComponentsT = TypeVar("ComponentsT", bound=LatentComponents)


def build_components(config: LatentComponents | dict[str, Any] | None = None) -> dict[str, Any]:
    """``unet``, ``vae``, ``text_encoder``, ``tokenizer`` and ``scheduler`` built from ``config``."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    config = as_components(config, LatentComponents)
    tokenizer = component_tokenizer(config)
    text_config = clip_text_config(tokenizer, config.text_encoder)
    with seeded(config.seed):
        vae = component_vae(config)
        text_encoder = CLIPTextModel(text_config)
        unet_kwargs = {
            "in_channels": vae.config.latent_channels,
            "out_channels": vae.config.latent_channels,
            "cross_attention_dim": text_config.hidden_size,
            **config.unet,
        }
        check_not_sdxl(unet_kwargs.get("addition_embed_type"), "components.unet")
        unet = UNet2DConditionModel(**unet_kwargs)
    check_latent_channels(unet, vae, "components.unet", vae_source(config))
    parts = {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer}
    return {**parts, "scheduler": component_scheduler(config)}


def as_components(config: ComponentsT | dict[str, Any] | None, cls: type[ComponentsT]) -> ComponentsT:
    """``config`` as a ``cls`` instance: ``None`` gives the defaults, a dictionary its keyword arguments."""
    if config is None:
        return cls()
    if isinstance(config, dict):
        return cls(**config)
    return config


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Draw from torch's CPU generator seeded with ``seed``, leaving the caller's random state as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def component_tokenizer(config: LatentComponents) -> Any:
    """The ``CLIPTokenizer`` of ``config.tokenizer``: the byte-level one, or a tokenizer folder."""
    from transformers import CLIPTokenizer

    if config.tokenizer == "byte-level":
        return CLIPTokenizer.from_pretrained(_byte_level_tokenizer_folder(config.model_max_length, tuple(config.words)))
    if not Path(config.tokenizer).is_dir():
        raise FileNotFoundError(f"components.tokenizer={config.tokenizer!r} is not a folder (or 'byte-level').")
    return CLIPTokenizer.from_pretrained(config.tokenizer)


def clip_text_config(tokenizer: Any, overrides: dict[str, Any]) -> Any:
    """A ``CLIPTextConfig`` sized to ``tokenizer`` (vocabulary, positions, special tokens), then ``overrides``."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        **{
            "vocab_size": len(tokenizer),
            "max_position_embeddings": tokenizer.model_max_length,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            **overrides,
        }
    )


def component_vae(config: LatentComponents) -> Any:
    """The ``AutoencoderKL`` of ``config``: the ``pretrained_vae`` folder, else a random one of ``config.vae``."""
    from diffusers import AutoencoderKL

    return _pretrained_vae(config.pretrained_vae) if config.pretrained_vae else AutoencoderKL(**config.vae)


def vae_source(config: LatentComponents) -> str:
    """Where the VAE of ``config`` comes from, for error messages."""
    return f"components.pretrained_vae={config.pretrained_vae!r}" if config.pretrained_vae else "components.vae"


def component_scheduler(config: LatentComponents) -> Any:
    """The ``DDPMScheduler`` of ``config.scheduler``."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(**config.scheduler)


def check_not_sdxl(addition_embed_type: str | None, source: str) -> None:
    """Refuse an SDXL UNet (``addition_embed_type='text_time'``) where one CLIP text encoder conditions the model.

    Such a UNet needs a pooled text embedding and size/crop time ids at every call, which only
    :class:`~diffusion_lightning.modules.latent_xl.StableDiffusionXLModule` provides; without this
    check the model would fail at its first training step, deep inside diffusers.
    """
    if addition_embed_type == "text_time":
        raise ValueError(
            f"{source} has addition_embed_type='text_time' (an SDXL UNet, conditioned on a pooled text embedding "
            "and size/crop time ids); LatentDiffusionModule accepts None or 'text'. Train it with "
            "diffusion_lightning.StableDiffusionXLModule."
        )


def _pretrained_vae(source: str) -> Any:
    from diffusers import AutoencoderKL

    if Path(source).exists() and not (Path(source) / "config.json").is_file():
        raise FileNotFoundError(
            f"components.pretrained_vae={source!r} holds no config.json; expected an AutoencoderKL folder "
            "(as written by AutoencoderKL.save_pretrained or `diffusion-lightning export` of an AutoencoderKLModule)."
        )
    return AutoencoderKL.from_pretrained(source)


def check_latent_channels(unet: Any, vae: Any, unet_source: str, vae_source: str) -> None:
    """Raise a ``ValueError`` naming both sources when the UNet does not take the VAE's latents."""
    latent, unet_in, unet_out = vae.config.latent_channels, unet.config.in_channels, unet.config.out_channels
    if unet_in != latent or unet_out != latent:
        raise ValueError(
            f"{unet_source} has in_channels={unet_in}, out_channels={unet_out} but the VAE of {vae_source} makes "
            f"latents of latent_channels={latent}; the UNet must take and predict {latent} channels "
            "(drop in_channels/out_channels from the UNet to follow the VAE)."
        )


def check_subfolders(
    pretrained: str, subfolders: Sequence[str] = SUBFOLDERS, writer: str = "StableDiffusionPipeline"
) -> None:
    """Raise ``FileNotFoundError`` naming what a local ``pretrained`` folder lacks (a hub id is left to the hub)."""
    root = Path(pretrained)
    if not root.exists():
        return  # a hub id: from_pretrained resolves (and reports) it
    if not root.is_dir():
        raise FileNotFoundError(f"pretrained={pretrained!r} is a file; expected a pipeline folder or a hub id.")
    missing = [name for name in subfolders if not (root / name).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"pretrained={pretrained!r} lacks the subfolder(s) {missing}; a {writer} folder has "
            f"{list(subfolders)} (as written by {writer}.save_pretrained)."
        )


def load_components(
    pretrained: str, revision: str | None = None, variant: str | None = None, torch_dtype: Any = None
) -> dict[str, Any]:
    """The five components of a Stable Diffusion pipeline folder or hub repository."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    check_subfolders(pretrained)
    classes = {
        "tokenizer": CLIPTokenizer,
        "text_encoder": CLIPTextModel,
        "vae": AutoencoderKL,
        "unet": UNet2DConditionModel,
        "scheduler": DDPMScheduler,
    }
    parts = load_subfolders(pretrained, classes, revision, variant, torch_dtype)
    where = f"pretrained={pretrained!r}"
    check_not_sdxl(parts["unet"].config.get("addition_embed_type"), f"the unet of {where}")
    check_latent_channels(parts["unet"], parts["vae"], f"the unet of {where}", f"the vae of {where}")
    return parts


def load_subfolders(
    pretrained: str,
    classes: dict[str, Any],
    revision: str | None = None,
    variant: str | None = None,
    torch_dtype: Any = None,
) -> dict[str, Any]:
    """Each ``classes[name].from_pretrained(pretrained, subfolder=name)``, in the order of ``classes``.

    Tokenizers and schedulers get the ``revision`` alone; models also the weights ``variant`` and
    ``torch_dtype`` (which the others do not accept).
    """
    common: dict[str, Any] = {"revision": revision}
    weights: dict[str, Any] = {**common, "variant": variant}
    if torch_dtype is not None:
        weights["torch_dtype"] = torch_dtype
    parts = {}
    for name, cls in classes.items():
        is_model = isinstance(cls, type) and issubclass(cls, torch.nn.Module)
        parts[name] = cls.from_pretrained(pretrained, subfolder=name, **(weights if is_model else common))
    return parts


def add_lora_adapters(
    unet: Any,
    config: dict[str, Any],
    unet_targets: list[str],
    text_encoders: Sequence[Any] = (),
    text_targets: list[str] | None = None,
) -> None:
    """peft LoRA adapters (``r``, ``lora_alpha``, ``lora_dropout`` of ``config``) on the UNet and the text encoders."""
    from peft import LoraConfig

    unet.add_adapter(LoraConfig(**config, init_lora_weights="gaussian", target_modules=unet_targets))
    if text_encoders:
        # peft's own injection (what diffusers' load_lora_weights uses for text encoders): transformers'
        # add_adapter wrapper demands a newer peft than diffusers does.
        from peft import inject_adapter_in_model

        text_config = LoraConfig(**config, init_lora_weights="gaussian", target_modules=text_targets)
        for text_encoder in text_encoders:
            inject_adapter_in_model(text_config, text_encoder, adapter_name="default")


def set_attention(unet: Any, attention: str) -> None:
    """The UNet's attention implementation: ``sdpa`` (diffusers' default), ``xformers`` or ``default``."""
    if attention == "xformers":
        try:
            import xformers  # noqa: F401
        except ImportError as error:
            raise ValueError("attention='xformers' needs the xformers package; use 'sdpa' instead.") from error
        unet.enable_xformers_memory_efficient_attention()
    elif attention == "default":
        from diffusers.models.attention_processor import AttnProcessor

        unet.set_attn_processor(AttnProcessor())


def lora_layers(unet: Any, text_encoder: Any = None, text_encoder_2: Any = None) -> dict[str, dict[str, torch.Tensor]]:
    """The peft adapters as ``unet_lora_layers`` (and ``text_encoder_lora_layers``, ``text_encoder_2_lora_layers``).

    What ``StableDiffusionPipeline.save_lora_weights`` (``StableDiffusionXLPipeline``'s with both
    text encoders) takes. The UNet's stay in peft's names
    (``lora_A``/``lora_B``), which ``load_lora_weights`` reads as they are: diffusers' older layout
    (``convert_state_dict_to_diffusers``) renames a UNet module called ``k_proj`` (the attention
    pooling of ``addition_embed_type="text"``) to a text-encoder key that the UNet loader then
    skips, leaving those adapters uninitialised. The text encoder's adapters were injected with
    peft directly (``inject_adapter_in_model``), so they are read from its state dict, dropping the
    adapter name as ``get_peft_model_state_dict`` would.
    """
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    layers = {"unet_lora_layers": get_peft_model_state_dict(unet)}
    for name, encoder in (("text_encoder_lora_layers", text_encoder), ("text_encoder_2_lora_layers", text_encoder_2)):
        if encoder is not None:
            adapters = {k.replace(".default", ""): v.detach() for k, v in encoder.state_dict().items() if "lora_" in k}
            layers[name] = convert_state_dict_to_diffusers(adapters)
    return layers


def fused_lora_pipeline(pipeline: Any, lora_dir: str | os.PathLike[str]) -> Any:
    """``pipeline`` (of adapter-free components) with the LoRA in ``lora_dir`` fused into its weights.

    Loading, fusing and unloading through diffusers leaves plain weights (no peft ``base_layer``
    wrappers), so the pipeline saves to a folder that ``from_pretrained`` loads as a base model.
    """
    pipeline.load_lora_weights(lora_dir)
    pipeline.fuse_lora()
    pipeline.unload_lora_weights()
    return pipeline
