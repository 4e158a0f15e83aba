import pytest
import torch
from diffusers import UNet2DModel

from diffusion_lightning import ClassConditionedUnet, UNetConfig, build_unet
from diffusion_lightning.nets import num_classes_of
from tests.conftest import tiny_config


def test_default_network_is_a_plain_unet2dmodel_with_a_null_class(tmp_path):
    unet = build_unet(tiny_config(attention_levels=(1,)), sample_size=8, in_channels=1, num_classes=10)
    assert type(unet) is UNet2DModel
    assert unet.config.num_class_embeds == 11
    assert unet.config.down_block_types == ("DownBlock2D", "AttnDownBlock2D")
    assert unet.config.up_block_types == ("AttnUpBlock2D", "UpBlock2D")
    assert num_classes_of(unet) == 10
    x = torch.randn(2, 1, 8, 8)
    out = unet(x, torch.tensor([1, 500]), class_labels=torch.tensor([3, 10])).sample
    assert out.shape == x.shape
    unet.save_pretrained(tmp_path / "unet")
    again = UNet2DModel.from_pretrained(tmp_path / "unet")
    torch.testing.assert_close(
        again(x, 5, class_labels=torch.tensor([0, 1])).sample, unet(x, 5, class_labels=torch.tensor([0, 1])).sample
    )


def test_concat_network_saves_and_loads_the_diffusers_way(tmp_path):
    unet = build_unet(
        tiny_config(conditioning="concat", class_embed_dim=3), sample_size=8, in_channels=3, num_classes=4
    )
    assert isinstance(unet, ClassConditionedUnet)
    assert unet.class_emb.num_embeddings == 5
    assert unet.model.config.in_channels == 6
    x = torch.randn(2, 3, 8, 8)
    labels = torch.tensor([0, 4])
    out = unet(x, torch.tensor([10, 20]), class_labels=labels).sample
    assert out.shape == x.shape
    unet.save_pretrained(tmp_path / "unet")
    assert (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    again = ClassConditionedUnet.from_pretrained(tmp_path / "unet")
    assert num_classes_of(again) == 4
    torch.testing.assert_close(again(x, 7, class_labels=labels).sample, unet(x, 7, class_labels=labels).sample)


def test_concat_network_requires_labels():
    unet = ClassConditionedUnet(
        num_classes=2,
        sample_size=8,
        block_out_channels=(8, 16),
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    with pytest.raises(ValueError, match="class_labels"):
        unet(torch.randn(1, 1, 8, 8), 1)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (dict(norm_num_groups=3), "norm_num_groups"),
        (dict(attention_levels=(2,)), "attention_levels"),
        (dict(layers_per_block=0), "layers_per_block"),
        (dict(block_out_channels=()), "block_out_channels"),
        (dict(dropout=1.0), "dropout"),
        (dict(conditioning="film"), "conditioning"),
    ],
)
def test_invalid_architectures_name_the_field(overrides, match):
    with pytest.raises(ValueError, match=match):
        build_unet(tiny_config(**overrides), sample_size=8, in_channels=1, num_classes=2)


def test_image_size_must_fit_the_levels():
    with pytest.raises(ValueError, match="image_size=6"):
        build_unet(
            UNetConfig(block_out_channels=(8, 8, 8), norm_num_groups=4), sample_size=6, in_channels=1, num_classes=2
        )
