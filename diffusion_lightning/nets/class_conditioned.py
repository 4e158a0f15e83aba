"""A UNet conditioned by concatenating a learned class embedding to its input channels."""

from __future__ import annotations

import torch
from diffusers import ModelMixin, UNet2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.unets.unet_2d import UNet2DOutput
from torch import nn


class ClassConditionedUnet(ModelMixin, ConfigMixin):
    """``UNet2DModel`` that sees its class as extra, constant input channels.

    A class label ``c`` is embedded to ``class_emb_size`` numbers, broadcast over the image and
    concatenated to the noisy sample before the UNet (the diffusers course's conditioning). Label
    ``num_classes`` is the reserved null class used for classifier-free guidance.

    The forward signature matches ``UNet2DModel`` (``class_labels`` keyword, ``UNet2DOutput``) so
    pipelines and modules treat both networks alike. Saved and loaded the diffusers way
    (``save_pretrained``/``from_pretrained``, safetensors weights plus ``config.json``).

    Args:
        num_classes: Number of real classes (the embedding has one more row, the null class).
        class_emb_size: Channels of the class embedding concatenated to the input.
        sample_size: Image height and width.
        in_channels: Channels of the images (not counting the class channels).
        out_channels: Channels of the prediction.
        block_out_channels: Width of each resolution level.
        layers_per_block: ResNet layers per level.
        down_block_types: diffusers down block names, one per level.
        up_block_types: diffusers up block names, one per level (lowest resolution first).
        norm_num_groups: Group-norm groups (must divide every width).
        attention_head_dim: Channels per attention head in attention blocks.
        add_attention: Self-attention in the middle block.
        dropout: Dropout in the ResNet blocks.
        resnet_time_scale_shift: ``default`` adds the time embedding, ``scale_shift`` applies it as FiLM.
    """

    @register_to_config
    def __init__(
        self,
        num_classes: int = 10,
        class_emb_size: int = 4,
        sample_size: int = 28,
        in_channels: int = 1,
        out_channels: int = 1,
        block_out_channels: tuple[int, ...] = (32, 64, 64),
        layers_per_block: int = 2,
        down_block_types: tuple[str, ...] = ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types: tuple[str, ...] = ("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups: int = 8,
        attention_head_dim: int = 8,
        add_attention: bool = True,
        dropout: float = 0.0,
        resnet_time_scale_shift: str = "default",
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes={num_classes!r} must be >= 1.")
        if class_emb_size < 1:
            raise ValueError(f"class_emb_size={class_emb_size!r} must be >= 1.")
        self.class_emb = nn.Embedding(num_classes + 1, class_emb_size)
        self.model = UNet2DModel(
            sample_size=sample_size,
            in_channels=in_channels + class_emb_size,
            out_channels=out_channels,
            block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block,
            down_block_types=tuple(down_block_types),
            up_block_types=tuple(up_block_types),
            norm_num_groups=norm_num_groups,
            attention_head_dim=attention_head_dim,
            add_attention=add_attention,
            dropout=dropout,
            resnet_time_scale_shift=resnet_time_scale_shift,
        )

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        class_labels: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> UNet2DOutput | tuple[torch.Tensor]:
        if class_labels is None:
            raise ValueError("class_labels is required (use num_classes for the unconditional class).")
        batch, _, height, width = sample.shape
        emb = self.class_emb(class_labels.to(sample.device).long()).to(sample.dtype)
        emb = emb.view(batch, -1, 1, 1).expand(batch, emb.shape[-1], height, width)
        out = self.model(torch.cat((sample, emb), dim=1), timestep).sample
        if not return_dict:
            return (out,)
        return UNet2DOutput(sample=out)
