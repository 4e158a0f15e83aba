"""Watch activations, gradients and parameters of chosen modules, and stop (or skip) non-finite steps."""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from diffusion_lightning.callbacks._watch_selection import select_modules
from diffusion_lightning.callbacks._watch_stats import STATISTICS, first_tensor, statistics
from diffusion_lightning.loggers.media import log_histogram
from diffusion_lightning.modules.nonfinite import drop_nonfinite_step

WATCH_KINDS = ("activations", "gradients", "parameters")
"""What can be watched."""
_PREFIX = {"activations": "debug/activation", "gradients": "debug/gradient", "parameters": "debug/parameters"}


class NonFiniteGradientError(FloatingPointError):
    """A loss or gradient became NaN or infinite. Attributes:
    global_step: The optimizer step at which it happened.
    module_name: The first module (in ``named_parameters()`` order) with a non-finite gradient,
        or ``None`` when only the loss (or the total gradient norm) was non-finite.
    """

    def __init__(self, message: str, global_step: int, module_name: str | None) -> None:
        super().__init__(message)
        self.global_step = global_step
        self.module_name = module_name


def _check_names(field: str, values: list[str] | None, accepted: tuple[str, ...]) -> tuple[str, ...]:
    chosen = tuple(dict.fromkeys(values if values is not None else accepted))
    unknown = [v for v in chosen if v not in accepted]
    if unknown:
        raise ValueError(f"{field}={list(chosen)!r} has unknown entries {unknown}; accepted: {list(accepted)}.")
    return chosen


