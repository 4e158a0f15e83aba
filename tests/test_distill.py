"""Knowledge and progressive distillation from a frozen class-conditioned teacher."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

from diffusion_lightning import ClassConditionedPipeline
from diffusion_lightning.modules.distill import KnowledgeDistillationModule, load_teacher
from diffusion_lightning.modules.progressive import ProgressiveDistillationModule, predict_x0
from diffusion_lightning.nets import build_unet
from diffusion_lightning.schedulers import make_scheduler, training_scheduler
from tests.conftest import RandomDigits, quiet_trainer, tiny_config


def loader() -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(RandomDigits(n=16, size=8, classes=3), batch_size=8)


@pytest.fixture
def teacher(tmp_path) -> str:
    torch.manual_seed(0)
    unet = build_unet(tiny_config(block_out_channels=(16, 32)), sample_size=8, in_channels=1, num_classes=3)
    scheduler = make_scheduler("ddim", training_scheduler(num_train_timesteps=100))
    ClassConditionedPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp_path / "teacher")
    return str(tmp_path / "teacher")


def test_knowledge_distillation_trains_a_smaller_student_on_both_terms(tmp_path, teacher):
    module = KnowledgeDistillationModule(teacher, size_factor=0.3, alpha=0.5, feature_weight=1.0, learning_rate=1e-3)
    count = lambda net: sum(p.numel() for p in net.parameters())  # noqa: E731
    assert count(module.unet) < 0.6 * count(module.teacher)
    frozen = {k: v.clone() for k, v in module.teacher.state_dict().items()}
    trainer = quiet_trainer(tmp_path / "run", max_steps=2, limit_val_batches=0)
    trainer.fit(module, loader())
    for name in ("train/loss_distill", "train/loss_task", "train/loss_feature"):
        assert trainer.callback_metrics[name] > 0, name
    assert all(torch.equal(v, module.teacher.state_dict()[k]) for k, v in frozen.items())
    assert len(module.projections) > 0  # a narrower student matches features through 1x1 projections

    trainer.save_checkpoint(tmp_path / "kd.ckpt")
    saved = torch.load(tmp_path / "kd.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert saved and not any(k.startswith("teacher.") for k in saved)
    restored = KnowledgeDistillationModule.load_from_checkpoint(tmp_path / "kd.ckpt")
    torch.testing.assert_close(restored.unet.conv_in.weight, module.unet.conv_in.weight)
    torch.testing.assert_close(restored.teacher.conv_in.weight, module.teacher.conv_in.weight)
    module.export_pipeline(tmp_path / "student")
    assert ClassConditionedPipeline.from_pretrained(tmp_path / "student").num_classes == 3


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_alpha_selects_the_term(teacher, alpha):
    module = KnowledgeDistillationModule(teacher, size_factor=0.5, alpha=alpha)
    batch = next(iter(loader()))
    out = module.diffusion_step(batch["images"], batch["labels"], torch.Generator().manual_seed(0))
    expected = module._terms["distill"] if alpha == 1.0 else module._terms["task"]
    torch.testing.assert_close(out.loss.detach(), expected)
    teacher_prediction = module.teacher_forward(out.noisy, out.timesteps, batch["labels"])
    torch.testing.assert_close(
        module._terms["distill"], torch.nn.functional.mse_loss(out.prediction, teacher_prediction).detach()
    )


def test_mismatched_conditioning_and_bad_teacher_paths_are_named(tmp_path, teacher):
    with pytest.raises(ValueError, match=r"num_classes: data/student 4 vs teacher 3.*image_size: data/student 16"):
        KnowledgeDistillationModule(teacher, num_classes=4, image_size=16)
    with pytest.raises(FileNotFoundError, match="neither a checkpoint file.*nor an exported pipeline"):
        load_teacher(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="alpha=2"):
        KnowledgeDistillationModule(teacher, alpha=2)


def test_progressive_target_makes_one_ddim_step_land_on_two_teacher_steps(teacher):
    module = ProgressiveDistillationModule(teacher, teacher_steps=8, rounds=2, steps_per_round=1)
    assert module.student_steps == 4
    index = torch.tensor([0, 1, 3])
    t, t1, t2 = module.transitions(index)
    ddim = DDIMScheduler.from_config(module.noise_scheduler.config, timestep_spacing="trailing")
    ddim.set_timesteps(4)
    assert t.tolist() == ddim.timesteps[index].tolist()
    total = module.noise_scheduler.config.num_train_timesteps
    assert int(t[0]) == total - 1, "the student's first step must start from pure noise"
    assert int(t2[-1]) < 0, "the last step lands on the clean sample"

    g = torch.Generator().manual_seed(0)
    sample, noise = torch.rand(3, 1, 8, 8, generator=g) * 2 - 1, torch.randn(3, 1, 8, 8, generator=g)
    labels = torch.tensor([0, 1, 2])
    (a, s), (a1, s1), (a2, s2) = module._alpha_sigma(t), module._alpha_sigma(t1), module._alpha_sigma(t2)
    z = a * sample + s * noise
    # the teacher's two DDIM steps, written out
    x = predict_x0(module.teacher_forward(z, t, labels), z, a, s, module.prediction_type)
    z1 = a1 * x + s1 * (z - a * x) / s
    x1 = predict_x0(module.teacher_forward(z1, t1.clamp(min=0), labels), z1, a1, s1, module.prediction_type)
    z2 = a2 * x1 + s2 * (z1 - a1 * x1) / s1.clamp(min=1e-8)  # the last step: t' is already the end
    # a student whose x0 is the target, stepped by diffusers' DDIM, lands on the teacher's z2
    target = (z2 - (s2 / s) * z) / (a2 - (s2 / s) * a)
    eps = (z - a * target) / s  # the epsilon a network predicting x~ would output
    for i in range(3):
        landed = ddim.step(eps[i : i + 1], int(t[i]), z[i : i + 1], eta=0.0).prev_sample
        torch.testing.assert_close(landed, z2[i : i + 1], atol=1e-4, rtol=1e-4)


def test_progressive_rounds_halve_steps_and_export_each_round(tmp_path, teacher):
    module = ProgressiveDistillationModule(teacher, teacher_steps=8, rounds=2, steps_per_round=2, learning_rate=1e-3)
    trainer = quiet_trainer(tmp_path, max_steps=4, limit_val_batches=0)
    trainer.fit(module, loader())
    rounds = sorted(p.name for p in (tmp_path / "rounds").iterdir())
    assert rounds == ["steps=2", "steps=4"]
    assert module.student_steps == 2 and module.num_inference_steps == 2
    torch.testing.assert_close(module.teacher.conv_in.weight, module.unet.conv_in.weight, atol=0.1, rtol=0)
    pipeline = ClassConditionedPipeline.from_pretrained(tmp_path / "rounds" / "steps=2")
    assert isinstance(pipeline.scheduler, DDIMScheduler)
    assert pipeline.scheduler.config.timestep_spacing == "trailing"
    pipeline.set_progress_bar_config(disable=True)
    images = pipeline([0, 1], num_inference_steps=2, output_type="pt").images
    assert images.shape == (2, 1, 8, 8)
    with pytest.raises(ValueError, match="divisible by 2\\*\\*rounds"):
        ProgressiveDistillationModule(teacher, teacher_steps=6, rounds=2)
