"""One loader for what training leaves behind, and class paths resolved the way LightningCLI resolves them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger

from diffusion_lightning import ClassConditionedDDPM, ClassConditionedPipeline, MNISTDataModule
from diffusion_lightning.modules.base import DiffusionModule
from diffusion_lightning.modules.distill import load_teacher
from diffusion_lightning.modules.loading import (
    PIPELINE_DEFAULTS,
    load_module,
    load_pipeline_source,
    module_class,
    read_checkpoint,
    source_kind,
)
from diffusion_lightning.pipelines.sampling_defaults import SAMPLING_DEFAULTS_FILE
from diffusion_lightning.utils.config import load_datamodule_config, resolve_class
from tests.conftest import RandomDigits, quiet_trainer, tiny_ddpm


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny DDPM after one step, saved as a checkpoint (no CLI: the class is recorded by the module)."""
    folder = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    module = tiny_ddpm(class_names=["a", "b", "c"], guidance_scale=3.0, num_inference_steps=7, sampler="ddim")
    trainer = quiet_trainer(folder, max_steps=1, limit_val_batches=0)
    trainer.fit(module, torch.utils.data.DataLoader(RandomDigits(n=8), batch_size=4))
    trainer.save_checkpoint(folder / "tiny.ckpt")
    return folder / "tiny.ckpt"


def _with_checkpoint(path: Path, out: Path, **changes) -> Path:
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    checkpoint.update(changes)
    torch.save(checkpoint, out)
    return out


# ---------------------------------------------------------------------- modules from checkpoints


def test_load_module_rebuilds_the_recorded_class(checkpoint):
    module = load_module(checkpoint)
    assert type(module) is ClassConditionedDDPM and not module.training
    saved = read_checkpoint(checkpoint)["state_dict"]
    torch.testing.assert_close(module.unet.conv_in.weight, saved["unet.conv_in.weight"])
    assert module_class(read_checkpoint(checkpoint)) is ClassConditionedDDPM


