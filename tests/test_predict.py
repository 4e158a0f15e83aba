"""``diffusion-lightning predict`` writes what it generates, for class-conditioned and text-to-image models."""

from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest
import torch

from diffusion_lightning.callbacks import PredictionWriter
from diffusion_lightning.cli import main
from tests.conftest import REPO, quiet_trainer, tiny_ddpm

DDPM = str(REPO / "configs/smoke/ddpm_mnist.yaml")
SD = str(REPO / "configs/smoke/sd_tiny.yaml")


def fit(config: str, root) -> str:
    main(["fit", "--config", config, "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false"])
    return str(root / "checkpoints" / "last.ckpt")


def read(folder):
    return json.loads((folder / "predictions.json").read_text())["images"]


def pixels(path) -> np.ndarray:
    with PIL.Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_ddpm_predict_writes_an_image_per_label_a_grid_and_their_json(tmp_path):
    ckpt = fit(DDPM, tmp_path / "run")
    argv = ["predict", "--config", DDPM, "--ckpt_path", ckpt, "--data.init_args.predict_samples_per_class", "2"]
    out = tmp_path / "predict"
    main([*argv, "--trainer.default_root_dir", str(out), "--trainer.enable_progress_bar", "false"])
    folder = out / "predictions"
    records = read(folder)
    assert [r["class"] for r in records] == [c for c in range(10) for _ in range(2)]
    assert [r["name"] for r in records[:2]] == ["0", "0"]
    assert sorted(p.name for p in folder.glob("0*.png")) == [f"{i:05d}.png" for i in range(20)]
    assert all(r["file"] == f"{i:05d}.png" and isinstance(r["seed"], int) for i, r in enumerate(records))
    assert len({r["seed"] for r in records}) == 20
    assert pixels(folder / "00000.png").shape == (28, 28, 3)
    with PIL.Image.open(folder / "grid.png") as grid:  # 10 labelled rows of 2, upscaled x2
        assert grid.height == (10 * (28 + 2) + 2) * 2 and grid.width > (2 * (28 + 2) + 2) * 2

    # the same checkpoint and seeds give the same images; a second output folder, the same files
    again = tmp_path / "again"
    main([*argv, "--trainer.default_root_dir", str(again), "--trainer.enable_progress_bar", "false"])
    assert read(again / "predictions") == records
    assert np.array_equal(pixels(folder / "00007.png"), pixels(again / "predictions" / "00007.png"))


def test_text_to_image_predict_draws_the_prompt_list(tmp_path):
    ckpt = fit(SD, tmp_path / "run")
    prompts = ["a handwritten digit three", "the number 8 written by hand"]
    out = tmp_path / "predict"
    main(
        [
            "predict", "--config", SD, "--ckpt_path", ckpt,
            "--data.init_args.predict_prompts", json.dumps(prompts),
            "--data.init_args.predict_samples_per_prompt", "2",
            "--trainer.default_root_dir", str(out), "--trainer.enable_progress_bar", "false",
        ]
    )  # fmt: skip
    folder = out / "predictions"
    records = read(folder)
    assert [r["prompt"] for r in records] == [p for p in prompts for _ in range(2)]
    assert all(r["negative_prompt"] is None for r in records)
    assert len(list(folder.glob("0*.png"))) == 4 and pixels(folder / "00003.png").shape == (16, 16, 3)
    assert (folder / "grid.png").is_file()


def test_predict_step_seeds_follow_the_batch_index_not_the_batch_size(tmp_path):
    model = tiny_ddpm(num_inference_steps=2)
    whole = model.predict_step({"labels": torch.tensor([0, 1, 2]), "index": torch.tensor([0, 1, 2])}, 0)
    part = model.predict_step({"labels": torch.tensor([2]), "index": torch.tensor([2])}, 5)
    assert whole["seeds"][2] == part["seeds"][0]
    torch.testing.assert_close(whole["images"][2], part["images"][0])
    assert whole["labels"].tolist() == [0, 1, 2] and whole["conditions"][1] == {"class": 1, "name": "1"}
    with pytest.raises(ValueError, match="prompts is set, but the model is class-conditioned"):
        model.predict_step({"prompts": ["a seven"]}, 0)


def test_writer_refuses_a_step_without_images(tmp_path):
    from lightning.pytorch.demos.boring_classes import BoringModel

    class Predicts(BoringModel):
        def predict_step(self, batch, batch_idx):
            return batch.sum()

    trainer = quiet_trainer(tmp_path, callbacks=[PredictionWriter()])
    with pytest.raises(ValueError, match="PredictionWriter needs predict_step to return a dict with 'images'"):
        trainer.predict(Predicts(), torch.utils.data.DataLoader(torch.randn(4, 32), batch_size=2))
