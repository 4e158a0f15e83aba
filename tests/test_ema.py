"""The EMA callback: diffusers' decay warm-up, scoping, validation on EMA weights, checkpoints, resume."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import UNet2DModel
from diffusers.training_utils import EMAModel
from lightning.pytorch import Callback, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel
from torch.utils.data import DataLoader

from diffusion_lightning import ClassConditionedDDPM
from diffusion_lightning.callbacks.ema import EMA
from diffusion_lightning.commands import export
from diffusion_lightning.data.base import LabelledImageDataModule
from diffusion_lightning.modules.loading import load_module
from tests.conftest import Crash, CrashAt, RandomDigits, quiet_trainer, tiny_config, tiny_ddpm


class Recorder(Callback):
    """The raw UNet weights after every optimizer step: ``weights[k]`` after ``k`` steps."""

    def __init__(self) -> None:
        self.weights: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.weights[trainer.global_step] = {k: v.detach().clone() for k, v in pl_module.unet.state_dict().items()}


class CrashInValidation(Callback):
    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if not trainer.sanity_checking:
            raise Crash("simulated crash in validation")


class WithFrozenEncoder(ClassConditionedDDPM):
    """A DDPM with a frozen extra network, as a latent model has its VAE."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.encoder = torch.nn.Linear(16, 16).requires_grad_(False)


class RandomDigitsData(LabelledImageDataModule):
    """Resumable mid-epoch like the real data modules, on random 8x8 images."""

    num_classes, in_channels, image_size, class_names = 3, 1, 8, ["a", "b", "c"]

    def load(self):
        g = torch.Generator().manual_seed(0)
        return {
            split: (torch.randint(0, 256, (n, 1, 8, 8), generator=g, dtype=torch.uint8), torch.arange(n) % 3)
            for split, n in (("train", 32), ("test", 8))
        }


def loader(n: int = 32, seed: int = 0) -> DataLoader:
    return DataLoader(RandomDigits(n, seed=seed), batch_size=8)


def fit(tmp_path, ema: EMA, max_steps: int, model=None, val: bool = False, callbacks=(), **trainer_kwargs):
    seed_everything(0)
    model = model or tiny_ddpm(learning_rate=1e-2, lr_scheduler=None)
    recorder = Recorder()
    trainer_kwargs.setdefault("limit_val_batches", 2 if val else 0)
    trainer_kwargs.setdefault("num_sanity_val_steps", 0)
    trainer = quiet_trainer(tmp_path, max_steps=max_steps, callbacks=[recorder, ema, *callbacks], **trainer_kwargs)
    trainer.fit(model, loader(), loader(16, seed=1) if val else None)
    return model, trainer, recorder.weights


def hand_ema(weights: dict[int, dict[str, torch.Tensor]], steps: list[int], decay) -> dict[str, torch.Tensor]:
    """The first recorded weights, then ``e = d * e + (1 - d) * w`` with ``d = decay(n)``."""
    ema = {k: v.clone() for k, v in weights[steps[0]].items()}
    for n, step in enumerate(steps[1:], start=1):
        d = decay(n)
        ema = {k: d * ema[k] + (1 - d) * weights[step][k] for k in ema}
    return ema


def assert_state_equal(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=atol, msg=name)


def differs(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------- decay


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (dict(decay=0.999), dict(decay=0.999, use_ema_warmup=False)),
        (dict(decay=0.99, min_decay=0.3), dict(decay=0.99, min_decay=0.3, use_ema_warmup=False)),
        (dict(decay=0.9999, inv_gamma=1.0), dict(decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=2 / 3)),
        (
            dict(decay=0.999, min_decay=0.2, inv_gamma=2.0, power=0.75),
            dict(decay=0.999, min_decay=0.2, use_ema_warmup=True, inv_gamma=2.0, power=0.75),
        ),
    ],
)
def test_decay_warmup_matches_diffusers(ours, theirs):
    reference = EMAModel([torch.nn.Parameter(torch.zeros(1))], **theirs)
    ema = EMA(**ours)
    # diffusers counts steps including the first (a copy); n_averaged counts the updates before this one
    for n in (0, 1, 2, 3, 9, 10, 100, 1_000, 31_623, 10**6):
        assert ema.decay_at(n) == pytest.approx(reference.get_decay(n + 1), abs=1e-15), n
    assert ema.decay_at(1) < 0.5 and ema.decay_at(10**7) == ours["decay"]


