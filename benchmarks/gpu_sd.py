"""Training-step throughput, peak memory and MFU of SD-1.5- and SDXL-sized models: this package against diffusers.

    python benchmarks/gpu_sd.py                               # published sizes, on a GPU (< 8 min on an H100/H200)
    python benchmarks/gpu_sd.py --size tiny --steps 6 --warmup 2   # the same architectures, tiny, on a CPU
    python benchmarks/gpu_sd.py --dry-run                     # build on the meta device: parameters and FLOPs only

Models: the UNet, VAE and CLIP text encoder(s) of Stable Diffusion 1.5 and of SDXL base, built from their
published configs (written out below) with random weights: nothing is downloaded. The tokenizers are the
package's offline byte-level CLIP tokenizer (~530 tokens instead of 49k: a smaller embedding table, the same
77-token sequences). ``--size tiny`` scales the channels and layers down and trains on 64 px images in fp32.

For each model and mode (LoRA of rank 16 on ``to_k, to_q, to_v, to_out.0``, or full fine-tuning of the UNet)
at 512 px (SDXL 1024 px), in bf16 mixed precision on a GPU:

- package: ``Trainer.fit`` of ``LatentDiffusionModule`` / ``StableDiffusionXLModule`` (``precision="bf16-mixed"``);
  a callback records the time at each ``on_train_batch_end`` (CUDA synchronised).
- raw: the step of diffusers' ``examples/text_to_image/train_text_to_image.py`` (``_lora.py``, ``_sdxl.py``)
  written out: VAE posterior sample x scaling factor, epsilon noise at uniform timesteps, frozen text
  encoder(s) (SDXL: both encoders' penultimate hidden states concatenated, the second's pooled
  ``text_embeds`` and the ``add_time_ids``), UNet under ``torch.autocast(bf16)``, MSE, AdamW (weight decay
  1e-2), gradient clipping at 1.0. As the scripts do, the frozen VAE and text encoders are cast to bf16
  (``weight_dtype``), and in LoRA mode the frozen UNet too, with the adapter parameters in fp32
  (``cast_training_params``). (``train_text_to_image_sdxl.py`` precomputes the embeddings and latents once;
  here, as in the package, the encoders run in every step.)

Reported: steady-state steps/s after ``--warmup`` steps, the ratio package/raw, peak memory
(``torch.cuda.max_memory_allocated``, reset between runs; on a CPU the growth of the peak resident set size,
``VmHWM``, above the run's start: indicative only), and model FLOPs utilisation: the FLOPs of one UNet
forward+backward in the run's mode and shape (``FlopCounterMode`` on the meta device, without gradient
checkpointing's recomputation, without the VAE and text encoders) x steps/s / the device's peak dense bf16
FLOP/s (``--peak-tflops`` overrides the table; n/a on a CPU unless given).

Read the memory columns knowing what differs: under ``bf16-mixed`` this package keeps every weight, the
frozen UNet, VAE and text encoders included, in fp32 (autocast computes in bf16), where diffusers' scripts
cast the frozen weights to bf16 (in LoRA mode the frozen UNet too); so the package holds about 2 bytes per
frozen parameter more (SD 1.5 LoRA: ~2 GB, SDXL LoRA: ~7 GB). ``--batch-size``: default 4 for SD 1.5 and 1
for SDXL, whose full fine-tuning holds ~41 GB of fp32 weights, gradients and AdamW state before activations
(1 for both at ``--size tiny``). The last lines, ``gpu_sd_<model>_<mode>_ratio=R``, are the throughput ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.training_utils import cast_training_params
from lightning.pytorch import Trainer, seed_everything
from peft import LoraConfig
from sd_step import Batches, collate
from torch.utils.flop_counter import FlopCounterMode

from diffusion_lightning import LatentDiffusionModule, StableDiffusionXLModule
from diffusion_lightning.nets.latent import LatentComponents, build_components
from diffusion_lightning.nets.latent_xl import NUM_TIME_IDS, XLComponents, build_xl_components

from _common import StepClock, steady_rate

LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
GPU = torch.cuda.is_available()

# ---------------------------------------------------------------- published configs (random weights)

SD15_UNET = dict(
    sample_size=64, block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, norm_num_groups=32,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    cross_attention_dim=768, attention_head_dim=8,
)  # fmt: skip
SDXL_UNET = dict(
    SD15_UNET, sample_size=128, block_out_channels=[320, 640, 1280],
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    transformer_layers_per_block=[1, 2, 10], attention_head_dim=[5, 10, 20], cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,  # 1280 (pooled text) + 6 time ids x 256
)  # fmt: skip


def clip(width: int, layers: int, heads: int, act: str) -> dict:
    """A CLIP text tower (``CLIPTextConfig`` arguments): MLP 4x wide, projection as wide as the hidden states."""
    return dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers, num_attention_heads=heads,
                projection_dim=width, hidden_act=act)  # fmt: skip


CLIP_L, CLIP_BIGG = clip(768, 12, 12, "quick_gelu"), clip(1280, 32, 20, "gelu")  # ViT-L/14; OpenCLIP bigG/14


def vae(scaling: float, sample: int, channels: tuple = (128, 256, 512, 512), layers: int = 2, groups: int = 32) -> dict:
    """SD's ``AutoencoderKL`` (SDXL's has the same shape): 8x downsampling to 4 latent channels."""
    return dict(
        block_out_channels=list(channels), down_block_types=["DownEncoderBlock2D"] * len(channels),
        up_block_types=["UpDecoderBlock2D"] * len(channels), latent_channels=4, layers_per_block=layers,
        norm_num_groups=groups, sample_size=sample, scaling_factor=scaling,
    )  # fmt: skip


@dataclass(frozen=True)
class Model:
    module: type
    components_class: type
    build: Any
    components: dict
    image_px: int
    batch_size: int
    text_encoders: tuple[str, ...]


def models(size: str) -> dict[str, Model]:
    tiny = size == "tiny"
    tiny_vae = {"channels": (16, 16, 32, 32), "layers": 1, "groups": 8}
    sd = {"unet": SD15_UNET, "vae": vae(0.18215, 512), "text_encoder": CLIP_L}
    xl = {"unet": SDXL_UNET, "vae": vae(0.13025, 1024), "text_encoder": CLIP_L, "text_encoder_2": CLIP_BIGG}
    if tiny:
        unet = {"sample_size": 8, "layers_per_block": 1}
        sd["unet"] = {**SD15_UNET, **unet, "block_out_channels": [32, 64, 64, 64], "cross_attention_dim": 64}
        xl["unet"] = dict(
            SDXL_UNET, **unet, block_out_channels=[32, 64, 64], transformer_layers_per_block=[1, 1, 2],
            attention_head_dim=[1, 2, 4], cross_attention_dim=128, addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=64 + NUM_TIME_IDS * 8,
        )  # fmt: skip
        sd["vae"], xl["vae"] = vae(0.18215, 64, **tiny_vae), vae(0.13025, 64, **tiny_vae)
        sd["text_encoder"] = xl["text_encoder"] = clip(64, 2, 4, "quick_gelu")
        xl["text_encoder_2"] = clip(64, 2, 4, "gelu")
    encoders = ("text_encoder", "text_encoder_2")
    return {
        "sd15": Model(LatentDiffusionModule, LatentComponents, build_components, sd, 64 if tiny else 512,
                      1 if tiny else 4, encoders[:1]),
        "sdxl": Model(StableDiffusionXLModule, XLComponents, build_xl_components, xl, 64 if tiny else 1024,
                      1, encoders),
    }  # fmt: skip


# ---------------------------------------------------------------- measurement helpers


def sync() -> None:
    if GPU:
        torch.cuda.synchronize()


class SyncedClock(StepClock):
    def on_train_batch_end(self, *args: Any) -> None:
        sync()
        super().on_train_batch_end(*args)


def _status_gb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def reset_memory() -> float:
    """Free what the last run left and reset the peak; the baseline the next peak is measured from."""
    gc.collect()
    if GPU:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return 0.0
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so that the next peak is its own
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS
    return _status_gb("VmRSS")


def peak_memory_gb(baseline: float) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if GPU else _status_gb("VmHWM") - baseline


def peak_tflops(args: argparse.Namespace) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops
    if not GPU:
        return None
    name = torch.cuda.get_device_name()
    table = [("H100 PCIe", 756), ("H100", 989), ("H200", 989), ("A100", 312), ("L40S", 362), ("4090", 165)]
    return next((tflops for key, tflops in table if key in name), None)


def loader(model: Model, args: argparse.Namespace, batch_size: int) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(Batches(model.image_px, args.steps * batch_size), batch_size, collate_fn=collate)


def unet_flops(model: Model, mode: str, batch_size: int) -> tuple[float, dict[str, int]]:
    """FLOPs of one UNet forward+backward in ``mode`` at the run's shapes, and the parts' parameter counts (meta)."""
    with torch.device("meta"):
        parts = model.build(model.components_class(**model.components))
        unet = parts["unet"]
        if mode == "lora":
            unet.requires_grad_(False)
            unet.add_adapter(LoraConfig(r=16, lora_alpha=16, init_lora_weights="gaussian", target_modules=LORA_TARGETS))
        latent = model.image_px // 2 ** (len(parts["vae"].config.block_out_channels) - 1)
        noisy = torch.randn(batch_size, unet.config.in_channels, latent, latent)
        hidden = torch.randn(batch_size, 77, unet.config.cross_attention_dim)
        added = None
        if "text_encoder_2" in parts:
            pooled = torch.randn(batch_size, parts["text_encoder_2"].config.projection_dim)
            added = {"text_embeds": pooled, "time_ids": torch.randn(batch_size, NUM_TIME_IDS)}
        with FlopCounterMode(display=False) as counter:
            out = unet(noisy, torch.randint(0, 1000, (batch_size,)), hidden, added_cond_kwargs=added)[0]
            out.float().square().mean().backward()
    counts = {name: sum(p.numel() for p in parts[name].parameters()) for name in ("unet", "vae", *model.text_encoders)}
    counts["trainable"] = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    return float(counter.get_total_flops()), counts


# ---------------------------------------------------------------- the two sides


def package_run(model: Model, mode: str, args: argparse.Namespace, batch_size: int) -> float:
    seed_everything(0, verbose=False)
    module = model.module(
        components=model.components_class(**model.components),
        training_mode=mode,
        lora_rank=16,
        lora_target_modules=LORA_TARGETS,
        prompt_dropout=0.0,
        learning_rate=1e-4,
        gradient_checkpointing=args.gradient_checkpointing,
    )
    clock = SyncedClock()
    trainer = Trainer(
        accelerator="auto", devices=1, max_steps=args.steps, limit_val_batches=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        gradient_clip_val=1.0, precision="bf16-mixed" if GPU else "32-true", callbacks=[clock],
    )  # fmt: skip
    trainer.fit(module, loader(model, args, batch_size))
    return steady_rate(clock.times, args.warmup)


def raw_run(model: Model, mode: str, args: argparse.Namespace, batch_size: int) -> float:
    """The training step of diffusers' text_to_image scripts, written out."""
    seed_everything(0, verbose=False)
    device = torch.device("cuda" if GPU else "cpu")
    weight_dtype = torch.bfloat16 if GPU else torch.float32
    parts = model.build(model.components_class(**model.components))
    unet, vae_, tokenizers = parts["unet"], parts["vae"], [parts["tokenizer"], parts.get("tokenizer_2")]
    encoders = [parts[name] for name in model.text_encoders]
    for frozen in (vae_, *encoders):
        frozen.requires_grad_(False).to(device, weight_dtype).eval()
    if mode == "lora":
        unet.requires_grad_(False).to(device, weight_dtype)
        unet.add_adapter(LoraConfig(r=16, lora_alpha=16, init_lora_weights="gaussian", target_modules=LORA_TARGETS))
        cast_training_params(unet, dtype=torch.float32)
    else:
        unet.to(device)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)
    noise_scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if GPU else contextlib.nullcontext()

    def encode(captions: list[str], height: int, width: int) -> tuple[torch.Tensor, dict | None]:
        states, pooled = [], None
        for tokenizer, encoder in zip(tokenizers, encoders):
            ids = tokenizer(captions, padding="max_length", truncation=True, return_tensors="pt").input_ids
            out = encoder(ids.to(device), output_hidden_states=len(encoders) > 1)
            states.append(out.hidden_states[-2] if len(encoders) > 1 else out.last_hidden_state)
            pooled = getattr(out, "text_embeds", None)
        if len(encoders) == 1:
            return states[0], None
        time_ids = torch.tensor([[height, width, 0, 0, height, width]] * len(captions), device=device)
        return torch.cat(states, dim=-1), {"text_embeds": pooled, "time_ids": time_ids.to(weight_dtype)}

    times = []
    for batch in loader(model, args, batch_size):
        images = batch["images"].to(device, weight_dtype)
        with torch.no_grad():
            latents = vae_.encode(images).latent_dist.sample() * vae_.config.scaling_factor
            hidden, added = encode(batch["captions"], *images.shape[-2:])
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=device)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        with autocast:
            prediction = unet(noisy, timesteps, hidden, added_cond_kwargs=added, return_dict=False)[0]
        loss = F.mse_loss(prediction.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter())
    return steady_rate(times, args.warmup)


