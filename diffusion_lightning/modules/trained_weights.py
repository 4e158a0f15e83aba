"""Checkpoints that hold only the weights a run trains, for modules whose large parts stay frozen."""

from __future__ import annotations

from typing import Any

from lightning.pytorch import LightningModule
from typing_extensions import override

__all__ = ["TrainedWeightsCheckpoint"]

#: The checkpoint fields that hold module weights: Lightning's, and the raw ones weight averaging keeps beside them.
WEIGHT_FIELDS = ("state_dict", "current_model_state")


class TrainedWeightsCheckpoint(LightningModule):
    """Mixin: save only the trained parameters; on load, complete them with the frozen ones ``__init__`` rebuilt.

    A LoRA run of Stable Diffusion trains a few megabytes of adapters beside gigabytes of frozen VAE,
    text encoder and UNet weights, which its source (a pretrained folder or a seeded config) can
    rebuild. Lightning has no hook for partial checkpoints, hence this one: listed before the
    :class:`~diffusion_lightning.modules.base.DiffusionModule` in the bases, it trims
    ``state_dict`` and ``current_model_state`` to :meth:`trainable_keys` when saving and adds the
    module's own frozen weights back when loading (a checkpoint lacking a trained weight is a
    ``KeyError`` naming it).
    """

    def trainable_keys(self) -> set[str]:
        """State-dict keys of the parameters being trained: all that checkpoints hold."""
        return {name for name, param in self.named_parameters() if param.requires_grad}

    def complete_state(self, state: dict[str, Any], field: str = "state_dict") -> dict[str, Any]:
        """``state`` (trained weights) completed with this module's frozen ones; ``KeyError`` if a trained one lacks."""
        keep = self.trainable_keys()
        missing = sorted(keep - set(state))
        if missing:
            raise KeyError(
                f"the checkpoint's {field} lacks {len(missing)} trained weight(s) of this {type(self).__name__}, "
                f"e.g. {missing[:3]}."
            )
        return {**{k: v for k, v in self.state_dict().items() if k not in keep}, **state}

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        keep = self.trainable_keys()
        for field in WEIGHT_FIELDS:
            if field in checkpoint:
                checkpoint[field] = {k: v for k, v in checkpoint[field].items() if k in keep}

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        for field in WEIGHT_FIELDS:
            if field in checkpoint:
                checkpoint[field] = self.complete_state(checkpoint[field], field)
