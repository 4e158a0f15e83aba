"""Throughput of ``Trainer.fit`` with ``ClassConditionedDDPM`` against a plain PyTorch loop.

    python benchmarks/train_overhead.py [--steps 200] [--block 5] [--batch-size 64] [--compile]

Both train the demo's UNet on the same batches of embedded digits with the same objective
(v-prediction, min-SNR-5), optimizer (AdamW, no decay on biases/norms), gradient clipping and
per-step LR schedule. They run in one process, in alternating blocks of ``--block`` steps: after
every block of the fit, a block of the plain loop (``_common.PairedBlocks``), ``--steps`` timed steps
on each side after ``--warmup``. The last line is ``lightning_vs_raw_throughput=R`` (steps/s, ratio of
means), after the spread of the per-block ratios.
"""

from __future__ import annotations

import argparse
import os

import torch
from lightning.pytorch import Trainer
from lightning.pytorch import seed_everything as seed_all

from diffusion_lightning import ClassConditionedDDPM, MNISTDataModule, WarmupCosineLR
from diffusion_lightning.losses import diffusion_loss, min_snr_weights, snr, training_target
from diffusion_lightning.nets import build_unet
from diffusion_lightning.schedulers import training_scheduler

from _common import DEMO_NET, PairedBlocks, endless, paired_ratio

MODEL_ARGS = dict(
    prediction_type="v_prediction", beta_schedule="squaredcos_cap_v2", snr_gamma=5.0, learning_rate=3e-3, p_uncond=0.1
)


class RawLoop:
    """The plain PyTorch loop, one optimizer step per call."""

    def __init__(self, args: argparse.Namespace, total_steps: int) -> None:
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.unet = build_unet(DEMO_NET, sample_size=28, in_channels=1, num_classes=10).to(self.device).train()
        if args.compile:
            self.unet.compile()
        self.scheduler = training_scheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
        self.scheduler.alphas_cumprod = self.scheduler.alphas_cumprod.to(self.device)
        decay = [p for p in self.unet.parameters() if p.ndim > 1]
        no_decay = [p for p in self.unet.parameters() if p.ndim <= 1]
        self.optimizer = torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=3e-3)
        self.lr_schedule = WarmupCosineLR(self.optimizer, warmup_steps=10, total_steps=total_steps)
        data = MNISTDataModule(batch_size=args.batch_size)
        data.setup("fit")
        self.batches = endless(data.train_dataloader())
        self.generator = torch.Generator(device=self.device)
        self.step_index = 0

    def __call__(self) -> None:
        batch = next(self.batches)
        images, labels = batch["images"].to(self.device), batch["labels"].to(self.device)
        self.generator.manual_seed(self.step_index)
        self.step_index += 1
        drop = torch.rand(labels.shape, generator=self.generator, device=self.device) < 0.1
        labels = torch.where(drop, torch.full_like(labels, 10), labels)
        noise = torch.randn(images.shape, generator=self.generator, device=self.device)
        t = torch.randint(0, 1000, (images.shape[0],), generator=self.generator, device=self.device)
        noisy = self.scheduler.add_noise(images, noise, t)
        prediction = self.unet(noisy, t, class_labels=labels).sample
        target = training_target(self.scheduler, images, noise, t, "v_prediction")
        weights = min_snr_weights(snr(self.scheduler, t), 5.0, "v_prediction")
        loss, _ = diffusion_loss(prediction, target, weights=weights)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.unet.parameters(), 1.0)
        self.optimizer.step()
        self.lr_schedule.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200, help="timed optimizer steps on each side")
    parser.add_argument("--block", type=int, default=5, help="steps per block")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps on each side first")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet on both sides")
    args = parser.parse_args()
    if args.block < 1 or args.steps < 2 * args.block:
        parser.error(f"--block {args.block} and --steps {args.steps}: need --block >= 1 and --steps >= 2 x --block")
    torch.set_num_threads(os.cpu_count() or 1)
    total = args.warmup + args.steps
    seed_all(0, verbose=False)
    paired = PairedBlocks(RawLoop(args, total), args.block, args.warmup)
    model = ClassConditionedDDPM(
        net=DEMO_NET, lr_scheduler=lambda o: WarmupCosineLR(o, warmup_steps=10), compile=args.compile, **MODEL_ARGS
    )
    trainer = Trainer(
        accelerator="auto", devices=1, max_steps=total, limit_val_batches=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        gradient_clip_val=1.0, callbacks=[paired],
    )  # fmt: skip
    trainer.fit(model, MNISTDataModule(batch_size=args.batch_size))
    paired_ratio(paired, "lightning_vs_raw_throughput")


if __name__ == "__main__":
    main()