def measure(run: Any, *run_args: Any) -> tuple[float, float]:
    """``(steps/s, peak memory in GB)`` of one run, with the memory of the runs before it freed."""
    baseline = reset_memory()
    rate = run(*run_args)
    peak = peak_memory_gb(baseline)
    reset_memory()
    return rate, peak


def dry_run(args: argparse.Namespace) -> None:
    for name in args.models:
        model = models(args.size)[name]
        batch_size = args.batch_size or model.batch_size
        for mode in args.modes:
            flops, counts = unet_flops(model, mode, batch_size)
            sizes = ", ".join(f"{part} {n / 1e6:,.1f}M" for part, n in counts.items())
            print(f"{name} {mode} @ {model.image_px}px x {batch_size}: {sizes}; UNet fwd+bwd {flops / 1e12:.2f} TFLOP")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=("published", "tiny"), default="published")
    parser.add_argument("--models", nargs="+", choices=("sd15", "sdxl"), default=["sd15", "sdxl"])
    parser.add_argument("--modes", nargs="+", choices=("lora", "full"), default=["lora", "full"])
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="steps excluded from the timing")
    parser.add_argument("--batch-size", type=int, help="default 4 for sd15, 1 for sdxl (tiny: 1)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="on both sides")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak dense bf16 TFLOP/s, for the MFU")
    parser.add_argument("--dry-run", action="store_true", help="build on the meta device, print sizes and FLOPs")
    args = parser.parse_args()
    if args.steps < args.warmup + 2:
        parser.error("--steps must be at least --warmup + 2")
    torch.set_num_threads(os.cpu_count() or 1)
    if args.dry_run:
        dry_run(args)
        return
    device = torch.cuda.get_device_name() if GPU else "cpu"
    peak = peak_tflops(args)
    print(f"device: {device}, peak {peak or 'unknown'} TFLOP/s; size {args.size}, {args.steps} steps", flush=True)
    rows = []
    for name in args.models:
        model = models(args.size)[name]
        batch_size = args.batch_size or model.batch_size
        for mode in args.modes:
            flops, _ = unet_flops(model, mode, batch_size)
            package, package_mem = measure(package_run, model, mode, args, batch_size)
            raw, raw_mem = measure(raw_run, model, mode, args, batch_size)
            mfu = f"{flops * package / (peak * 1e12):.1%} / {flops * raw / (peak * 1e12):.1%}" if peak else "n/a"
            rows.append((name, mode, package, raw, package / raw, package_mem, raw_mem, mfu))
            print(f"{name} {mode}: package {package:.3f} steps/s, raw {raw:.3f} steps/s", flush=True)
    memory = "peak memory GB" if GPU else "peak RSS growth GB"
    print(
        f"\n| model | mode | package steps/s | raw steps/s | ratio | package {memory} | raw {memory} | MFU pkg / raw |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, mode, package, raw, ratio, package_mem, raw_mem, mfu in rows:
        print(
            f"| {name} | {mode} | {package:.3f} | {raw:.3f} | {ratio:.3f} | {package_mem:.2f} | {raw_mem:.2f} | {mfu} |"
        )
    print()
    for row in rows:
        print(f"gpu_sd_{row[0]}_{row[1]}_ratio={row[4]:.3f}")


if __name__ == "__main__":
    main()
