import math

import pytest
import torch
from lightning.pytorch import seed_everything

from diffusion_lightning import ClassConditionedDDPM, ClassConditionedPipeline, WarmupCosineLR
from diffusion_lightning.modules.base import mix_seed
from tests.conftest import RandomDigits, quiet_trainer, tiny_config, tiny_ddpm


def loaders(n=32, batch_size=8):
    data = RandomDigits(n=n)
    train = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False)
    val = torch.utils.data.DataLoader(data, batch_size=16)
    return train, val


@pytest.mark.parametrize(
    ("prediction_type", "loss_type"),
    [("epsilon", "l2"), ("v_prediction", "l2"), ("sample", "l2"), ("epsilon", "huber"), ("v_prediction", "l1")],
)
def test_training_lowers_the_repeatable_validation_loss(tmp_path, prediction_type, loss_type):
    seed_everything(0)
    model = tiny_ddpm(
        prediction_type=prediction_type, loss_type=loss_type, snr_gamma=5.0, learning_rate=3e-3, lr_scheduler=None
    )
    train, val = loaders()
    trainer = quiet_trainer(tmp_path, max_steps=40)
    before = trainer.validate(model, val, verbose=False)[0]["val/loss"]
    again = trainer.validate(model, val, verbose=False)[0]["val/loss"]
    assert before == again  # fixed noise and timesteps: repeatable
    trainer.fit(model, train, val)
    after = trainer.validate(model, val, verbose=False)[0]["val/loss"]
    assert math.isfinite(after) and after < 0.9 * before


def test_training_step_returns_per_sample_losses_and_timesteps(tmp_path):
    model = tiny_ddpm()
    batch = next(iter(loaders()[0]))
    trainer = quiet_trainer(tmp_path, max_steps=1)
    trainer.strategy.connect(model)
    model.trainer = trainer
    model.log = lambda *args, **kwargs: None  # no loop is running to collect logs
    out = model.training_step(batch, 0)
    assert out["loss"].requires_grad and out["loss"].ndim == 0
    assert out["per_sample_loss"].shape == (8,) and out["timesteps"].shape == (8,)
    assert out["timesteps"].min() >= 0 and out["timesteps"].max() < 1000


def test_classifier_free_guidance_drops_labels_to_the_null_class():
    model = tiny_ddpm(num_classes=3, p_uncond=0.3)
    labels = torch.zeros(20_000, dtype=torch.long)
    dropped = model.drop_condition(labels, torch.Generator().manual_seed(0))
    assert set(dropped.unique().tolist()) == {0, 3}
    assert (dropped == 3).float().mean().item() == pytest.approx(0.3, abs=0.02)
    assert torch.equal(tiny_ddpm(p_uncond=0.0).drop_condition(labels, torch.Generator()), labels)


def test_noise_depends_on_seed_epoch_batch_and_rank():
    model = tiny_ddpm(seed=1)
    a = torch.randn(4, generator=model.generator(0, 0, 0))
    assert torch.equal(a, torch.randn(4, generator=model.generator(0, 0, 0)))
    for keys in [(1, 0, 0), (0, 1, 0), (0, 0, 1)]:
        assert not torch.equal(a, torch.randn(4, generator=model.generator(*keys)))
    assert mix_seed(1, 2) != mix_seed(2, 1)


def test_optimizer_groups_and_warmup_cosine_schedule(tmp_path):
    model = tiny_ddpm(
        learning_rate=2e-3,
        optimizer=lambda p: torch.optim.AdamW(p, weight_decay=0.05),
        lr_scheduler=lambda o: WarmupCosineLR(o, warmup_steps=2),
    )
    train, _ = loaders()
    trainer = quiet_trainer(tmp_path, max_steps=10, limit_val_batches=0)
    trainer.fit(model, train)
    optimizer, config = trainer.optimizers[0], trainer.lr_scheduler_configs[0]
    scheduler = config.scheduler
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim <= 1 for p in no_decay["params"])
    n_params = sum(1 for p in model.parameters() if p.requires_grad)
    assert len(decay["params"]) + len(no_decay["params"]) == n_params
    assert config.interval == "step"
    assert scheduler.total_steps == 10 and scheduler.last_epoch == 10
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0)  # cosine decayed to min_lr_ratio=0


