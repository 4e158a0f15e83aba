"""StableDiffusionXLModule: SDXL conditioning as diffusers computes it, training modes, exports diffusers loads.

The export checks load the folders in a fresh Python process that imports diffusers alone, as a user
of the exported model would, and compare its images with the module's own.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from safetensors.torch import load_file

from diffusion_lightning import LatentDiffusionModule, StableDiffusionXLModule, load_module
from diffusion_lightning.cli import main
from diffusion_lightning.commands import export, sample
from diffusion_lightning.nets.latent_xl import NUM_TIME_IDS, build_time_ids, build_xl_components
from tests.conftest import REPO, quiet_trainer
from tests.fresh_pipelines import run_fresh
from tests.test_latent import loader

CONFIG = REPO / "configs" / "smoke" / "sdxl_tiny.yaml"
PROMPT = "a handwritten digit seven"


def fresh_process(tmp_path: Path, jobs: dict[str, dict]) -> dict:
    """``jobs`` loaded by ``StableDiffusionXLPipeline`` in a diffusers-only process (``run_fresh``)."""
    return run_fresh(tmp_path, "StableDiffusionXLPipeline", jobs, guidance_scale=3.0)


def images(pipeline: StableDiffusionXLPipeline, prompt: str = PROMPT) -> torch.Tensor:
    pipeline.set_progress_bar_config(disable=True)
    out = pipeline(prompt, num_inference_steps=2, guidance_scale=3.0, height=16, width=16,
                   generator=torch.Generator().manual_seed(0), output_type="pt")  # fmt: skip
    return out.images


def xl_module(**kwargs) -> StableDiffusionXLModule:
    kwargs = {"learning_rate": 1e-2, "num_inference_steps": 2, **kwargs}
    return StableDiffusionXLModule(**kwargs)


def fit(module: LatentDiffusionModule, tmp_path: Path, steps: int = 2) -> LatentDiffusionModule:
    trainer = quiet_trainer(tmp_path, max_steps=steps, limit_val_batches=0)
    trainer.fit(module, loader())
    return module


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> Path:
    """One run of ``configs/smoke/sdxl_tiny.yaml`` (LoRA on the UNet and both text encoders, checkpointing)."""
    root = tmp_path_factory.mktemp("sdxl_tiny")
    main(["fit", "--config", str(CONFIG), "--trainer.default_root_dir", str(root),
          "--trainer.enable_progress_bar", "false"])  # fmt: skip
    return root


# ---------------------------------------------------------------------- conditioning


def test_time_ids_carry_each_images_original_size_and_crop_to_the_unet():
    original = torch.tensor([[512, 384], [1024, 768]])
    crop = torch.tensor([[10, 0], [0, 32]])
    rows = build_time_ids((16, 16), 2, original, crop)
    assert rows.tolist() == [[512, 384, 10, 0, 16, 16], [1024, 768, 0, 32, 16, 16]]
    assert build_time_ids((16, 24), 2).tolist() == [[16, 24, 0, 0, 16, 24]] * 2  # no sizes: the image as it is
    # the order of diffusers' own time ids
    pipeline = xl_module().build_pipeline()
    projection = pipeline.text_encoder_2.config.projection_dim
    theirs = pipeline._get_add_time_ids((1024, 768), (0, 32), (16, 16), torch.float32, projection)
    assert theirs.long().tolist() == [rows[1].tolist()]

    # through a training step: the UNet gets the batch's sizes and crops
    module = xl_module()
    seen = []

    def hook(unet, args, kwargs):
        seen.append(kwargs["added_cond_kwargs"])

    module.unet.register_forward_pre_hook(hook, with_kwargs=True)
    batch = {"images": torch.rand(2, 3, 16, 16) * 2 - 1, "captions": ["a digit", "a two"],
             "original_size": original, "crop_top_left": crop}  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    module.diffusion_step(*module.unpack_batch(batch, generator), generator)
    assert seen[0]["time_ids"].long().tolist() == rows.tolist()
    assert seen[0]["text_embeds"].shape == (2, module.text_encoder_2.config.projection_dim)
    del batch["original_size"], batch["crop_top_left"]
    module.diffusion_step(*module.unpack_batch(batch, generator), generator)
    assert seen[1]["time_ids"].long().tolist() == [[16, 16, 0, 0, 16, 16]] * 2

    with pytest.raises(ValueError, match=r"batch\['original_size'\] has shape \(2,\).*expected an integer tensor"):
        module.unpack_batch({**batch, "original_size": torch.tensor([512, 512])}, generator)
    with pytest.raises(ValueError, match=r"batch\['crop_top_left'\].*dtype torch.float32"):
        module.unpack_batch({**batch, "crop_top_left": torch.zeros(2, 2)}, generator)


def test_prompt_embeddings_are_the_sdxl_pipelines():
    module = xl_module()
    pipeline = module.build_pipeline()
    ids = module.tokenize([PROMPT, "two"])
    hidden, pooled = module.encode_prompt(ids)
    theirs = pipeline.encode_prompt([PROMPT, "two"], device="cpu", num_images_per_prompt=1,
                                    do_classifier_free_guidance=True)  # fmt: skip
    prompt_embeds, negative_embeds, pooled_embeds, negative_pooled = theirs
    torch.testing.assert_close(hidden, prompt_embeds)
    torch.testing.assert_close(pooled, pooled_embeds)
    # the unconditional branch the pipeline samples with is what prompt dropout trains: the empty prompt's
    empty_hidden, empty_pooled = module.encode_prompt(module.empty_prompt_ids[None].expand(2, -1))
    torch.testing.assert_close(empty_hidden, negative_embeds)
    torch.testing.assert_close(empty_pooled, negative_pooled)
    assert hidden.shape[-1] == module.text_encoder.config.hidden_size + module.text_encoder_2.config.hidden_size


def test_prompt_dropout_drops_both_prompts_and_keeps_the_time_ids():
    module = xl_module(prompt_dropout=0.5)
    batch = {"images": torch.rand(4, 3, 16, 16), "captions": ["a digit one", "two", "three", "four"],
             "original_size": torch.tensor([[64, 32]] * 4)}  # fmt: skip
    _, condition = module.unpack_batch(batch, torch.Generator().manual_seed(0))
    dropped = module.drop_condition(condition, torch.Generator().manual_seed(0))
    empty = module.empty_prompt_ids
    rows = [torch.equal(row[: empty.shape[0]], empty) for row in dropped]
    assert any(rows) and not all(rows)
    torch.testing.assert_close(dropped[:, -NUM_TIME_IDS:], condition[:, -NUM_TIME_IDS:])
    assert condition.shape[1] == empty.shape[0] + NUM_TIME_IDS
    assert empty.shape[0] == module.tokenizer.model_max_length + module.tokenizer_2.model_max_length


def test_pretokenized_batches_need_both_tokenizers_ids():
    module = xl_module()
    ids = module.tokenize(["a digit"])
    half = ids[:, : module.tokenizer.model_max_length]
    batch = {"images": torch.rand(1, 3, 16, 16), "input_ids": half, "input_ids_2": ids[:, half.shape[1] :]}
    _, condition = module.unpack_batch(batch)
    torch.testing.assert_close(condition[:, :-NUM_TIME_IDS], ids)
    with pytest.raises(
        ValueError, match=r"has \['input_ids'\] and no 'captions'.*all of \['input_ids', 'input_ids_2'\]"
    ):
        module.unpack_batch({"images": batch["images"], "input_ids": half})


# ---------------------------------------------------------------------- bad components


def test_a_unet_that_does_not_fit_the_encoders_is_refused_naming_the_field(tmp_path):
    good = build_xl_components()["unet"].config
    projection = (
        r"components.unet has projection_class_embeddings_input_dim=99 but .*projection_dim=32\) and 6 time ids of "
        r"addition_time_embed_dim=8 make 32 \+ 6 \* 8 = 80; set projection_class_embeddings_input_dim: 80"
    )
    with pytest.raises(ValueError, match=projection):
        xl_module(components={"unet": {**_unet_args(good), "projection_class_embeddings_input_dim": 99}})
    with pytest.raises(ValueError, match=r"cross_attention_dim=32 but .* 32 \(components.text_encoder.hidden_size\) "
                                         r"\+ 32 \(components.text_encoder_2.hidden_size\) = 64"):  # fmt: skip
        xl_module(components={"unet": {**_unet_args(good), "cross_attention_dim": 32}})
    with pytest.raises(ValueError, match="addition_embed_type=None; an SDXL UNet takes 'text_time'"):
        xl_module(components={"unet": {**_unet_args(good), "addition_embed_type": None}})
    # the other way round: an SDXL UNet in the one-encoder module fails at once, not at its first step
    with pytest.raises(
        ValueError, match="components.unet has addition_embed_type='text_time'.*StableDiffusionXLModule"
    ):
        LatentDiffusionModule(components={"unet": {**_unet_args(good), "cross_attention_dim": 32}})


def _unet_args(config) -> dict:
    keys = ("sample_size", "block_out_channels", "layers_per_block", "down_block_types", "up_block_types",
            "attention_head_dim", "norm_num_groups", "addition_embed_type", "addition_time_embed_dim")  # fmt: skip
    return {key: config[key] for key in keys}


def test_pretrained_sdxl_folder_loads_and_its_gaps_are_named(tmp_path):
    parts = build_xl_components({"seed": 3})
    StableDiffusionXLPipeline(**parts, add_watermarker=False).save_pretrained(tmp_path / "sdxl")
    module = StableDiffusionXLModule(pretrained=str(tmp_path / "sdxl"), training_mode="lora")
    for name in ("unet", "text_encoder", "text_encoder_2"):
        expected = next(iter(parts[name].state_dict().values()))
        torch.testing.assert_close(next(iter(getattr(module, name).state_dict().values())), expected)
    assert module.noise_scheduler.config.beta_schedule == parts["scheduler"].config.beta_schedule
    with pytest.raises(ValueError, match=r"the unet of pretrained=.*addition_embed_type='text_time'"):
        LatentDiffusionModule(pretrained=str(tmp_path / "sdxl"))
    import shutil

    shutil.rmtree(tmp_path / "sdxl" / "text_encoder_2")
    with pytest.raises(FileNotFoundError, match=r"lacks the subfolder\(s\) \['text_encoder_2'\]; a "
                                                r"StableDiffusionXLPipeline folder has"):  # fmt: skip
        StableDiffusionXLModule(pretrained=str(tmp_path / "sdxl"))


# ---------------------------------------------------------------------- training


def changed(trained: torch.nn.Module, base: torch.nn.Module) -> bool:
    """Whether any weight of ``trained`` differs from ``base``'s."""
    reference = base.state_dict()
    return any(not torch.equal(value, reference[key]) for key, value in trained.state_dict().items())


