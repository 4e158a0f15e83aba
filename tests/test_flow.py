"""Flow matching in the shared core: noise levels, targets, weights, samplers, export and refusals."""

import math
import subprocess
import sys

import pytest
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    UniPCMultistepScheduler,
)
from lightning.pytorch import seed_everything

from diffusion_lightning import ClassConditionedPipeline, KnowledgeDistillationModule
from diffusion_lightning.losses import (
    flow_loss_weights,
    flow_noise,
    flow_sigmas,
    predicted_original,
    shift_sigmas,
    training_target,
)
from diffusion_lightning.modules.loading import load_pipeline_source
from diffusion_lightning.schedulers import FLOW_SCHEDULERS, is_flow, make_scheduler, training_scheduler
from tests.conftest import RandomDigits, quiet_trainer, tiny_ddpm

FLOW = "flow_prediction"


def loaders(n=32, batch_size=8):
    data = RandomDigits(n=n)
    return (
        torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False),
        torch.utils.data.DataLoader(data, batch_size=16),
    )


# ------------------------------------------------------------------------------------ pure functions


def test_rectified_flow_noise_target_and_x0():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 1, 8, 8, generator=g), torch.randn(4, 1, 8, 8, generator=g)
    sigmas = torch.tensor([0.0, 0.25, 0.5, 1.0])
    x_t = flow_noise(x0, noise, sigmas)
    torch.testing.assert_close(x_t[0], x0[0])
    torch.testing.assert_close(x_t[3], noise[3])
    torch.testing.assert_close(x_t[1], 0.75 * x0[1] + 0.25 * noise[1])
    velocity = training_target(None, x0, noise, None, FLOW)
    torch.testing.assert_close(velocity, noise - x0)
    scheduler = training_scheduler(prediction_type=FLOW)
    x0_hat = predicted_original(scheduler, velocity, x_t, sigmas * 1000, FLOW)
    torch.testing.assert_close(x0_hat, x0, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scheme", ["none", "logit_normal", "mode", "sigma_sqrt", "cosmap"])
def test_noise_levels_lie_in_range_and_are_seeded(scheme):
    a = flow_sigmas(4096, scheme, torch.Generator().manual_seed(1))
    b = flow_sigmas(4096, scheme, torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b)
    assert a.min() >= 1e-3 and a.max() <= 1.0


def test_logit_normal_concentrates_mid_noise_and_shift_moves_levels_up():
    uniform = flow_sigmas(20000, "none", torch.Generator().manual_seed(0))
    logit = flow_sigmas(20000, "logit_normal", torch.Generator().manual_seed(0))
    middle = lambda s: ((s > 0.25) & (s < 0.75)).float().mean().item()  # noqa: E731
    assert abs(middle(uniform) - 0.5) < 0.02 and middle(logit) > 0.65  # logit-normal(0, 1): 0.70 of its mass
    shifted = flow_sigmas(20000, "none", torch.Generator().manual_seed(0), shift=3.0)
    above_floor = uniform > 1e-3  # both are floored at 1/T
    torch.testing.assert_close(shifted[above_floor], shift_sigmas(uniform, 3.0)[above_floor])
    assert (shifted >= uniform - 1e-6).all() and shifted.median() > 0.7  # 3u / (1 + 2u) at u = 0.5 is 0.75


def test_stratified_levels_cover_the_density_quantiles():
    g = torch.Generator().manual_seed(0)
    levels = flow_sigmas(8, "logit_normal", g, stratified=True)
    assert torch.all(levels[1:] > levels[:-1])  # one per slice, in order
    again = flow_sigmas(8, "logit_normal", torch.Generator().manual_seed(0), stratified=True)
    torch.testing.assert_close(levels, again)
    # the median slice sits at sigmoid(0) = 0.5
    assert levels[3] < 0.5 < levels[4]


def test_loss_weightings_are_diffusers_formulas():
    s = torch.tensor([0.1, 0.5, 0.9])
    torch.testing.assert_close(flow_loss_weights("sigma_sqrt", s), s**-2)
    torch.testing.assert_close(flow_loss_weights("cosmap", s), 2 / (math.pi * (1 - 2 * s + 2 * s**2)))
    assert flow_loss_weights("logit_normal", s) is None and flow_loss_weights("none", s) is None


@pytest.mark.parametrize("name", sorted(FLOW_SCHEDULERS))
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_every_flow_sampler_lands_on_the_data_with_the_exact_velocity(name, shift):
    """With the true velocity of a one-point data set, every sampler must end on that point: the
    training convention (``t = sigma * T``, ``v = noise - x_0``) and diffusers' samplers agree."""
    target = torch.linspace(-1, 1, 16).reshape(1, 1, 4, 4)
    scheduler = make_scheduler(name, training_scheduler(prediction_type=FLOW, flow_shift=shift).config)
    assert is_flow(scheduler)
    scheduler.set_timesteps(8)
    x = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    for t in scheduler.timesteps:
        sigma = (t.float() / 1000).clamp(min=1e-4)
        velocity = (x - target) / sigma  # x_t = (1 - s) x0 + s n  =>  n - x0 = (x_t - x0) / s
        x = scheduler.step(velocity, t, x).prev_sample
    torch.testing.assert_close(x, target, atol=2e-2, rtol=0)


def test_flow_samplers_keep_the_shift_and_refuse_ddpm_only_ones():
    config = training_scheduler(prediction_type=FLOW, flow_shift=3.0).config
    expected = {
        "euler": FlowMatchEulerDiscreteScheduler,
        "heun": FlowMatchHeunDiscreteScheduler,
        "dpm": DPMSolverMultistepScheduler,
        "unipc": UniPCMultistepScheduler,
    }
    for name, cls in expected.items():
        scheduler = make_scheduler(name, config)
        assert type(scheduler) is cls and is_flow(scheduler)
        again = make_scheduler("euler", scheduler.config)  # a DPM flow config converts back with its shift
        assert again.config.shift == 3.0
    for name in ("ddpm", "ddim", "euler_a"):
        with pytest.raises(ValueError, match=f"scheduler='{name}' does not sample flow-matching models"):
            make_scheduler(name, config)
    assert not is_flow(training_scheduler(prediction_type="epsilon"))


# ------------------------------------------------------------------------------------ the module


def test_flow_module_noises_on_the_straight_line_and_regresses_the_velocity():
    model = tiny_ddpm(prediction_type=FLOW)
    assert model.weighting_scheme == "logit_normal"
    x0 = torch.randn(4, 1, 8, 8)
    noise = torch.randn(4, 1, 8, 8)
    timesteps = torch.tensor([100.0, 400.0, 700.0, 1000.0])
    out = model.diffusion_step(x0, torch.tensor([0, 1, 2, 0]), torch.Generator(), timesteps=timesteps, noise=noise)
    sigmas = (timesteps / 1000).view(-1, 1, 1, 1)
    torch.testing.assert_close(out.noisy, (1 - sigmas) * x0 + sigmas * noise)
    torch.testing.assert_close(out.target, noise - x0)
    drawn = model.sample_timesteps(256, torch.Generator().manual_seed(0))
    assert drawn.dtype.is_floating_point and drawn.min() >= 1 and drawn.max() <= 1000


def test_flow_training_lowers_the_repeatable_validation_loss(tmp_path):
    seed_everything(0)
    model = tiny_ddpm(prediction_type=FLOW, weighting_scheme="cosmap", learning_rate=3e-3, lr_scheduler=None)
    train, val = loaders()
    trainer = quiet_trainer(tmp_path, max_steps=40)
    before = trainer.validate(model, val, verbose=False)[0]["val/loss"]
    assert trainer.validate(model, val, verbose=False)[0]["val/loss"] == before
    trainer.fit(model, train, val)
    after = trainer.validate(model, val, verbose=False)[0]["val/loss"]
    assert math.isfinite(after) and after < 0.9 * before


def test_flow_export_loads_with_diffusers_schedulers_and_generates(tmp_path):
    model = tiny_ddpm(prediction_type=FLOW, flow_shift=2.0, sampler="euler", num_inference_steps=3)
    path = model.export_pipeline(tmp_path / "pipe")
    pipe = ClassConditionedPipeline.from_pretrained(path)
    assert type(pipe.scheduler) is FlowMatchEulerDiscreteScheduler and pipe.scheduler.config.shift == 2.0
    g = torch.Generator().manual_seed(0)
    images = pipe([0, 1], num_inference_steps=3, output_type="pt", generator=g).images
    assert images.shape == (2, 1, 8, 8) and torch.isfinite(images).all()
    # the module's own sampling and the reloaded folder draw the same images
    ours = model.build_pipeline()(
        [0, 1], num_inference_steps=3, output_type="pt", generator=torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(ours.images, images)
    for name in ("heun", "dpm", "unipc"):
        pipe.scheduler = make_scheduler(name, pipe.scheduler.config)
        out = pipe([2], num_inference_steps=4, output_type="pt", generator=torch.Generator().manual_seed(0)).images
        assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match="scheduler='ddim' does not sample flow-matching models"):
        model.build_pipeline("ddim")


def test_flow_checkpoint_resumes_as_flow(tmp_path):
    model = tiny_ddpm(prediction_type=FLOW, flow_shift=1.5, weighting_scheme="mode")
    trainer = quiet_trainer(tmp_path, max_steps=2, limit_val_batches=0)
    trainer.fit(model, loaders()[0])
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    again = type(model).load_from_checkpoint(tmp_path / "m.ckpt", weights_only=False)
    assert again.is_flow and again.flow_shift == 1.5 and again.weighting_scheme == "mode"
    assert type(again.noise_scheduler) is FlowMatchEulerDiscreteScheduler


def test_knowledge_distillation_takes_the_flow_teacher_objective(tmp_path):
    teacher = tiny_ddpm(prediction_type=FLOW, flow_shift=2.0)
    folder = teacher.export_pipeline(tmp_path / "teacher")
    student = KnowledgeDistillationModule(teacher=str(folder), size_factor=0.5)
    assert student.is_flow and student.flow_shift == 2.0
    trainer = quiet_trainer(tmp_path, max_steps=2, limit_val_batches=0)
    trainer.fit(student, loaders()[0])


def test_analysis_refuses_a_flow_teacher(tmp_path):
    from diffusion_lightning.analysis.models import load_model

    folder = tiny_ddpm(prediction_type=FLOW).export_pipeline(tmp_path / "teacher")
    with pytest.raises(ValueError, match="flow-matching model.*does not support it"):
        load_model(folder)


@pytest.mark.parametrize("shift", [1.0, 2.0])
def test_flow_progressive_target_makes_one_euler_step_land_on_two_teacher_steps(tmp_path, shift):
    from diffusion_lightning import ProgressiveDistillationModule

    torch.manual_seed(0)
    folder = tiny_ddpm(prediction_type=FLOW, flow_shift=shift).export_pipeline(tmp_path / "teacher")
    module = ProgressiveDistillationModule(teacher=str(folder), teacher_steps=8, rounds=1)
    assert module.is_flow and module.student_steps == 4 and module.flow_shift == shift
    student = module.sampling_scheduler()  # what the exported round samples with
    student.set_timesteps(4)
    teacher = module._flow_euler(8)  # the teacher's grid: twice as fine, nested in the student's
    teacher.set_timesteps(8)
    torch.testing.assert_close(teacher.sigmas[::2], student.sigmas)
    torch.testing.assert_close(student.sigmas, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))  # whatever the shift
    index = torch.tensor([0, 1, 2, 3])
    sigma, mid, end = module.flow_transitions(index)
    torch.testing.assert_close(sigma, student.sigmas[:4])
    torch.testing.assert_close(mid, teacher.sigmas[1::2])
    torch.testing.assert_close(end, student.sigmas[1:])

    g = torch.Generator().manual_seed(0)
    sample, noise = torch.rand(4, 1, 8, 8, generator=g) * 2 - 1, torch.randn(4, 1, 8, 8, generator=g)
    labels = torch.tensor([0, 1, 2, 3])
    labels[3] = 3  # the null class of 3 classes: the unconditional branch is distilled too
    out = module._flow_step(sample, labels, index, noise)
    for i in range(4):  # the teacher's two steps as diffusers' 8-step Euler takes them...
        z = out.noisy[i : i + 1]
        teacher._step_index = 2 * i
        for t in teacher.timesteps[2 * i : 2 * i + 2]:
            z = teacher.step(module.teacher_forward(z, t.view(1), labels[i : i + 1]), t, z).prev_sample
        # ...and one 4-step Euler step of a student that predicts the target lands on the same point
        student._step_index = i
        t = student.timesteps[i]
        landed = student.step(out.target[i : i + 1], t, out.noisy[i : i + 1]).prev_sample
        torch.testing.assert_close(landed, z, atol=1e-5, rtol=1e-4)
    assert out.loss > 0 and out.per_sample_loss.shape == (4,)