def test_without_warmup_the_decay_is_constant():
    ema = EMA(decay=0.995, use_warmup=False)
    assert {ema.decay_at(n) for n in (1, 2, 50, 10**6)} == {0.995}


# ---------------------------------------------------------------------- what fit computes


def test_fit_gives_the_hand_computed_warmed_up_average(tmp_path):
    ema = EMA(decay=0.3)  # warm-up (1 + n) / (10 + n) reaches the cap at n = 3
    model, trainer, weights = fit(tmp_path, ema, max_steps=5)
    assert int(ema.average_model.n_averaged) == 5
    expected = hand_ema(weights, [1, 2, 3, 4, 5], lambda n: min(0.3, (1 + n) / (10 + n)))
    assert_state_equal(model.unet.state_dict(), expected, atol=1e-6)  # the module keeps the EMA weights
    assert_state_equal(ema.average_model.module.state_dict(), weights[5])  # and the copy the raw ones
    assert differs(model.unet.state_dict(), weights[5])


def test_updates_start_at_the_given_step_and_follow_every_n_steps(tmp_path):
    ema = EMA(decay=0.9, update_every_n_steps=2, update_starting_at_step=3)
    model, _, weights = fit(tmp_path, ema, max_steps=8)
    # zero-based steps 3, 5 and 7 update, i.e. the weights after 4, 6 and 8 steps
    assert int(ema.average_model.n_averaged) == 3
    expected = hand_ema(weights, [4, 6, 8], lambda n: (1 + n) / (10 + n))
    assert_state_equal(model.unet.state_dict(), expected, atol=1e-6)


def test_before_the_first_update_the_average_is_the_trained_weights(tmp_path):
    ema = EMA(update_starting_at_step=100)
    model, trainer, weights = fit(tmp_path, ema, max_steps=4, val=True)
    assert int(ema.average_model.n_averaged) == 0
    assert_state_equal(model.unet.state_dict(), weights[4])
    assert trainer.callback_metrics["val/loss"] > 0
    trainer.save_checkpoint(tmp_path / "early.ckpt")
    saved = torch.load(tmp_path / "early.ckpt", weights_only=True)
    assert_state_equal(saved["state_dict"], saved["current_model_state"])


def test_scope_averages_only_the_denoiser(tmp_path):
    def count(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    model = WithFrozenEncoder(image_size=8, num_classes=3, net=tiny_config(), learning_rate=1e-2)
    frozen = count(model.encoder)
    unet = count(model.unet)
    # the whole module has a frozen part, so by default only its trainable parameters (the UNet's) are averaged
    for scope, only_trainable, expected in (
        ("denoiser", None, unet),
        ("unet", None, unet),
        (None, None, unet),
        (None, True, unet),
        (None, False, unet + frozen),
    ):
        ema = EMA(scope=scope, only_trainable=only_trainable)
        ema.setup(None, model, "fit")
        assert count(ema.average_model.module) == expected, (scope, only_trainable)
    assert count(model) == unet + frozen

    ema = EMA(decay=0.5)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    model, trainer, weights = fit(tmp_path, ema, 3, model, callbacks=[checkpoint], enable_checkpointing=True)
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    ema_state, raw_state = saved["state_dict"], saved["current_model_state"]
    assert ema_state.keys() == raw_state.keys() == model.state_dict().keys()
    for name in ("encoder.weight", "encoder.bias"):
        assert torch.equal(ema_state[name], raw_state[name])

    def unet(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k[len("unet.") :]: v for k, v in state.items() if k.startswith("unet.")}

    assert_state_equal(unet(raw_state), weights[3])
    assert_state_equal(unet(ema_state), model.unet.state_dict())
    assert differs(unet(ema_state), unet(raw_state))


def test_a_scope_without_trainable_parameters_is_rejected_unless_asked_for():
    model = WithFrozenEncoder(image_size=8, num_classes=3, net=tiny_config())
    for only_trainable in (None, True):
        with pytest.raises(ValueError, match=r"scope='encoder': every parameter of Linear is frozen.*'text_encoder'"):
            EMA(scope="encoder", only_trainable=only_trainable).setup(None, model, "fit")
    ema = EMA(scope="encoder", only_trainable=False)  # averaging frozen weights on purpose
    ema.setup(None, model, "fit")
    assert ema.averaged_keys == ["encoder.weight", "encoder.bias"]


def test_unknown_or_unusable_scope_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="scope='vae': ClassConditionedDDPM has no attribute 'vae'"):
        fit(tmp_path, EMA(scope="vae"), max_steps=1)
    with pytest.raises(ValueError, match="scope='denoiser.nope': UNet2DModel has no attribute 'nope'"):
        EMA(scope="denoiser.nope").setup(None, tiny_ddpm(), "fit")
    with pytest.raises(ValueError, match="scope='num_classes' is a int"):
        EMA(scope="num_classes").setup(None, tiny_ddpm(), "fit")


