"""``diffusion-lightning sample`` on text-to-image pipelines: prompts, seeds, negative prompts, image-to-image."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import PIL.Image
import pytest
import torch

from diffusion_lightning import LatentDiffusionModule
from diffusion_lightning.commands import sample

PROMPTS = ["a handwritten digit zero", "the digit one"]


def sd_module() -> LatentDiffusionModule:
    torch.manual_seed(0)
    return LatentDiffusionModule(num_inference_steps=2)


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory) -> Path:
    """A tiny Stable Diffusion pipeline folder (16x16 images)."""
    return sd_module().export_pipeline(tmp_path_factory.mktemp("pipelines") / "sd")


def run(folder: Path, out: Path, *extra: str) -> dict:
    """Sample with 2 steps into ``out``; the samples.json written."""
    sample.main(["--pipeline", str(folder), "--out", str(out), "--steps", "2", *extra])
    return json.loads((out / "samples.json").read_text())


def pixels(out: Path, prompt: int, index: int) -> np.ndarray:
    return np.asarray(PIL.Image.open(out / f"prompt={prompt}" / f"sample={index:03d}.png"), dtype=np.int16)


def test_text_to_image_writes_grid_images_and_json(sd_folder, tmp_path):
    memory = ("--attention-slicing", "--vae-slicing", "--vae-tiling")
    meta = run(sd_folder, tmp_path, "--prompt", *PROMPTS, "--n-per-prompt", "3", "--scale", "1", *memory)
    for i in range(2):
        files = sorted(p.name for p in (tmp_path / f"prompt={i}").iterdir())
        assert files == ["sample=000.png", "sample=001.png", "sample=002.png"]
        assert PIL.Image.open(tmp_path / f"prompt={i}" / "sample=000.png").size == (16, 16)
    grid = PIL.Image.open(tmp_path / "samples.png")
    assert grid.height == 2 + 2 * (16 + 2)  # two rows of 16 px tiles, padding 2, scale 1
    assert grid.width > 2 + 3 * (16 + 2)  # three tiles per row plus the prompt labels
    assert meta["prompts"] == PROMPTS and meta["negative_prompts"] is None
    assert meta["n_per_prompt"] == 3 and meta["num_inference_steps"] == 2 and meta["guidance_scale"] == 7.5
    assert (meta["height"], meta["width"]) == (16, 16) and meta["image"] is None and meta["strength"] is None
    assert meta["pipeline"] == "StableDiffusionPipeline" and meta["device"] and meta["seed"] == 0
    assert meta["options"] == dict(attention_slicing=True, vae_slicing=True, vae_tiling=True, cpu_offload=False,
                                   compile=False)  # fmt: skip


def test_seeds_reproduce_independently_of_batching(sd_folder, tmp_path):
    common = ("--prompt", *PROMPTS, "--n-per-prompt", "2")
    run(sd_folder, tmp_path / "all", *common)
    meta = run(sd_folder, tmp_path / "one", *common, "--batch-size", "1", "--no-images", "--scheduler", "ddim")
    assert meta["scheduler"] == "ddim" and not (tmp_path / "one" / "prompt=0").exists()
    run(sd_folder, tmp_path / "ones", *common, "--batch-size", "1")
    run(sd_folder, tmp_path / "other", *common, "--seed", "1")
    for i in range(2):
        for j in range(2):
            same = pixels(tmp_path / "all", i, j), pixels(tmp_path / "ones", i, j)
            assert np.abs(same[0] - same[1]).max() <= 1, (i, j)  # equal up to rounding of batched math
            assert np.abs(same[0] - pixels(tmp_path / "other", i, j)).mean() > 1, (i, j)
    assert np.abs(pixels(tmp_path / "all", 0, 0) - pixels(tmp_path / "all", 0, 1)).mean() > 1  # own seed each


def test_negative_prompt_changes_the_images_and_must_match_the_prompts(sd_folder, tmp_path):
    common = ("--prompt", PROMPTS[0], "--n-per-prompt", "1", "--guidance-scale", "5")
    run(sd_folder, tmp_path / "plain", *common)
    meta = run(sd_folder, tmp_path / "negative", *common, "--negative-prompt", "blurry digit")
    assert meta["negative_prompts"] == ["blurry digit"]
    assert np.abs(pixels(tmp_path / "plain", 0, 0) - pixels(tmp_path / "negative", 0, 0)).mean() > 1
    with pytest.raises(SystemExit, match=r"--negative-prompt has 3 entries for 2 --prompt"):
        run(sd_folder, tmp_path / "x", "--prompt", *PROMPTS, "--negative-prompt", "a", "b", "c")


def test_image_to_image(sd_folder, tmp_path):
    image = tmp_path / "start.png"
    rng = np.random.default_rng(0)
    PIL.Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(image)
    common = ("--prompt", PROMPTS[0], "--n-per-prompt", "2", "--image", str(image))
    meta = run(sd_folder, tmp_path / "out", *common, "--strength", "0.5")
    assert meta["image"] == str(image) and meta["strength"] == 0.5
    assert meta["pipeline"] == "StableDiffusionImg2ImgPipeline"
    assert PIL.Image.open(tmp_path / "out" / "prompt=0" / "sample=001.png").size == (16, 16)
    for strength in ("1e-9", "1.5", "0"):
        with pytest.raises(SystemExit, match="--strength="):
            run(sd_folder, tmp_path / "bad", *common, "--strength", strength)
    missing = str(tmp_path / "missing.png")
    with pytest.raises(SystemExit, match="missing.png"):
        run(sd_folder, tmp_path / "bad", "--prompt", "x", "--image", missing)
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not a png")
    with pytest.raises(SystemExit, match="notes.png.*could not be read"):
        run(sd_folder, tmp_path / "bad", "--prompt", "x", "--image", str(not_an_image))


def test_prompts_belong_to_text_pipelines(sd_folder, tiny_pipeline, tmp_path):
    tiny_pipeline.save_pretrained(tmp_path / "classes")
    with pytest.raises(SystemExit, match=r"--prompt.*ClassConditionedPipeline"):
        run(tmp_path / "classes", tmp_path / "out", "--prompt", "a digit")
    with pytest.raises(SystemExit, match=r"--image.*ClassConditionedPipeline"):
        run(tmp_path / "classes", tmp_path / "out", "--image", str(tmp_path / "classes" / "model_index.json"))
    with pytest.raises(SystemExit, match="give --prompt"):
        run(sd_folder, tmp_path / "out")
    meta = run(tmp_path / "classes", tmp_path / "classes_out", "--n-per-class", "1")  # loaded via DiffusionPipeline
    assert meta["classes"] == [0, 1, 2] and (tmp_path / "classes_out" / "class=2" / "sample=000.png").is_file()


def test_cpu_offload_without_cuda_is_a_clear_error(sd_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="--cpu-offload.*needs a CUDA GPU"):
        run(sd_folder, tmp_path, "--prompt", "x", "--cpu-offload")


class Captioned(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(i)
        return {"images": torch.rand(3, 16, 16, generator=g) * 2 - 1, "captions": PROMPTS[i]}


def collate(items: list[dict]) -> dict:
    return {"images": torch.stack([x["images"] for x in items]), "captions": [x["captions"] for x in items]}


def test_sample_from_a_latent_checkpoint(tmp_path):
    module = sd_module()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, torch.utils.data.DataLoader(Captioned(), batch_size=2, collate_fn=collate))
    trainer.save_checkpoint(tmp_path / "sd.ckpt")
    out = tmp_path / "out"
    sample.main(["--ckpt", str(tmp_path / "sd.ckpt"), "--out", str(out), "--prompt", "x", "--n-per-prompt", "1"])
    meta = json.loads((out / "samples.json").read_text())
    assert meta["num_inference_steps"] == 2 and meta["guidance_scale"] == module.guidance_scale
    assert (meta["height"], meta["width"]) == (16, 16) and meta["weights"] == "ema"
    assert PIL.Image.open(out / "prompt=0" / "sample=000.png").size == (16, 16)
