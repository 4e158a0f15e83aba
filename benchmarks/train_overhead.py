"""Throughput of ``Trainer.fit`` with ``ClassConditionedDDPM`` against a plain PyTorch loop.

    python benchmarks/train_overhead.py [--steps 30] [--rounds 5] [--batch-size 64] [--compile]

Both train the demo's UNet on the same batches of embedded digits with the same objective
(v-prediction, min-SNR-5), optimizer (AdamW, no decay on biases/norms), gradient clipping and
per-step LR schedule. Runs are interleaved; each reports steady-state steps per second after
``--warmup`` steps. The last line is ``lightning_vs_raw_throughput=R`` (median over rounds).
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from lightning.pytorch import Trainer
from lightning.pytorch import seed_everything as seed_all

from diffusion_lightning import ClassConditionedDDPM, MNISTDataModule, WarmupCosineLR
from diffusion_lightning.losses import diffusion_loss, min_snr_weights, snr, training_target
from diffusion_lightning.nets import build_unet
from diffusion_lightning.schedulers import training_scheduler

from _common import DEMO_NET, StepClock, interleave, ratio_of_medians, ratio_spread, steady_rate

MODEL_ARGS = dict(
    prediction_type="v_prediction", beta_schedule="squaredcos_cap_v2", snr_gamma=5.0, learning_rate=3e-3, p_uncond=0.1
)


def lightning_run(args: argparse.Namespace) -> float:
    seed_all(0, verbose=False)
    model = ClassConditionedDDPM(
        net=DEMO_NET, lr_scheduler=lambda o: WarmupCosineLR(o, warmup_steps=10), compile=args.compile, **MODEL_ARGS
    )
    clock = StepClock()
    trainer = Trainer(
        accelerator="auto", devices=1, max_steps=args.steps, limit_val_batches=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        gradient_clip_val=1.0, callbacks=[clock],
    )  # fmt: skip
    trainer.fit(model, MNISTDataModule(batch_size=args.batch_size))
    return steady_rate(clock.times, args.warmup)


def raw_run(args: argparse.Namespace) -> float:
    seed_all(0, verbose=False)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    unet = build_unet(DEMO_NET, sample_size=28, in_channels=1, num_classes=10).to(device).train()
    if args.compile:
        unet.compile()
    scheduler = training_scheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.to(device)
    decay = [p for p in unet.parameters() if p.ndim > 1]
    no_decay = [p for p in unet.parameters() if p.ndim <= 1]
    optimizer = torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=3e-3)
    lr_schedule = WarmupCosineLR(optimizer, warmup_steps=10, total_steps=args.steps)
    data = MNISTDataModule(batch_size=args.batch_size)
    data.setup("fit")
    generator = torch.Generator(device=device)
    times = []
    step = 0
    while step < args.steps:
        for batch in data.train_dataloader():
            images, labels = batch["images"].to(device), batch["labels"].to(device)
            generator.manual_seed(step)
            drop = torch.rand(labels.shape, generator=generator, device=device) < 0.1
            labels = torch.where(drop, torch.full_like(labels, 10), labels)
            noise = torch.randn(images.shape, generator=generator, device=device)
            t = torch.randint(0, 1000, (images.shape[0],), generator=generator, device=device)
            noisy = scheduler.add_noise(images, noise, t)
            prediction = unet(noisy, t, class_labels=labels).sample
            target = training_target(scheduler, images, noise, t, "v_prediction")
            weights = min_snr_weights(snr(scheduler, t), 5.0, "v_prediction")
            loss, _ = diffusion_loss(prediction, target, weights=weights)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            optimizer.step()
            lr_schedule.step()
            times.append(time.perf_counter())
            step += 1
            if step == args.steps:
                break
    return steady_rate(times, args.warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="steps excluded from the timing")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of each run")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet in both runs")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    results = interleave({"lightning": lambda: lightning_run(args), "raw": lambda: raw_run(args)}, args.rounds)
    for name, rates in results.items():
        print(f"{name}: steps/s per round {[round(r, 3) for r in rates]}")
    print(f"per-round ratio (lightning / raw): {ratio_spread(results, 'lightning', 'raw')}")
    print(f"lightning_vs_raw_throughput={ratio_of_medians(results, 'lightning', 'raw'):.3f}")


if __name__ == "__main__":
    main()