class GradientActivationWatcher(Callback):
    """Log statistics of activations, gradients and parameters of chosen modules; guard against NaN/inf.

    Every ``log_every_n_steps`` optimizer steps (step 0 included), for the modules selected by
    ``patterns`` and ``module_types`` when fitting starts, it logs the chosen statistics of

    - ``activations``: the module's forward output (its first floating-point tensor, first call in
      the step), through forward hooks installed when the watched step's batch starts and removed
      as soon as its forward is done, so other steps run without hooks;
    - ``gradients``: all gradients of the module's parameters, after backward and before clipping;
    - ``parameters``: all its parameters at the same point (the weights that produced the step).

    Scalars go to every logger as ``debug/activation/<module>/<stat>``,
    ``debug/gradient/<module>/<stat>`` and ``debug/parameters/<module>/<stat>`` (written directly with
    ``log_metrics`` at the watched step, independently of the Trainer's ``log_every_n_steps``);
    ``hist`` goes through :func:`~diffusion_lightning.loggers.media.log_histogram` under
    ``.../<module>/hist``, for at most ``max_histograms`` modules per watched step, taken in turn so
    that every module is covered over successive watched steps (a histogram is drawn from at most
    ``histogram_samples`` values picked uniformly at random, so large tensors stay cheap; the
    scalars always use every value). Statistics are computed on rank 0.

    Every step, on every rank, the loss and one fused norm of all gradients are checked for NaN/inf,
    and the ranks agree on the outcome (a failure on one fails all of them, so they skip or stop
    together); only on failure is the first parameter with a non-finite gradient looked up. Training then stops
    with :class:`NonFiniteGradientError` naming the global step and that module, or, with
    ``skip_nonfinite``, the gradients are dropped (``grad = None``: the optimizer leaves weights and
    state as they are) with a warning naming the module; non-finite weights raise in any case. A
    non-finite activation of a watched step is reported with its module (first in forward order).
    Under fp16 mixed precision the gradient scaler already skips non-finite steps, so it checks.

    Frozen components, the direct children of the LightningModule whose parameters all have
    ``requires_grad=False`` (the VAE and, unless it trains, the text encoder of a
    ``LatentDiffusionModule``), are not watched unless a pattern names them: their gradients do not
    exist and their weights do not change. So ``module_types: [ResnetBlock2D]`` watches the UNet's
    blocks but not the VAE's, and ``patterns: ["vae.encoder.*"]`` watches the VAE's encoder. Inside a
    component that trains every module can be watched, frozen or not, e.g. the ResNet blocks of a UNet
    trained with LoRA adapters: the adapters' gradients flow through them and their activations
    follow the adapters.

    Lightning's ``grad_norm`` and ``detect_anomaly`` and W&B's ``watch`` neither watch activations of
    chosen modules for any logger nor skip non-finite steps, hence this callback.

    Args:
        patterns: Glob patterns (``fnmatch``, ``*`` also crosses dots) on the names of
            ``pl_module.named_modules()``, e.g. ``"unet.down_blocks.*.resnets.?"``. Each must match
            some module. A pattern reaches into a frozen component only when its first dotted part
            is the component's name (``vae.*``, ``text_encoder``; not ``*`` or ``*.attentions.*``).
        module_types: Class names, e.g. ``"Conv2d"``, ``"Attention"``, ``"ResnetBlock2D"`` (a
            subclass counts as its base classes too), matched outside frozen components (and in
            those that ``patterns`` name). Each must match some module. Given together with
            ``patterns``, a module must match both.
        watch: Any of ``activations``, ``gradients``, ``parameters`` (default: all). An empty list
            keeps only the non-finite guard, and then no module needs to be selected.
        stats: Any of ``hist``, ``mean``, ``std``, ``norm``, ``min``, ``max``, ``var``,
            ``abs_mean`` (default: ``mean``, ``std``, ``norm``, ``hist``). ``std`` and ``var`` are
            the population ones.
        log_every_n_steps: Watch every this many optimizer steps (>= 1).
        max_histograms: Modules that get histograms per watched step (>= 0).
        histogram_samples: Values drawn (with replacement, from a generator of its own) from a larger
            tensor for its histogram (>= 1); ``None`` uses every value.
        skip_nonfinite: Skip the optimizer step when the loss or a gradient is non-finite (with a
            warning) instead of stopping training.
    """

    def __init__(
        self,
        patterns: list[str] | None = None,
        module_types: list[str] | None = None,
        watch: list[str] | None = None,
        stats: list[str] | None = None,
        log_every_n_steps: int = 50,
        max_histograms: int = 8,
        histogram_samples: int | None = 65536,
        skip_nonfinite: bool = False,
    ) -> None:
        self.watch = _check_names("watch", watch, WATCH_KINDS)
        self.stats = _check_names("stats", stats if stats is not None else ["mean", "std", "norm", "hist"], STATISTICS)
        if self.watch and not self.stats:
            raise ValueError(f"stats={stats!r} is empty; choose some of {list(STATISTICS)} (or set watch=[]).")
        if log_every_n_steps < 1:
            raise ValueError(f"log_every_n_steps={log_every_n_steps!r} must be an integer >= 1.")
        if max_histograms < 0:
            raise ValueError(f"max_histograms={max_histograms!r} must be >= 0 (0 disables histograms).")
        if histogram_samples is not None and histogram_samples < 1:
            raise ValueError(f"histogram_samples={histogram_samples!r} must be >= 1, or None for every value.")
        self.patterns = tuple(patterns or ())
        self.module_types = tuple(module_types or ())
        if self.watch and not self.patterns and not self.module_types:
            raise ValueError(
                f"patterns={patterns!r} and module_types={module_types!r} select no module to watch; give glob "
                "patterns on module names and/or class names (or set watch=[] to keep only the non-finite guard)."
            )
        self.log_every_n_steps = log_every_n_steps
        self.max_histograms = max_histograms
        self.histogram_samples = histogram_samples
        self._sampler = torch.Generator().manual_seed(0)
        self.skip_nonfinite = skip_nonfinite
        self.skipped_steps = 0
        self._scalar_stats = tuple(s for s in self.stats if s != "hist")
        self._histogram_offset = 0
        self._modules: list[tuple[str, torch.nn.Module]] = []
        self._handles: list[RemovableHandle] = []
        self._watching: int | None = None
        self._last_watched = -1
        self._histogram_names: frozenset[str] = frozenset()
        self._activations: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._activation_values: dict[str, torch.Tensor] = {}
        self._nonfinite_activation: tuple[int, str] | None = None
        self._loss: torch.Tensor | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(patterns=self.patterns, module_types=self.module_types)

    @property
    def module_names(self) -> list[str]:
        """Names of the watched modules (known once fitting has started)."""
        return [name for name, _ in self._modules]

    # ------------------------------------------------------------------ selection

    def _next_histogram_modules(self) -> frozenset[str]:
        if "hist" not in self.stats or self.max_histograms == 0:
            return frozenset()
        names = self.module_names
        if len(names) <= self.max_histograms:
            return frozenset(names)
        start = self._histogram_offset % len(names)
        self._histogram_offset = (start + self.max_histograms) % len(names)
        return frozenset(names[(start + i) % len(names)] for i in range(self.max_histograms))

    # ------------------------------------------------------------------ hooks

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_watched = -1
        if self.watch or self.patterns or self.module_types:
            self._modules = select_modules(pl_module, self.patterns, self.module_types)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self._watching is not None and self._watching != step:
            self._watching = None  # the previous watched step never reached its optimizer step
        if not self.watch or not trainer.is_global_zero or step % self.log_every_n_steps or step == self._last_watched:
            return
        self._last_watched = self._watching = step
        self._histogram_names = self._next_histogram_modules()
        self._activations.clear()
        self._activation_values.clear()
        if "activations" in self.watch:
            for name, module in self._modules:
                self._handles.append(module.register_forward_hook(partial(self._record_activation, name)))

    def _record_activation(self, name: str, module: torch.nn.Module, args: Any, output: Any) -> None:
        tensor = first_tensor(output)
        if tensor is None or name in self._activations:
            return
        with torch.no_grad():
            values = tensor.detach()
            self._activations[name] = (statistics(values, self._scalar_stats), torch.isfinite(values).all())
            if name in self._histogram_names:
                self._activation_values[name] = self._histogram_values(values)

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        self._remove_hooks()
        self._loss = loss.detach() if self._loss is None else self._loss + loss.detach()
        if self._activations:
            self._log_activations(trainer)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self._remove_hooks()
        if self._watching == trainer.global_step:
            if self._activations:  # training_step returned no loss, so backward never ran
                self._log_activations(trainer)
            self._log_weights(trainer)
        self._watching = None
        loss, self._loss = self._loss, None
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            return
        self._check_finite(trainer, pl_module, optimizer, loss)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._reset()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._reset()

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"histogram_offset": self._histogram_offset, "skipped_steps": self.skipped_steps}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._histogram_offset = int(state_dict.get("histogram_offset", 0))
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _reset(self) -> None:
        self._remove_hooks()
        self._watching = None
        self._loss = None
        self._activations.clear()
        self._activation_values.clear()

    # ------------------------------------------------------------------ logging

    def _histogram_values(self, values: torch.Tensor) -> torch.Tensor:
        flat = values.detach().reshape(-1)
        if self.histogram_samples is None or flat.numel() <= self.histogram_samples:
            return flat.clone()
        index = torch.randint(flat.numel(), (self.histogram_samples,), generator=self._sampler)
        return flat[index.to(flat.device)]

    def _log(
        self, trainer: pl.Trainer, kind: str, stats: dict[str, torch.Tensor], values: dict[str, torch.Tensor]
    ) -> None:
        step = trainer.global_step
        prefix = _PREFIX[kind]
        if stats and self._scalar_stats:
            table = torch.stack(list(stats.values())).cpu().tolist()  # one device sync per kind
            metrics = {
                f"{prefix}/{name}/{stat}": value
                for name, row in zip(stats, table)
                for stat, value in zip(self._scalar_stats, row)
            }
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
        for name, flat in values.items():
            log_histogram(trainer, f"{prefix}/{name}/hist", flat, step=step)

    def _log_activations(self, trainer: pl.Trainer) -> None:
        names = list(self._activations)  # in the order the modules ran
        finite = torch.stack([ok for _, ok in self._activations.values()]).cpu().tolist()
        bad = [name for name, ok in zip(names, finite) if not ok]
        if bad:
            self._nonfinite_activation = (trainer.global_step, bad[0])
            rank_zero_warn(
                f"Non-finite activation at global step {trainer.global_step}: first in module {bad[0]!r} "
                f"({len(bad)} of {len(names)} watched modules)."
            )
        stats = {name: stat for name, (stat, _) in self._activations.items()}
        self._log(trainer, "activations", stats, dict(self._activation_values))
        self._activations.clear()
        self._activation_values.clear()

    def _log_weights(self, trainer: pl.Trainer) -> None:
        for kind in ("gradients", "parameters"):
            if kind not in self.watch:
                continue
            stats, values = {}, {}
            for name, module in self._modules:
                params = list(module.parameters())
                tensors = [p.grad for p in params if p.grad is not None] if kind == "gradients" else params
                if not tensors:
                    continue
                with torch.no_grad():
                    flat = torch.cat([t.detach().reshape(-1).float() for t in tensors])
                    stats[name] = statistics(flat, self._scalar_stats)
                if name in self._histogram_names:
                    values[name] = self._histogram_values(flat)
            self._log(trainer, kind, stats, values)

    # ------------------------------------------------------------------ non-finite guard

    def _check_finite(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        optimizer: torch.optim.Optimizer,
        loss: torch.Tensor | None,
    ) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]).float()
        checks = torch.stack([norm, loss.float().sum().to(norm.device) if loss is not None else torch.zeros_like(norm)])
        finite = bool(torch.isfinite(checks).all())  # the one device sync of an ordinary step
        # Every process takes the same decision: the losses differ between processes, and a step skipped
        # on some of them only would let their weights drift apart (one small all-reduce under DDP).
        if trainer.strategy.reduce_boolean_decision(finite, all=True):
            return
        step = trainer.global_step
        norm_value, loss_value = checks.tolist()
        if finite:
            module, message = None, f"Non-finite loss or gradient on another process at global step {step}."
        else:
            module, message = self._describe_nonfinite(pl_module, step, norm_value, loss_value)
        if not self.skip_nonfinite:
            raise NonFiniteGradientError(message, step, module)
        if not drop_nonfinite_step(trainer, params, message, self.skipped_steps + 1, "debug/skipped_steps"):
            message += " The parameters themselves are non-finite, so skipping steps cannot recover."
            raise NonFiniteGradientError(message, step, module)
        self.skipped_steps += 1

    def _describe_nonfinite(
        self, pl_module: pl.LightningModule, step: int, norm: float, loss: float
    ) -> tuple[str | None, str]:
        """Find the first parameter with a non-finite gradient; runs only once the fused check failed."""
        bad = [
            name
            for name, p in pl_module.named_parameters()
            if p.grad is not None and not bool(torch.isfinite(p.grad).all())
        ]
        module = bad[0].rpartition(".")[0] or type(pl_module).__name__ if bad else None
        if bad:
            message = (
                f"Non-finite gradient at global step {step}: first in module {module!r} (parameter {bad[0]!r}; "
                f"{len(bad)} parameters have non-finite gradients)."
            )
        elif not math.isfinite(norm):
            message = f"The total gradient norm overflowed at global step {step} although every gradient is finite."
        else:
            message = f"Non-finite loss at global step {step}; the gradients are finite."
        if not math.isfinite(loss):
            message += f" The loss is {loss:g}."
        if self._nonfinite_activation is not None and self._nonfinite_activation[0] == step:
            message += f" The first non-finite activation was in module {self._nonfinite_activation[1]!r}."
        return module, message
