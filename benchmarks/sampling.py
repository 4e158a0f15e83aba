"""Throughput of ``ClassConditionedPipeline`` against a hand-written diffusers sampling loop.

    python benchmarks/sampling.py [--per-class 8] [--steps 25] [--rounds 9] [--scheduler dpm]

Both generate the same labelled batch (every class ``--per-class`` times) with the same UNet (the
demo's network), scheduler and classifier-free guidance (one batched forward of 2B per step).
Runs are interleaved; the last line is ``pipeline_vs_loop_throughput=R`` (images per second,
median over rounds).
"""

from __future__ import annotations

import argparse
import os

import torch

from diffusion_lightning import ClassConditionedPipeline
from diffusion_lightning.nets import build_unet
from diffusion_lightning.schedulers import make_scheduler, training_scheduler

from _common import DEMO_NET, Stopwatch, interleave, ratio_of_medians


@torch.no_grad()
def hand_loop(unet, scheduler, labels: torch.Tensor, steps: int, guidance: float, seed: int) -> torch.Tensor:
    """The loop a user would write with diffusers' building blocks."""
    generator = torch.Generator().manual_seed(seed)
    shape = (labels.shape[0], unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    x = torch.randn(shape, generator=generator).to(unet.device) * scheduler.init_noise_sigma
    both = torch.cat([torch.full_like(labels, 10), labels]).to(unet.device)
    scheduler.set_timesteps(steps, device=unet.device)
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(torch.cat([x, x]), t)
        uncond, cond = unet(model_input, t, class_labels=both).sample.chunk(2)
        x = scheduler.step(uncond + guidance * (cond - uncond), t, x).prev_sample
    return (x / 2 + 0.5).clamp(0, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-class", type=int, default=8)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--guidance-scale", type=float, default=2.0)
    parser.add_argument("--scheduler", default="dpm")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    unet = build_unet(DEMO_NET, sample_size=28, in_channels=1, num_classes=10).to(device).eval()
    noise = training_scheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    pipe = ClassConditionedPipeline(unet=unet, scheduler=make_scheduler(args.scheduler, noise))
    pipe.set_progress_bar_config(disable=True)
    loop_scheduler = make_scheduler(args.scheduler, noise)
    labels = torch.arange(10).repeat_interleave(args.per_class)
    n = labels.numel()

    def run_pipeline() -> float:
        with Stopwatch() as watch:
            pipe(labels, num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                 generator=torch.Generator().manual_seed(0), output_type="pt")  # fmt: skip
        return n / watch.seconds

    def run_loop() -> float:
        with Stopwatch() as watch:
            hand_loop(unet, loop_scheduler, labels, args.steps, args.guidance_scale, seed=0)
        return n / watch.seconds

    # Same noise, same scheduler, same guidance: the two must agree before they are compared.
    a = pipe(labels, num_inference_steps=3, guidance_scale=args.guidance_scale,
             generator=torch.Generator().manual_seed(0), output_type="pt").images  # fmt: skip
    b = hand_loop(unet, loop_scheduler, labels, 3, args.guidance_scale, seed=0)
    torch.testing.assert_close(a.cpu(), b.cpu(), atol=1e-4, rtol=1e-4)
    run_pipeline()  # warm-up
    results = interleave({"pipeline": run_pipeline, "loop": run_loop}, args.rounds)
    for name, rates in results.items():
        print(f"{name}: images/s per round {[round(r, 2) for r in rates]}")
    print(f"pipeline_vs_loop_throughput={ratio_of_medians(results, 'pipeline', 'loop'):.3f}")


if __name__ == "__main__":
    main()
