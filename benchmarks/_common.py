"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from lightning.pytorch import Callback

from diffusion_lightning import UNetConfig

REPO = Path(__file__).resolve().parents[1]
JUDGE_DIR = REPO / "outputs" / "classifier_mnist"

#: The demo's network (configs/ddpm_mnist.yaml).
DEMO_NET = UNetConfig(block_out_channels=(32, 64, 128), layers_per_block=1, resnet_time_scale_shift="scale_shift")


class StepClock(Callback):
    """The time of every training step's end (``on_train_batch_end``)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_end(self, *args: object) -> None:
        self.times.append(time.perf_counter())


def steady_rate(times: list[float], warmup: int) -> float:
    """Steps per second after the first ``warmup`` steps, from the steps' end times."""
    return (len(times) - 1 - warmup) / (times[-1] - times[warmup])


def interleave(runs: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Call each run once per round, alternating their order, and collect what they return."""
    results: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            results[name].append(runs[name]())
            print(f"round {r + 1}/{rounds} {name}: {results[name][-1]:.3f}", flush=True)
    return results


def ratio_of_medians(results: dict[str, list[float]], numerator: str, denominator: str) -> float:
    return statistics.median(results[numerator]) / statistics.median(results[denominator])


def ratio_spread(results: dict[str, list[float]], numerator: str, denominator: str) -> str:
    """The per-round ratios (each round's pair of runs), as ``min .. max over N rounds``."""
    ratios = [a / b for a, b in zip(results[numerator], results[denominator])]
    return f"{min(ratios):.3f} .. {max(ratios):.3f} over {len(ratios)} rounds"


class Stopwatch:
    """Wall time of a block, with CUDA synchronisation when a GPU is used."""

    def __enter__(self) -> Stopwatch:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.start


def judge_checkpoint(path: Path) -> Path:
    """``path`` when it exists, else the digit judge trained now (configs/classifier_mnist.yaml, about a minute)."""
    if path.is_file():
        return path
    from diffusion_lightning.cli import main as cli_main

    print(f"training the digit judge into {JUDGE_DIR} ...", file=sys.stderr)
    config = str(REPO / "configs/classifier_mnist.yaml")
    cli_main(["fit", "--config", config, "--trainer.default_root_dir", str(JUDGE_DIR)])
    return JUDGE_DIR / "checkpoints" / "last.ckpt"
