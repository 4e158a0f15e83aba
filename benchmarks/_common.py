"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

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


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def endless(loader: Iterable[Any]) -> Iterator[Any]:
    """The batches of ``loader``, epoch after epoch (a new pass, reshuffled where the loader shuffles)."""
    while True:
        yield from loader


def print_step_table(first_column: str, rows: dict[str, list[float]]) -> None:
    """A markdown table of step durations (seconds): count, mean and median in ms per row."""
    print(f"| {first_column} | steps | ms/step (mean) | ms/step (median) |")
    print("|---|---|---|---|")
    for name, values in rows.items():
        print(f"| {name} | {len(values)} | {1000 * statistics.fmean(values):.1f} | "
              f"{1000 * statistics.median(values):.1f} |")  # fmt: skip


class PairedBlocks(Callback):
    """Lightning against a plain loop in one process: after every ``block`` steps of the fit,
    ``block`` steps of ``raw_step``, each step of both timed.

    Separate runs share a machine whose speed drifts by up to 20 % between them (more than the 1 %
    in question); neighbouring blocks a few seconds apart do not, and :func:`paired_ratio` compares
    each Lightning block with the raw blocks on either side of it, so slow drift cancels. The first
    ``warmup`` steps of the fit, and as many raw steps run after them, are not timed.
    """

    def __init__(self, raw_step: Callable[[], object], block: int, warmup: int) -> None:
        self.raw_step, self.block, self.warmup = raw_step, block, warmup
        self.lightning: list[list[float]] = []
        self.raw: list[list[float]] = []
        self._current: list[float] = []
        self._last = 0.0

    def _raw_block(self, steps: int) -> list[float]:
        durations, last = [], time.perf_counter()
        for _ in range(steps):
            self.raw_step()
            _sync()
            now = time.perf_counter()
            durations.append(now - last)
            last = now
        return durations

    def on_train_batch_end(self, trainer: object, *args: object) -> None:
        _sync()
        now = time.perf_counter()
        step = trainer.global_step  # type: ignore[attr-defined]
        if step == self.warmup:
            self._raw_block(self.warmup)
        elif step > self.warmup:
            self._current.append(now - self._last)
            if len(self._current) == self.block:
                self.lightning.append(self._current)
                self._current = []
                self.raw.append(self._raw_block(self.block))
        self._last = time.perf_counter()


def paired_ratio(paired: PairedBlocks, name: str) -> float:
    """Print the paired blocks' table and ``{name}=R`` (Lightning steps/s over raw steps/s, ratio of means
    over every timed step); return R. Each Lightning block is also compared with the mean of the raw
    blocks before and after it: the median of those per-block ratios and their 10th-90th percentile
    state the spread."""
    lightning = [d for block in paired.lightning for d in block]
    raw = [d for block in paired.raw for d in block]
    ratios = []
    for i, block in enumerate(paired.lightning):
        neighbours = [d for j in (i - 1, i) if j >= 0 for d in paired.raw[j]]
        ratios.append(statistics.fmean(neighbours) / statistics.fmean(block))
    ratio = statistics.fmean(raw) / statistics.fmean(lightning)
    deciles = statistics.quantiles(ratios, n=10)
    error = statistics.stdev(ratios) / len(ratios) ** 0.5
    print(f"\npaired blocks: {len(paired.lightning)} of {paired.block} steps each side")
    print_step_table("loop", {"lightning": lightning, "raw": raw})
    print(f"throughput ratio (lightning / raw): ratio of means {ratio:.3f}; per block against its raw neighbours: "
          f"median {statistics.median(ratios):.3f}, 10th..90th percentile {deciles[0]:.3f} .. {deciles[-1]:.3f}, "
          f"standard error of their mean {error:.3f}")  # fmt: skip
    print(f"{name}={ratio:.3f}")
    return ratio


class Stopwatch:
    """Wall time of a block, with CUDA synchronisation when a GPU is used."""

    def __enter__(self) -> Stopwatch:
        _sync()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        _sync()
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


def save_strips(path: Path, rows: dict[str, torch.Tensor], title: str) -> Path:
    """One row of images (``(N, 1, H, W)`` in ``[0, 1]``) per entry of ``rows``, labelled by its key, in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    figure, axes = plt.subplots(len(rows), 1, figsize=(8, 0.9 * len(rows) + 0.4), squeeze=False)
    for axis, (label, images) in zip(axes[:, 0], rows.items()):
        axis.imshow(torch.cat(list(images[:, 0].clamp(0, 1)), dim=1).numpy(), cmap="gray", vmin=0, vmax=1)
        axis.set_xticks([])
        axis.set_yticks([])
        axis.set_ylabel(label, rotation=0, ha="right", va="center")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