def test_flow_progressive_rounds_export_euler_students_that_record_their_steps(tmp_path):
    from diffusion_lightning import ProgressiveDistillationModule

    folder = tiny_ddpm(prediction_type=FLOW, guidance_scale=1.5).export_pipeline(tmp_path / "teacher")
    module = ProgressiveDistillationModule(teacher=str(folder), teacher_steps=8, rounds=2, steps_per_round=2)
    trainer = quiet_trainer(tmp_path / "run", max_steps=4, limit_val_batches=0)
    trainer.fit(module, loaders()[0])
    assert module.student_steps == 2 and module.num_inference_steps == 2
    for steps in (4, 2):
        pipe, defaults = load_pipeline_source(pipeline=tmp_path / "run" / "rounds" / f"steps={steps}")
        assert type(pipe.scheduler) is FlowMatchEulerDiscreteScheduler
        assert pipe.scheduler.config.shift_terminal == 1.0 / steps
        assert defaults["steps"] == steps and defaults["guidance_scale"] == 1.5
        pipe.set_progress_bar_config(disable=True)
        images = pipe([0, 1], num_inference_steps=steps, output_type="pt").images
        assert images.shape == (2, 1, 8, 8) and torch.isfinite(images).all()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(prediction_type=FLOW, snr_gamma=5.0), "snr_gamma=5.0 applies to DDPM noise schedules"),
        (dict(weighting_scheme="cosmap"), "weighting_scheme='cosmap' applies to prediction_type='flow_prediction'"),
        (dict(flow_shift=3.0), "flow_shift=3.0 applies to prediction_type='flow_prediction' only"),
        (dict(prediction_type=FLOW, flow_shift=0.0), "flow_shift=0.0 must be > 0"),
        (dict(prediction_type=FLOW, weighting_scheme="sigmoid"), "weighting_scheme='sigmoid' is not supported"),
        (dict(prediction_type=FLOW, logit_std=0.0), "logit_std=0.0 must be > 0"),
    ],
)
def test_bad_flow_arguments_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_ddpm(**kwargs)