def test_training_modes_train_both_text_encoders_and_only_what_they_say(tmp_path):
    before = build_xl_components()
    full = fit(xl_module(), tmp_path / "full")
    assert changed(full.unet, before["unet"])
    assert not torch.equal(full.unet.add_embedding.linear_1.weight, before["unet"].add_embedding.linear_1.weight)
    assert not any(changed(getattr(full, name), before[name]) for name in ("vae", "text_encoder", "text_encoder_2"))

    text = fit(xl_module(training_mode="text_encoder"), tmp_path / "text")
    assert changed(text.text_encoder, before["text_encoder"]) and changed(text.text_encoder_2, before["text_encoder_2"])
    assert not changed(text.unet, before["unet"])

    lora = fit(xl_module(training_mode="lora", lora_rank=2, lora_text_encoder=True), tmp_path / "lora")
    keys = lora.trainable_keys()
    assert keys and all("lora_" in key for key in keys)
    assert {key.split(".")[0] for key in keys} == {"unet", "text_encoder", "text_encoder_2"}
    assert set(lora.lora_state_dicts()) == {"unet_lora_layers", "text_encoder_lora_layers",
                                            "text_encoder_2_lora_layers"}  # fmt: skip
    torch.testing.assert_close(lora.unet.conv_in.weight, before["unet"].conv_in.weight)


