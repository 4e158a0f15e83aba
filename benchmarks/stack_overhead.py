"""Wall time of ``fit`` with the whole callback stack against the same fit without callbacks.

    python benchmarks/stack_overhead.py [--epochs 2] [--rounds 1] [--every-n-epochs 2]

The demo model and data (configs/ddpm_mnist.yaml's network, batch 64, 62 steps per epoch), one
validation batch per epoch, TensorBoard logging to a temporary folder. The stack is
configs/callbacks/default.yaml's (EMA with raw validation, gradient/activation watcher every 50
steps, diffusion metrics, sample grid, early stopping, LR monitor, run summary) except that the
generation and grid passes run every ``--every-n-epochs`` epochs (default.yaml: 5), so a short
benchmark pays for them at least once. Runs are interleaved; the last line is
``stack_overhead_fraction=F`` (wall time with the stack / without - 1, median over rounds).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
from lightning.pytorch import Trainer
from lightning.pytorch import seed_everything as seed_all
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor
from lightning.pytorch.loggers import TensorBoardLogger

from diffusion_lightning import (
    EMA,
    ClassConditionedDDPM,
    GenerationMonitor,
    GradientActivationWatcher,
    MNISTDataModule,
    RunSummary,
    SampleGridLogger,
    TimestepLossLogger,
    WarmupCosineLR,
)

from _common import DEMO_NET, interleave, ratio_of_medians


def stack(every_n_epochs: int) -> list:
    return [
        EMA(decay=0.999, validate_raw=True),
        GradientActivationWatcher(module_types=["ResnetBlock2D"], stats=["mean", "std", "norm", "abs_mean", "hist"]),
        TimestepLossLogger(num_buckets=10),
        GenerationMonitor(every_n_epochs=every_n_epochs, num_samples=10),
        SampleGridLogger(every_n_epochs=every_n_epochs, num_per_class=4),
        EarlyStopping(monitor="val/loss", mode="min", patience=5),
        LearningRateMonitor(logging_interval="step"),
        RunSummary(),
    ]


def fit_seconds(args: argparse.Namespace, with_stack: bool) -> float:
    seed_all(0, verbose=False)
    model = ClassConditionedDDPM(
        net=DEMO_NET, prediction_type="v_prediction", beta_schedule="squaredcos_cap_v2", snr_gamma=5.0,
        learning_rate=3e-3, lr_scheduler=lambda o: WarmupCosineLR(o, warmup_steps=100),
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as root:
        trainer = Trainer(
            accelerator="auto", devices=1, max_epochs=args.epochs, limit_val_batches=1, default_root_dir=root,
            logger=TensorBoardLogger(root), enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, num_sanity_val_steps=0, gradient_clip_val=1.0,
            callbacks=stack(args.every_n_epochs) if with_stack else [],
        )  # fmt: skip
        data = MNISTDataModule(batch_size=64, eval_batch_size=250)
        start = time.perf_counter()
        trainer.fit(model, data)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--every-n-epochs", type=int, default=2, help="generation and grid interval")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    results = interleave(
        {"stack": lambda: fit_seconds(args, True), "none": lambda: fit_seconds(args, False)}, args.rounds
    )
    for name, seconds in results.items():
        print(f"{name}: fit seconds per round {[round(s, 1) for s in seconds]}")
    print(f"stack_overhead_fraction={ratio_of_medians(results, 'stack', 'none') - 1:.3f}")


if __name__ == "__main__":
    main()
