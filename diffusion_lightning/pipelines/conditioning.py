"""What a model can be asked for, and one way to ask any pipeline for it.

Every part of the package that generates (sampling callbacks, ``evaluate``, ``predict``, the
analyses) describes *what* to generate as :class:`Conditions` and calls :func:`generate`; it never
tests ``num_classes`` or a pipeline's class. A model (``DiffusionModule.condition_spec()``) or an
exported pipeline (:func:`condition_spec`) states its :class:`ConditionSpec`: the kind of condition
it understands (``class`` labels or text ``prompt``\\ s), its classes, and the conditions used when a
caller names none. A later kind of condition adds a value to :data:`CONDITION_KINDS` and a branch
in :func:`generate` and :meth:`ConditionSpec.resolve`; callers stay as they are.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

__all__ = ["CONDITION_KINDS", "ConditionSpec", "Conditions", "condition_spec", "generate"]

#: The kinds of condition a model can declare.
CONDITION_KINDS: tuple[str, ...] = ("class", "prompt")


@dataclass(frozen=True)
class Conditions:
    """An ordered list of conditions, one generated image each.

    Args:
        kind: ``class`` or ``prompt``.
        values: Class ids (``kind="class"``) or prompts (``kind="prompt"``).
        names: A human-readable label per value (class name, or the prompt itself) for grids and files.
        negative_prompts: One negative prompt per value (``prompt`` kind only), or ``None``.
    """

    kind: str
    values: tuple[Any, ...]
    names: tuple[str, ...]
    negative_prompts: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.kind not in CONDITION_KINDS:
            raise ValueError(f"kind={self.kind!r} is not accepted; expected one of {list(CONDITION_KINDS)}.")
        if len(self.names) != len(self.values):
            raise ValueError(f"names has {len(self.names)} entries for {len(self.values)} values.")
        if self.negative_prompts is not None and len(self.negative_prompts) != len(self.values):
            count = len(self.negative_prompts)
            raise ValueError(f"negative_prompts has {count} entries for {len(self.values)} values.")

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, index: slice) -> Conditions:
        negatives = self.negative_prompts[index] if self.negative_prompts is not None else None
        return replace(self, values=self.values[index], names=self.names[index], negative_prompts=negatives)

    def _take(self, order: list[int]) -> Conditions:
        negatives = tuple(self.negative_prompts[i] for i in order) if self.negative_prompts is not None else None
        return replace(
            self,
            values=tuple(self.values[i] for i in order),
            names=tuple(self.names[i] for i in order),
            negative_prompts=negatives,
        )

    def repeat_each(self, n: int) -> Conditions:
        """Every condition ``n`` times in a row (``a a b b``): the rows of a grid."""
        if n < 1:
            raise ValueError(f"n={n!r} must be >= 1.")
        return self._take([i for i in range(len(self)) for _ in range(n)])

    def cycle(self, n: int) -> Conditions:
        """The first ``n`` conditions of ``a b a b ...``."""
        if n < 1:
            raise ValueError(f"n={n!r} must be >= 1.")
        return self._take([i % len(self) for i in range(n)])

    def spread(self, n: int) -> Conditions:
        """``n`` conditions as even as possible over these, grouped (``a a b b c``): lower ones get the extra."""
        if n < 1:
            raise ValueError(f"n={n!r} must be >= 1.")
        return self._take(sorted(i % len(self) for i in range(n)))

    def groups(self) -> torch.Tensor:
        """The index of each value among the distinct values, in first-seen order, ``(B,)`` long."""
        first: dict[Any, int] = {}
        return torch.tensor([first.setdefault(v, len(first)) for v in self.values], dtype=torch.long)

    def distinct(self) -> Conditions:
        """The distinct conditions, in first-seen order."""
        seen: dict[Any, int] = {}
        order = [seen.setdefault(v, i) for i, v in enumerate(self.values) if v not in seen]
        return self._take(order)

    def as_records(self) -> list[dict[str, Any]]:
        """One JSON-ready dict per condition (``class``/``name`` or ``prompt``/``negative_prompt``)."""
        if self.kind == "class":
            return [{"class": int(v), "name": n} for v, n in zip(self.values, self.names)]
        negatives = self.negative_prompts or (None,) * len(self)
        return [{"prompt": v, "negative_prompt": neg} for v, neg in zip(self.values, negatives)]


@dataclass(frozen=True)
class ConditionSpec:
    """What a model can be conditioned on.

    Args:
        kind: ``class`` (class labels ``0..num_classes-1``) or ``prompt`` (text).
        num_classes: Number of classes (``class`` kind).
        class_names: Optional class names (``class`` kind).
        default_prompts: Prompts used when a caller names none (``prompt`` kind), e.g. the module's
            ``validation_prompts``.
        default_negative_prompts: Negative prompts that go with ``default_prompts`` (one, or one each).
    """

    kind: str
    num_classes: int | None = None
    class_names: tuple[str, ...] | None = None
    default_prompts: tuple[str, ...] = ()
    default_negative_prompts: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.kind not in CONDITION_KINDS:
            raise ValueError(f"kind={self.kind!r} is not accepted; expected one of {list(CONDITION_KINDS)}.")
        if self.kind == "class" and (self.num_classes is None or self.num_classes < 1):
            raise ValueError(f"num_classes={self.num_classes!r}: a class-conditioned model needs >= 1 class.")

    def class_name(self, index: int) -> str:
        return self.class_names[index] if self.class_names else str(index)

    def resolve(
        self,
        classes: Sequence[int] | None = None,
        prompts: Sequence[str] | None = None,
        negative_prompts: Sequence[str] | None = None,
        owner: str = "",
    ) -> Conditions:
        """The conditions a caller asked for, checked against this spec; the defaults where it asked for none.

        Raises:
            ValueError: naming the field (prefixed by ``owner``) when the request does not fit the model:
                classes for a text model, prompts for a class model, a class out of range, or a text
                model with neither prompts nor default prompts.
        """
        where = f"{owner}: " if owner else ""
        if self.kind == "class":
            if prompts is not None or negative_prompts is not None:
                field = "prompts" if prompts is not None else "negative_prompts"
                raise ValueError(
                    f"{where}{field} is set, but the model is class-conditioned ({self.num_classes} classes); "
                    "give classes instead, or leave both unset for every class."
                )
            assert self.num_classes is not None
            chosen = list(range(self.num_classes)) if classes is None else [int(c) for c in classes]
            if not chosen:
                raise ValueError(f"{where}classes=[] is empty; give at least one class, or None for all.")
            bad = [c for c in chosen if not 0 <= c < self.num_classes]
            if bad:
                raise ValueError(
                    f"{where}classes={list(classes or [])!r} has {bad}; the model's classes are "
                    f"0..{self.num_classes - 1}."
                )
            return Conditions("class", tuple(chosen), tuple(self.class_name(c) for c in chosen))
        if classes is not None:
            raise ValueError(
                f"{where}classes={list(classes)!r} is set, but the model is conditioned on text prompts; "
                "give prompts instead (or none for the model's validation prompts)."
            )
        chosen_prompts = list(self.default_prompts) if prompts is None else list(prompts)
        if prompts is None and negative_prompts is None:
            negative_prompts = self.default_negative_prompts
        if not chosen_prompts:
            raise ValueError(
                f"{where}prompts is not set and the model has no default prompts; give prompts "
                "(or the model's validation_prompts)."
            )
        if not all(isinstance(p, str) for p in chosen_prompts):
            raise ValueError(f"{where}prompts={chosen_prompts!r} must be strings.")
        negatives = None
        if negative_prompts is not None:
            negatives = list(negative_prompts)
            if len(negatives) == 1:
                negatives = negatives * len(chosen_prompts)
            if len(negatives) != len(chosen_prompts):
                raise ValueError(
                    f"{where}negative_prompts has {len(negatives)} entries; expected 1 or one per prompt "
                    f"({len(chosen_prompts)})."
                )
        prompts_tuple = tuple(chosen_prompts)
        return Conditions("prompt", prompts_tuple, prompts_tuple, tuple(negatives) if negatives else None)


def condition_spec(model: Any) -> ConditionSpec:
    """The :class:`ConditionSpec` of a module or pipeline: its own ``condition_spec()`` when it has one.

    This package's modules declare theirs; a diffusers pipeline with a text encoder or tokenizer (Stable
    Diffusion and kin) is a ``prompt`` model, and any other object with an integer ``num_classes`` (as
    :class:`~diffusion_lightning.pipelines.ClassConditionedPipeline`) a ``class`` model, with the
    ``class_names`` of its config.
    """
    declared = getattr(model, "condition_spec", None)
    if callable(declared):
        return declared()
    if getattr(model, "tokenizer", None) is not None or getattr(model, "text_encoder", None) is not None:
        return ConditionSpec("prompt")
    num_classes = getattr(model, "num_classes", None)
    if isinstance(num_classes, int):
        config = getattr(model, "config", {}) or {}
        names = config.get("class_names") if hasattr(config, "get") else None
        return ConditionSpec("class", num_classes=num_classes, class_names=tuple(names) if names else None)
    raise ValueError(
        f"{type(model).__name__} declares no conditioning this package can drive: expected a class-conditioned "
        "pipeline (num_classes) or a text-to-image pipeline (tokenizer/text_encoder)."
    )


StepCallback = Callable[[Any, int, Any, dict[str, torch.Tensor]], dict]


def generate(
    pipeline: Any,
    conditions: Conditions,
    *,
    num_inference_steps: int,
    guidance_scale: float,
    generator: torch.Generator | list[torch.Generator] | None = None,
    image_size: int | None = None,
    callback_on_step_end: StepCallback | None = None,
    callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
) -> torch.Tensor:
    """Images ``(B, C, H, W)`` in ``[0, 1]`` (float, on the CPU), one per condition, from any supported pipeline.

    Args:
        pipeline: A class-conditioned pipeline or a diffusers text-to-image pipeline.
        conditions: What to generate; its kind must be the pipeline's.
        num_inference_steps: Denoising steps.
        guidance_scale: Classifier-free guidance scale (1 disables guidance).
        generator: The noise's generator(s).
        image_size: Height and width of text-to-image samples (default: the pipeline's).
        callback_on_step_end: Called after every denoising step, diffusers' ``fn(pipe, i, t, tensors)``.
        callback_on_step_end_tensor_inputs: Tensors handed to the callback.
    """
    kwargs: dict[str, Any] = {
        "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale,
        "generator": generator,
        "output_type": "pt",
    }
    if callback_on_step_end is not None:
        kwargs["callback_on_step_end"] = callback_on_step_end
        kwargs["callback_on_step_end_tensor_inputs"] = list(callback_on_step_end_tensor_inputs)
    if conditions.kind == "class":
        out = pipeline(list(conditions.values), **kwargs)
    else:
        if image_size is not None:
            kwargs.update(height=image_size, width=image_size)
        negatives = list(conditions.negative_prompts) if conditions.negative_prompts is not None else None
        out = pipeline(prompt=list(conditions.values), negative_prompt=negatives, **kwargs)
    return out.images.float().cpu()
