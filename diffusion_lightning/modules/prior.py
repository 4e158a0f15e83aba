"""DreamBooth's prior preservation: class images of the base model, mixed into fine-tuning batches.

Fine-tuning on a few new examples makes a model forget what it drew before. DreamBooth's remedy
(Ruiz et al., 2023; diffusers' ``train_dreambooth.py --with_prior_preservation``) trains on the base
model's own images of what should be kept alongside the new examples, and adds their loss with the
weight ``prior_loss_weight``. :class:`PriorImages` is that set of class images: a folder in the
imagefolder layout (``metadata.jsonl`` with ``file_name`` and ``text``), topped up to
``num_images`` by the base model (the module before its first step) from ``prompts``, one PNG at a
time, so an interrupted generation resumes where it stopped. diffusers' script has no reusable
component for this (it lives inside its ``main``), hence this file.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info

from diffusion_lightning.utils.seeding import mix_seed

__all__ = ["PriorImages", "prepare_prior", "prior_training_step"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class PriorImages:
    """The class images of prior preservation.

    Args:
        folder: Where the images and their ``metadata.jsonl`` live (created when generating).
        prompts: Prompts the base model draws the missing images from, cycled; needed when
            ``num_images`` asks for more images than the folder holds.
        num_images: Top the folder up to this many images; ``None`` uses the folder as it is.
        seed: Seed of the generation (image ``i`` uses ``mix_seed(seed, i)``).
    """

    def __init__(self, folder: str, prompts: list[str] | None, num_images: int | None, seed: int = 0) -> None:
        if num_images is not None and num_images < 1:
            raise ValueError(f"num_prior_images={num_images!r} must be >= 1 (or null to use prior_data_dir as it is).")
        if prompts is not None and (not prompts or not all(isinstance(p, str) and p.strip() for p in prompts)):
            raise ValueError(f"prior_prompts={prompts!r:.120} must be a non-empty list of non-blank prompts.")
        self.folder, self.prompts, self.num_images, self.seed = Path(folder), prompts, num_images, seed
        self.images: torch.Tensor | None = None
        self.captions: list[str] = []
        self.keys: list[str] = []

    @property
    def metadata_file(self) -> Path:
        return self.folder / "metadata.jsonl"

    def records(self) -> list[dict[str, str]]:
        """The ``{file_name, text}`` entries of the folder whose image exists."""
        if not self.metadata_file.is_file():
            return []
        entries = []
        for number, line in enumerate(self.metadata_file.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as err:
                where = f"prior_data_dir: {str(self.metadata_file)!r}, line {number}"
                raise ValueError(f"{where} is not JSON ({err}).") from err
            if (
                not isinstance(entry, dict)
                or not isinstance(entry.get("file_name"), str)
                or not isinstance(entry.get("text"), str)
            ):
                raise ValueError(
                    f"prior_data_dir: {str(self.metadata_file)!r}, line {number}: expected an object with "
                    f"'file_name' and 'text' strings; got {line!r:.120}."
                )
            if (self.folder / entry["file_name"]).is_file():
                entries.append(entry)
        return entries

    def missing(self) -> int:
        """How many images generation has to add (0 with ``num_images=None``)."""
        return 0 if self.num_images is None else max(0, self.num_images - len(self.records()))

    def check(self) -> None:
        """Raise before training when the images can be neither found nor generated."""
        if self.missing() and not self.prompts:
            raise ValueError(
                f"prior_data_dir={str(self.folder)!r} holds {len(self.records())} of "
                f"num_prior_images={self.num_images} images and prior_prompts is unset; give prior_prompts for the "
                "base model to draw the rest."
            )
        if self.num_images is None and not self.records():
            found = sorted(p.name for p in self.folder.iterdir())[:5] if self.folder.is_dir() else None
            raise ValueError(
                f"prior_data_dir={str(self.folder)!r} holds no class image"
                f"{' (it does not exist)' if found is None else f' listed in a metadata.jsonl (found {found})'}; "
                "expected images with a metadata.jsonl of {'file_name', 'text'} lines, or set num_prior_images "
                "and prior_prompts to have the base model draw them."
            )

    @torch.no_grad()
    def generate(self, module: Any, batch_size: int) -> int:
        """Draw the missing images with ``module`` (its sampler, steps and guidance); return how many."""
        from diffusion_lightning.callbacks.sampling import sampling_mode
        from diffusion_lightning.pipelines.conditioning import Conditions, generate

        records = self.records()
        todo = self.missing()
        if not todo:
            return 0
        assert self.prompts is not None and self.num_images is not None
        self.folder.mkdir(parents=True, exist_ok=True)
        done = {r["file_name"] for r in records}
        start = len(records)
        rank_zero_info(f"prior preservation: the base model draws {todo} class image(s) into {str(self.folder)!r}")
        pipeline = module.build_pipeline()
        pipeline.set_progress_bar_config(disable=True)
        from PIL import Image

        with sampling_mode(module):
            for first in range(start, self.num_images, batch_size):
                indices = [i for i in range(first, min(first + batch_size, self.num_images))]
                prompts = tuple(self.prompts[i % len(self.prompts)] for i in indices)
                generators = [torch.Generator().manual_seed(mix_seed(self.seed, i)) for i in indices]
                images = generate(
                    pipeline,
                    Conditions("prompt", prompts, prompts),
                    num_inference_steps=module.num_inference_steps,
                    guidance_scale=module.guidance_scale,
                    generator=generators,
                    image_size=module.image_size,
                )
                lines = []
                for index, prompt, image in zip(indices, prompts, images):
                    name = f"{index:06d}.png"
                    while name in done:  # a name taken by a user's own image
                        name = f"{index:06d}-{len(done)}.png"
                    array = (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
                    tmp = self.folder / f".{name}.tmp"
                    Image.fromarray(array).save(tmp, format="PNG")
                    os.replace(tmp, self.folder / name)
                    done.add(name)
                    lines.append(json.dumps({"file_name": name, "text": prompt}) + "\n")
                with self.metadata_file.open("a", encoding="utf-8") as file:  # after the images: never a dangling line
                    file.writelines(lines)
                    file.flush()
                    os.fsync(file.fileno())
        return todo

    def load(self, resolution: int) -> None:
        """Read the images (RGB, ``resolution`` square, in ``[-1, 1]``), prompts and content keys into memory."""
        from PIL import Image

        records = self.records()
        if not records:
            self.check()
        tensors, self.keys = [], []
        for record in records:
            data = (self.folder / record["file_name"]).read_bytes()
            # keyed by content: a latent cache must not serve an old image's latents for a redrawn file
            self.keys.append(f"prior/{hashlib.sha1(data).hexdigest()}")
            with Image.open(io.BytesIO(data)) as image:
                image = image.convert("RGB").resize((resolution, resolution), Image.Resampling.BICUBIC)
                tensors.append(torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8))
        self.images = (
            torch.stack(tensors).view(len(records), resolution, resolution, 3).permute(0, 3, 1, 2).float() / 127.5 - 1
        )
        self.captions = [r["text"] for r in records]

    def __len__(self) -> int:
        return len(self.captions)

    def batch(self, size: int, generator: torch.Generator) -> dict[str, Any]:
        """``size`` class images drawn without replacement (with, when fewer): ``images``, ``captions``, ``keys``."""
        if self.images is None:
            raise RuntimeError("PriorImages.load() has not run.")
        n = len(self.captions)
        if size <= n:
            index = torch.randperm(n, generator=generator, device=generator.device)[:size].cpu()
        else:
            index = torch.randint(n, (size,), generator=generator, device=generator.device).cpu()
        return {
            "images": self.images[index],
            "captions": [self.captions[i] for i in index.tolist()],
            "keys": [self.keys[i] for i in index.tolist()],
        }


def prepare_prior(module: Any) -> None:
    """At the start of fitting: check the class images, draw the missing ones with the base model (rank 0), load them.

    Raises:
        ValueError: images are missing and the run resumes from a checkpoint: they would come from
            fine-tuned weights instead of the base model.
    """
    prior, trainer = module.prior, module.trainer
    prior.check()
    if prior.missing():
        resumed = trainer.ckpt_path
        if resumed or module.global_step > 0:
            raise ValueError(
                f"prior_data_dir={str(prior.folder)!r} lacks {prior.missing()} class image(s), but this run resumes "
                f"from {str(resumed)!r}: they must come from the base model, not from fine-tuned weights. Restore "
                "the folder, or draw them from the base model first."
            )
        if trainer.is_global_zero:
            data = getattr(trainer, "datamodule", None)
            prior.generate(module, getattr(data, "eval_batch_size", None) or 16)
    trainer.strategy.barrier("prior_images")
    prior.load(module.image_size)


def prior_training_step(module: Any, batch: Any, batch_idx: int) -> dict[str, Any]:
    """A training step on ``batch`` plus as many class images: instance mean + ``prior_loss_weight`` x prior mean."""
    generator = module.generator(module.current_epoch, batch_idx, module.global_rank)
    sample, condition = module.unpack_batch(batch, generator)
    prior_sample, prior_condition = module.unpack_batch(module.prior.batch(sample.shape[0], generator), generator)
    n, m = sample.shape[0], prior_sample.shape[0]
    # DreamBooth's sum of the two means, as one weighted mean over the joint batch
    weights = torch.cat([sample.new_full((n,), (n + m) / n), sample.new_full((m,), (n + m) / m)])
    weights[n:] *= module.prior_loss_weight
    condition = module.drop_condition(torch.cat([condition, prior_condition]), generator)
    out = module.diffusion_step(torch.cat([sample, prior_sample]), condition, generator, sample_weights=weights)
    module.log("train/loss", out.loss, prog_bar=True, sync_dist=True, batch_size=n + m)
    module.log("train/instance_loss", out.per_sample_loss[:n].mean(), sync_dist=True, batch_size=n)
    module.log("train/prior_loss", out.per_sample_loss[n:].mean(), sync_dist=True, batch_size=m)
    return {"loss": out.loss, "per_sample_loss": out.per_sample_loss, "timesteps": out.timesteps}
