"""Smaller "student" UNets derived from a teacher's config, and a size/cost report to compare them.

A student keeps the teacher's architecture (block types, attention, conditioning, every other
config key) and shrinks the width of each resolution level. ``size_factor`` always means the
target *fraction of parameters*: almost every parameter of a UNet lives in a convolution or a
linear layer whose size is ``c_in * c_out``, so parameters scale with the square of the width and
the widths are multiplied by ``sqrt(size_factor)``. A 0.25 student has half the channels and about
a quarter of the teacher's parameters.

Works with ``UNet2DModel``, ``UNet2DConditionModel`` and the project's
:class:`~diffusion_lightning.nets.class_conditioned.ClassConditionedUnet` (any ``ConfigMixin``
network whose config has ``block_out_channels``, ``norm_num_groups`` and the diffusers block and
attention keys).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = [
    "StudentReport",
    "build_student",
    "count_macs",
    "default_inputs",
    "describe",
    "size_table",
    "student_config",
]

#: Factors searched for the smallest valid one: 0.01, 0.02, ..., 1.00.
FACTOR_GRID = tuple(round(0.01 * i, 2) for i in range(1, 101))


def _per_level(value: Any, levels: int) -> list[Any]:
    """``value`` repeated per level when it is a scalar (or ``None``), else as a list."""
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value] * levels


def _is_condition_unet(config: Mapping[str, Any]) -> bool:
    """Whether ``config`` is a ``UNet2DConditionModel``'s (whose ``attention_head_dim`` counts heads)."""
    return "cross_attention_dim" in config


def _head_divisors(config: Mapping[str, Any], levels: int) -> list[set[int]]:
    """Per level, the numbers its width must be divisible by for its attention layers to split evenly.

    ``UNet2DModel`` (and ``ClassConditionedUnet``): ``attention_head_dim`` is channels per head for
    ``Attn*`` blocks and the mid block (``add_attention``), whose group norm also has
    ``attn_norm_num_groups`` groups when that is set. ``UNet2DConditionModel``: because of
    diffusers' historical naming, ``num_attention_heads or attention_head_dim`` is the *number of
    heads* of ``CrossAttn*`` blocks and ``UNetMidBlock2DCrossAttn``, while ``attention_head_dim``
    stays channels per head for other attention blocks (``Attn*``, ``SimpleCrossAttn*``); its up
    blocks read ``attention_head_dim`` unreversed (``[i]`` for the level ``levels - 1 - i``), as
    diffusers does.
    """
    divisors: list[set[int]] = [set() for _ in range(levels)]
    down = list(config.get("down_block_types") or [])
    up = list(config.get("up_block_types") or [])
    head_dim = _per_level(config.get("attention_head_dim"), levels)
    if _is_condition_unet(config):
        heads = _per_level(config.get("num_attention_heads") or config.get("attention_head_dim"), levels)

        def needs(block: str, level: int, dim_index: int) -> int | None:
            if "CrossAttn" in block and "Simple" not in block:
                return heads[level]
            if "Attn" in block:
                return head_dim[dim_index]
            return None

        for i, block in enumerate(down[:levels]):
            divisors[i].add(needs(block, i, i))
        for i, block in enumerate(up[:levels]):
            divisors[levels - 1 - i].add(needs(block, levels - 1 - i, i))
        mid = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
        if mid:
            divisors[-1].add(needs(mid, levels - 1, levels - 1) if "Attn" in mid else head_dim[-1])
    else:
        attention = {i for i, block in enumerate(down[:levels]) if "Attn" in block}
        attention |= {levels - 1 - i for i, block in enumerate(up[:levels]) if "Attn" in block}
        if config.get("add_attention", True) and config.get("mid_block_type", "UNetMidBlock2D") is not None:
            attention.add(levels - 1)
        for level in attention:
            divisors[level] |= {head_dim[level], config.get("attn_norm_num_groups")}
    return [{int(d) for d in level if d} for level in divisors]


@dataclass
class _Plan:
    widths: list[int]
    layers_per_block: int | list[int]
    clipped: list[int]
    """Levels whose width, rounded to its alignment, fell below the floor and was raised to it."""
    floors: list[int]
    shrinks: bool
    """Whether the student is strictly smaller than the teacher (some width or depth reduced)."""


