"""CrossAttentionHeatmapLogger and the accumulating cross-attention processor."""

from __future__ import annotations

import PIL.Image
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from diffusion_lightning import LatentDiffusionModule
from diffusion_lightning.callbacks.cross_attention import CrossAttentionHeatmapLogger
from diffusion_lightning.utils.attention import attention_processors
from diffusion_lightning.utils.cross_attention import (
    CrossAttentionAccumulator,
    cross_attention_layers,
    normalize_maps,
    prompt_tokens,
)
from tests.conftest import quiet_trainer, tiny_ddpm

PROMPT = "a handwritten digit"
DOWN = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"  # 8x8 queries (latents are 8x8)
MID = "mid_block.attentions.0.transformer_blocks.0.attn2"  # 4x4 queries


class Captioned(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(i)
        return {"images": torch.rand(3, 16, 16, generator=g) * 2 - 1, "captions": f"a digit {i % 4}"}


def collate(items: list[dict]) -> dict:
    return {"images": torch.stack([x["images"] for x in items]), "captions": [x["captions"] for x in items]}


def processor_types(module: LatentDiffusionModule) -> dict[str, type]:
    return {name: type(p) for name, p in attention_processors(module.unet).items()}


def test_cross_attention_layers_are_the_attn2_layers():
    layers = cross_attention_layers(LatentDiffusionModule().unet)
    assert len(layers) == 4 and all(name.endswith("attn2.processor") for name in layers)


def test_token_maps_cover_the_real_tokens_at_the_requested_resolution():
    module = LatentDiffusionModule(num_inference_steps=3)
    callback = CrossAttentionHeatmapLogger(prompts=[PROMPT, "the digit 7"], resolution=12, timestep_maps=2)
    maps = callback.record(module)
    assert maps is callback.maps and len(maps) == 2

    first = maps[0]
    real = module.tokenizer(PROMPT).input_ids[1:-1]  # without start and end tokens
    assert first.token_ids == real and len(first.tokens) == len(real) == first.maps.shape[0]
    assert first.tokens[0] == "a" and first.tokens[-1] == "digit"  # decoded, "</w>" stripped
    assert "".join(first.tokens) == PROMPT.replace(" ", "")
    assert first.positions == list(range(1, len(real) + 1))
    assert first.maps.shape == (len(real), 12, 12)
    assert (first.maps > 0).all() and (first.maps < 1).all()  # raw: mean probabilities over 77 keys
    assert sorted(first.step_maps) == [0, 2]  # two evenly spaced steps of three
    for step in (None, 0, 2):
        normed = first.normalized(step)
        assert normed.shape == (len(real), 12, 12)
        assert normed.min() >= 0 and normed.max() <= 1
        torch.testing.assert_close(normed.amin(dim=(1, 2)), torch.zeros(len(real)))
        torch.testing.assert_close(normed.amax(dim=(1, 2)), torch.ones(len(real)))
    assert maps[1].tokens == ["the", "digit", "7"] and maps[1].maps.shape == (3, 12, 12)

    # Recording does not change the images: they are what the pipeline draws without it (image i from seed i).
    from diffusion_lightning.pipelines import generate

    pipeline = module.build_pipeline()
    generated = generate(
        pipeline,
        module.condition_spec().resolve(prompts=[PROMPT, "the digit 7"]),
        num_inference_steps=3,
        guidance_scale=module.guidance_scale,
        generator=[torch.Generator().manual_seed(i) for i in range(2)],
        image_size=module.image_size,
    )
    torch.testing.assert_close(torch.stack([first.image, maps[1].image]), generated, atol=1e-4, rtol=0)

    strip = callback.render(first)
    assert strip.height > 64 and strip.width > (len(real) + 1) * 64  # image + one tile per token, 16 px upscaled x4


@pytest.mark.parametrize(("layer", "side"), [(DOWN, 8), (MID, 4)])
def test_raw_maps_equal_a_direct_recomputation(layer, side):
    module = LatentDiffusionModule().eval()
    attn = module.unet.get_submodule(layer)
    inputs = {}

    def grab(mod, args, kwargs):
        inputs["hidden"], inputs["context"] = args[0], kwargs["encoder_hidden_states"]

    handle = attn.register_forward_pre_hook(grab, with_kwargs=True)
    torch.manual_seed(0)
    with torch.no_grad():
        context = module.encode_prompt_ids(module.tokenize(["", PROMPT]))  # [unconditional, conditional]
        accumulator = CrossAttentionAccumulator(side, keep_steps=[0], keep_last=1)
        with accumulator.attached(module.unet, [f"{layer}.processor"]):
            module.unet(torch.randn(2, 4, 8, 8), torch.tensor([500, 500]), encoder_hidden_states=context)
        handle.remove()

        query, key = attn.to_q(inputs["hidden"]), attn.to_k(inputs["context"])
        heads = attn.heads
        query = query.reshape(2, side * side, heads, -1).transpose(1, 2)
        key = key.reshape(2, key.shape[1], heads, -1).transpose(1, 2)
        probs = (query @ key.transpose(-1, -2) * attn.scale).softmax(dim=-1).mean(dim=1)  # (2, queries, tokens)
    expected = probs[1].T.reshape(1, -1, side, side)  # the conditional image, tokens x h x w
    torch.testing.assert_close(accumulator.maps(step=0), expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(accumulator.maps(), expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(accumulator.maps().sum(dim=1), torch.ones(1, side, side))  # probabilities over keys


def test_maps_of_grids_are_upsampled_before_averaging():
    accumulator = CrossAttentionAccumulator(4)
    accumulator.latent_hw = (4, 4)
    fine = torch.rand(2, 16, 3).softmax(-1)  # (batch * heads, 4x4 queries, tokens): one image, two heads
    coarse = torch.rand(2, 4, 3).softmax(-1)  # 2x2 queries
    accumulator.accumulate("a", fine, heads=2, query_hw=None)
    accumulator.accumulate("b", coarse, heads=2, query_hw=None)
    fine_maps = fine.mean(0).T.reshape(1, 3, 4, 4)
    coarse_maps = torch.nn.functional.interpolate(coarse.mean(0).T.reshape(1, 3, 2, 2), size=(4, 4), mode="bilinear")
    torch.testing.assert_close(accumulator.maps(), (fine_maps + coarse_maps) / 2)
    with pytest.raises(KeyError, match="step 0 has no maps"):
        accumulator.maps(step=0)


def test_normalize_maps_maps_each_to_unit_range():
    maps = torch.tensor([[[1.0, 3.0], [2.0, 5.0]], [[2.0, 2.0], [2.0, 2.0]]])
    normed = normalize_maps(maps)
    torch.testing.assert_close(normed[0], torch.tensor([[0.0, 0.5], [0.25, 1.0]]))
    torch.testing.assert_close(normed[1], torch.zeros(2, 2))  # a constant map is all zero


def test_prompt_tokens_skip_start_end_and_padding():
    tokenizer = LatentDiffusionModule().tokenizer
    positions, ids, texts = prompt_tokens(tokenizer, "the digit 7")
    assert positions == [1, 2, 3] and texts == ["the", "digit", "7"]
    assert not set(ids) & set(tokenizer.all_special_ids)


def test_processors_restored_after_a_pass_and_after_an_exception(monkeypatch):
    module = LatentDiffusionModule(num_inference_steps=2)
    before = processor_types(module)
    callback = CrossAttentionHeatmapLogger(prompts=[PROMPT])
    callback.record(module)
    assert processor_types(module) == before and not module.unet._forward_pre_hooks
    assert module.training

    def boom(self, *args, **kwargs):
        raise RuntimeError("accumulation failed")

    monkeypatch.setattr(CrossAttentionAccumulator, "accumulate", boom)
    with pytest.raises(RuntimeError, match="accumulation failed"):
        callback.record(module)
    assert processor_types(module) == before and not module.unet._forward_pre_hooks
    assert module.training


def test_fit_logs_token_heatmaps_to_tensorboard_and_disk(tmp_path):
    module = LatentDiffusionModule(num_inference_steps=2, learning_rate=1e-3)
    callback = CrossAttentionHeatmapLogger(prompts=[PROMPT, "the digit 7"], timestep_maps=[-1])
    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    before = processor_types(module)
    loader = torch.utils.data.DataLoader(Captioned(), batch_size=4, collate_fn=collate)
    trainer = quiet_trainer(tmp_path, max_steps=2, limit_val_batches=1, logger=logger, callbacks=[callback])
    trainer.fit(module, loader, loader)

    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    events.Reload()
    tags = sorted(tag for tag in events.Tags()["images"] if tag.startswith("attention/cross/"))
    assert tags == ["attention/cross/0", "attention/cross/0/t=1", "attention/cross/1", "attention/cross/1/t=1"]
    logged = events.Images("attention/cross/1")[0]
    assert logged.step == 2

    folder = tmp_path / "attention" / "cross" / "step=000002"
    assert sorted(p.name for p in folder.iterdir()) == [
        "00.png", "00.txt", "00_t=1.png", "01.png", "01.txt", "01_t=1.png"
    ]  # fmt: skip
    with PIL.Image.open(folder / "01.png") as saved:
        assert saved.size == (logged.width, logged.height) == (4 * (64 + 4) + 4, 14 + 4 + 64 + 14 + 4)
    assert (folder / "00.txt").read_text() == PROMPT + "\n"
    assert [m.prompt for m in callback.maps] == [PROMPT, "the digit 7"]
    assert processor_types(module) == before


def test_class_conditioned_module_is_rejected(tmp_path):
    callback = CrossAttentionHeatmapLogger(prompts=[PROMPT])
    message = (
        "CrossAttentionHeatmapLogger needs a text-conditioned module.*ClassConditionedDDPM has no tokenizer and no"
    )
    with pytest.raises(ValueError, match=message):
        callback.setup(quiet_trainer(tmp_path, callbacks=[callback]), tiny_ddpm(), "fit")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prompts": []}, r"prompts=\[\]"),
        ({"prompts": ["a", "b"], "negative_prompts": ["x", "y", "z"]}, "negative_prompts has 3 entries"),
        ({"every_n_epochs": 0}, "every_n_epochs=0"),
        ({"layers": []}, "layers"),
        ({"resolution": 0}, "resolution=0"),
        ({"timestep_maps": -1}, "timestep_maps=-1"),
        ({"timestep_maps": []}, "timestep_maps"),
        ({"colormap": "nope"}, "colormap='nope'"),
        ({"alpha": 1.5}, "alpha=1.5"),
        ({"scheduler": "plms"}, "scheduler='plms'"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CrossAttentionHeatmapLogger(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prompts": [PROMPT], "layers": ["nope.*"]}, "layers pattern 'nope.*' matches no attention layer"),
        ({"prompts": [PROMPT], "timestep_maps": [0, 5]}, r"timestep_maps=\[0, 5\] has \[5\]"),
        ({}, "CrossAttentionHeatmapLogger: prompts is not set and the model has no default prompts"),
    ],
)
def test_bad_arguments_at_setup(tmp_path, kwargs, message):
    callback = CrossAttentionHeatmapLogger(num_inference_steps=5, **kwargs)
    with pytest.raises(ValueError, match=message):
        callback.setup(quiet_trainer(tmp_path, callbacks=[callback]), LatentDiffusionModule(), "fit")
