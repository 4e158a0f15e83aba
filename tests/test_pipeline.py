import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

from diffusion_lightning import ClassConditionedPipeline
from diffusion_lightning.schedulers import make_scheduler


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_class_labels_forms(tiny_pipeline):
    pipe = tiny_pipeline
    out = pipe(2, batch_size=3, num_inference_steps=2, output_type="pt", generator=_gen())
    assert out.images.shape == (3, 1, 8, 8)
    assert out.class_labels.tolist() == [2, 2, 2]
    assert pipe([0, 1], num_inference_steps=2, output_type="pt").class_labels.tolist() == [0, 1]
    assert pipe(torch.tensor([1, 2, 0]), num_inference_steps=2, output_type="pt").images.shape[0] == 3
    assert pipe(1, num_inference_steps=2, output_type="pt").images.shape[0] == 1


def test_output_types_and_base_output(tiny_pipeline):
    pt = tiny_pipeline([0, 1], num_inference_steps=2, output_type="pt", generator=_gen())
    arr = tiny_pipeline([0, 1], num_inference_steps=2, output_type="np", generator=_gen())
    pil = tiny_pipeline([0, 1], num_inference_steps=2, output_type="pil", generator=_gen())
    assert pt.images.min() >= 0 and pt.images.max() <= 1
    assert isinstance(arr.images, np.ndarray) and arr.images.shape == (2, 8, 8, 1)
    np.testing.assert_allclose(arr.images, pt.images.permute(0, 2, 3, 1).numpy(), atol=1e-6)
    assert all(isinstance(im, PIL.Image.Image) and im.size == (8, 8) for im in pil.images)
    assert pil["images"] is pil.images
    images, labels = tiny_pipeline([0, 1], num_inference_steps=2, output_type="pt", return_dict=False)
    assert images.shape[0] == 2 and labels.tolist() == [0, 1]


def test_seeded_generation_is_reproducible(tiny_pipeline):
    a = tiny_pipeline([0, 1, 2], num_inference_steps=3, output_type="pt", generator=_gen(1)).images
    b = tiny_pipeline([0, 1, 2], num_inference_steps=3, output_type="pt", generator=_gen(1)).images
    c = tiny_pipeline([0, 1, 2], num_inference_steps=3, output_type="pt", generator=_gen(2)).images
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


def _record_forwards(pipe):
    calls = []
    handle = pipe.unet.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append((args[0].shape[0], kwargs["class_labels"].tolist())), with_kwargs=True
    )
    return calls, handle


@pytest.mark.parametrize(("scale", "batch", "labels"), [(3.0, 4, [3, 3, 0, 1]), (1.0, 2, [0, 1]), (0.0, 2, [3, 3])])
def test_guidance_is_one_batched_forward(tiny_pipeline, scale, batch, labels):
    calls, handle = _record_forwards(tiny_pipeline)
    tiny_pipeline([0, 1], num_inference_steps=2, guidance_scale=scale, output_type="pt")
    handle.remove()
    assert len(calls) == 2
    assert all(size == batch and lab == labels for size, lab in calls)


def test_guidance_combines_conditional_and_unconditional(tiny_pipeline):
    """One DDIM step with eta=0 is linear in the prediction: check eps = u + s (c - u)."""
    pipe = tiny_pipeline
    latents = torch.randn(1, 1, 8, 8, generator=_gen(3))
    out = {
        s: pipe([1], num_inference_steps=1, guidance_scale=s, latents=latents, output_type="pt").images
        for s in (0.0, 1.0, 2.5)
    }
    u, c, g = (2 * out[s] - 1 for s in (0.0, 1.0, 2.5))
    mask = (g.abs() < 0.999) & (u.abs() < 0.999) & (c.abs() < 0.999)  # away from the [0, 1] clamp
    torch.testing.assert_close(g[mask], (u + 2.5 * (c - u))[mask], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("ddpm", DDPMScheduler),
        ("ddim", DDIMScheduler),
        ("dpm", DPMSolverMultistepScheduler),
        ("euler", EulerDiscreteScheduler),
    ],
)
def test_any_scheduler_swaps_in(tiny_pipeline, name, cls):
    tiny_pipeline.scheduler = make_scheduler(name, tiny_pipeline.scheduler.config)
    assert isinstance(tiny_pipeline.scheduler, cls)
    images = tiny_pipeline([0, 2], num_inference_steps=3, output_type="pt", generator=_gen()).images
    assert images.shape == (2, 1, 8, 8) and torch.isfinite(images).all()


