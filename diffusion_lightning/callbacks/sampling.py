"""The base of every callback that generates during training: when, what, with which weights, on which rank.

:class:`SamplingCallback` owns the mechanics the sample grid, the attention loggers, the
generation monitor and the periodic evaluation share, so each of them says only what it records:

- **when**: at the end of every validation of ``fit`` in every ``every_n_epochs``-th epoch (with
  ``val_check_interval``, each validation of that epoch), never in the sanity check;
- **what**: fixed ``classes`` or ``prompts`` (checked against the model's
  :class:`~diffusion_lightning.pipelines.ConditionSpec` at ``setup``, so a wrong choice fails
  before training), generated from a CPU generator seeded by ``seed``;
- **how**: the module's pipeline with ``scheduler`` and ``num_inference_steps``/``guidance_scale``
  (the module's defaults where ``None``), eval mode and no autograd for the pass, every
  submodule's mode restored after it (also on error), the global RNG untouched;
- **which weights**: with this package's ``EMA`` the averaged ones (it swaps for the whole
  validation); a warning when listed after a ``WeightAveraging`` that swaps only at epoch end;
- **where**: rank 0 generates and writes (``rank_zero_only = False`` in a subclass that must run a
  collective, such as broadcasting evaluation scalars).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, WeightAveraging
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from diffusion_lightning.losses import check_choice
from diffusion_lightning.modules.base import DiffusionModule
from diffusion_lightning.pipelines.conditioning import Conditions, condition_spec, generate
from diffusion_lightning.schedulers import SCHEDULERS

__all__ = ["SamplingCallback", "sampling_mode"]


@contextlib.contextmanager
def sampling_mode(module: torch.nn.Module) -> Iterator[None]:
    """Eval mode, no autograd and a forked global RNG for the duration; modes come back after, also on error."""
    modes = [(m, m.training) for m in module.modules()]
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    module.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=cuda):
            yield
    finally:
        for m, training in modes:
            m.training = training


class SamplingCallback(Callback):
    """Generate from fixed conditions every few epochs; a subclass says what it records in :meth:`on_sample`.

    Args:
        every_n_epochs: Run after every n-th epoch's validation (>= 1).
        classes: Classes to generate (class-conditioned models); default every class.
        prompts: Prompts to generate (text-to-image models); default the module's ``validation_prompts``.
        negative_prompts: One negative prompt per prompt, or one for all.
        seed: Seed of the sampling noise (a CPU generator, so samples match across devices).
        num_inference_steps: Denoising steps; default the module's ``num_inference_steps``.
        guidance_scale: Classifier-free guidance scale, >= 0; default the module's ``guidance_scale``.
        scheduler: Sampling scheduler (``ddpm``, ``ddim``, ``dpm``, ``euler``, ``euler_a``, ``unipc``,
            ...); default the module's ``sampler``.
    """

    rank_zero_only: bool = True
    """Whether only rank 0 enters :meth:`on_sample` (a subclass running a collective sets ``False``)."""

    def __init__(
        self,
        every_n_epochs: int = 1,
        classes: list[int] | None = None,
        prompts: list[str] | None = None,
        negative_prompts: list[str] | None = None,
        seed: int = 0,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        scheduler: str | None = None,
    ) -> None:
        name = type(self).__name__
        if not isinstance(every_n_epochs, int) or isinstance(every_n_epochs, bool) or every_n_epochs < 1:
            raise ValueError(f"{name}: every_n_epochs={every_n_epochs!r} must be an int >= 1.")
        if num_inference_steps is not None and (not isinstance(num_inference_steps, int) or num_inference_steps < 1):
            raise ValueError(f"{name}: num_inference_steps={num_inference_steps!r} must be >= 1, or None.")
        if guidance_scale is not None and guidance_scale < 0:
            raise ValueError(f"{name}: guidance_scale={guidance_scale!r} must be >= 0 (1 disables guidance), or None.")
        if scheduler is not None:
            check_choice("scheduler", scheduler, tuple(SCHEDULERS))
        if classes is not None and len(classes) == 0:
            raise ValueError(f"{name}: classes=[] is empty; give at least one class, or None for all.")
        if prompts is not None and (len(prompts) == 0 or not all(isinstance(p, str) for p in prompts)):
            raise ValueError(f"{name}: prompts={prompts!r} must be a non-empty list of strings, or None.")
        if negative_prompts is not None and prompts is not None and len(negative_prompts) not in (1, len(prompts)):
            raise ValueError(
                f"{name}: negative_prompts has {len(negative_prompts)} entries; expected 1 or one per prompt "
                f"({len(prompts)})."
            )
        if classes is not None and prompts is not None:
            raise ValueError(f"{name}: give classes (class-conditioned models) or prompts (text models), not both.")
        self.every_n_epochs = every_n_epochs
        self.classes = None if classes is None else [int(c) for c in classes]
        self.prompts = None if prompts is None else list(prompts)
        self.negative_prompts = None if negative_prompts is None else list(negative_prompts)
        self.seed = seed
        self.num_inference_steps = num_inference_steps
        self.guidance_scale = guidance_scale
        self.scheduler = scheduler
        self._last_step: int | None = None  # the global step of the last pass: one pass per validation
        self.history: list[dict[str, Any]] = []
        """What :meth:`record` kept of each pass (``epoch``, ``step`` and the subclass' figures); in checkpoints."""

    # ------------------------------------------------------------------ what and how

    def module(self, pl_module: pl.LightningModule) -> DiffusionModule:
        """``pl_module`` as a :class:`DiffusionModule`; ``ValueError`` naming this callback otherwise."""
        if not isinstance(pl_module, DiffusionModule):
            raise ValueError(
                f"{type(self).__name__} needs a DiffusionModule (build_pipeline, denoiser, sampling defaults); "
                f"got {type(pl_module).__name__}."
            )
        return pl_module

    def conditions(self, pl_module: DiffusionModule) -> Conditions:
        """The fixed conditions, checked against the module's :class:`ConditionSpec`."""
        return condition_spec(pl_module).resolve(
            self.classes, self.prompts, self.negative_prompts, owner=type(self).__name__
        )

    def sampling_args(self, pl_module: DiffusionModule) -> tuple[int, float]:
        """Steps and guidance scale: this callback's, else the module's defaults."""
        steps = self.num_inference_steps or pl_module.num_inference_steps
        guidance = pl_module.guidance_scale if self.guidance_scale is None else self.guidance_scale
        return int(steps), float(guidance)

    def pipeline(self, pl_module: DiffusionModule) -> Any:
        """The module's pipeline at its current weights, with this callback's scheduler and no progress bar."""
        pipeline = pl_module.build_pipeline(self.scheduler)
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    def generator(self) -> torch.Generator:
        """A CPU generator seeded by ``seed``: the same noise on every device and every epoch."""
        return torch.Generator().manual_seed(self.seed)

    def sample(
        self, pl_module: DiffusionModule, conditions: Conditions | None = None, pipeline: Any = None, **kwargs: Any
    ) -> torch.Tensor:
        """Images ``(B, C, H, W)`` in ``[0, 1]`` of ``conditions`` (default :meth:`conditions`) at the current weights.

        ``kwargs`` go to :func:`~diffusion_lightning.pipelines.generate` (``callback_on_step_end``, ...).
        Runs in :func:`sampling_mode`: the caller need not.
        """
        conditions = conditions if conditions is not None else self.conditions(pl_module)
        steps, guidance = self.sampling_args(pl_module)
        with sampling_mode(pl_module):
            return generate(
                pipeline if pipeline is not None else self.pipeline(pl_module),
                conditions,
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=kwargs.pop("generator", None) or self.generator(),
                image_size=getattr(pl_module, "image_size", None),
                **kwargs,
            )

    # ------------------------------------------------------------------ what it keeps

    def record(self, trainer: pl.Trainer, **values: Any) -> None:
        """Keep ``values`` of this pass in :attr:`history`, with the epoch and global step."""
        self.history.append({"epoch": trainer.current_epoch, "step": trainer.global_step, **values})

    def epoch_records(self) -> list[dict[str, Any]]:
        """The per-pass records, which :class:`~diffusion_lightning.callbacks.RunSummary` merges by epoch."""
        return self.history

    @property
    @override
    def state_key(self) -> str:
        """Unique per schedule and conditions, so several samplers of one class can keep their histories."""
        return self._generate_state_key(
            every_n_epochs=self.every_n_epochs, classes=self.classes, prompts=self.prompts, seed=self.seed
        )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"history": [dict(r) for r in self.history]} if self.history else {}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(r) for r in state_dict.get("history", [])]

    # ------------------------------------------------------------------ when

    def check(self, trainer: pl.Trainer, pl_module: DiffusionModule) -> None:
        """Raise ``ValueError`` when this callback cannot run on ``pl_module``; called at ``setup``."""

    def due(self, trainer: pl.Trainer) -> bool:
        """Whether to sample at this validation end: fitting, no sanity check, every n-th epoch, once per step."""
        return (
            trainer.state.fn == TrainerFn.FITTING
            and not trainer.sanity_checking
            and (trainer.current_epoch + 1) % self.every_n_epochs == 0
            and self._last_step != trainer.global_step
        )

    def on_sample(self, trainer: pl.Trainer, pl_module: DiffusionModule) -> None:
        """Generate and record; called when :meth:`due` (on rank 0 only unless ``rank_zero_only`` is ``False``)."""
        raise NotImplementedError

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        module = self.module(pl_module)
        self.check(trainer, module)
        self.conditions(module)
        self._warn_if_after_weight_averaging(trainer)
        self._last_step = None  # a new fit with the same callback samples at its first due validation

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.due(trainer):
            return
        self._last_step = trainer.global_step
        if self.rank_zero_only and not trainer.is_global_zero:
            return
        self.on_sample(trainer, self.module(pl_module))

    def _warn_if_after_weight_averaging(self, trainer: pl.Trainer) -> None:
        """Warn when listed after a ``WeightAveraging`` callback that swaps weights only at validation *epoch* end.

        Lightning's ``WeightAveraging`` swaps the averaged weights in at ``on_validation_epoch_start``
        and out in its own ``on_validation_epoch_end``; callbacks run in list order, so a sampler after
        it samples the raw weights. This package's ``EMA`` swaps at ``on_validation_start``/``end``,
        so any order works with it.
        """
        callbacks = list(getattr(trainer, "callbacks", []))
        if self not in callbacks:
            return
        before = callbacks[: callbacks.index(self)]
        if any(
            isinstance(c, WeightAveraging)
            and type(c).on_validation_epoch_end is WeightAveraging.on_validation_epoch_end
            for c in before
        ):
            rank_zero_warn(
                f"{type(self).__name__} is listed after a WeightAveraging (EMA) callback, so it samples the "
                "training weights, not the averaged ones; list it before the EMA callback."
            )
