"""Shared fixtures: tiny networks built from init dicts, quiet CPU trainers, no downloads."""

from __future__ import annotations

import os
from pathlib import Path

# Before anything imports huggingface_hub, which reads these once: nothing may reach the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # one thread per worker: the processes the tests start (CLI runs, notebook kernels, DDP ranks) too
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch import Callback, Trainer  # noqa: E402

from diffusion_lightning import ClassConditionedDDPM, ClassConditionedPipeline, UNetConfig, build_unet  # noqa: E402
from diffusion_lightning.schedulers import make_scheduler, training_scheduler  # noqa: E402

torch.set_num_threads(1)  # tiny models: one thread is faster than two competing for the cores

REPO = Path(__file__).resolve().parents[1]

TINY_NET = dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4)


def tiny_config(**overrides) -> UNetConfig:
    return UNetConfig(**{**TINY_NET, **overrides})


def tiny_ddpm(**kwargs) -> ClassConditionedDDPM:
    kwargs.setdefault("net", tiny_config())
    kwargs.setdefault("image_size", 8)
    kwargs.setdefault("num_classes", 3)
    return ClassConditionedDDPM(**kwargs)


def quiet_trainer(tmp_path: Path, **kwargs) -> Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    return Trainer(**{**defaults, **kwargs})


@pytest.fixture
def tiny_pipeline() -> ClassConditionedPipeline:
    torch.manual_seed(0)
    unet = build_unet(tiny_config(), sample_size=8, in_channels=1, num_classes=3)
    scheduler = make_scheduler("ddim", training_scheduler(num_train_timesteps=100))
    pipe = ClassConditionedPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class RandomDigits(torch.utils.data.Dataset):
    """A deterministic stand-in for a labelled image set: ``n`` random 8x8 images in [-1, 1]."""

    def __init__(self, n: int = 32, size: int = 8, classes: int = 3, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.images = torch.rand(n, 1, size, size, generator=g) * 2 - 1
        self.labels = torch.randint(0, classes, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"images": self.images[i], "labels": self.labels[i]}


class Crash(RuntimeError):
    """What :class:`CrashAt` raises: a stand-in for a killed run."""


class CrashAt(Callback):
    """Raise :class:`Crash` after the optimizer step ``step`` (before that step's checkpoint)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            raise Crash(f"simulated crash at step {self.step}")


@pytest.fixture(scope="session")
def postgres_url():
    """A SQLAlchemy URL of a private PostgreSQL server on loopback (skips, with the reason, where none can start)."""
    from tests.postgres import postgres_server, unavailable_reason

    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    with postgres_server() as url:
        yield url