def test_gradient_checkpointing_trains_the_unet_and_both_text_encoders(tmp_path):
    module = xl_module(training_mode="lora", lora_rank=2, lora_text_encoder=True, gradient_checkpointing=True)
    assert module.unet.is_gradient_checkpointing
    assert module.text_encoder.is_gradient_checkpointing and module.text_encoder_2.is_gradient_checkpointing
    adapters = {k: v.detach().clone() for k, v in module.named_parameters() if "lora_B" in k}
    fit(module, tmp_path, steps=1)
    changed = {
        k.split(".")[0] for k, v in module.named_parameters() if "lora_B" in k and not torch.equal(v, adapters[k])
    }
    assert changed == {"unet", "text_encoder", "text_encoder_2"}


@pytest.mark.parametrize("cls", [LatentDiffusionModule, StableDiffusionXLModule])
def test_lora_alpha_other_than_the_rank_loads_at_the_trained_scale(cls, tmp_path):
    module = cls(training_mode="lora", lora_rank=2, lora_alpha=8, lora_text_encoder=True, learning_rate=1e-2)
    fit(module, tmp_path, steps=2)
    module.export_pipeline(tmp_path / "lora")
    pipeline = module.make_pipeline({**module.base_components(), "scheduler": module.sampling_scheduler()})
    plain = images(pipeline)
    pipeline.load_lora_weights(tmp_path / "lora")
    adapted = images(pipeline)
    assert (adapted - plain).abs().max() > 1e-3
    torch.testing.assert_close(adapted, images(module.build_pipeline()), atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------- the smoke config and exports


def test_smoke_config_checkpoints_hold_the_adapters_of_all_three_networks(smoke_run):
    state = torch.load(smoke_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert state["hyper_parameters"]["_class_path"].endswith("StableDiffusionXLModule")
    keys = state["state_dict"]
    assert keys and all("lora_" in key for key in keys)
    assert {key.split(".")[0] for key in keys} == {"unet", "text_encoder", "text_encoder_2"}
    assert list(smoke_run.glob("samples/epoch=*-step=*.png"))  # validation images, through the SDXL pipeline
    assert type(load_module(smoke_run / "checkpoints" / "last.ckpt").build_pipeline()).__name__ == (
        "StableDiffusionXLPipeline"
    )


def test_lora_and_merged_exports_load_in_a_fresh_process_and_match_the_module(smoke_run, tmp_path):
    ckpt = smoke_run / "checkpoints" / "last.ckpt"
    export.main(["--ckpt", str(ckpt), "--out", str(tmp_path / "lora")])
    assert "pytorch_lora_weights.safetensors" in [p.name for p in (tmp_path / "lora").iterdir()]
    prefixes = {key.split(".")[0] for key in load_file(tmp_path / "lora" / "pytorch_lora_weights.safetensors")}
    assert prefixes == {"unet", "text_encoder", "text_encoder_2"}
    export.main(["--ckpt", str(ckpt), "--out", str(tmp_path / "merged"), "--merge-lora"])

    module = load_module(ckpt)
    base = module.make_pipeline({**module.base_components(), "scheduler": module.sampling_scheduler()})
    base.save_pretrained(tmp_path / "base")  # the base model a user would load the adapters into
    result = fresh_process(
        tmp_path,
        {
            "base": {"folder": str(tmp_path / "base"), "prompt": PROMPT},
            "adapted": {"folder": str(tmp_path / "base"), "lora": str(tmp_path / "lora"), "prompt": PROMPT},
            "merged": {"folder": str(tmp_path / "merged"), "prompt": PROMPT},
        },
    )
    assert result["warnings"] == {"base": [], "adapted": [], "merged": []}
    assert not result["errors"], result["errors"]
    ours = images(module.build_pipeline())
    plain, adapted, merged = (result["images"][name] for name in ("base", "adapted", "merged"))
    assert (adapted - plain).abs().max() > 1e-3  # the adapters change the output...
    torch.testing.assert_close(adapted, ours, atol=1e-5, rtol=1e-4)  # ...into the module's
    torch.testing.assert_close(merged, ours, atol=1e-4, rtol=1e-3)

    out = tmp_path / "samples"
    sample.main(["--pipeline", str(tmp_path / "merged"), "--prompt", "a digit", "--n-per-prompt", "2",
                 "--steps", "2", "--out", str(out)])  # fmt: skip
    assert json.loads((out / "samples.json").read_text())["pipeline"] == "StableDiffusionXLPipeline"


def test_full_export_loads_in_a_fresh_process_without_warnings_and_matches_the_module(tmp_path):
    module = fit(xl_module(train_text_encoder=True), tmp_path / "run")
    module.export_pipeline(tmp_path / "pipe")
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and index["force_zeros_for_empty_prompt"] is False
    result = fresh_process(tmp_path, {"full": {"folder": str(tmp_path / "pipe"), "prompt": PROMPT}})
    assert result["warnings"] == {"full": []}
    assert not result["errors"], result["errors"]
    torch.testing.assert_close(result["images"]["full"], images(module.build_pipeline()), atol=1e-5, rtol=1e-4)


def test_bucketed_folder_batches_train_sdxl_with_their_true_sizes_and_crops(tmp_path):
    """ImageCaptionDataModule with aspect buckets feeding the SDXL module: every UNet call sees one
    bucket's latents and the time ids of the images' real original sizes and crops."""
    from diffusion_lightning import ImageCaptionDataModule
    from tests.test_buckets import write_folder

    shapes = write_folder(tmp_path / "data")
    data = ImageCaptionDataModule(source="folder", root=str(tmp_path / "data"), aspect_buckets=True, resolution=32,
                                  bucket_step=8, max_aspect=2.0, batch_size=2, val_fraction=0.1)  # fmt: skip
    module = xl_module(image_size=32)
    seen = []
    module.unet.register_forward_pre_hook(
        lambda unet, args, kwargs: seen.append((tuple(args[0].shape[-2:]), kwargs["added_cond_kwargs"]["time_ids"])),
        with_kwargs=True,
    )
    quiet_trainer(tmp_path, max_epochs=1, limit_val_batches=0).fit(module, datamodule=data)
    assert len({size for size, _ in seen}) > 1  # several buckets were trained on
    originals = {shape for shape in shapes.values()}
    factor = module.vae_scale_factor
    for latent_size, time_ids in seen:
        rows = time_ids.long().tolist()
        for row in rows:
            assert tuple(row[:2]) in originals  # (height, width) of a real file
            assert tuple(row[4:]) == (latent_size[0] * factor, latent_size[1] * factor)  # the bucket it was cut to
