"""Train a diffusers :class:`~diffusers.AutoencoderKL`: the VAE whose latents a latent diffusion model denoises.

The objective is a reconstruction loss (L1 or L2) plus ``kl_weight`` times the KL divergence of the
posterior to ``N(0, I)``, plus optionally ``lpips_weight`` times LPIPS. After training, the latents
are rescaled to unit variance as Stable Diffusion does: the module measures the standard deviation
of posterior samples over training data and records ``scaling_factor = 1 / std`` in the VAE config,
in every checkpoint (a buffer) and in the exported folder.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import AutoencoderKL
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch.optim import AdamW
from torch.utils.data import DataLoader
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure
from typing_extensions import override

from diffusion_lightning.losses import check_choice
from diffusion_lightning.optim import optimizer_config
from diffusion_lightning.utils.io import atomic_directory
from diffusion_lightning.utils.model_card import ModelCardOptions, write_model_card
from diffusion_lightning.utils.seeding import mix_seed

__all__ = ["AutoencoderKLModule", "RECONSTRUCTION_LOSSES", "default_vae_config"]

#: Reconstruction losses.
RECONSTRUCTION_LOSSES = ("l1", "l2")
_SCALE_KEY = 0x5CA1E  # seed key of the latent samples that measure the scaling factor


def default_vae_config(in_channels: int, image_size: int) -> dict[str, Any]:
    """The arguments of a small :class:`AutoencoderKL` for digits: two levels, 4 latent channels."""
    return {
        "in_channels": in_channels,
        "out_channels": in_channels,
        "block_out_channels": [32, 64],
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 8,
        "sample_size": image_size,
    }


def _vae_arguments() -> set[str]:
    return {name for name in inspect.signature(AutoencoderKL.__init__).parameters if name != "self"}


def _build_vae(vae: dict[str, Any] | None, in_channels: int, image_size: int) -> AutoencoderKL:
    config = default_vae_config(in_channels, image_size)
    given = dict(vae or {})
    unknown = sorted(set(given) - _vae_arguments())
    if unknown:
        raise ValueError(
            f"vae has unknown keys {unknown}; accepted: the AutoencoderKL arguments {sorted(_vae_arguments())}."
        )
    for key in ("in_channels", "out_channels"):
        if key in given and given[key] != in_channels:
            raise ValueError(
                f"vae.{key}={given[key]!r} differs from in_channels={in_channels!r} (the data's channels)."
            )
    config.update(given)
    levels = len(config["block_out_channels"])
    if levels < 1 or min(config["block_out_channels"]) < 1:
        raise ValueError(f"vae.block_out_channels={config['block_out_channels']!r} must be positive widths.")
    config.setdefault("down_block_types", ["DownEncoderBlock2D"] * levels)
    config.setdefault("up_block_types", ["UpDecoderBlock2D"] * levels)
    groups = config["norm_num_groups"]
    if groups < 1 or any(width % groups for width in config["block_out_channels"]):
        raise ValueError(
            f"vae.norm_num_groups={groups!r} must divide every width of block_out_channels="
            f"{config['block_out_channels']!r}."
        )
    if image_size % 2 ** (levels - 1):
        raise ValueError(
            f"image_size={image_size!r} must be divisible by {2 ** (levels - 1)} (the VAE downsamples "
            f"{levels - 1} times); pad the data (pad_to) or use fewer block_out_channels."
        )
    return AutoencoderKL(**config)


class AutoencoderKLModule(LightningModule):
    """Train a diffusers ``AutoencoderKL`` on batches of ``images`` in ``[-1, 1]``.

    Training samples the posterior with a generator seeded by ``(seed, epoch, batch, rank)``, so a
    resumed run draws what the uninterrupted run would have; validation uses the posterior mode
    (deterministic). Logged: ``train/loss``, ``train/rec_loss``, ``train/kl`` (and ``train/lpips``),
    ``val/loss``, ``val/rec_loss``, ``val/kl``, ``val/psnr`` and ``val/ssim`` (images mapped to
    ``[0, 1]``, data range 1). During fitting, each validation first measures the latent scaling
    factor (:meth:`measure_scaling_factor`) on the first ``scale_batches`` batches of the training
    set in order, so every checkpoint holds the factor of its weights.

    Args:
        vae: ``AutoencoderKL`` arguments overriding :func:`default_vae_config` (``down_block_types``
            and ``up_block_types`` default to plain encoder/decoder blocks, one per width).
        pretrained: A local folder or hub id of an ``AutoencoderKL`` to start from, instead of ``vae``.
        pretrained_subfolder: Its subfolder (``vae`` in a Stable Diffusion repository).
        in_channels: Image channels (linked from the data module).
        image_size: Image height and width (linked from the data module).
        num_classes: Linked from the data module; unused (the autoencoder is unconditional).
        class_names: Linked from the data module; unused.
        loss_type: Reconstruction loss, ``l1`` or ``l2``.
        kl_weight: Weight (>= 0) of the KL divergence (summed over the latent, mean over samples).
        lpips_weight: Weight (>= 0) of the LPIPS perceptual loss; 0 disables it.
        lpips_weights: A torchvision AlexNet state dict for the LPIPS backbone (see
            :class:`~diffusion_lightning.metrics.lpips.LPIPSDiversity`); ``None`` looks in the torch hub cache.
        learning_rate: Learning rate of every parameter group (> 0).
        optimizer: Optimizer factory taking parameter groups.
        lr_scheduler: LR scheduler factory, stepped every optimizer step; ``None`` keeps the LR constant.
        seed: Seed of the posterior samples.
        scale_batches: Training batches measured for the scaling factor at each validation while
            fitting (>= 1); 0 disables the measurement.
    """

    def __init__(
        self,
        vae: dict[str, Any] | None = None,
        pretrained: str | None = None,
        pretrained_subfolder: str | None = None,
        in_channels: int = 1,
        image_size: int = 28,
        num_classes: int | None = None,
        class_names: list[str] | None = None,
        loss_type: Literal["l1", "l2"] = "l1",
        kl_weight: float = 1e-6,
        lpips_weight: float = 0.0,
        lpips_weights: str | None = None,
        learning_rate: float = 1e-3,
        optimizer: OptimizerCallable = AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        seed: int = 0,
        scale_batches: int = 4,
    ) -> None:
        super().__init__()
        check_choice("loss_type", loss_type, RECONSTRUCTION_LOSSES)
        if in_channels < 1:
            raise ValueError(f"in_channels={in_channels!r} must be >= 1.")
        if image_size < 1:
            raise ValueError(f"image_size={image_size!r} must be >= 1.")
        for name, value in (("kl_weight", kl_weight), ("lpips_weight", lpips_weight)):
            if not value >= 0:
                raise ValueError(f"{name}={value!r} must be >= 0.")
        if not learning_rate > 0:
            raise ValueError(f"learning_rate={learning_rate!r} must be > 0.")
        if scale_batches < 0:
            raise ValueError(f"scale_batches={scale_batches!r} must be >= 0 (0 disables the measurement).")
        if vae is not None and pretrained is not None:
            raise ValueError("give vae (a new AutoencoderKL) or pretrained (a folder or hub id), not both.")
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        if pretrained is not None:
            self.vae = AutoencoderKL.from_pretrained(pretrained, subfolder=pretrained_subfolder)
            if self.vae.config.in_channels != in_channels:
                raise ValueError(
                    f"pretrained={pretrained!r} reads {self.vae.config.in_channels} channels, but "
                    f"in_channels={in_channels!r}."
                )
        else:
            self.vae = _build_vae(vae, in_channels, image_size)
        self.lpips = None
        if lpips_weight > 0:
            from diffusion_lightning.metrics.lpips import LPIPSDiversity

            self.lpips = LPIPSDiversity(net="alex", backbone_weights=lpips_weights, min_size=64)
        self.in_channels = in_channels
        self.image_size = image_size
        self.num_classes = num_classes
        self.class_names = class_names
        self.loss_type = loss_type
        self.kl_weight = kl_weight
        self.lpips_weight = lpips_weight
        self.learning_rate = learning_rate
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.seed = seed
        self.scale_batches = scale_batches
        initial = float(getattr(self.vae.config, "scaling_factor", 1.0) or 1.0)
        self.register_buffer("latent_scaling_factor", torch.tensor(initial, dtype=torch.float64))
        self.val_psnr = PeakSignalNoiseRatio(data_range=1.0)
        self.val_ssim = StructuralSimilarityIndexMeasure(data_range=1.0)

    # ------------------------------------------------------------------ the model

    @property
    def denoiser(self) -> AutoencoderKL:
        """The trained network (what EMA averages with its default scope, and what export saves)."""
        return self.vae

    @property
    def scaling_factor(self) -> float:
        """``1 / std`` of the latents as last measured (1 before any measurement)."""
        return float(self.latent_scaling_factor)

    def generator(self, *keys: int) -> torch.Generator:
        """A generator on this module's device seeded by ``(seed, *keys)``."""
        return torch.Generator(device=self.device).manual_seed(mix_seed(self.seed, *keys))

    @staticmethod
    def images_of(batch: Any) -> torch.Tensor:
        """The ``images`` of a batch dict (or the batch itself when it is a tensor)."""
        if isinstance(batch, dict):
            if "images" not in batch:
                raise ValueError(f"batch has keys {sorted(batch)}; AutoencoderKLModule needs 'images'.")
            return batch["images"]
        if isinstance(batch, torch.Tensor):
            return batch
        raise ValueError(f"batch is a {type(batch).__name__}; expected a dict with 'images' or a tensor.")

    @override
    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, Any]:
        """Reconstruct ``images``: a posterior sample (with ``generator``) or its mode, decoded; and the posterior."""
        posterior = self.vae.encode(images).latent_dist
        latents = posterior.sample(generator) if generator is not None else posterior.mode()
        return self.vae.decode(latents).sample, posterior

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """Deterministic reconstructions (posterior mode) of images in ``[-1, 1]``."""
        return self(images)[0]

    def losses(self, images: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """``loss``, ``rec_loss``, ``kl`` (mean per sample), ``lpips`` when used, and ``reconstructions``."""
        reconstructions, posterior = self(images, generator)
        error = reconstructions.float() - images.float()
        rec_loss = error.abs().mean() if self.loss_type == "l1" else error.square().mean()
        kl = posterior.kl().mean()
        loss = rec_loss + self.kl_weight * kl
        out = {"rec_loss": rec_loss, "kl": kl, "reconstructions": reconstructions}
        if self.lpips is not None:
            # _distance keeps the graph (distance() is for metrics, without gradients)
            perceptual = (
                self.lpips._distance((reconstructions.float() + 1) / 2, (images.float() + 1) / 2).to(loss.device).mean()
            )
            loss = loss + self.lpips_weight * perceptual
            out["lpips"] = perceptual
        out["loss"] = loss
        return out

    # ------------------------------------------------------------------ steps

    @override
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images = self.images_of(batch)
        out = self.losses(images, self.generator(self.current_epoch, batch_idx, self.global_rank))
        size = images.shape[0]
        self.log("train/loss", out["loss"], prog_bar=True, sync_dist=True, batch_size=size)
        for name in ("rec_loss", "kl", "lpips"):
            if name in out:
                self.log(f"train/{name}", out[name], sync_dist=True, batch_size=size)
        return out["loss"]

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images = self.images_of(batch)
        out = self.losses(images)
        size = images.shape[0]
        self.log("val/loss", out["loss"], prog_bar=True, sync_dist=True, batch_size=size)
        for name in ("rec_loss", "kl", "lpips"):
            if name in out:
                self.log(f"val/{name}", out[name], sync_dist=True, batch_size=size)
        original = ((images.float() + 1) / 2).clamp(0, 1)
        reconstructed = ((out["reconstructions"].float() + 1) / 2).clamp(0, 1)
        self.val_psnr(reconstructed, original)
        self.val_ssim(reconstructed, original)
        self.log("val/psnr", self.val_psnr, prog_bar=True, batch_size=size)
        self.log("val/ssim", self.val_ssim, batch_size=size)
        return out["loss"]

    # ------------------------------------------------------------------ latent scale

    @torch.no_grad()
    def measure_scaling_factor(self, dataloader: Iterable[Any], max_batches: int | None = None) -> float:
        """Set ``scaling_factor = 1 / std`` of posterior samples over ``dataloader`` and return it.

        Batch ``i`` is sampled with a generator seeded by ``(seed, 0x5CA1E, i)``; the std is over
        every latent value of the first ``max_batches`` batches (all when ``None``). The factor goes
        to the ``latent_scaling_factor`` buffer (saved in checkpoints) and to ``vae.config``.
        """
        if max_batches is not None and max_batches < 1:
            raise ValueError(f"max_batches={max_batches!r} must be >= 1, or None for every batch.")
        total, total_sq, count = 0.0, 0.0, 0
        for index, batch in enumerate(dataloader):
            if max_batches is not None and index >= max_batches:
                break
            images = self.images_of(batch).to(self.device, self.vae.dtype)
            latents = self.vae.encode(images).latent_dist.sample(self.generator(_SCALE_KEY, index)).double()
            total += latents.sum().item()
            total_sq += latents.square().sum().item()
            count += latents.numel()
        if count < 2:
            raise ValueError("measure_scaling_factor needs at least two latent values; the dataloader gave none.")
        variance = (total_sq - total * total / count) / (count - 1)
        factor = 1.0 / max(variance, 1e-24) ** 0.5
        self.set_scaling_factor(factor)
        return factor

    def set_scaling_factor(self, factor: float) -> None:
        """Record ``factor`` in the buffer and the VAE config."""
        self.latent_scaling_factor.fill_(float(factor))
        self.vae.register_to_config(scaling_factor=float(factor))

    def scale_loader(self) -> Iterable[Any] | None:
        """The training data in order (no shuffling) for the measurement while fitting."""
        loader = self.trainer.train_dataloader
        if isinstance(loader, DataLoader):
            return DataLoader(loader.dataset, batch_size=loader.batch_size, shuffle=False, collate_fn=loader.collate_fn)
        return loader

    @override
    def on_validation_epoch_start(self) -> None:
        trainer = self.trainer
        if self.scale_batches and trainer.state.fn == "fit" and not trainer.sanity_checking:
            loader = self.scale_loader()
            if loader is not None:
                self.measure_scaling_factor(loader, self.scale_batches)

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        factor = checkpoint.get("state_dict", {}).get("latent_scaling_factor")
        if factor is not None:
            self.vae.register_to_config(scaling_factor=float(factor))

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        cls = type(self)
        checkpoint["diffusion_lightning"] = {"module_class": f"{cls.__module__}.{cls.__qualname__}"}

    # ------------------------------------------------------------------ optimization and export

    @override
    def configure_optimizers(self) -> Any:
        decay, no_decay = [], []
        for param in self.vae.parameters():
            if param.requires_grad:
                (no_decay if param.ndim <= 1 else decay).append(param)
        groups = [{"params": decay, "lr": self.learning_rate}]
        if no_decay:
            groups.append({"params": no_decay, "lr": self.learning_rate, "weight_decay": 0.0})
        return optimizer_config(self.optimizer_factory(groups), self.lr_scheduler_factory, self.trainer)

    def export_pipeline(
        self, path: str | os.PathLike[str], scheduler: str | None = None, card: ModelCardOptions | None = None
    ) -> Path:
        """Write the VAE as an ``AutoencoderKL`` folder (with ``scaling_factor``) and its model card, atomically.

        Args:
            path: The folder; it appears only once complete.
            scheduler: Must be ``None``: an autoencoder has no sampling scheduler.
            card: License and run of the card ``README.md`` (see :mod:`diffusion_lightning.utils.model_card`).

        Raises:
            ValueError: When ``scheduler`` is given.
        """
        if scheduler is not None:
            raise ValueError(f"scheduler={scheduler!r} does not apply to an autoencoder; accepted: None.")
        self.vae.register_to_config(scaling_factor=self.scaling_factor)
        with atomic_directory(path) as tmp:
            self.vae.save_pretrained(tmp, safe_serialization=True)
            write_model_card(tmp, self, path, "vae", options=card)
        return Path(path)
