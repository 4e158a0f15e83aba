"""Exponential moving average of a diffusion model's weights, with diffusers' decay warm-up."""

from __future__ import annotations

from typing import Any, cast

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from typing_extensions import override

from diffusion_lightning.modules.base import DiffusionModule

__all__ = ["EMA"]

_COPY = "module."  # the prefix AveragedModel gives to the names of its copy's state


class _TrainableParameters(torch.nn.Module):
    """The trainable parameters of a module, held by reference in one flat list.

    ``AveragedModel`` deep-copies the module it is given and pairs its parameters with those of the
    module passed to ``update_parameters``; given this view, it copies and averages the trainable
    parameters alone, and the frozen ones are neither duplicated nor touched.
    """

    def __init__(self, module: torch.nn.Module, names: list[str]) -> None:
        super().__init__()
        found = dict(module.named_parameters())
        self.weights = torch.nn.ParameterList([found[name] for name in names])


class EMA(EMAWeightAveraging):
    """An exponential moving average (EMA) of the denoiser's weights for validation, checkpoints and export.

    Lightning's :class:`~lightning.pytorch.callbacks.EMAWeightAveraging` keeps the average in a
    :class:`~torch.optim.swa_utils.AveragedModel`, swaps it in for validation and puts it in checkpoints.
    This subclass adds what diffusion training needs:

    - Decay warm-up as diffusers' ``EMAModel.get_decay``: the ``n``-th update after the first uses
      ``min(decay, (1 + n) / (10 + n))``, or ``1 - (1 + n / inv_gamma) ** -power`` when ``inv_gamma``
      is set, clamped to ``[min_decay, decay]``. ``n`` is the AveragedModel's ``n_averaged`` buffer,
      which travels in checkpoints, so a resumed run continues the warm-up exactly. Without warm-up a
      400-step run at decay 0.999 keeps ``0.999 ** 400``, about 67 %, of the random initialization.
    - ``scope``: only one submodule (the denoiser by default) is copied and averaged, so a frozen VAE
      or text encoder is not duplicated.
    - ``only_trainable``: when the scope has frozen parameters, e.g. the base weights of a UNet
      trained with LoRA adapters (``LatentDiffusionModule(training_mode="lora")``), only its
      trainable ones (the adapters) are copied, averaged and exchanged. The frozen weights never
      change, so their average is themselves: copying them would only double their memory (a
      Stable Diffusion UNet is 3.4 GB in fp32, its adapters a few MB) and the time of every update.
    - ``validate_raw``: the validation loss of the raw weights as well, logged as ``val/loss_raw``
      beside ``val/loss`` (which the EMA weights give).

    Lightning's base class averages the whole LightningModule and finds the averaged weights in
    checkpoints by their ``module.`` prefix, so ``setup``, ``on_train_batch_end`` and the checkpoint
    hooks are written here to average the scope or its trainable parameters and to map them to their
    names in the module; the ``AveragedModel`` with its ``n_averaged`` count, the exchange of weights
    (``_swap_models``) and the callback state are the base class' (the internals used are listed in
    :data:`~diffusion_lightning.utils.compat.WEIGHT_AVERAGING_INTERNALS`, checked on every upgrade).

    The weights are exchanged at ``on_validation_start``/``on_validation_end`` (the base class uses
    the epoch hooks), so every validation hook of any other callback, e.g. one drawing samples, sees
    the EMA weights whatever its place in the callback list. When training ends the module keeps the
    EMA weights, as in the base class, but the raw ones are swapped into the averaged copy instead of
    being overwritten: a checkpoint written after that (``ModelCheckpoint``'s ``save_last`` at train
    end, ``trainer.save_checkpoint``) still resumes exactly. The base class creates the copy at
    ``setup``, before the strategy moves the module to its device; here it follows the module there
    unless ``device`` is given.

    Checkpoints hold the whole module with the EMA weights of the averaged parameters under
    ``state_dict`` (so ``load_from_checkpoint`` and ``diffusion-lightning export`` give EMA weights;
    a LoRA export writes the averaged adapters), the raw weights under ``current_model_state``
    (``load_module(path, weights="raw")``) and the update count under ``averaging_state``. A module
    may drop frozen weights from both, as ``LatentDiffusionModule`` does: only the averaged ones
    need to be there to resume.

    Args:
        decay: Largest decay of the average, in ``(0, 1)``; the warm-up rises towards it.
        min_decay: Smallest decay once the warm-up has begun, in ``[0, decay]``.
        use_warmup: Warm the decay up from 0 as diffusers does; ``False`` uses ``decay`` from the
            second update on (the first copies the weights).
        inv_gamma: Set it (1.0 is usual) for the warm-up ``1 - (1 + n / inv_gamma) ** -power``
            instead of ``(1 + n) / (10 + n)``; must be > 0.
        power: Exponent of the ``inv_gamma`` warm-up, > 0: 2/3 suits runs of a million steps, 3/4
            shorter ones (decay 0.999 after 10k updates). Only used with ``inv_gamma``.
        update_every_n_steps: Update the average every N optimizer steps, counted from the first
            update (>= 1).
        update_starting_at_step: Optimizer steps taken before the first update (>= 0). Until then the
            EMA copy equals the trained weights, and the warm-up counts from the first update.
        scope: Attribute path of the averaged submodule on the LightningModule: ``denoiser`` (the
            property of every ``DiffusionModule``), ``unet``, ``model.diffusion_model``; ``None``
            averages the whole module. With ``LatentDiffusionModule(lora_text_encoder=True)``,
            ``None`` averages the text encoder's adapters as well as the UNet's.
        only_trainable: Average only the parameters of the scope that have ``requires_grad`` (buffers
            are then neither averaged nor copied). ``None``: only those when some parameter of the
            scope is frozen, when fitting starts; ``False`` averages all parameters (and buffers)
            of the scope, frozen or not.
        validate_raw: Also log the raw weights' validation loss as ``val/loss_raw``, on the same
            fixed noise and timesteps (needs a ``DiffusionModule``), in the validations of ``fit`` and
            in ``validate`` after a ``fit`` of the same trainer.
        device: Where to keep the average, e.g. ``cpu`` to save accelerator memory; default: the
            module's device.
        use_buffers: Average the buffers as well; ``False`` copies them.
    """

    def __init__(
        self,
        decay: float = 0.9999,
        min_decay: float = 0.0,
        use_warmup: bool = True,
        inv_gamma: float | None = None,
        power: float = 2 / 3,
        update_every_n_steps: int = 1,
        update_starting_at_step: int = 0,
        scope: str | None = "denoiser",
        only_trainable: bool | None = None,
        validate_raw: bool = False,
        device: str | None = None,
        use_buffers: bool = True,
    ) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay={decay!r} must be in (0, 1), e.g. 0.9999.")
        if not 0.0 <= min_decay <= decay:
            raise ValueError(f"min_decay={min_decay!r} must be in [0, decay={decay!r}].")
        if inv_gamma is not None and inv_gamma <= 0:
            raise ValueError(f"inv_gamma={inv_gamma!r} must be > 0 (1.0 is usual), or None.")
        if inv_gamma is not None and not use_warmup:
            raise ValueError(f"inv_gamma={inv_gamma!r} shapes the warm-up; it needs use_warmup=True.")
        if power <= 0:
            raise ValueError(f"power={power!r} must be > 0 (2/3 or 3/4 are usual).")
        if inv_gamma is None and power != 2 / 3:
            raise ValueError(f"power={power!r} is only used with inv_gamma; set inv_gamma (1.0 is usual).")
        if update_every_n_steps < 1:
            raise ValueError(f"update_every_n_steps={update_every_n_steps!r} must be >= 1.")
        if update_starting_at_step < 0:
            raise ValueError(f"update_starting_at_step={update_starting_at_step!r} must be >= 0.")
        if scope is not None and not all(part.isidentifier() for part in scope.split(".")):
            raise ValueError(f"scope={scope!r} must be a dotted attribute path such as 'denoiser' or 'unet', or None.")
        super().__init__(
            device=device,
            use_buffers=use_buffers,
            decay=decay,
            update_every_n_steps=update_every_n_steps,
            update_starting_at_step=update_starting_at_step,
        )
        # The base class' constant-decay avg_fn gives way to the warm-up one.
        self._kwargs = {"multi_avg_fn": self._update_average}
        self.decay = decay
        self.min_decay = min_decay
        self.use_warmup = use_warmup
        self.inv_gamma = inv_gamma
        self.power = power
        self.scope = scope
        self.only_trainable = only_trainable
        self.validate_raw = validate_raw
        self._module_name = ""  # registered name of the scope in the LightningModule, "" for all of it
        self._trainable: list[str] | None = None  # names in the scope of the averaged parameters, None for all
        self._keys: dict[str, str] = {}  # key in the averaged copy's state -> key in the module's state
        self._holds_average = False  # True while the module holds the EMA weights and the copy the raw ones
        self._swapped_for_validation = False

    def decay_at(self, step: int) -> float:
        """The decay of an update that follows ``step`` earlier ones: diffusers' ``get_decay(step + 1)``."""
        if not self.use_warmup:
            return self.decay
        if step <= 0:
            return 0.0
        value = (1 + step) / (10 + step) if self.inv_gamma is None else 1 - (1 + step / self.inv_gamma) ** -self.power
        return max(min(value, self.decay), self.min_decay)

    @override
    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        """Update after step ``update_starting_at_step`` (zero-based), then every ``update_every_n_steps``."""
        start = self.update_starting_at_step or 0
        return step_idx is not None and step_idx >= start and (step_idx - start) % self.update_every_n_steps == 0

    @property
    def average_model(self) -> AveragedModel | None:
        """The averaged copy of the scope, or of its trainable parameters (``None`` outside ``fit``)."""
        return self._average_model

    @property
    def averaged_keys(self) -> list[str]:
        """The module's state-dict keys of the averaged weights (known once fitting has started)."""
        return list(self._keys.values())

    # ------------------------------------------------------------------ set-up and updates

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self.validate_raw and not isinstance(pl_module, DiffusionModule):
            raise ValueError(
                f"validate_raw=True needs a DiffusionModule to compute the loss, got {type(pl_module).__name__}."
            )
        if self._average_model is not None and self._holds_average:
            self._swap_models(pl_module)  # a further fit continues from the raw weights
        if is_overridden("configure_model", pl_module):
            rank_zero_warn(
                "EMA doesn't support sharding model layers; configure_model is called to create the layers "
                "before the averaged copy is made, so you may run out of memory."
            )
            pl_module.configure_model()
        self._module_name = self._resolve_scope(pl_module)
        self._trainable = self._resolve_trainable(self._scope_of(pl_module))
        tracked = self._tracked(pl_module)
        self._average_model = AveragedModel(tracked, device=self._device, use_buffers=self._use_buffers, **self._kwargs)
        prefix = f"{self._module_name}." if self._module_name else ""
        if self._trainable is None:
            self._keys = {_COPY + name: prefix + name for name in tracked.state_dict()}
        else:
            self._keys = {f"{_COPY}weights.{i}": prefix + name for i, name in enumerate(self._trainable)}
        self._holds_average = False
        self._latest_update_step = 0

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._average_model is not None and self._device is None:
            self._average_model.to(pl_module.device)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: STEP_OUTPUT, batch: Any, batch_idx: int
    ) -> None:
        # As the base class, but the average is updated from the scope (or its trainable parameters).
        step_idx = trainer.global_step - 1
        if trainer.global_step > self._latest_update_step and self.should_update(step_idx=step_idx):
            assert self._average_model is not None
            self._average_model.update_parameters(self._tracked(pl_module))
            self._latest_update_step = trainer.global_step

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._average_model is not None and not self._holds_average:
            self._swap_models(pl_module)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self._swapped_for_validation:  # interrupted validation: give the module its trained weights back
            self._swap_models(pl_module)
            self._swapped_for_validation = False

    # ------------------------------------------------------------------ validation

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._average_model is not None and not self._holds_average:
            self._swap_models(pl_module)
            self._swapped_for_validation = True

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._swapped_for_validation:
            self._swap_models(pl_module)
            self._swapped_for_validation = False

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Nothing: the weights were exchanged at ``on_validation_start``."""

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Nothing: the weights are exchanged back at ``on_validation_end``."""

    @override
    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: STEP_OUTPUT,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not self.validate_raw or trainer.sanity_checking or not self._holds_average:
            return
        module = cast(DiffusionModule, pl_module)
        self._swap_models(module)  # the raw weights in, for one batch
        try:
            with torch.no_grad():
                out = module.evaluation_output(batch, batch_idx)  # the same noise and timesteps as val/loss
        finally:
            self._swap_models(module)
        module.log("val/loss_raw", out.loss, sync_dist=True, batch_size=out.timesteps.shape[0])

    # ------------------------------------------------------------------ checkpoints

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self._average_model is None:
            super().on_save_checkpoint(trainer, pl_module, checkpoint)  # says that no EMA state is saved
            return
        self._sync_before_first_update(pl_module)
        module_state = checkpoint["state_dict"]
        copy_state = self._average_model.state_dict()
        in_copy = {self._keys[key]: value for key, value in copy_state.items() if key in self._keys}
        merged = {name: in_copy.get(name, value) for name, value in module_state.items()}
        ema, raw = (module_state, merged) if self._holds_average else (merged, module_state)
        checkpoint["state_dict"] = ema
        checkpoint["current_model_state"] = raw
        checkpoint["averaging_state"] = {key: value for key, value in copy_state.items() if key not in self._keys}

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self._average_model is None:
            super().on_load_checkpoint(trainer, pl_module, checkpoint)  # warns that no EMA state is restored
            return
        if "current_model_state" not in checkpoint or "averaging_state" not in checkpoint:
            # n_averaged is 0: the average follows the loaded weights until its first update copies them
            rank_zero_warn("The checkpoint was not written with EMA; the average starts again from its weights.")
            return
        ema = checkpoint["state_dict"]
        missing = [name for name in self._keys.values() if name not in ema]
        if missing:
            raise KeyError(
                f"the checkpoint's state_dict lacks {len(missing)} of the {len(self._keys)} averaged weight(s), "
                f"e.g. {missing[:3]}; it was written by a run that trained other parameters."
            )
        averaged = {key: ema[name] for key, name in self._keys.items()}
        self._average_model.load_state_dict(averaged | checkpoint["averaging_state"])
        # Lightning loaded "state_dict", which holds the EMA weights, into the module; it trains the raw ones.
        pl_module.load_state_dict(checkpoint["current_model_state"])

    # ------------------------------------------------------------------ helpers

    def _update_average(
        self, averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor | int
    ) -> None:
        """AveragedModel's ``multi_avg_fn``: torch's EMA update at the warm-up decay of this update."""
        get_ema_multi_avg_fn(self.decay_at(int(num_averaged)))(averaged, current, num_averaged)

    def _resolve_scope(self, pl_module: pl.LightningModule) -> str:
        """The registered name of the module that ``scope`` points at, validated."""
        target: Any = pl_module
        for part in self.scope.split(".") if self.scope else []:
            if not hasattr(target, part):
                raise ValueError(
                    f"scope={self.scope!r}: {type(target).__name__} has no attribute {part!r}; expected an attribute "
                    f"path to a torch.nn.Module of {type(pl_module).__name__} (e.g. 'denoiser') or None for all of it."
                )
            target = getattr(target, part)
        if not isinstance(target, torch.nn.Module):
            raise ValueError(f"scope={self.scope!r} is a {type(target).__name__}, expected a torch.nn.Module.")
        for name, module in pl_module.named_modules():
            if module is target:
                return name
        raise ValueError(
            f"scope={self.scope!r} is not a registered submodule of {type(pl_module).__name__}, "
            "so its weights would not be in checkpoints."
        )

    def _resolve_trainable(self, scope: torch.nn.Module) -> list[str] | None:
        """The names of the parameters to average when only the trainable ones are, else ``None``."""
        named = list(scope.named_parameters())
        trainable = [name for name, param in named if param.requires_grad]
        if not (self.only_trainable or (self.only_trainable is None and len(trainable) < len(named))):
            return None
        if not trainable:
            raise ValueError(
                f"scope={self.scope!r}: every parameter of {type(scope).__name__} is frozen (requires_grad=False), "
                f"so with only_trainable={self.only_trainable!r} there is nothing to average; expected a scope "
                "that trains, e.g. 'text_encoder' or None for every trained parameter."
            )
        return trainable

    def _scope_of(self, pl_module: pl.LightningModule) -> torch.nn.Module:
        return pl_module.get_submodule(self._module_name)

    def _tracked(self, pl_module: pl.LightningModule) -> torch.nn.Module:
        """The module whose parameters (and buffers) are averaged: the scope, or a view of its trainable ones.

        The view is built afresh at each call, so it always holds the module's current parameters.
        """
        scope = self._scope_of(pl_module)
        return scope if self._trainable is None else _TrainableParameters(scope, self._trainable)

    def _sync_before_first_update(self, pl_module: pl.LightningModule) -> None:
        """Before its first update (``update_starting_at_step``) the average is the trained weights themselves."""
        average = self._average_model
        if average is not None and not self._holds_average and int(average.n_averaged) == 0:
            average.module.load_state_dict(self._tracked(pl_module).state_dict())

    @override
    def _swap_models(self, pl_module: pl.LightningModule) -> None:
        self._sync_before_first_update(pl_module)
        # The base class exchanges the parameters and buffers of its argument with those of the copy.
        super()._swap_models(cast(pl.LightningModule, self._tracked(pl_module)))
        self._holds_average = not self._holds_average
