"""The conditioning vocabulary: what a model can be asked for, and one way to ask any pipeline for it."""

from __future__ import annotations

import pytest
import torch

from diffusion_lightning import LatentDiffusionModule
from diffusion_lightning.pipelines import Conditions, ConditionSpec, condition_spec, generate
from tests.conftest import tiny_ddpm


def test_class_spec_resolves_classes_and_names_and_refuses_prompts():
    spec = ConditionSpec("class", num_classes=3, class_names=("zero", "one", "two"))
    every = spec.resolve()
    assert every.kind == "class" and every.values == (0, 1, 2) and every.names == ("zero", "one", "two")
    assert spec.resolve(classes=[2, 0]).names == ("two", "zero")
    with pytest.raises(ValueError, match=r"Grid: classes=\[0, 5\] has \[5\]; the model's classes are 0..2"):
        spec.resolve(classes=[0, 5], owner="Grid")
    with pytest.raises(ValueError, match=r"classes=\[\] is empty"):
        spec.resolve(classes=[])
    with pytest.raises(ValueError, match="prompts is set, but the model is class-conditioned"):
        spec.resolve(prompts=["a seven"])
    with pytest.raises(ValueError, match="num_classes=None"):
        ConditionSpec("class")
    with pytest.raises(ValueError, match="kind='audio' is not accepted"):
        ConditionSpec("audio")


def test_prompt_spec_uses_its_defaults_and_refuses_classes():
    spec = ConditionSpec("prompt", default_prompts=("a one", "a two"), default_negative_prompts=("blurry",))
    default = spec.resolve()
    assert default.values == ("a one", "a two") and default.negative_prompts == ("blurry", "blurry")
    asked = spec.resolve(prompts=["a three"])  # the caller's prompts come without the default negatives
    assert asked.values == ("a three",) and asked.negative_prompts is None
    assert spec.resolve(prompts=["a", "b"], negative_prompts=["x", "y"]).negative_prompts == ("x", "y")
    with pytest.raises(ValueError, match="negative_prompts has 3 entries; expected 1 or one per prompt"):
        spec.resolve(prompts=["a", "b"], negative_prompts=["x", "y", "z"])
    with pytest.raises(ValueError, match=r"classes=\[1\] is set, but the model is conditioned on text prompts"):
        spec.resolve(classes=[1])
    with pytest.raises(ValueError, match="prompts is not set and the model has no default prompts"):
        ConditionSpec("prompt").resolve()


def test_conditions_arrange_rows_cycles_spreads_and_groups():
    rows = Conditions("prompt", ("a", "b", "c"), ("a", "b", "c"), ("x", "y", "z"))
    assert rows.repeat_each(2).values == ("a", "a", "b", "b", "c", "c")
    assert rows.repeat_each(2).negative_prompts == ("x", "x", "y", "y", "z", "z")
    assert rows.cycle(5).values == ("a", "b", "c", "a", "b")
    assert rows.spread(5).values == ("a", "a", "b", "b", "c")  # lower ones get the extra, grouped
    assert rows.spread(5).groups().tolist() == [0, 0, 1, 1, 2]
    assert rows.cycle(5).distinct().values == ("a", "b", "c")
    assert rows[1:].values == ("b", "c") and len(rows[1:]) == 2
    assert rows.as_records()[0] == {"prompt": "a", "negative_prompt": "x"}
    assert Conditions("class", (3,), ("three",)).as_records() == [{"class": 3, "name": "three"}]
    with pytest.raises(ValueError, match="names has 1 entries for 2 values"):
        Conditions("class", (1, 2), ("one",))


def test_modules_and_their_pipelines_declare_the_same_conditioning():
    ddpm = tiny_ddpm()
    assert condition_spec(ddpm) == condition_spec(ddpm.build_pipeline())
    assert condition_spec(ddpm).kind == "class" and condition_spec(ddpm).num_classes == ddpm.num_classes
    latent = LatentDiffusionModule(validation_prompts=["a digit"])
    assert condition_spec(latent).kind == condition_spec(latent.build_pipeline()).kind == "prompt"
    with pytest.raises(ValueError, match="declares no conditioning this package can drive"):
        condition_spec(torch.nn.Linear(2, 2))


def test_generate_asks_each_kind_of_pipeline_the_way_it_is_called():
    ddpm = tiny_ddpm(num_inference_steps=2)
    pipeline = ddpm.build_pipeline()
    pipeline.set_progress_bar_config(disable=True)
    classes = condition_spec(pipeline).resolve(classes=[2, 0])
    images = generate(pipeline, classes, num_inference_steps=2, guidance_scale=2.0,
                      generator=torch.Generator().manual_seed(0))  # fmt: skip
    direct = pipeline([2, 0], num_inference_steps=2, guidance_scale=2.0, generator=torch.Generator().manual_seed(0),
                      output_type="pt").images  # fmt: skip
    torch.testing.assert_close(images, direct)

    latent = LatentDiffusionModule(validation_prompts=["a digit one"])
    text = latent.build_pipeline()
    text.set_progress_bar_config(disable=True)
    prompts = condition_spec(latent).resolve(prompts=["a digit one", "a digit two"], negative_prompts=["blurry"])
    seen = []
    images = generate(text, prompts, num_inference_steps=2, guidance_scale=3.0, image_size=16,
                      generator=torch.Generator().manual_seed(0),
                      callback_on_step_end=lambda pipe, i, t, tensors: seen.append(i) or {})  # fmt: skip
    direct = text(prompt=["a digit one", "a digit two"], negative_prompt=["blurry", "blurry"], num_inference_steps=2,
                  guidance_scale=3.0, height=16, width=16, generator=torch.Generator().manual_seed(0),
                  output_type="pt").images  # fmt: skip
    assert images.shape == (2, 3, 16, 16) and seen == [0, 1]
    torch.testing.assert_close(images, direct.float())
