"""The captioned-digits recipe: varied captions, digit subsets, a VAE from a folder, prior preservation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL

from diffusion_lightning import LatentDiffusionModule
from diffusion_lightning.data.captions import DIGIT_NAMES, ImageCaptionDataModule
from diffusion_lightning.data.mnist import _embedded_digits
from diffusion_lightning.modules.prior import PriorImages
from diffusion_lightning.nets.latent import build_components
from tests.conftest import quiet_trainer
from tests.test_latent import loader

TEMPLATES = ["a handwritten digit {name}", "the number {digit} written by hand", "{digit}"]


def label_of(key: str) -> int:
    return int(_embedded_digits()[1][int(key.split("/")[1])])


def test_caption_templates_vary_the_wording_and_each_image_keeps_its_caption():
    dm = ImageCaptionDataModule(caption_template=TEMPLATES, max_samples=300, seed=3)
    dm.setup()
    train = dm.datasets["train"]
    seen = set()
    for key, caption in zip(train.keys, train.captions):
        digit = label_of(key)
        options = [t.format(name=DIGIT_NAMES[digit], digit=digit) for t in TEMPLATES]
        assert caption in options
        seen.add(options.index(caption))
    assert seen == {0, 1, 2}  # every wording is used
    subset = ImageCaptionDataModule(caption_template=TEMPLATES, digits=[8, 9], max_samples=100, seed=3)
    subset.setup()
    captions = dict(zip(train.keys, train.captions))
    both = [k for k in subset.datasets["train"].keys if k in captions]
    assert both and all(dict(zip(subset.datasets["train"].keys, subset.datasets["train"].captions))[k] == captions[k]
                        for k in both)  # fmt: skip


def test_digits_keeps_only_the_named_digits_balanced():
    dm = ImageCaptionDataModule(digits=[8, 9], max_samples=100, val_fraction=0.1)
    dm.setup()
    labels = [label_of(k) for k in dm.datasets["train"].keys]
    assert len(labels) == 90 and labels.count(8) == labels.count(9) == 45
    assert sorted(label_of(k) for k in dm.datasets["val"].keys) == [8] * 5 + [9] * 5
    all_of_them = ImageCaptionDataModule(digits=[0, 1, 2, 3, 4, 5, 6, 7], val_fraction=0.05)
    all_of_them.setup()
    assert len(all_of_them.datasets["train"]) + len(all_of_them.datasets["val"]) == 4000


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(caption_template=[]), r"caption_template=\[\] is not valid: expected a string or a non-empty list"),
        (dict(caption_template=["{digit}", "{label}"]), r"caption_template=.*'\{label\}'.* only \{name\} and"),
        (dict(digits=[8, 10]), r"digits=\[8, 10\] must be a non-empty list of distinct digits 0..9"),
        (dict(digits=[8, 8]), r"digits=\[8, 8\] must be"),
        (dict(digits=[1], source="folder", root="x"), r"digits=\[1\] selects digits of the embedded source"),
    ],
)
def test_bad_caption_options_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ImageCaptionDataModule(**kwargs)


def save_vae(folder: Path, latent_channels: int = 4, scaling_factor: float = 0.5) -> Path:
    vae = AutoencoderKL(**{**build_components()["vae"].config, "latent_channels": latent_channels,
                           "scaling_factor": scaling_factor})  # fmt: skip
    vae.save_pretrained(folder)
    return folder


def test_components_take_a_vae_folder_and_refuse_one_whose_latents_the_unet_cannot_take(tmp_path):
    folder = save_vae(tmp_path / "vae")
    module = LatentDiffusionModule(components={"pretrained_vae": str(folder)})
    assert module.vae.config.scaling_factor == 0.5 and module.unet.config.in_channels == 4
    reloaded = AutoencoderKL.from_pretrained(folder)
    torch.testing.assert_close(module.vae.state_dict(), reloaded.state_dict())
    wide = save_vae(tmp_path / "wide", latent_channels=8)
    LatentDiffusionModule(components={"pretrained_vae": str(wide)})  # the UNet follows the VAE by default
    with pytest.raises(ValueError, match=r"components.unet has in_channels=4, out_channels=4 but the VAE of "
                       r"components.pretrained_vae='.*wide' makes latents of latent_channels=8"):  # fmt: skip
        LatentDiffusionModule(components={"pretrained_vae": str(wide), "unet": {"in_channels": 4, "out_channels": 4}})
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"components.pretrained_vae='.*empty' holds no config.json"):
        LatentDiffusionModule(components={"pretrained_vae": str(tmp_path / "empty")})


def test_a_pipeline_folder_whose_unet_does_not_take_the_vae_latents_is_refused(tmp_path):
    LatentDiffusionModule().build_pipeline().save_pretrained(tmp_path / "sd")
    config = json.loads((tmp_path / "sd/vae/config.json").read_text())
    save_vae(tmp_path / "sd/vae", latent_channels=3)
    assert config["latent_channels"] == 4
    with pytest.raises(ValueError, match=r"the unet of pretrained='.*sd' has in_channels=4.* latent_channels=3"):
        LatentDiffusionModule(pretrained=str(tmp_path / "sd"))


def prior_fit(tmp_path, steps: int = 2, **kwargs):
    kwargs = {"learning_rate": 1e-3, "num_inference_steps": 2, "prior_data_dir": str(tmp_path / "prior"), **kwargs}
    module = LatentDiffusionModule(**kwargs)
    seen: list[list[str]] = []
    unpack = module.unpack_batch

    def spy(batch, generator=None):
        seen.append(list(batch["keys"]))
        return unpack(batch, generator)

    module.unpack_batch = spy
    trainer = quiet_trainer(tmp_path / "run", max_steps=steps, limit_val_batches=0, log_every_n_steps=1)
    trainer.fit(module, loader())
    return module, trainer, seen


def test_prior_preservation_draws_class_images_once_and_mixes_them_into_every_batch(tmp_path):
    prompts = ["a handwritten digit zero", "a handwritten digit one"]
    module, trainer, seen = prior_fit(tmp_path, prior_prompts=prompts, num_prior_images=5, prior_loss_weight=0.5)
    records = [json.loads(line) for line in (tmp_path / "prior/metadata.jsonl").read_text().splitlines()]
    assert [r["text"] for r in records] == [prompts[i % 2] for i in range(5)]
    assert all((tmp_path / "prior" / r["file_name"]).is_file() for r in records)
    assert len(module.prior) == 5 and module.prior.images.shape == (5, 3, 16, 16)
    # each step unpacks the instance batch, then as many class images
    assert len(seen) == 4 and [k[0].startswith("img") for k in seen] == [True, False, True, False]
    assert all(len(k) == 4 and all(x.startswith("prior/") for x in k) for k in seen[1::2])
    logged = trainer.logged_metrics
    instance, prior, loss = (float(logged[f"train/{k}"]) for k in ("instance_loss", "prior_loss", "loss"))
    assert instance > 0 and prior > 0 and instance != prior
    assert loss == pytest.approx(instance + 0.5 * prior, rel=1e-5)
    # a second run finds them: nothing drawn again; more asked for: only the missing ones are drawn
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "prior").glob("*.png")}
    prior_fit(tmp_path, prior_prompts=prompts, num_prior_images=5)
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "prior").glob("*.png")} == stamps
    again, _, _ = prior_fit(tmp_path, prior_prompts=prompts, num_prior_images=7)
    assert len(again.prior) == 7 and {p.name: p.stat().st_mtime_ns for p in (tmp_path / "prior").glob("*.png")
                                      if p.name in stamps} == stamps  # fmt: skip


def test_class_images_are_the_base_models_and_reproducible(tmp_path):
    module = LatentDiffusionModule(num_inference_steps=2)
    first = PriorImages(str(tmp_path / "a"), ["a seven"], 3, seed=1)
    second = PriorImages(str(tmp_path / "b"), ["a seven"], 3, seed=1)
    assert first.generate(module, 2) == 3 and second.generate(module, 3) == 3
    first.load(16), second.load(16)
    assert torch.equal(first.images, second.images)  # batch size does not change the images
    assert first.images.std() > 0


def test_prior_preservation_bad_input_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"prior_data_dir='.*empty' holds no class image listed in a metadata.jsonl "
                       r"\(found \[\]\).* set num_prior_images and prior_prompts"):  # fmt: skip
        prior_fit(tmp_path, prior_data_dir=str(tmp_path / "empty"))
    with pytest.raises(ValueError, match=r"holds 0 of num_prior_images=3 images and prior_prompts is unset"):
        prior_fit(tmp_path, num_prior_images=3)
    with pytest.raises(ValueError, match=r"prior_prompts and num_prior_images need prior_data_dir"):
        LatentDiffusionModule(prior_prompts=["a seven"])
    with pytest.raises(ValueError, match=r"prior_loss_weight=-1 must be >= 0"):
        LatentDiffusionModule(prior_data_dir="x", prior_loss_weight=-1)
    with pytest.raises(ValueError, match=r"prior_prompts=\['a seven', ' '\] must be a non-empty list of non-blank"):
        LatentDiffusionModule(prior_data_dir="x", prior_prompts=["a seven", " "], num_prior_images=2)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad/metadata.jsonl").write_text('{"file_name": "a.png"}\n')
    with pytest.raises(ValueError, match=r"metadata.jsonl', line 1: expected an object with 'file_name' and 'text'"):
        PriorImages(str(tmp_path / "bad"), None, None).records()


def test_resuming_without_the_class_images_is_refused(tmp_path):
    prompts = ["a handwritten digit zero"]
    _, trainer, _ = prior_fit(tmp_path, prior_prompts=prompts, num_prior_images=2)
    ckpt = tmp_path / "step2.ckpt"
    trainer.save_checkpoint(ckpt)
    for file in (tmp_path / "prior").iterdir():
        file.unlink()
    module = LatentDiffusionModule(learning_rate=1e-3, num_inference_steps=2, prior_data_dir=str(tmp_path / "prior"),
                                   prior_prompts=prompts, num_prior_images=2)  # fmt: skip
    resumed = quiet_trainer(tmp_path / "run2", max_steps=4, limit_val_batches=0)
    with pytest.raises(ValueError, match=r"lacks 2 class image\(s\), but this run resumes from '.*step2.ckpt': "
                       r"they must come from the base model"):  # fmt: skip
        resumed.fit(module, loader(), ckpt_path=ckpt)


def test_class_image_keys_follow_their_content_so_a_latent_cache_never_serves_a_redrawn_file(tmp_path):
    module = LatentDiffusionModule(num_inference_steps=2)
    prior = PriorImages(str(tmp_path / "prior"), ["a seven", "a one"], 2, seed=1)
    prior.generate(module, 2)
    prior.load(16)
    keys = list(prior.keys)
    assert len(set(keys)) == 2 and all(k.startswith("prior/") for k in keys)
    first = tmp_path / "prior" / "000000.png"
    first.write_bytes((tmp_path / "prior" / "000001.png").read_bytes())  # the file redrawn
    prior.load(16)
    assert prior.keys[0] != keys[0] and prior.keys[0] == prior.keys[1] == keys[1]


def test_lora_on_the_pooled_text_path_exports_and_loads_with_load_lora_weights(tmp_path):
    """The digits LoRA adapts ``add_embedding`` and ``time_emb_proj`` too: diffusers must load those adapters."""
    from diffusers import StableDiffusionPipeline

    from diffusion_lightning.commands import export
    from diffusion_lightning.nets.latent import _tiny_unet
    from tests.test_latent import images

    components = {"unet": {**_tiny_unet(), "addition_embed_type": "text", "addition_embed_type_num_heads": 4}}
    targets = ["to_k", "to_q", "to_v", "to_out.0", "conv1", "conv2", "time_emb_proj", "add_embedding.pool.k_proj",
               "add_embedding.pool.q_proj", "add_embedding.pool.v_proj", "add_embedding.proj"]  # fmt: skip
    module = LatentDiffusionModule(components=components, training_mode="lora", lora_rank=2,
                                   lora_target_modules=targets, learning_rate=5e-2, num_inference_steps=2)  # fmt: skip
    trainer = quiet_trainer(tmp_path / "run", max_steps=3, limit_val_batches=0)
    trainer.fit(module, loader())
    adapted = {n for n, p in module.unet.named_parameters() if p.requires_grad}
    for target in ("add_embedding.proj", "add_embedding.pool.k_proj", "mid_block.resnets.0.time_emb_proj"):
        assert any(n.startswith(f"{target}.lora_B") for n in adapted), target
    trainer.save_checkpoint(tmp_path / "lora.ckpt")
    export.main(["--ckpt", str(tmp_path / "lora.ckpt"), "--out", str(tmp_path / "lora")])

    pipeline = StableDiffusionPipeline(**build_components(components), safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)  # fmt: skip
    pipeline.scheduler = module.sampling_scheduler()
    plain = images(pipeline)
    pipeline.load_lora_weights(tmp_path / "lora")
    loaded = {n for n, _ in pipeline.unet.named_parameters() if "lora_B" in n}
    trained = {n.replace(".default", "") for n in adapted if "lora_B" in n}
    assert {n.replace(".default_0", "") for n in loaded} == trained  # every adapter loaded, none left uninitialised
    adapted_images = images(pipeline)
    assert (adapted_images - plain).abs().max() > 1e-4
    torch.testing.assert_close(adapted_images, images(module.build_pipeline()), atol=1e-5, rtol=1e-4)