def test_callback_sees_every_step(tiny_pipeline):
    seen = []

    def callback(pipe, i, t, tensors):
        seen.append((i, int(t), tensors["latents"].shape, tensors["pred_original_sample"] is not None))
        return {}

    tiny_pipeline(
        [0],
        num_inference_steps=3,
        output_type="pt",
        callback_on_step_end=callback,
        callback_on_step_end_tensor_inputs=["latents", "pred_original_sample"],
    )
    assert [s[0] for s in seen] == [0, 1, 2]
    assert all(s[2] == (1, 1, 8, 8) and s[3] for s in seen)


def test_save_and_load_roundtrip(tiny_pipeline, tmp_path):
    tiny_pipeline.register_to_config(class_names=["a", "b", "c"])
    tiny_pipeline.save_pretrained(tmp_path / "pipe")
    assert (tmp_path / "pipe" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = ClassConditionedPipeline.from_pretrained(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.scheduler, DDIMScheduler)
    assert loaded.config.class_names == ["a", "b", "c"]
    a = tiny_pipeline([0, 1], num_inference_steps=2, output_type="pt", generator=_gen()).images
    b = loaded([0, 1], num_inference_steps=2, output_type="pt", generator=_gen()).images
    torch.testing.assert_close(a, b)


def test_generate_grid(tiny_pipeline):
    grid = tiny_pipeline.generate_grid(num_per_class=2, num_inference_steps=2, generator=_gen(), batch_size=4, scale=3)
    assert grid.images.shape == (6, 1, 8, 8)
    assert grid.class_labels.tolist() == [0, 0, 1, 1, 2, 2]
    # torchvision layout: 3 rows x 2 columns of 8px cells with 2px padding
    assert grid.grid.shape == (1, 3 * 10 + 2, 2 * 10 + 2)
    assert grid.pil_grid.height == 3 * grid.grid.shape[1]
    assert grid.pil_grid.width > 3 * grid.grid.shape[2]  # a label margin on the left
    two = tiny_pipeline.generate_grid(num_per_class=1, classes=[2, 0], num_inference_steps=2)
    assert two.class_labels.tolist() == [2, 0]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(class_labels=3), r"class_labels contains \[3\]; accepted classes are 0..2"),
        (dict(class_labels=[0, -1]), "accepted classes"),
        (dict(class_labels=[0, 1], batch_size=3), "batch_size=3"),
        (dict(class_labels="1"), "class_labels"),
        (dict(class_labels=[]), "empty"),
        (dict(class_labels=0, guidance_scale=-1.0), "guidance_scale=-1.0"),
        (dict(class_labels=0, output_type="jpg"), "output_type='jpg'"),
        (dict(class_labels=0, num_inference_steps=0), "num_inference_steps=0"),
        (dict(class_labels=0, latents=torch.zeros(1, 1, 4, 4)), "latents has shape"),
    ],
)
def test_bad_input_names_the_argument(tiny_pipeline, kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_pipeline(**kwargs)


def test_unknown_scheduler_name(tiny_pipeline):
    with pytest.raises(ValueError, match=r"scheduler='heun2' is not supported; expected one of \['ddpm'"):
        make_scheduler("heun2", tiny_pipeline.scheduler.config)


def _gens(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


@pytest.mark.parametrize(("name", "kwargs"), [("ddpm", {}), ("ddim", {"eta": 1.0}), ("euler_a", {})])
def test_generator_list_drives_the_step_noise_of_stochastic_schedulers(tiny_pipeline, name, kwargs):
    """Each image draws its initial and step noise from its own generator: reproducible, batch-independent."""
    pipe = tiny_pipeline
    pipe.scheduler = make_scheduler(name, pipe.scheduler.config)
    common = dict(num_inference_steps=4, output_type="pt", **kwargs)
    torch.manual_seed(0)
    a = pipe([0, 1, 2], generator=_gens(1, 2, 3), **common).images
    torch.manual_seed(1)  # the global RNG must play no part
    b = pipe([0, 1, 2], generator=_gens(1, 2, 3), **common).images
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    alone = pipe([1], generator=_gens(2), **common).images
    mixed = pipe([2, 1], generator=_gens(9, 2), **common).images
    torch.testing.assert_close(alone[0], a[1])  # up to the rounding of batched math
    torch.testing.assert_close(mixed[1], a[1])
    initial = torch.cat([torch.randn(1, 1, 8, 8, generator=g) for g in _gens(1, 2, 3)])
    same_start = pipe([0, 1, 2], generator=_gens(4, 5, 6), latents=initial, **common).images
    assert (same_start - a).abs().amax(dim=(1, 2, 3)).min() > 1e-3  # other step noise, other images


def test_generate_grid_with_a_generator_per_image_is_independent_of_batch_size(tiny_pipeline):
    pipe = tiny_pipeline
    pipe.scheduler = make_scheduler("ddpm", pipe.scheduler.config)
    whole = pipe.generate_grid(num_per_class=2, num_inference_steps=3, generator=_gens(*range(6))).images
    chunks = pipe.generate_grid(num_per_class=2, num_inference_steps=3, generator=_gens(*range(6)), batch_size=4)
    torch.testing.assert_close(chunks.images, whole)
    with pytest.raises(ValueError, match=r"generator is a list of 5 generators for 6 images"):
        pipe.generate_grid(num_per_class=2, num_inference_steps=3, generator=_gens(*range(5)))


@pytest.mark.parametrize("count", [2, 4])
def test_generator_list_needs_one_generator_per_image(tiny_pipeline, count):
    with pytest.raises(ValueError, match=rf"generator is a list of {count} generators for 3 images"):
        tiny_pipeline([0, 1, 2], num_inference_steps=2, output_type="pt", generator=_gens(*range(count)))


@pytest.mark.parametrize(
    ("labels", "match"),
    [
        (torch.tensor([3.7]), r"class_labels is a tensor of dtype torch.float32 \(\[3.7"),
        (torch.tensor([-0.5, 1.0]), r"class_labels is a tensor of dtype torch.float32 \(\[-0.5, 1.0\]\)"),
        (torch.tensor([True, False]), r"class_labels is a tensor of dtype torch.bool \(\[True, False\]\)"),
        (torch.tensor([[0, 1], [2, 0]]), r"class_labels is a 2-D tensor of shape \(2, 2\); accepted: .*1-D integer"),
        (torch.tensor(1), r"class_labels is a 0-D tensor of shape \(\); accepted: .*1-D integer tensor"),
        ([0, 1.0], r"class_labels=\[0, 1.0\] must hold ints only; accepted: an int, a list of ints"),
        ([True, 0], r"class_labels=\[True, 0\] must hold ints only"),
        (True, r"class_labels=True is not accepted; give an int, a list of ints or a 1-D integer tensor"),
        (2.0, r"class_labels=2.0 is not accepted"),
        (np.array([0, 1]), r"class_labels=array\(\[0, 1\]\) is not accepted"),
    ],
)
def test_class_labels_are_validated_before_any_cast(tiny_pipeline, labels, match):
    with pytest.raises(ValueError, match=match):
        tiny_pipeline(labels, num_inference_steps=1, output_type="pt")


def test_integer_labels_of_any_integer_type_are_accepted(tiny_pipeline):
    assert tiny_pipeline.class_label_tensor(torch.tensor([2, 0], dtype=torch.int32)).tolist() == [2, 0]
    assert tiny_pipeline.class_label_tensor(torch.tensor([1], dtype=torch.uint8)).dtype == torch.long
    assert tiny_pipeline.class_label_tensor(np.int64(1), batch_size=2).tolist() == [1, 1]
    assert tiny_pipeline.class_label_tensor((np.int32(0), 2)).tolist() == [0, 2]


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf"), True])
def test_guidance_scale_must_be_finite(tiny_pipeline, scale):
    calls, handle = _record_forwards(tiny_pipeline)
    with pytest.raises(ValueError, match=rf"guidance_scale={scale!r} must be a finite number >= 0"):
        tiny_pipeline([0], num_inference_steps=1, guidance_scale=scale, output_type="pt")
    handle.remove()
    assert not calls


@pytest.mark.parametrize("name", ["ddpm", "ddim", "dpm", "euler", "euler_a", "unipc"])
def test_more_steps_than_training_timesteps_is_refused_before_sampling(tiny_pipeline, name):
    tiny_pipeline.scheduler = make_scheduler(name, tiny_pipeline.scheduler.config)
    calls, handle = _record_forwards(tiny_pipeline)
    with pytest.raises(ValueError, match=r"num_inference_steps=101 exceeds the scheduler's num_train_timesteps=100"):
        tiny_pipeline([0], num_inference_steps=101, output_type="pt")
    handle.remove()
    assert not calls
    assert tiny_pipeline([0], num_inference_steps=100, output_type="pt").images.shape == (1, 1, 8, 8)


def test_generate_grid_rows_are_validated_like_labels(tiny_pipeline):
    rows = tiny_pipeline.generate_grid(num_per_class=1, classes=torch.tensor([2, 0]), num_inference_steps=1)
    assert rows.class_labels.tolist() == [2, 0]
    with pytest.raises(ValueError, match=r"class_labels=\[1.5\] must hold ints only"):
        tiny_pipeline.generate_grid(num_per_class=1, classes=[1.5], num_inference_steps=1)
    with pytest.raises(ValueError, match="class_labels is empty"):
        tiny_pipeline.generate_grid(num_per_class=1, classes=[], num_inference_steps=1)
