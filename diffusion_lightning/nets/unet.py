"""Class-conditioned pixel-space UNets built from a typed, YAML-friendly description."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from diffusers import ModelMixin, UNet2DModel

from diffusion_lightning.nets.class_conditioned import ClassConditionedUnet

# defined beside the pipeline, whose module an exported folder carries as pipeline.py
from diffusion_lightning.pipelines.class_conditioned import INSTALLED_COMPONENTS
from diffusion_lightning.pipelines.class_conditioned import num_classes_of as num_classes_of

#: An exported folder carries ClassConditionedUnet's module as unet/class_conditioned.py (see
#: :func:`~diffusion_lightning.pipelines.save_pipeline_code`); with the package installed, its own class loads it.
INSTALLED_COMPONENTS[(ClassConditionedUnet.__module__.rsplit(".", 1)[-1], ClassConditionedUnet.__name__)] = (
    ClassConditionedUnet
)


@dataclass
class UNetConfig:
    """Architecture of a class-conditioned pixel-space UNet.

    Data-dependent sizes (image size, channels, number of classes) are not here: the data module
    provides them and the CLI links them to the model.
    """

    block_out_channels: tuple[int, ...] = (32, 64, 128)
    """Channels of each resolution level, highest resolution first."""
    layers_per_block: int = 1
    """ResNet layers per level (the decoder has one more)."""
    attention_levels: tuple[int, ...] = ()
    """Indices of the levels (0 = highest resolution) that get self-attention blocks."""
    mid_attention: bool = False
    """Self-attention in the middle block."""
    attention_head_dim: int = 8
    """Channels per attention head."""
    norm_num_groups: int = 8
    """Group-norm groups; must divide every entry of ``block_out_channels``."""
    dropout: float = 0.0
    """Dropout in the ResNet blocks."""
    resnet_time_scale_shift: Literal["default", "scale_shift"] = "default"
    """How the time (and class) embedding enters the ResNets: added, or as scale and shift (FiLM)."""
    conditioning: Literal["class_embedding", "concat"] = "class_embedding"
    """``class_embedding``: a plain ``UNet2DModel`` with ``num_class_embeds`` (loads with
    ``UNet2DModel.from_pretrained`` alone); ``concat``: :class:`ClassConditionedUnet`, a learned
    embedding concatenated to the input channels."""
    class_embed_dim: int = 4
    """Channels of the concatenated class embedding (``conditioning: concat`` only)."""

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first field that cannot build a network."""
        levels = len(self.block_out_channels)
        if levels < 1 or any(int(c) < 1 for c in self.block_out_channels):
            raise ValueError(
                f"net.block_out_channels={self.block_out_channels!r} must be a non-empty list of positive ints."
            )
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if self.norm_num_groups < 1 or bad:
            raise ValueError(
                f"net.norm_num_groups={self.norm_num_groups!r} must divide every width in "
                f"block_out_channels={tuple(self.block_out_channels)!r} (not {bad})."
            )
        if self.layers_per_block < 1:
            raise ValueError(f"net.layers_per_block={self.layers_per_block!r} must be >= 1.")
        outside = [i for i in self.attention_levels if not 0 <= i < levels]
        if outside:
            raise ValueError(
                f"net.attention_levels={self.attention_levels!r} has {outside}; levels are 0..{levels - 1}."
            )
        if self.attention_head_dim < 1:
            raise ValueError(f"net.attention_head_dim={self.attention_head_dim!r} must be >= 1.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"net.dropout={self.dropout!r} must be in [0, 1).")
        if self.conditioning not in ("class_embedding", "concat"):
            raise ValueError(
                f"net.conditioning={self.conditioning!r} is not supported; expected 'class_embedding' or 'concat'."
            )
        if self.class_embed_dim < 1:
            raise ValueError(f"net.class_embed_dim={self.class_embed_dim!r} must be >= 1.")

    def block_types(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """diffusers down and up block names implied by ``attention_levels``."""
        levels = len(self.block_out_channels)
        down = tuple("AttnDownBlock2D" if i in self.attention_levels else "DownBlock2D" for i in range(levels))
        up = tuple("AttnUpBlock2D" if i in self.attention_levels else "UpBlock2D" for i in reversed(range(levels)))
        return down, up


# Hyper-parameters hold this dataclass: let ``torch.load(weights_only=True)`` (what
# ``Trainer.fit(ckpt_path=...)`` uses) rebuild it without allowing arbitrary code.
torch.serialization.add_safe_globals([UNetConfig])


def build_unet(config: UNetConfig, *, sample_size: int, in_channels: int, num_classes: int) -> ModelMixin:
    """Build the network described by ``config`` for images of ``in_channels x sample_size^2``.

    The class embedding always has ``num_classes + 1`` rows: label ``num_classes`` is the null
    class that classifier-free guidance uses for the unconditional prediction.
    """
    config.validate()
    levels = len(config.block_out_channels)
    if sample_size < 2 ** (levels - 1) or sample_size % 2 ** (levels - 1):
        raise ValueError(
            f"image_size={sample_size!r} must be divisible by 2**(levels - 1) = {2 ** (levels - 1)} "
            f"for block_out_channels={tuple(config.block_out_channels)!r}."
        )
    if num_classes < 1:
        raise ValueError(f"num_classes={num_classes!r} must be >= 1.")
    down, up = config.block_types()
    common = dict(
        sample_size=sample_size,
        out_channels=in_channels,
        block_out_channels=tuple(int(c) for c in config.block_out_channels),
        layers_per_block=config.layers_per_block,
        down_block_types=down,
        up_block_types=up,
        norm_num_groups=config.norm_num_groups,
        attention_head_dim=config.attention_head_dim,
        add_attention=config.mid_attention,
        dropout=config.dropout,
        resnet_time_scale_shift=config.resnet_time_scale_shift,
    )
    if config.conditioning == "concat":
        return ClassConditionedUnet(
            num_classes=num_classes, class_emb_size=config.class_embed_dim, in_channels=in_channels, **common
        )
    return UNet2DModel(in_channels=in_channels, num_class_embeds=num_classes + 1, **common)