def _plan(config: Mapping[str, Any], size_factor: float, scale_depth: bool, min_channels: int) -> _Plan:
    teacher = [int(c) for c in config["block_out_channels"]]
    levels = len(teacher)
    groups = int(config.get("norm_num_groups") or 1)
    depth = config.get("layers_per_block", 1)
    depth_scale = 1.0
    new_depth: int | list[int] = depth
    if scale_depth:
        # params ~ depth * width^2: share the factor, depth by its cube root, then let the widths make up
        # for the rounding of the (small, integer) depth so the total still aims at size_factor.
        per = [int(d) for d in _per_level(depth, levels)]
        scaled = [max(1, math.floor(d * size_factor ** (1 / 3) + 0.5)) for d in per]
        depth_scale = sum(per) / sum(scaled)
        new_depth = scaled if isinstance(depth, (list, tuple)) else scaled[0]
    width_scale = math.sqrt(min(1.0, size_factor * depth_scale))
    widths, clipped, floors = [], [], []
    non_decreasing = all(a <= b for a, b in zip(teacher, teacher[1:]))
    for level, (width, heads) in enumerate(zip(teacher, _head_divisors(config, levels))):
        align = groups
        for d in heads:
            if width % math.lcm(align, d) == 0:  # a teacher that ignores a divisor is not held to it
                align = math.lcm(align, d)
        floor = min(width, align * math.ceil(max(min_channels, groups) / align))
        rounded = align * math.floor(width * width_scale / align + 0.5)
        if rounded < floor < width:  # a level the teacher already has at the floor just stays there
            clipped.append(level)
        new = max(rounded, floor)
        if non_decreasing and widths and new < widths[-1]:
            new = align * math.ceil(widths[-1] / align)
        widths.append(new)
        floors.append(floor)
    shallower = _per_level(new_depth, levels) != _per_level(depth, levels)
    shrinks = any(w < t for w, t in zip(widths, teacher)) or shallower
    return _Plan(widths, new_depth, clipped, floors, shrinks)


def _valid(plan: _Plan, size_factor: float) -> bool:
    """No level clipped at the floor, and a factor below 1 does not leave a teacher already at the floor unchanged.

    (A factor close to 1 may round back to the teacher's widths: that is the nearest network, not an error.)
    """
    at_floor = all(w <= f for w, f in zip(plan.widths, plan.floors))
    return not plan.clipped and (plan.shrinks or size_factor >= 1.0 or not at_floor)


def _searched(plan: _Plan) -> bool:
    """What the smallest valid factor must give: no level clipped, and a strictly smaller network."""
    return not plan.clipped and plan.shrinks


def student_config(
    teacher_config: Mapping[str, Any], size_factor: float, scale_depth: bool = False, min_channels: int = 8
) -> dict[str, Any]:
    """The config of a student with about ``size_factor`` of the teacher's parameters.

    Parameters scale with the square of the width, so each entry of ``block_out_channels`` is
    multiplied by ``sqrt(size_factor)`` and rounded to the nearest multiple of ``norm_num_groups``
    (and of the attention head size or head count where that level has attention and the teacher's
    width is a multiple of it), never below ``max(min_channels, norm_num_groups)`` (or the teacher's
    own width if that is smaller). Non-decreasing teacher widths stay non-decreasing. With
    ``scale_depth``, ``layers_per_block`` (an int or one per level) is multiplied by
    ``size_factor ** (1/3)`` (rounded, at least 1) and the widths by the square root of what is left,
    so that the parameter fraction still aims at ``size_factor``. Every other key is copied
    unchanged; private keys (``_class_name``, ``_diffusers_version``, ...) are dropped.

    Args:
        teacher_config: The teacher's ``unet.config`` (a ``FrozenDict``) or its constructor kwargs.
        size_factor: Target fraction of the teacher's parameters, in ``[0.01, 1.0]``.
        scale_depth: Also shrink ``layers_per_block``.
        min_channels: Smallest width of a level.

    Returns:
        A plain dict for ``type(teacher).from_config``.

    Raises:
        ValueError: If ``size_factor`` is outside ``[0.01, 1.0]``, the config has no
            ``block_out_channels``, or the factor is so small that a level's width would be clipped
            at the floor or the teacher is already at the floor (the message names the smallest valid
            factor on the 0.01 grid: the smallest that clips nothing and gives a strictly smaller network).
            A factor close to 1 may round back to the teacher's widths; that is not an error.
    """
    if isinstance(size_factor, bool) or not isinstance(size_factor, (int, float)) or not 0.01 <= size_factor <= 1.0:
        raise ValueError(f"size_factor={size_factor!r} must be a number in [0.01, 1.0] (a fraction of parameters).")
    if not teacher_config.get("block_out_channels"):
        raise ValueError(
            f"teacher_config has block_out_channels={teacher_config.get('block_out_channels')!r}; expected a "
            "UNet2DModel, UNet2DConditionModel or ClassConditionedUnet config with a non-empty list of widths."
        )
    if min_channels < 1:
        raise ValueError(f"min_channels={min_channels!r} must be >= 1.")
    plan = _plan(teacher_config, size_factor, scale_depth, min_channels)
    if not _valid(plan, size_factor):
        smallest = next(
            (f for f in FACTOR_GRID[:-1] if _searched(_plan(teacher_config, f, scale_depth, min_channels))),
            None,
        )
        hint = (
            f"the smallest valid factor for this teacher is {smallest}"
            if smallest is not None
            else "no factor below 1.0 gives a smaller network for this teacher (its widths are at the floor); "
            "the smallest valid factor is 1.0"
        )
        raise ValueError(
            f"size_factor={size_factor} gives widths {plan.widths} with level(s) {plan.clipped} clipped at the "
            f"floor {plan.floors} "
            f"(norm_num_groups={teacher_config.get('norm_num_groups')}, min_channels={min_channels}, teacher widths "
            f"{list(teacher_config['block_out_channels'])}); {hint}."
        )
    config = {key: value for key, value in teacher_config.items() if not str(key).startswith("_")}
    config["block_out_channels"] = tuple(plan.widths)
    if scale_depth:
        depth = plan.layers_per_block
        config["layers_per_block"] = tuple(depth) if isinstance(depth, list) else depth
    return config


