"""SampleGridLogger: fixed-seed grids (a row per class or per prompt) logged and saved as PNGs during training."""

from __future__ import annotations

import warnings

import numpy as np
import PIL.Image
import pytest
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader

from diffusion_lightning.callbacks.samples import SampleGridLogger, sampling_mode
from diffusion_lightning.loggers import media
from tests.conftest import RandomDigits, quiet_trainer, tiny_ddpm


def small_ddpm(**kwargs):
    torch.manual_seed(0)
    kwargs.setdefault("num_inference_steps", 2)
    kwargs.setdefault("num_train_timesteps", 100)
    return tiny_ddpm(**kwargs)


def fit(tmp_path, model, callbacks, logger=False, epochs=1):
    loader = DataLoader(RandomDigits(n=8), batch_size=4)
    trainer = quiet_trainer(tmp_path, max_epochs=epochs, limit_val_batches=1, logger=logger, callbacks=callbacks)
    trainer.fit(model, loader, loader)
    return trainer


def test_fit_saves_a_png_per_epoch_and_logs_the_grid(tmp_path):
    every = SampleGridLogger(classes=[0, 2], num_per_class=3, label_rows=False, scale=2)
    second = SampleGridLogger(every_n_epochs=2, num_per_class=1, dirpath=str(tmp_path / "other"))
    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    fit(tmp_path, small_ddpm(), [every, second], logger=logger, epochs=2)

    files = sorted(p.name for p in (tmp_path / "samples").iterdir())
    assert files == ["epoch=000-step=000002.png", "epoch=001-step=000004.png"]  # no temporary files left
    with PIL.Image.open(tmp_path / "samples" / files[0]) as image:
        # 3 columns and 2 rows of 8x8 images, 2 px padding, upscaled x2
        assert image.size == ((3 * (8 + 2) + 2) * 2, (2 * (8 + 2) + 2) * 2)
    assert every.last_path == tmp_path / "samples" / files[1]
    assert sorted(p.name for p in (tmp_path / "other").iterdir()) == ["epoch=001-step=000004.png"]

    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "histograms": 0, "scalars": 0})
    events.Reload()
    grids = events.Images("samples/grid")
    # two from `every` (steps 2 and 4) and one from `second` (step 4)
    assert sorted(e.step for e in grids) == [2, 4, 4]
    assert (grids[0].width, grids[0].height) == (64, 44)


def test_same_seed_gives_the_same_grid():
    model = small_ddpm()
    first = SampleGridLogger(num_per_class=2, seed=3).generate(model)
    again = SampleGridLogger(num_per_class=2, seed=3).generate(model)
    other = SampleGridLogger(num_per_class=2, seed=4).generate(model)
    assert torch.equal(first.images, again.images)
    assert np.array_equal(np.asarray(first.pil_grid), np.asarray(again.pil_grid))
    assert not torch.equal(first.images, other.images)
    assert first.conditions.values == (0, 0, 1, 1, 2, 2)
    unlabelled = SampleGridLogger(num_per_class=2, seed=3, label_rows=False).generate(model)
    assert unlabelled.pil_grid.height == first.pil_grid.height and unlabelled.pil_grid.width < first.pil_grid.width


def test_grid_uses_the_ema_weights_when_listed_before_ema(tmp_path):
    model = small_ddpm(learning_rate=0.05)
    raw = model.unet.conv_in.weight.detach().clone()
    callback = SampleGridLogger(num_per_class=1, label_rows=False)
    fit(tmp_path, model, [callback, EMAWeightAveraging(decay=0.5)])
    # EMA leaves the averaged weights in the model at the end, the ones swapped in for validation
    assert not torch.equal(model.unet.conv_in.weight, raw)
    with PIL.Image.open(callback.last_path) as image:
        saved = np.asarray(image.convert("RGB"))
    expected = np.asarray(callback.generate(model).pil_grid.convert("RGB"))
    assert np.array_equal(saved, expected)


def test_warns_when_listed_after_ema(tmp_path):
    callback = SampleGridLogger()
    trainer = quiet_trainer(tmp_path, callbacks=[EMAWeightAveraging(), callback])
    with pytest.warns(UserWarning, match="listed after a WeightAveraging"):
        callback.setup(trainer, small_ddpm(), "fit")


