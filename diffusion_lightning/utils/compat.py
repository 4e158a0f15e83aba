"""The package's only door to private APIs of Lightning, torchmetrics, Optuna and optuna-integration.

Each function below reaches one private (underscore) name or an undocumented internal structure
that has no public equivalent; ``tests/test_compat.py`` checks every one of them against the
installed versions, so an upgrade that moves one fails there, by name, instead of somewhere deep
in a run. Imports are local: Optuna and optuna-integration are optional dependencies, and callers
that never touch them do not import them.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    import lightning.pytorch as pl
    import optuna
    import torch

__all__ = [
    "WEIGHT_AVERAGING_INTERNALS",
    "PruningKeys",
    "add_prefix",
    "batches_processed_in_epoch",
    "clip_score_update",
    "convert_params",
    "flatten_dict",
    "forget_step_values",
    "inception_features_and_logits",
    "pruning_keys",
    "pruning_trial",
    "rng_states",
    "sanitize_callable_params",
    "set_rng_states",
    "should_update_logs",
    "study_storage",
    "trial_id",
]


# ---------------------------------------------------------------------- Lightning: Trainer internals


def should_update_logs(trainer: pl.Trainer) -> bool:
    """Whether Lightning writes the step metrics to the loggers at the current step.

    The same decision as Lightning's logger connector (``log_every_n_steps``, ``should_stop``; what
    ``LearningRateMonitor`` asks too), plus what its step-metric update adds while training: never
    in the middle of a gradient accumulation, always with ``fast_dev_run``. Valid from
    ``on_train_batch_start`` to ``on_train_batch_end`` (and in the evaluation loops' batch hooks).
    """
    loop = trainer.fit_loop
    if trainer.training and trainer.lightning_module.automatic_optimization and loop._should_accumulate():
        return False
    return bool(trainer._logger_connector.should_update_logs or trainer.fast_dev_run)


def forget_step_values(trainer: pl.Trainer, names: set[str]) -> None:
    """Drop the step values logged under ``names`` at an earlier step from the running loop's results.

    Lightning keeps a step value logged in ``on_train_batch_end`` until the epoch ends and sends it
    to the loggers again at every later logging step where the same name is not logged anew; a
    metric that has nothing to say at this step (an empty timestep bucket) must be left out, not
    repeated. Reaches the Trainer's ``_results`` (a ``_ResultCollection``).
    """
    results = trainer._results if names else None
    for result in (results or {}).values():
        if result.meta.name in names:
            result.reset()  # marked reset: left out of the logged metrics until logged again


def batches_processed_in_epoch(trainer: pl.Trainer) -> int:
    """Training batches of the current epoch this process has run ``training_step`` on.

    From ``on_train_batch_end`` on (and so in a checkpoint written there) it counts the batch just
    run; in ``on_train_batch_start`` it does not yet. A resumed run continues the count.
    """
    return int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)


#: What :class:`~diffusion_lightning.callbacks.EMA` uses of its base class ``WeightAveraging`` beyond the
#: public hooks: the averaged copy, its settings, the step of the last update and the swap of weights.
#: A subclass reaches them as its own attributes, so they are listed (and checked by the tests) here.
WEIGHT_AVERAGING_INTERNALS: tuple[str, ...] = (
    "_average_model",
    "_device",
    "_kwargs",
    "_latest_update_step",
    "_use_buffers",
    "_swap_models",
)


# ---------------------------------------------------------------------- Lightning: fabric utilities


def rng_states(include_cuda: bool = True) -> dict[str, Any]:
    """Lightning's collection of the global RNG states (torch, CUDA, numpy, Python)."""
    from lightning.fabric.utilities.seed import _collect_rng_states

    return _collect_rng_states(include_cuda=include_cuda)


def set_rng_states(states: dict[str, Any]) -> None:
    """Set the global RNG states from the form :func:`rng_states` returns."""
    from lightning.fabric.utilities.seed import _set_rng_states

    _set_rng_states(states)


def convert_params(params: Any) -> dict[str, Any]:
    """Hyperparameters (a dict, an ``argparse.Namespace`` or ``None``) as a dict, as Lightning's loggers take them."""
    from lightning.fabric.utilities.logger import _convert_params

    return _convert_params(params)


def sanitize_callable_params(params: dict[str, Any]) -> dict[str, Any]:
    """Callables among the values replaced by their names (or their results), as Lightning's loggers do."""
    from lightning.fabric.utilities.logger import _sanitize_callable_params

    return _sanitize_callable_params(params)


def flatten_dict(params: MutableMapping[Any, Any], delimiter: str = "/") -> dict[str, Any]:
    """Nested dicts flattened to ``a/b`` keys, as Lightning's loggers flatten hyperparameters."""
    from lightning.fabric.utilities.logger import _flatten_dict

    return _flatten_dict(params, delimiter=delimiter)


def add_prefix(metrics: Mapping[str, Any], prefix: str, separator: str) -> Mapping[str, Any]:
    """Metric names prefixed with ``prefix`` and ``separator`` (unchanged when ``prefix`` is empty)."""
    from lightning.fabric.utilities.logger import _add_prefix

    return _add_prefix(metrics, prefix, separator)


# ---------------------------------------------------------------------- torchmetrics


def clip_score_update(images: torch.Tensor, prompts: list[str], model: Any, processor: Any) -> tuple[torch.Tensor, int]:
    """torchmetrics' per-sample CLIP scores of ``images`` (uint8) against ``prompts``, and their count."""
    from torchmetrics.functional.multimodal.clip_score import _clip_score_update

    return _clip_score_update(images, prompts, model, processor)


def inception_features_and_logits(network: Any, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Pool features and unbiased logits of uint8 ``pixels`` from torchmetrics' ``NoTrainInceptionV3``.

    The network's public ``forward`` returns one of them, chosen at construction; this runs the
    torch-fidelity forward that computes both in one pass.
    """
    return network._torch_fidelity_forward(pixels)


# ---------------------------------------------------------------------- Optuna and optuna-integration


class PruningKeys(NamedTuple):
    """The trial system-attribute keys optuna-integration's pruning callback uses under DDP."""

    epoch: str
    intermediate_value: str
    pruned: str


def pruning_keys() -> PruningKeys:
    """The keys :meth:`PyTorchLightningPruningCallback.check_pruned` reads after a DDP ``fit``."""
    from optuna_integration.pytorch_lightning.pytorch_lightning import _EPOCH_KEY, _INTERMEDIATE_VALUE, _PRUNED_KEY

    return PruningKeys(_EPOCH_KEY, _INTERMEDIATE_VALUE, _PRUNED_KEY)


def pruning_trial(callback: Any) -> optuna.trial.Trial:
    """The trial an optuna-integration ``PyTorchLightningPruningCallback`` reports to."""
    return callback._trial


def trial_id(trial: optuna.trial.Trial | optuna.trial.FrozenTrial) -> int:
    """The storage id of a trial (not its ``number``): what storage methods take."""
    return trial._trial_id


def study_storage(study: optuna.Study) -> optuna.storages.BaseStorage:
    """The storage a study reads and writes (with its cache, when the study has one)."""
    return study._storage
