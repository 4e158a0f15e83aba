"""Cost of ``GradientActivationWatcher`` at its default interval on the demo recipe.

    python benchmarks/watcher_overhead.py [--steps 110] [--rounds 2] [--interval 50] [--threads N]

Both runs train the demo's UNet (v-prediction, cosine betas, min-SNR-5, gradient clipping) on the
embedded digits through ``Trainer.fit`` with the same TensorBoard logger; one also has the watcher
on every ResNet block of the UNet (activations, gradients, parameters; default statistics and
histogram budget). Runs are interleaved; each reports steady-state steps per second after
``--warmup`` steps, a window that holds the watched steps ``interval, 2 * interval, ...``. Besides
the throughput, the time spent inside the watcher's hooks is measured directly (a figure that the
other processes on a shared machine disturb far less). The last line is
``watcher_overhead_fraction=F``: ``1 - median(with) / median(without)`` of steps per second.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch import seed_everything as seed_all
from lightning.pytorch.loggers import TensorBoardLogger

from diffusion_lightning import ClassConditionedDDPM, MNISTDataModule, WarmupCosineLR
from diffusion_lightning.callbacks.watcher import GradientActivationWatcher

from _common import DEMO_NET, interleave

MODEL_ARGS = dict(
    prediction_type="v_prediction", beta_schedule="squaredcos_cap_v2", snr_gamma=5.0, learning_rate=3e-3, p_uncond=0.1
)
RESNET_BLOCKS = ["unet.*.resnets.[0-9]"]
_HOOKS = ("on_train_batch_start", "_record_activation", "on_before_backward", "on_before_optimizer_step")


class TimedWatcher(GradientActivationWatcher):
    """The watcher, adding up the wall time spent in its hooks (forward hooks included)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.seconds = 0.0
        for name in _HOOKS:
            setattr(self, name, self._timed(getattr(self, name)))

    def _timed(self, hook: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return hook(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        return timed


class StepClock(Callback):
    """Time of every optimizer step's end, and the watcher's hook time up to then."""

    def __init__(self, watcher: TimedWatcher | None) -> None:
        self.watcher = watcher
        self.times: list[float] = []
        self.hook_seconds: list[float] = []

    def on_train_batch_end(self, *args: Any) -> None:
        self.times.append(time.perf_counter())
        self.hook_seconds.append(self.watcher.seconds if self.watcher else 0.0)


def run(args: argparse.Namespace, watched: bool, hook_fractions: list[float]) -> float:
    seed_all(0, verbose=False)
    model = ClassConditionedDDPM(
        net=DEMO_NET, lr_scheduler=lambda o: WarmupCosineLR(o, warmup_steps=10), **MODEL_ARGS
    )  # fmt: skip
    watcher = TimedWatcher(patterns=RESNET_BLOCKS, log_every_n_steps=args.interval) if watched else None
    clock = StepClock(watcher)
    with tempfile.TemporaryDirectory() as logs:
        trainer = Trainer(
            accelerator="auto", devices=1, max_steps=args.steps, limit_val_batches=0, logger=TensorBoardLogger(logs),
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            gradient_clip_val=1.0, callbacks=[clock] + ([watcher] if watcher else []),
        )  # fmt: skip
        trainer.fit(model, MNISTDataModule(batch_size=args.batch_size))
    if watcher is not None:
        assert len(watcher.module_names) == sum(type(m).__name__ == "ResnetBlock2D" for m in model.modules())
        span = clock.times[-1] - clock.times[args.warmup]
        hook_fractions.append((clock.hook_seconds[-1] - clock.hook_seconds[args.warmup]) / span)
    return (len(clock.times) - 1 - args.warmup) / (clock.times[-1] - clock.times[args.warmup])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=110, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="steps excluded from the timing")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of each run")
    parser.add_argument("--interval", type=int, default=50, help="the watcher's log_every_n_steps")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all cores)")
    args = parser.parse_args()
    watched_steps = len(range(args.interval * (args.warmup // args.interval + 1), args.steps, args.interval))
    if watched_steps < 2:
        parser.error(f"--steps {args.steps} leaves {watched_steps} watched step(s) after the warm-up; need >= 2.")
    torch.set_num_threads(args.threads)
    hook_fractions: list[float] = []
    results = interleave(
        {"without": lambda: run(args, False, hook_fractions), "with": lambda: run(args, True, hook_fractions)},
        args.rounds,
    )
    for name, rates in results.items():
        print(f"{name} watcher: steps/s per round {[round(r, 3) for r in rates]}")
    print(f"watched steps per run in the timed window: {watched_steps}")
    print(f"time inside the watcher's hooks: {[round(f, 4) for f in hook_fractions]} of the timed window")
    fraction = 1 - statistics.median(results["with"]) / statistics.median(results["without"])
    print(f"watcher_overhead_fraction={fraction:.3f}")


if __name__ == "__main__":
    main()