def build_student(teacher_unet: nn.Module, size_factor: float, seed: int | None = None, **kwargs: Any) -> nn.Module:
    """A freshly, randomly initialised network of the teacher's class with :func:`student_config`'s config.

    Args:
        teacher_unet: A diffusers ``ConfigMixin`` network (``UNet2DModel``, ``UNet2DConditionModel``,
            ``ClassConditionedUnet``).
        size_factor: Target fraction of the teacher's parameters, in ``[0.01, 1.0]``.
        seed: Seed of the initialisation (the global RNG is left untouched), or ``None`` for the global RNG.
        **kwargs: ``scale_depth`` and ``min_channels`` of :func:`student_config`.

    Returns:
        The student, on the teacher's device and in its dtype.
    """
    config = getattr(teacher_unet, "config", None)
    if not isinstance(config, Mapping) or not hasattr(type(teacher_unet), "from_config"):
        raise ValueError(
            f"teacher_unet={type(teacher_unet).__name__} has no diffusers config; expected a ConfigMixin network "
            "such as UNet2DModel, UNet2DConditionModel or ClassConditionedUnet."
        )
    student_kwargs = student_config(config, size_factor, **kwargs)
    if seed is None:
        student = type(teacher_unet).from_config(student_kwargs)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            student = type(teacher_unet).from_config(student_kwargs)
    reference = next(teacher_unet.parameters(), None)
    if reference is not None and (reference.device, reference.dtype) != (student.device, student.dtype):
        student = student.to(device=reference.device, dtype=reference.dtype)
    return student


@dataclass
class StudentReport:
    """Size and cost of one network."""

    name: str
    """Class name of the network."""
    block_out_channels: tuple[int, ...]
    layers_per_block: Any
    parameters: int
    macs: int
    """Multiply-accumulates of one forward of a batch of 1 (FLOPs / 2, as ``FlopCounterMode`` counts
    them: convolutions, matrix products and attention; norms and activations are not counted)."""
    latency_s: float
    """Median seconds per forward on the network's device."""
    size_factor: float | None = None
    """Parameters relative to the reference parameter count, when one was given."""
    requested_factor: float | None = None
    """The ``size_factor`` the network was built with (:func:`size_table`)."""


