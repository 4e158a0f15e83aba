"""EMA of a LoRA-trained latent model: only the adapters are copied, averaged, checkpointed and exported."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Callback, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file

from diffusion_lightning import ImageCaptionDataModule, LatentDiffusionModule
from diffusion_lightning.callbacks.ema import EMA
from diffusion_lightning.commands import export
from tests.conftest import Crash, CrashAt, quiet_trainer
from tests.test_ema import assert_state_equal, differs, hand_ema

ADAPTERS = "pytorch_lora_weights.safetensors"


def lora_module(**kwargs) -> LatentDiffusionModule:
    kwargs = {"training_mode": "lora", "lora_rank": 2, "learning_rate": 1e-2, "num_inference_steps": 2, **kwargs}
    return LatentDiffusionModule(components={"seed": 0}, **kwargs)


def data() -> ImageCaptionDataModule:
    return ImageCaptionDataModule(source="embedded", resolution=16, max_samples=64, batch_size=8)


def adapters(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters() if "lora_" in name}


class AdapterRecorder(Callback):
    """The raw adapter weights after every optimizer step: ``weights[k]`` after ``k`` steps."""

    def __init__(self) -> None:
        self.weights: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.weights[trainer.global_step] = adapters(pl_module)


def exported(folder) -> dict[str, torch.Tensor]:
    """The adapters of an export, under the module's peft names (the file has no adapter name)."""
    names = {".lora_A.": ".lora_A.default.", ".lora_B.": ".lora_B.default."}
    renamed = {}
    for name, value in load_file(folder / ADAPTERS).items():
        for theirs, ours in names.items():
            name = name.replace(theirs, ours)
        renamed[name] = value
    return renamed


def test_only_the_adapters_are_averaged_checkpointed_and_exported(tmp_path):
    seed_everything(0)
    module, ema, recorder = lora_module(), EMA(decay=0.5, use_warmup=False), AdapterRecorder()
    lora = adapters(module)
    assert len(lora) == 64 and set(lora) == module.trainable_keys()  # the UNet's adapters, nothing else trains
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    trainer = quiet_trainer(
        tmp_path, max_steps=3, limit_val_batches=0, enable_checkpointing=True, callbacks=[recorder, ema, checkpoint]
    )
    trainer.fit(module, data())

    # the averaged copy holds the adapters alone: no frozen base weight, no buffer
    assert sorted(ema.averaged_keys) == sorted(lora)
    copy = list(ema.average_model.module.parameters())
    assert len(copy) == len(lora) and not list(ema.average_model.module.buffers())
    assert sum(p.numel() for p in copy) == sum(v.numel() for v in lora.values())

    expected = hand_ema(recorder.weights, [1, 2, 3], lambda n: 0.5)
    raw = recorder.weights[3]
    assert differs(expected, raw)
    assert_state_equal(adapters(module), expected, atol=1e-6)  # after fit the module holds the average

    # the checkpoint (written during training) holds the averaged and the raw adapters, and the update count
    (path,) = (tmp_path / "ckpt").iterdir()
    saved = torch.load(path, map_location="cpu", weights_only=True)
    ema_state, raw_state = saved["state_dict"], saved["current_model_state"]
    assert len(ema_state) == len(raw_state) == len(lora) == 64
    assert not any("base_layer" in k or k.startswith(("vae.", "text_encoder.")) for k in [*ema_state, *raw_state])
    assert list(saved["averaging_state"]) == ["n_averaged"] and int(saved["averaging_state"]["n_averaged"]) == 3
    assert_state_equal(ema_state, expected, atol=1e-6)
    assert_state_equal(raw_state, raw)

    # exports give the averaged adapters, from the module after fit and from the checkpoint
    module.export_pipeline(tmp_path / "module")
    export.main(["--ckpt", str(path), "--out", str(tmp_path / "ema")])
    assert_state_equal(exported(tmp_path / "module"), expected, atol=1e-6)
    assert_state_equal(exported(tmp_path / "ema"), expected, atol=1e-6)
    # --weights raw: the trained adapters, with the frozen base rebuilt around them
    export.main(["--ckpt", str(path), "--out", str(tmp_path / "raw"), "--weights", "raw"])
    assert_state_equal(exported(tmp_path / "raw"), raw)


def test_interrupted_and_resumed_lora_run_has_the_uninterrupted_average(tmp_path):
    def run(root, callbacks=()):
        seed_everything(0)
        ema = EMA(decay=0.9, update_every_n_steps=2, update_starting_at_step=1)
        checkpoint = ModelCheckpoint(dirpath=root / "ckpt", save_last=True, every_n_train_steps=1, save_top_k=0)
        trainer = quiet_trainer(
            root, max_steps=6, limit_val_batches=0, enable_checkpointing=True, callbacks=[ema, checkpoint, *callbacks]
        )
        return lora_module(), ema, trainer

    module_a, ema_a, trainer_a = run(tmp_path / "a")
    trainer_a.fit(module_a, data())

    module_b, _, trainer_b = run(tmp_path / "b", callbacks=[CrashAt(5)])
    with pytest.raises(Crash):
        trainer_b.fit(module_b, data())
    saved = torch.load(tmp_path / "b" / "ckpt" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 4 and int(saved["averaging_state"]["n_averaged"]) == 2
    assert len(saved["state_dict"]) == len(adapters(module_b))

    module_c, ema_c, trainer_c = run(tmp_path / "b")
    trainer_c.fit(module_c, data(), ckpt_path="last")
    assert trainer_c.global_step == trainer_a.global_step == 6
    assert int(ema_c.average_model.n_averaged) == int(ema_a.average_model.n_averaged) == 3
    assert_state_equal(module_c.state_dict(), module_a.state_dict())  # averaged adapters, frozen base
    assert_state_equal(ema_c.average_model.module.state_dict(), ema_a.average_model.module.state_dict())  # raw
    assert differs(adapters(module_a), dict(zip(ema_a.averaged_keys, ema_a.average_model.module.parameters())))


def test_opting_out_averages_the_whole_unet_and_a_frozen_scope_is_rejected():
    module = lora_module()
    ema = EMA(only_trainable=False)
    ema.setup(None, module, "fit")
    assert len(ema.averaged_keys) == len(module.unet.state_dict()) > len(adapters(module))

    frozen_unet = lora_module(training_mode="text_encoder")
    with pytest.raises(ValueError, match=r"scope='denoiser': every parameter of UNet2DConditionModel is frozen"):
        EMA().setup(None, frozen_unet, "fit")
    ema = EMA(scope=None)  # the trained text encoder, alone
    ema.setup(None, frozen_unet, "fit")
    assert set(ema.averaged_keys) == frozen_unet.trainable_keys()
    assert all(k.startswith("text_encoder.") for k in ema.averaged_keys)