# ---------------------------------------------------------------------- export and checkpoints


def test_export_and_checkpoints_carry_ema_weights_and_raw_ones_on_request(tmp_path):
    model, trainer, weights = fit(tmp_path, EMA(decay=0.5), max_steps=4)
    ema_state = {k: v.clone() for k, v in model.unet.state_dict().items()}
    assert differs(ema_state, weights[4])

    unet = UNet2DModel.from_pretrained(model.export_pipeline(tmp_path / "pipe") / "unet")
    assert_state_equal(unet.state_dict(), ema_state)

    # written after training: the raw weights are still there (they wait in the average's copy)
    trainer.save_checkpoint(tmp_path / "done.ckpt")
    assert_state_equal(load_module(tmp_path / "done.ckpt").unet.state_dict(), ema_state)
    assert_state_equal(load_module(tmp_path / "done.ckpt", weights="raw").unet.state_dict(), weights[4])
    loaded = ClassConditionedDDPM.load_from_checkpoint(tmp_path / "done.ckpt", weights_only=False)
    assert_state_equal(loaded.unet.state_dict(), ema_state)

    export.main(["--ckpt", str(tmp_path / "done.ckpt"), "--out", str(tmp_path / "raw"), "--weights", "raw"])
    assert_state_equal(UNet2DModel.from_pretrained(tmp_path / "raw" / "unet").state_dict(), weights[4])


def test_interrupted_and_resumed_run_has_the_uninterrupted_ema_and_raw_weights(tmp_path):
    def run(root, callbacks=()):
        seed_everything(0)
        model = tiny_ddpm(net=tiny_config(dropout=0.1), learning_rate=3e-3, p_uncond=0.2)
        ema = EMA(decay=0.9, update_every_n_steps=2, update_starting_at_step=1, validate_raw=True)
        checkpoint = ModelCheckpoint(dirpath=root / "ckpt", save_last=True, every_n_train_steps=1, save_top_k=0)
        trainer = quiet_trainer(
            root,
            max_steps=7,
            limit_val_batches=1,
            num_sanity_val_steps=0,
            enable_checkpointing=True,
            callbacks=[ema, checkpoint, *callbacks],
        )
        return model, ema, RandomDigitsData(batch_size=8, val_fraction=8 / 32), trainer

    model_a, ema_a, data_a, trainer_a = run(tmp_path / "a")
    trainer_a.fit(model_a, data_a)

    model_b, _, data_b, trainer_b = run(tmp_path / "b", callbacks=[CrashAt(5)])  # 3 batches an epoch
    with pytest.raises(Crash):
        trainer_b.fit(model_b, data_b)
    saved = torch.load(tmp_path / "b" / "ckpt" / "last.ckpt", weights_only=True)
    # one batch into the second epoch, after a validation, two updates (zero-based steps 1 and 3) done
    assert saved["global_step"] == 4 and int(saved["averaging_state"]["n_averaged"]) == 2

    model_c, ema_c, data_c, trainer_c = run(tmp_path / "b")
    trainer_c.fit(model_c, data_c, ckpt_path="last")
    assert trainer_c.global_step == trainer_a.global_step == 7
    assert int(ema_c.average_model.n_averaged) == int(ema_a.average_model.n_averaged) == 3
    assert_state_equal(model_c.state_dict(), model_a.state_dict())  # EMA weights
    assert_state_equal(ema_c.average_model.module.state_dict(), ema_a.average_model.module.state_dict())  # raw
    assert differs(model_a.unet.state_dict(), ema_a.average_model.module.state_dict())


# ---------------------------------------------------------------------- validation