def test_checkpoint_errors_name_the_file_and_what_is_accepted(checkpoint, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        load_module(tmp_path / "missing.ckpt")
    torch.save({"weights": 1}, tmp_path / "foreign.ckpt")
    with pytest.raises(ValueError, match="foreign.ckpt.*is not a Lightning checkpoint"):
        load_module(tmp_path / "foreign.ckpt")
    with pytest.raises(ValueError, match=r"weights='best' is not supported; expected one of \['ema', 'raw'\]"):
        load_module(checkpoint, weights="best")
    anonymous = _with_checkpoint(checkpoint, tmp_path / "anonymous.ckpt", diffusion_lightning={})
    with pytest.raises(ValueError, match="anonymous.ckpt.*does not record its module class"):
        load_module(anonymous)
    for class_path in ("torch.nn.Linear", "nowhere.Module", "diffusion_lightning.modules.ddpm.Nope"):
        wrong = _with_checkpoint(checkpoint, tmp_path / "wrong.ckpt", diffusion_lightning={"module_class": class_path})
        with pytest.raises(ValueError, match="wrong.ckpt") as error:
            load_module(wrong)
        assert repr(class_path) in str(error.value) and "DiffusionModule" in str(error.value)


# ---------------------------------------------------------------------- pipelines from either source


def test_pipeline_from_a_checkpoint_carries_the_modules_defaults(checkpoint):
    pipeline, defaults = load_pipeline_source(ckpt=checkpoint)
    assert isinstance(pipeline, ClassConditionedPipeline)
    assert type(pipeline.scheduler).__name__ == "DDIMScheduler"  # the module's sampler
    spec = defaults.pop("condition_spec")  # what evaluate and the commands generate by default
    assert spec.kind == "class" and spec.num_classes == 3 and spec.class_names == ("a", "b", "c")
    assert defaults == {"steps": 7, "guidance_scale": 3.0}  # plus image_size for modules that record one
    pipeline, _ = load_pipeline_source(ckpt=checkpoint, scheduler="euler")
    assert type(pipeline.scheduler).__name__ == "EulerDiscreteScheduler"


def test_pipeline_from_a_folder_and_its_errors(checkpoint, tmp_path):
    load_module(checkpoint).export_pipeline(tmp_path / "exported")
    pipeline, defaults = load_pipeline_source(pipeline=tmp_path / "exported", scheduler="dpm")
    assert isinstance(pipeline, ClassConditionedPipeline) and pipeline.config.class_names == ["a", "b", "c"]
    assert type(pipeline.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert defaults.pop("condition_spec").class_names == ("a", "b", "c")  # the exported pipeline's own
    assert defaults == {"steps": 7, "guidance_scale": 3.0}  # recorded by export, as the checkpoint's
    recorded = tmp_path / "exported" / SAMPLING_DEFAULTS_FILE
    assert json.loads(recorded.read_text()) == {"num_inference_steps": 7, "guidance_scale": 3.0}
    recorded.write_text('{"num_inference_steps": 0, "guidance_scale": 3.0}')
    with pytest.raises(ValueError, match=r"sampling_defaults.json: num_inference_steps=0 is not valid; accepted"):
        load_pipeline_source(pipeline=tmp_path / "exported")
    recorded.write_text("{not json")
    with pytest.raises(ValueError, match=r"sampling_defaults.json: not readable JSON"):
        load_pipeline_source(pipeline=tmp_path / "exported")
    recorded.unlink()  # a folder saved by diffusers alone records nothing
    defaults = load_pipeline_source(pipeline=tmp_path / "exported")[1]
    assert {k: v for k, v in defaults.items() if k != "condition_spec"} == PIPELINE_DEFAULTS

    with pytest.raises(ValueError, match="exactly one of ckpt.*or pipeline"):
        load_pipeline_source()
    with pytest.raises(ValueError, match="exactly one of ckpt.*or pipeline"):
        load_pipeline_source(ckpt=checkpoint, pipeline=tmp_path / "exported")
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "pytorch_lora_weights.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="LoRA adapter weights only.*--merge-lora"):
        load_pipeline_source(pipeline=tmp_path / "lora")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty.*has no model_index.json"):
        load_pipeline_source(pipeline=tmp_path / "empty")
    (tmp_path / "sd").mkdir()  # never loaded: its class is checked first
    (tmp_path / "sd" / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    with pytest.raises(ValueError, match="sd.*holds a StableDiffusionPipeline; expected a ClassConditionedPipeline"):
        load_pipeline_source(pipeline=tmp_path / "sd", expect=ClassConditionedPipeline)
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "model_index.json").write_text('{"_class_name": "NoSuchPipeline"}')
    with pytest.raises(ValueError, match="odd.*names a pipeline class diffusers does not know.*NoSuchPipeline"):
        load_pipeline_source(pipeline=tmp_path / "odd")


def test_source_kind(checkpoint, tmp_path):
    load_module(checkpoint).export_pipeline(tmp_path / "exported")
    assert source_kind(checkpoint) == "ckpt"
    assert source_kind(tmp_path / "exported") == "pipeline"
    assert source_kind(tmp_path) is None and source_kind(tmp_path / "missing") is None


def test_a_checkpoint_teacher_is_the_modules_network_and_schedule(checkpoint):
    module = load_module(checkpoint)
    teacher = load_teacher(checkpoint)
    assert teacher.num_classes == 3 and teacher.class_names == ["a", "b", "c"] and teacher.guidance_scale == 3.0
    for name, value in module.unet.state_dict().items():
        torch.testing.assert_close(teacher.unet.state_dict()[name], value)
    for key in ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "prediction_type"):
        assert teacher.scheduler_config[key] == module.noise_scheduler.config[key], key


# ---------------------------------------------------------------------- class paths and config sections


def test_resolve_class_goes_through_jsonargparse():
    assert resolve_class("lightning.pytorch.loggers.CSVLogger", Logger) is CSVLogger
    assert resolve_class("lightning.pytorch.loggers.tensorboard.TensorBoardLogger", Logger) is TensorBoardLogger
    assert resolve_class("diffusion_lightning.ClassConditionedDDPM", DiffusionModule) is ClassConditionedDDPM
    for class_path in ("torch.nn.Linear", "nowhere.Logger", "lightning.pytorch.loggers.Nope", "CSVLogger"):
        with pytest.raises(ValueError, match=r"trainer\.logger=.*does not name an importable subclass") as error:
            resolve_class(class_path, Logger, field="trainer.logger")
        assert repr(class_path) in str(error.value) and "\n" not in str(error.value)


def test_load_datamodule_config_builds_the_data_section(tmp_path):
    config = tmp_path / "fit.yaml"
    config.write_text(
        "model:\n  class_path: diffusion_lightning.ClassConditionedDDPM\n"
        "data:\n  class_path: MNISTDataModule\n  init_args:\n    batch_size: 4\n    val_fraction: 0.2\n"
    )
    datamodule = load_datamodule_config(config)
    assert type(datamodule) is MNISTDataModule
    assert datamodule.batch_size == 4 and datamodule.val_fraction == 0.2


def test_load_datamodule_config_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        load_datamodule_config(tmp_path / "missing.yaml")
    for name, text in (
        ("no_data.yaml", "model:\n  class_path: x.Y\n"),
        ("empty.yaml", ""),
        ("no_class.yaml", "data:\n  init_args:\n    batch_size: 4\n"),
    ):
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=f"{name}.*has no data section with a class_path") as error:
            load_datamodule_config(tmp_path / name)
        assert "\n" not in str(error.value)
    cases = {
        "typo.yaml": ("data:\n  class_path: MNISTDataModule\n  init_args:\n    batch_sise: 4\n", "batch_sise"),
        "type.yaml": ("data:\n  class_path: MNISTDataModule\n  init_args:\n    batch_size: many\n", "batch_size"),
        "class.yaml": ("data:\n  class_path: torch.nn.Linear\n", "LightningDataModule"),
    }
    for name, (text, named) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=f"{name}.*the data section does not parse") as error:
            load_datamodule_config(tmp_path / name)
        assert named in str(error.value)
    (tmp_path / "value.yaml").write_text("data:\n  class_path: MNISTDataModule\n  init_args:\n    source: tape\n")
    with pytest.raises(ValueError, match="source='tape' is not supported"):  # the data module's own check
        load_datamodule_config(tmp_path / "value.yaml")
