"""Student UNets: widths, parameter fractions, validity errors and the size/cost report."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import UNet2DConditionModel, UNet2DModel
from torch import nn

from diffusion_lightning.nets import ClassConditionedUnet, UNetConfig, build_components, build_unet
from diffusion_lightning.nets.students import (
    StudentReport,
    build_student,
    count_macs,
    default_inputs,
    describe,
    size_table,
    student_config,
)


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def teachers() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {
        "unet2d": build_unet(
            UNetConfig(block_out_channels=(32, 64, 128), layers_per_block=1, norm_num_groups=8),
            sample_size=28,
            in_channels=1,
            num_classes=10,
        ),
        "concat": ClassConditionedUnet(block_out_channels=(32, 64, 64), layers_per_block=1, sample_size=16),
        "text": build_components()["unet"],
    }


NAMES = ("unet2d", "concat", "text")


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("factor", [0.1, 0.25, 0.5, 0.8])
def test_widths_are_multiples_of_the_groups_above_the_floor(teachers, name, factor):
    config = teachers[name].config
    if name == "text" and factor < 0.25:
        factor = 0.25  # a 16/32 teacher has little room below a quarter
    student = student_config(config, factor)
    groups = config["norm_num_groups"]
    widths = student["block_out_channels"]
    assert len(widths) == len(config["block_out_channels"])
    assert all(w % groups == 0 and w >= max(8, groups) for w in widths)
    assert list(widths) == sorted(widths)  # the teachers' widths are non-decreasing
    assert all(w <= t for w, t in zip(widths, config["block_out_channels"]))


@pytest.mark.parametrize(
    ("name", "factors"),
    [("unet2d", (0.1, 0.25, 0.5, 1.0)), ("concat", (0.1, 0.25, 0.5, 1.0)), ("text", (0.25, 0.5, 1.0))],
)
def test_parameter_fraction_is_near_the_target(teachers, name, factors):
    teacher = teachers[name]
    for factor in factors:
        fraction = _params(build_student(teacher, factor)) / _params(teacher)
        assert 0.6 * factor <= fraction <= 1.6 * factor, (factor, fraction)


def test_parameter_fraction_of_a_wider_teacher_with_attention():
    config = UNetConfig(block_out_channels=(64, 128, 256), attention_levels=(1, 2), mid_attention=True)
    teacher = build_unet(config, sample_size=16, in_channels=3, num_classes=10)
    for factor in (0.05, 0.1, 0.3, 0.6):
        student = build_student(teacher, factor)
        assert all(w % 8 == 0 for w in student.config.block_out_channels)  # head dim 8 and 8 groups
        assert 0.8 * factor <= _params(student) / _params(teacher) <= 1.25 * factor


@pytest.mark.parametrize("name", NAMES)
def test_factor_one_reproduces_the_teacher(teachers, name):
    teacher = teachers[name]
    student = build_student(teacher, 1.0)
    assert type(student) is type(teacher)
    assert list(student.config.block_out_channels) == list(teacher.config.block_out_channels)
    assert _params(student) == _params(teacher)


def test_other_keys_are_copied_and_private_keys_dropped(teachers):
    config = teachers["text"].config
    student = student_config(config, 0.5)
    assert not [key for key in student if key.startswith("_")]
    assert set(student) == {key for key in config if not key.startswith("_")}
    changed = {key for key in student if student[key] != config[key]}
    assert changed == {"block_out_channels"}


@pytest.mark.parametrize("name", NAMES)
def test_student_runs_on_the_teachers_inputs(teachers, name):
    teacher = teachers[name]
    student = build_student(teacher, 0.25, seed=0)
    assert type(student) is type(teacher)
    inputs = default_inputs(teacher, batch_size=2)
    with torch.no_grad():
        expected = teacher(**inputs).sample
        got = student(**inputs).sample
    assert got.shape == expected.shape
    assert torch.isfinite(got).all()


def test_seed_makes_the_student_reproducible(teachers):
    first = build_student(teachers["unet2d"], 0.25, seed=3)
    second = build_student(teachers["unet2d"], 0.25, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), second.parameters()))


def test_scale_depth_shrinks_layers_per_block():
    teacher = build_unet(
        UNetConfig(block_out_channels=(32, 64, 128), layers_per_block=2), sample_size=16, in_channels=1, num_classes=3
    )
    assert student_config(teacher.config, 0.1)["layers_per_block"] == 2
    config = student_config(teacher.config, 0.1, scale_depth=True)
    assert config["layers_per_block"] == 1
    student = UNet2DModel.from_config(config)
    assert 0.6 * 0.1 <= _params(student) / _params(teacher) <= 1.6 * 0.1
    # never below one layer, and per-level tuples are scaled level by level
    assert student_config(teacher.config, 0.02, scale_depth=True)["layers_per_block"] == 1
    per_level = student_config({**teacher.config, "layers_per_block": (2, 4, 4)}, 0.3, scale_depth=True)
    assert per_level["layers_per_block"] == (1, 3, 3)


@pytest.mark.parametrize("name", NAMES)
def test_too_small_factor_names_the_smallest_valid_one(teachers, name):
    config = teachers[name].config
    with pytest.raises(ValueError, match=r"size_factor=0\.01 .*smallest valid factor for this teacher is ") as info:
        student_config(config, 0.01)
    smallest = float(str(info.value).rsplit(" ", 1)[-1].rstrip("."))
    assert 0.01 < smallest < 1.0
    student_config(config, smallest)  # valid
    with pytest.raises(ValueError, match="smallest valid factor"):
        student_config(config, round(smallest - 0.01, 2))


def test_level_already_at_the_floor_stays_there():
    config = dict(block_out_channels=(8, 64), norm_num_groups=8, down_block_types=("DownBlock2D",) * 2)
    assert student_config(config, 0.1)["block_out_channels"] == (8, 24)


def test_teacher_at_the_floor_has_no_smaller_student():
    config = dict(block_out_channels=(8, 8), norm_num_groups=8, down_block_types=("DownBlock2D",) * 2)
    with pytest.raises(ValueError, match="no factor below 1.0"):
        student_config(config, 0.01)
    assert student_config(config, 1.0)["block_out_channels"] == (8, 8)


@pytest.mark.parametrize("factor", [0.0, 0.005, 1.01, 2, -0.5, float("nan"), "0.5", True])
def test_factor_outside_the_range_raises(teachers, factor):
    with pytest.raises(ValueError, match=r"size_factor=.* must be a number in \[0\.01, 1\.0\]"):
        student_config(teachers["unet2d"].config, factor)


def test_config_without_widths_raises():
    with pytest.raises(ValueError, match="block_out_channels"):
        student_config({"in_channels": 3}, 0.5)


def test_head_counts_of_a_condition_unet_divide_the_widths():
    # UNet2DConditionModel: attention_head_dim is the number of heads of CrossAttn blocks (per level here)
    kwargs = dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(48, 96),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=(3, 6),
        norm_num_groups=4,
    )
    config = student_config(kwargs, 0.3)
    widths = config["block_out_channels"]
    assert widths[0] % 12 == 0 and widths[1] % 12 == 0  # lcm(4 groups, 3 heads), lcm(4, 6)
    assert widths[0] < 48 and widths[1] < 96
    student = UNet2DConditionModel(**config)
    out = student(torch.randn(1, 4, 8, 8), 5, encoder_hidden_states=torch.randn(1, 3, 16)).sample
    assert out.shape == (1, 4, 8, 8)


def test_head_dim_of_attention_levels_divides_the_widths():
    config = dict(
        block_out_channels=(32, 96), norm_num_groups=8, attention_head_dim=12, add_attention=False,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    )  # fmt: skip
    widths = student_config(config, 0.4)["block_out_channels"]
    assert widths[0] % 8 == 0 and widths[1] % 24 == 0  # only level 1 has attention: lcm(8, 12)


def test_conv_macs_match_the_analytic_count():
    conv = nn.Conv2d(3, 16, kernel_size=3, padding=1)
    assert count_macs(conv, torch.randn(1, 3, 20, 20)) == 3 * 3 * 3 * 16 * 20 * 20
    linear = nn.Linear(10, 7)
    assert count_macs(linear, torch.randn(4, 10)) == 4 * 10 * 7


@pytest.mark.parametrize("name", NAMES)
def test_describe_reports_positive_costs_and_a_cheaper_student(teachers, name):
    teacher = teachers[name]
    teacher.train()
    big = describe(teacher, repeats=2)
    assert teacher.training  # mode restored
    assert isinstance(big, StudentReport)
    assert big.parameters == _params(teacher) and big.macs > 0 and big.latency_s > 0
    assert big.size_factor is None
    small = describe(build_student(teacher, 0.25), repeats=2, reference_parameters=big.parameters)
    assert 0 < small.macs < big.macs
    assert small.parameters < big.parameters
    assert small.size_factor == pytest.approx(small.parameters / big.parameters)


def test_describe_with_custom_inputs(teachers):
    teacher = teachers["unet2d"]
    report = describe(
        teacher, lambda unet: {"sample": torch.randn(1, 1, 8, 8), "timestep": 3, "class_labels": torch.tensor([1])}
    )
    assert 0 < report.macs < describe(teacher, repeats=1).macs  # 8x8 is cheaper than 28x28
    with pytest.raises(ValueError, match="repeats=0"):
        describe(teacher, repeats=0)


def test_size_table(teachers):
    teacher = teachers["concat"]
    reports = size_table(teacher, [0.25, 1.0], repeats=1)
    assert [r.requested_factor for r in reports] == [0.25, 1.0]
    assert reports[1].size_factor == pytest.approx(1.0)
    assert reports[0].size_factor == pytest.approx(0.25, rel=0.6)
    assert reports[0].macs < reports[1].macs
    assert all(math.isfinite(r.latency_s) for r in reports)