def test_warmup_cosine_values():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = WarmupCosineLR(opt, warmup_steps=4, total_steps=14, min_lr_ratio=0.1)
    lrs = []
    for _ in range(16):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert lrs[4] == pytest.approx(1.0)
    assert lrs[9] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lrs[14] == pytest.approx(0.1) and lrs[15] == pytest.approx(0.1)
    state = sched.state_dict()
    assert state["total_steps"] == 14 and state["warmup_steps"] == 4
    with pytest.raises(ValueError, match="total_steps=2"):
        WarmupCosineLR(opt, warmup_steps=4, total_steps=2)


def test_compile_flag_compiles_the_denoiser_in_place(tmp_path, monkeypatch):
    """TorchDynamo really traces the denoiser; the backend only records and runs the graphs (inductor is slow)."""
    graphs, runs = [], []

    def recording_backend(graph: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(graph)

        def run(*args):
            runs.append(len(graphs))
            return graph.forward(*args)

        return run

    model = tiny_ddpm(compile=True)
    compile_in_place = model.unet.compile

    def compile_with_recording_backend(*args, **kwargs):
        compile_in_place(*args, **{**kwargs, "backend": recording_backend})

    monkeypatch.setattr(model.unet, "compile", compile_with_recording_backend)
    before = model.unet.conv_in.weight.detach().clone()
    train, _ = loaders()
    trainer = quiet_trainer(tmp_path, max_steps=2, limit_val_batches=0)
    trainer.fit(model, train)
    assert graphs and runs.count(1) == 2, runs  # both training steps ran the compiled denoiser
    assert not torch.equal(model.unet.conv_in.weight, before) and torch.isfinite(trainer.callback_metrics["train/loss"])
    assert type(model.unet).__name__ == "UNet2DModel"  # compiled in place, not wrapped in an OptimizedModule
    assert all(not k.startswith("_orig_mod") and "._orig_mod" not in k for k in model.state_dict())


def test_export_writes_a_loadable_pipeline(tmp_path):
    model = tiny_ddpm(class_names=["a", "b", "c"], sampler="ddim")
    path = model.export_pipeline(tmp_path / "pipe")
    pipe = ClassConditionedPipeline.from_pretrained(path)
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    assert pipe.config.class_names == ["a", "b", "c"]
    assert pipe.scheduler.config.prediction_type == model.prediction_type
    for name, value in model.unet.state_dict().items():
        torch.testing.assert_close(pipe.unet.state_dict()[name], value)


def test_predict_step_generates_the_requested_classes():
    model = tiny_ddpm(num_inference_steps=2)
    out = model.predict_step({"labels": torch.tensor([0, 2, 1])}, 0)
    assert out["images"].shape == (3, 1, 8, 8) and out["labels"].tolist() == [0, 2, 1]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(prediction_type="x0"), "prediction_type='x0'"),
        (dict(loss_type="mae"), "loss_type='mae'"),
        (dict(beta_schedule="sigmoid"), "beta_schedule='sigmoid'"),
        (dict(sampler="heun9"), "sampler='heun9'"),
        (dict(snr_gamma=0.0), "snr_gamma=0.0"),
        (dict(p_uncond=1.0), "p_uncond=1.0"),
        (dict(learning_rate=0.0), "learning_rate=0.0"),
        (dict(guidance_scale=-1.0), "guidance_scale=-1.0"),
        (dict(class_names=["a"]), "class_names has 1 entries"),
        (dict(beta_start=0.1, beta_end=0.01), "beta_start"),
    ],
)
def test_bad_arguments_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_ddpm(**kwargs)


def test_hyperparameters_rebuild_the_module(tmp_path):
    model = tiny_ddpm(net=tiny_config(conditioning="concat"), p_uncond=0.2)
    trainer = quiet_trainer(tmp_path, max_steps=1, limit_val_batches=0)
    trainer.fit(model, loaders()[0])
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    again = ClassConditionedDDPM.load_from_checkpoint(tmp_path / "m.ckpt", weights_only=False)
    assert again.p_uncond == 0.2 and type(again.unet).__name__ == "ClassConditionedUnet"
    for name, value in model.state_dict().items():
        torch.testing.assert_close(again.state_dict()[name], value)