def test_mode_is_restored_also_when_sampling_raises(monkeypatch):
    model = small_ddpm()
    model.train()
    model.unet.conv_in.eval()

    def boom(*args, **kwargs):
        raise RuntimeError("sampling failed")

    monkeypatch.setattr(type(model.build_pipeline()), "__call__", boom)
    with pytest.raises(RuntimeError, match="sampling failed"):
        SampleGridLogger().generate(model)
    assert model.training and model.unet.training and not model.unet.conv_in.training
    with sampling_mode(model):
        assert not model.training and not torch.is_grad_enabled()
    assert model.training and not model.unet.conv_in.training and torch.is_grad_enabled()


def test_csv_logger_gets_the_png_and_one_warning(tmp_path, monkeypatch):
    monkeypatch.setattr(media, "_WARNED", set())
    logger = CSVLogger(tmp_path, name="csv", version=0)
    callback = SampleGridLogger(num_per_class=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(tmp_path, small_ddpm(), [callback], logger=logger, epochs=2)
    assert sum("CSVLogger cannot log images" in str(w.message) for w in caught) == 1
    assert len(list((tmp_path / "samples").glob("*.png"))) == 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"every_n_epochs": 0}, "every_n_epochs=0"),
        ({"num_per_class": 0}, "num_per_class=0"),
        ({"classes": []}, "classes=[]"),
        ({"scheduler": "plms"}, "scheduler='plms'"),
        ({"num_inference_steps": 0}, "num_inference_steps=0"),
        ({"guidance_scale": -1.0}, "guidance_scale=-1.0"),
        ({"scale": 0}, "scale=0"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        SampleGridLogger(**kwargs)


def test_classes_out_of_range_at_setup(tmp_path):
    callback = SampleGridLogger(classes=[0, 7])
    with pytest.raises(ValueError, match=r"classes=\[0, 7\] has \[7\]; the model's classes are 0..2"):
        fit(tmp_path, small_ddpm(), [callback])


def test_needs_a_diffusion_module(tmp_path):
    from lightning.pytorch.demos.boring_classes import BoringModel

    callback = SampleGridLogger()
    with pytest.raises(ValueError, match="SampleGridLogger needs a DiffusionModule .*got BoringModel"):
        callback.setup(quiet_trainer(tmp_path, callbacks=[callback]), BoringModel(), "fit")


def test_text_model_rows_are_its_prompts(tmp_path):
    from diffusion_lightning import LatentDiffusionModule
    from tests.test_latent import loader

    torch.manual_seed(0)
    module = LatentDiffusionModule(validation_prompts=["a digit one", "a digit two"], num_inference_steps=2)
    callback = SampleGridLogger(num_per_class=2, scale=1)
    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    trainer = quiet_trainer(
        tmp_path, max_epochs=1, limit_train_batches=1, limit_val_batches=1, logger=logger, callbacks=[callback]
    )
    trainer.fit(module, loader(), loader())
    grid = callback.generate(module)
    assert grid.conditions.values == ("a digit one", "a digit one", "a digit two", "a digit two")
    assert grid.images.shape == (4, 3, 16, 16)
    # prompt-labelled: the labels widen the image beyond the 2 x (16 + 2) + 2 px of the bare grid
    assert grid.pil_grid.width > 2 * 18 + 2 and grid.pil_grid.height == 2 * 18 + 2
    with PIL.Image.open(callback.last_path) as image:
        assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(grid.pil_grid.convert("RGB")))
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    events.Reload()
    assert [e.step for e in events.Images("samples/grid")] == [1]
    # explicit prompts replace the module's; classes are refused for a text model
    assert SampleGridLogger(prompts=["a digit three"], num_per_class=1).generate(module).images.shape[0] == 1
    with pytest.raises(ValueError, match=r"classes=\[1\] is set, but the model is conditioned on text prompts"):
        SampleGridLogger(classes=[1]).setup(trainer, module, "fit")


def test_prompts_refused_for_a_class_model(tmp_path):
    callback = SampleGridLogger(prompts=["a seven"])
    with pytest.raises(ValueError, match="prompts is set, but the model is class-conditioned"):
        callback.setup(quiet_trainer(tmp_path, callbacks=[callback]), small_ddpm(), "fit")
