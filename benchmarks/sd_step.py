"""Training-step throughput and memory of ``LatentDiffusionModule`` against a hand-written loop.

    python benchmarks/sd_step.py [--steps 200] [--block 5] [--size small|tiny]

The raw loop is the step of diffusers' ``examples/text_to_image/train_text_to_image.py``: VAE
posterior sample x scaling factor, epsilon noise at uniform timesteps, frozen CLIP text encoder,
UNet, MSE, AdamW, gradient clipping, per-step LR schedule. The module trains the same components
(built from the same seeded config, so both start from identical weights) through ``Trainer.fit``.
Both run in one process, in alternating blocks of ``--block`` steps: after every block of the fit, a
block of the raw loop (``_common.PairedBlocks``), ``--steps`` timed steps on each side after
``--warmup``. The last line, ``sd_lightning_vs_raw_throughput=R``, is steps/s as a ratio of means,
after the spread of the per-block ratios.

Memory: each of raw, Lightning full fine-tuning and Lightning LoRA runs in its own process (peak
memory is per process): CUDA ``max_memory_allocated`` on a GPU, else the peak resident set size.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer
from lightning.pytorch import seed_everything as seed_all

from diffusion_lightning import LatentDiffusionModule, WarmupCosineLR
from diffusion_lightning.nets.latent import LatentComponents, build_components

from _common import PairedBlocks, endless, paired_ratio

#: A small SD-shaped model that takes about a second per step on 2 CPU cores (64x64 images, 32x32 latents).
SMALL = {
    "unet": {
        "sample_size": 32,
        "block_out_channels": [64, 128, 128],
        "layers_per_block": 1,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "cross_attention_dim": 128,
        "attention_head_dim": 8,
        "norm_num_groups": 32,
    },
    "vae": {
        "block_out_channels": [32, 64],
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
        "latent_channels": 4,
        "norm_num_groups": 16,
        "layers_per_block": 1,
    },
    "text_encoder": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4},
}
SIZES = {"small": (SMALL, 64), "tiny": ({}, 16)}
PROMPTS = ["a handwritten digit seven", "a photo of a cat", "a red car on a road", "the digit zero"]


class Batches(torch.utils.data.Dataset):
    def __init__(self, size: int, n: int) -> None:
        self.size, self.n = size, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(i)
        return {"images": torch.rand(3, self.size, self.size, generator=g) * 2 - 1, "captions": PROMPTS[i % 4]}


def collate(items: list[dict]) -> dict:
    return {"images": torch.stack([x["images"] for x in items]), "captions": [x["captions"] for x in items]}


def loader(args: argparse.Namespace) -> torch.utils.data.DataLoader:
    size = SIZES[args.size][1]
    return torch.utils.data.DataLoader(Batches(size, args.steps * args.batch_size), args.batch_size, collate_fn=collate)


def lightning_run(args: argparse.Namespace, mode: str = "full", callbacks: list | None = None) -> None:
    seed_all(0, verbose=False)
    module = LatentDiffusionModule(
        components=LatentComponents(**SIZES[args.size][0]),
        training_mode=mode,
        prompt_dropout=0.0,
        learning_rate=1e-4,
        lr_scheduler=lambda o: WarmupCosineLR(o, warmup_steps=5),
    )
    trainer = Trainer(
        accelerator="auto", devices=1, max_steps=args.steps, limit_val_batches=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        gradient_clip_val=1.0, callbacks=callbacks or [],
    )  # fmt: skip
    trainer.fit(module, loader(args))


class RawLoop:
    """The step of diffusers' train_text_to_image.py, written out; one optimizer step per call."""

    def __init__(self, args: argparse.Namespace) -> None:
        seed_all(0, verbose=False)
        self.device = device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        parts = build_components(LatentComponents(**SIZES[args.size][0]))
        self.vae, self.text_encoder, self.unet = parts["vae"], parts["text_encoder"], parts["unet"]
        self.tokenizer = parts["tokenizer"]
        self.noise_scheduler = LatentDiffusionModule(components=LatentComponents(**SIZES[args.size][0])).noise_scheduler
        self.vae.requires_grad_(False).to(device).eval()
        self.text_encoder.requires_grad_(False).to(device).eval()
        self.unet.to(device).train()
        decay = [p for p in self.unet.parameters() if p.ndim > 1]
        no_decay = [p for p in self.unet.parameters() if p.ndim <= 1]
        self.optimizer = torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=1e-4)
        self.lr_schedule = WarmupCosineLR(self.optimizer, warmup_steps=5, total_steps=args.steps)
        self.noise_scheduler.alphas_cumprod = self.noise_scheduler.alphas_cumprod.to(device)
        self.batches = endless(loader(args))

    def __call__(self) -> None:
        batch, device = next(self.batches), self.device
        ids = self.tokenizer(batch["captions"], padding="max_length", truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            latents = self.vae.encode(batch["images"].to(device)).latent_dist.sample() * self.vae.config.scaling_factor
            hidden = self.text_encoder(ids.to(device), return_dict=False)[0]
        noise = torch.randn_like(latents)
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=device)
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        prediction = self.unet(noisy, t, hidden, return_dict=False)[0]
        loss = F.mse_loss(prediction.float(), noise.float())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.unet.parameters(), 1.0)
        self.optimizer.step()
        self.lr_schedule.step()


def _proc_status_mb(field: str) -> float:
    """``VmRSS`` / ``VmHWM`` of this process (its own address space: unlike ``ru_maxrss``, not inherited)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return _proc_status_mb("VmHWM")


def measure_memory(args: argparse.Namespace) -> None:
    """Child process: one run of ``--memory-of`` (a few steps), then its peak memory (and the part above
    the memory held before training: imports and the interpreter) as JSON."""
    steps = argparse.Namespace(**{**vars(args), "steps": max(args.warmup + 2, 4)})
    before = 0.0 if torch.cuda.is_available() else _proc_status_mb("VmRSS")
    if args.memory_of == "raw":
        raw = RawLoop(steps)
        for _ in range(steps.steps):
            raw()
    else:
        lightning_run(steps, args.memory_of)
    peak = peak_memory_mb()
    print(json.dumps({"peak_memory_mb": peak, "training_mb": peak - before}))


def memory_table(args: argparse.Namespace) -> dict[str, float]:
    table = {}
    for name in ("raw", "full", "lora"):
        command = [sys.executable, __file__, "--size", args.size, "--batch-size", str(args.batch_size)]
        out = subprocess.run([*command, "--memory-of", name], capture_output=True, text=True, check=True).stdout
        result = json.loads(out.strip().splitlines()[-1])
        table[name] = result["training_mb"]
        print(
            f"peak memory {name}: {result['peak_memory_mb']:.0f} MB, {table[name]:.0f} MB above the start", flush=True
        )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200, help="timed optimizer steps on each side")
    parser.add_argument("--block", type=int, default=5, help="steps per block")
    parser.add_argument("--warmup", type=int, default=4, help="untimed steps on each side first")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--memory-of", choices=("raw", "full", "lora"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    if args.memory_of:
        measure_memory(args)
        return
    steps = args.steps
    args.steps = args.warmup + args.steps
    paired = PairedBlocks(RawLoop(args), args.block, args.warmup)
    lightning_run(args, callbacks=[paired])
    print(f"timed steps on each side: {steps}")
    memory = memory_table(args)
    print(f"lora_vs_full_peak_memory={memory['lora'] / memory['full']:.3f}")
    paired_ratio(paired, "sd_lightning_vs_raw_throughput")


if __name__ == "__main__":
    main()