def test_cli_fits_a_flow_model_with_the_whole_callback_stack(tmp_path):
    """Sampling callbacks (grids, generation monitor, attention maps, EMA validation) on a flow model."""
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "diffusion_lightning", "fit", "--config", "configs/smoke/ddpm_mnist.yaml",
         "--config", "configs/smoke/callbacks.yaml", "--model.init_args.prediction_type", FLOW,
         "--model.init_args.snr_gamma", "null",
         "--model.init_args.weighting_scheme", "logit_normal", "--model.init_args.sampler", "euler",
         "--trainer.default_root_dir", str(out), "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert (out / "checkpoints" / "last.ckpt").is_file()


# ------------------------------------------------------------------------------------ latent models


def test_latent_flow_model_exports_a_stable_diffusion_pipeline_that_samples_as_trained(tmp_path):
    from diffusers import StableDiffusionPipeline

    from diffusion_lightning import LatentDiffusionModule
    from tests.test_latent import images, loader

    module = LatentDiffusionModule(prediction_type=FLOW, flow_shift=2.0, learning_rate=1e-3, num_inference_steps=2)
    quiet_trainer(tmp_path, max_steps=2, limit_val_batches=0).fit(module, loader())
    folder = module.export_pipeline(tmp_path / "pipe")
    pipeline = StableDiffusionPipeline.from_pretrained(folder)
    scheduler = pipeline.scheduler
    assert type(scheduler) is DPMSolverMultistepScheduler and scheduler.config.use_flow_sigmas
    assert scheduler.config.prediction_type == FLOW and scheduler.config.flow_shift == 2.0
    torch.testing.assert_close(images(pipeline), images(module.build_pipeline()))
    # fine-tuning the exported folder keeps the objective and the shift
    again = LatentDiffusionModule(pretrained=str(folder))
    assert again.is_flow and again.flow_shift == 2.0
    with pytest.raises(ValueError, match=r"sampler='euler': a flow-matching StableDiffusionPipeline samples with"):
        module.build_pipeline("euler")