def default_inputs(unet: nn.Module, batch_size: int = 1, text_length: int = 8) -> dict[str, Any]:
    """Forward kwargs of a batch of ``batch_size`` at the network's ``sample_size``.

    Adds ``class_labels`` when the config has ``num_class_embeds``, ``class_embed_type`` or
    ``num_classes`` (``ClassConditionedUnet``), and ``encoder_hidden_states`` of shape
    ``(batch, text_length, cross_attention_dim)`` for a ``UNet2DConditionModel``. Networks with
    other conditioning (e.g. SDXL's ``added_cond_kwargs``) need a ``sample_input_fn``.
    """
    config = unet.config
    reference = next(unet.parameters())
    device, dtype = reference.device, reference.dtype
    size = config.get("sample_size") or 32
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    inputs: dict[str, Any] = {
        "sample": torch.randn(batch_size, config.get("in_channels", 3), height, width, device=device, dtype=dtype),
        "timestep": torch.full((batch_size,), 10, device=device, dtype=torch.long),
    }
    if config.get("num_class_embeds") or config.get("class_embed_type") or config.get("num_classes"):
        inputs["class_labels"] = torch.zeros(batch_size, device=device, dtype=torch.long)
    if _is_condition_unet(config):
        dim = config.get("cross_attention_dim") or 1280
        dim = dim[0] if isinstance(dim, (list, tuple)) else dim
        inputs["encoder_hidden_states"] = torch.randn(batch_size, text_length, int(dim), device=device, dtype=dtype)
    return inputs


def count_macs(module: nn.Module, *args: Any, **kwargs: Any) -> int:
    """Multiply-accumulates of ``module(*args, **kwargs)`` (``FlopCounterMode`` FLOPs / 2), without gradients."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(*args, **kwargs)
    return int(counter.get_total_flops()) // 2


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def describe(
    unet: nn.Module,
    sample_input_fn: Callable[[nn.Module], Mapping[str, Any]] | None = None,
    repeats: int = 5,
    reference_parameters: int | None = None,
) -> StudentReport:
    """Parameters, MACs and latency of one forward of ``unet`` on a batch of 1.

    Args:
        unet: The network (its ``config`` gives the input shape unless ``sample_input_fn`` does).
        sample_input_fn: ``unet -> forward kwargs``; defaults to :func:`default_inputs`.
        repeats: Timed forwards after one warm-up; the latency is their median.
        reference_parameters: Parameter count (e.g. the teacher's) that ``size_factor`` is relative to.

    Returns:
        The report (the network is put back in the train/eval mode it was in).
    """
    if repeats < 1:
        raise ValueError(f"repeats={repeats!r} must be >= 1.")
    if reference_parameters is not None and reference_parameters < 1:
        raise ValueError(f"reference_parameters={reference_parameters!r} must be a positive parameter count.")
    inputs = dict((sample_input_fn or default_inputs)(unet))
    parameters = sum(p.numel() for p in unet.parameters())
    device = next(unet.parameters()).device
    was_training = unet.training
    unet.eval()
    try:
        macs = count_macs(unet, **inputs)
        times = []
        with torch.no_grad():
            for i in range(repeats + 1):
                _sync(device)
                start = time.perf_counter()
                unet(**inputs)
                _sync(device)
                if i:  # the first forward is the warm-up
                    times.append(time.perf_counter() - start)
    finally:
        unet.train(was_training)
    config = getattr(unet, "config", {}) or {}
    return StudentReport(
        name=type(unet).__name__,
        block_out_channels=tuple(config.get("block_out_channels", ())),
        layers_per_block=config.get("layers_per_block"),
        parameters=parameters,
        macs=macs,
        latency_s=statistics.median(times),
        size_factor=parameters / reference_parameters if reference_parameters else None,
    )


def size_table(
    teacher_unet: nn.Module,
    factors: Sequence[float],
    sample_input_fn: Callable[[nn.Module], Mapping[str, Any]] | None = None,
    repeats: int = 5,
    **kwargs: Any,
) -> list[StudentReport]:
    """:func:`describe` of a student per factor, ``size_factor`` relative to the teacher's parameters.

    Args:
        teacher_unet: The teacher network.
        factors: Size factors, each in ``[0.01, 1.0]`` (1.0 describes a fresh copy of the teacher's shape).
        sample_input_fn: Passed to :func:`describe`.
        repeats: Passed to :func:`describe`.
        **kwargs: Passed to :func:`build_student` (``scale_depth``, ``min_channels``, ``seed``).

    Returns:
        One report per factor, in order.
    """
    reference = sum(p.numel() for p in teacher_unet.parameters())
    reports = []
    for factor in factors:
        student = build_student(teacher_unet, factor, **kwargs)
        report = describe(student, sample_input_fn, repeats=repeats, reference_parameters=reference)
        report.requested_factor = factor
        reports.append(report)
    return reports