def raw_validation_loss(model: ClassConditionedDDPM, raw_unet: dict[str, torch.Tensor]) -> torch.Tensor:
    raw = copy.deepcopy(model).eval()
    raw.unet.load_state_dict(raw_unet)
    losses = []
    with torch.no_grad():
        for batch_idx, batch in enumerate(loader(16, seed=1)):
            generator = raw.generator(0x5EED, batch_idx, 0)
            timesteps = raw.sample_timesteps(8, generator, stratified=True)
            losses.append(raw.diffusion_step(batch["images"], batch["labels"], generator, timesteps=timesteps).loss)
    return torch.stack(losses).mean()


def test_validation_uses_ema_weights_and_validate_raw_logs_the_raw_loss(tmp_path):
    ema = EMA(decay=0.5, validate_raw=True)
    model, trainer, weights = fit(tmp_path, ema, max_steps=4, val=True)  # validates after the last step
    ema_state = {k: v.clone() for k, v in model.unet.state_dict().items()}
    ema_loss, raw_loss = raw_validation_loss(model, ema_state), raw_validation_loss(model, weights[4])
    assert float(ema_loss) != pytest.approx(float(raw_loss), rel=1e-4)
    logged = trainer.callback_metrics
    assert float(logged["val/loss"]) == pytest.approx(float(ema_loss), rel=1e-5)
    assert float(logged["val/loss_raw"]) == pytest.approx(float(raw_loss), rel=1e-5)

    # after fit the module holds the EMA weights; validate_raw still finds the raw ones
    (metrics,) = trainer.validate(model, loader(16, seed=1), verbose=False)
    assert metrics["val/loss"] == pytest.approx(float(ema_loss), rel=1e-5)
    assert metrics["val/loss_raw"] == pytest.approx(float(raw_loss), rel=1e-5)
    assert_state_equal(model.unet.state_dict(), ema_state)  # validating leaves the EMA weights in place


def test_without_validate_raw_only_the_ema_loss_is_logged(tmp_path):
    _, trainer, _ = fit(tmp_path, EMA(), max_steps=4, val=True)
    assert "val/loss" in trainer.callback_metrics and "val/loss_raw" not in trainer.callback_metrics


def test_a_crash_during_validation_leaves_the_raw_weights(tmp_path):
    model, ema, recorder = tiny_ddpm(learning_rate=1e-2, lr_scheduler=None), EMA(decay=0.5), Recorder()
    trainer = quiet_trainer(tmp_path, max_steps=8, limit_val_batches=2, callbacks=[recorder, ema, CrashInValidation()])
    with pytest.raises(Crash):
        trainer.fit(model, loader(), loader(16, seed=1))
    assert trainer.global_step == 4  # the first validation, after an epoch of 4 batches
    assert_state_equal(model.unet.state_dict(), recorder.weights[4])
    assert differs(ema.average_model.module.state_dict(), recorder.weights[4])  # the copy holds the EMA again


# ---------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(decay=0.0), "decay=0.0"),
        (dict(decay=1.0), "decay=1.0"),
        (dict(decay=1.5), "decay=1.5"),
        (dict(min_decay=-0.1), "min_decay=-0.1"),
        (dict(decay=0.9, min_decay=0.95), "min_decay=0.95"),
        (dict(inv_gamma=0.0), "inv_gamma=0.0"),
        (dict(inv_gamma=1.0, use_warmup=False), "inv_gamma=1.0"),
        (dict(inv_gamma=1.0, power=0.0), "power=0.0"),
        (dict(power=0.75), "power=0.75"),
        (dict(update_every_n_steps=0), "update_every_n_steps=0"),
        (dict(update_starting_at_step=-1), "update_starting_at_step=-1"),
        (dict(scope=""), "scope=''"),
        (dict(scope="unet..conv_in"), "scope='unet..conv_in'"),
    ],
)
def test_bad_arguments_are_rejected_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        EMA(**kwargs)


def test_validate_raw_needs_a_diffusion_module():
    with pytest.raises(ValueError, match="validate_raw=True needs a DiffusionModule.*BoringModel"):
        EMA(scope=None, validate_raw=True).setup(None, BoringModel(), "fit")


def test_constructible_from_yaml():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--callbacks", type=list[EMA])
    config = parser.parse_string(
        "callbacks:\n- class_path: diffusion_lightning.callbacks.ema.EMA\n"
        "  init_args: {decay: 0.999, inv_gamma: 1.0, power: 0.75, scope: unet, validate_raw: true}\n"
    )
    (ema,) = parser.instantiate(config).callbacks
    assert (ema.decay, ema.inv_gamma, ema.power, ema.scope, ema.validate_raw) == (0.999, 1.0, 0.75, "unet", True)
