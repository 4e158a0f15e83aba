"""Per-step cost of the default callback stack against no callbacks, and of each callback in it.

    python benchmarks/stack_overhead.py [--steps 50] [--warmup 5] [--rounds 3] [--alone]
    python benchmarks/stack_overhead.py --paired [--paired-steps 400] [--block 5]

The demo model and data (configs/ddpm_mnist.yaml's network, batch 64), TensorBoard logging to a
temporary folder in every run. The stack is configs/callbacks/default.yaml's: EMA (raw validation),
the gradient/activation watcher (every 50 steps), timestep losses, the generation monitor and the
sample grid, early stopping, the LR monitor, Lightning's throughput and device-statistics monitors and
the run summary.

Training steps: each run fits ``--warmup`` + ``--steps`` steps and times the last ``--steps`` of
them, from one step's end to the next (data, forward, backward, optimizer and every hook), after a
first untimed fit that pays the dataset parse and lazy imports. ``--steps`` 50 holds exactly one
of the watcher's logging steps. The runs (none and the stack; with ``--alone``, each callback alone
too) are interleaved, in alternating order, over ``--rounds`` rounds; a configuration's overhead is
the ratio of its median seconds per step to the median with no callbacks, with the spread of the
per-round ratios.

Per-callback breakdown: in the stack's runs every hook of every callback (and the watcher's
forward hooks) is timed over the same steps, so each callback's own milliseconds per step are
measured inside one run. On a CPU whose speed drifts by a few percent between runs, this is the
figure that shows which callback costs what; the whole-stack ratio above also catches what no hook
holds (the loggers writing what the callbacks logged).

Generation passes: the stack's run validates once after the timed steps (one batch) with the
samplers due, and the seconds inside each sampler's pass are reported apart; they run every
``every_n_epochs`` epochs, not every step. The last lines are ``callback_hooks_fraction=F`` (the
callbacks' own time per step over a step without them) and ``stack_overhead_fraction=F`` (the
whole-stack ratio of medians).

``--paired``: one fit with the whole stack in which every callback's per-step hooks (batch start and
end, backward, optimizer step, zero-grad, the watcher's forward hooks) are switched on and off in
alternating blocks of ``--block`` steps. Separate runs share a machine whose speed can drift by
20 % between them; neighbouring blocks a few seconds apart do not, so each on-block is compared
with the off-blocks beside it. The phase flips every ten blocks so that, with the default
``--block 5`` and ``--paired-steps`` a multiple of 100, the steps at which the watcher and the
loggers do their periodic work (every 50 steps) fall as often in on-blocks as in off-blocks.
Reported: mean step time on and off (every step counts, the periodic ones included), the median
of the per-block paired ratios with their 10th-90th percentile, and
``paired_stack_overhead_fraction=F`` (ratio of means).
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
from lightning.pytorch.callbacks import DeviceStatsMonitor, EarlyStopping, LearningRateMonitor, ThroughputMonitor
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
from diffusion_lightning.callbacks import batch_size

from _common import DEMO_NET, StepClock, print_step_table

#: configs/callbacks/default.yaml, by name (the samplers due at every validation here).
STACK: dict[str, Callable[[], Callback]] = {
    "EMA": lambda: EMA(decay=0.999, use_warmup=True, validate_raw=True),
    "GradientActivationWatcher": lambda: GradientActivationWatcher(
        module_types=["ResnetBlock2D"],
        stats=["mean", "std", "norm", "abs_mean", "hist"],
        log_every_n_steps=50,
        max_histograms=8,
    ),  # fmt: skip
    "TimestepLossLogger": lambda: TimestepLossLogger(num_buckets=10),
    "GenerationMonitor": lambda: GenerationMonitor(every_n_epochs=1, num_samples=10),
    "SampleGridLogger": lambda: SampleGridLogger(every_n_epochs=1, num_per_class=4),
    "EarlyStopping": lambda: EarlyStopping(monitor="val/loss", mode="min", patience=5),
    "LearningRateMonitor": lambda: LearningRateMonitor(logging_interval="step"),
    "ThroughputMonitor": lambda: ThroughputMonitor(batch_size_fn=batch_size, window_size=20),
    "DeviceStatsMonitor": lambda: DeviceStatsMonitor(),
    "RunSummary": lambda: RunSummary(),
}
SAMPLERS = ("GenerationMonitor", "SampleGridLogger")
HOOKS = [name for name in dir(Callback) if name.startswith("on_")]


#: Callback methods that run at every training step; ``HookTimer.gate`` switches them off.
STEP_HOOKS = ("on_train_batch_start", "on_train_batch_end", "on_before_backward", "on_after_backward",
              "on_before_optimizer_step", "on_before_zero_grad", "_record_activation")  # fmt: skip


class HookTimer:
    """Seconds inside each callback's hooks while ``on`` (the timed steps), by callback. While ``gate``
    is False the per-step hooks (``STEP_HOOKS``) are skipped: the step runs as if without callbacks."""

    def __init__(self) -> None:
        self.on = False
        self.gate = True
        self.seconds: dict[str, float] = {}

    def wrap(self, callback: Callback) -> None:
        name = type(callback).__name__
        self.seconds.setdefault(name, 0.0)
        methods = [hook for hook in HOOKS if getattr(type(callback), hook) is not getattr(Callback, hook)]
        if hasattr(callback, "_record_activation"):  # the watcher's forward hooks
            methods.append("_record_activation")
        for method in methods:
            setattr(callback, method, self._timed(name, getattr(callback, method), method in STEP_HOOKS))

    def _timed(self, name: str, inner: Callable[..., Any], per_step: bool) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            if per_step and not self.gate:
                return None
            if not self.on:
                return inner(*args, **kwargs)
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - start

        return timed


class HookSwitch(StepClock):
    """A step clock, placed last (so after every other callback's hooks), that switches ``hooks`` on
    from the end of the last warm-up step to the end of the last step."""

    def __init__(self, hooks: HookTimer, warmup: int, steps: int) -> None:
        super().__init__()
        self.hooks, self.warmup, self.steps = hooks, warmup, steps

    def on_train_batch_end(self, *args: Any) -> None:
        super().on_train_batch_end(*args)
        self.hooks.on = self.warmup <= len(self.times) < self.warmup + self.steps


class BlockGate(Callback):
    """Placed first: before each step's hooks, opens ``hooks.gate`` in the on-blocks of the paired
    design (blocks of ``block`` steps after ``warmup``, alternating, the phase flipped every ten
    blocks); during the warm-up the gate stays open."""

    def __init__(self, hooks: HookTimer, warmup: int, block: int) -> None:
        self.hooks, self.warmup, self.block = hooks, warmup, block
        self.on_steps: list[bool] = []

    @staticmethod
    def is_on(index: int, block: int) -> bool:
        b = index // block
        return (b + b // 10) % 2 == 0

    def on_train_batch_start(self, trainer: Any, *args: Any) -> None:
        index = trainer.global_step - self.warmup
        self.hooks.gate = index < 0 or self.is_on(index, self.block)
        if index >= 0:
            self.on_steps.append(self.hooks.gate)


def paired(data: MNISTDataModule, args: argparse.Namespace) -> None:
    """One fit with the stack's per-step hooks switched on and off in alternating blocks."""
    seed_all(0, verbose=False)
    model = demo_model()
    callbacks = [STACK[name]() for name in STACK]
    hooks = HookTimer()
    for callback in callbacks:
        hooks.wrap(callback)
    gate, clock = BlockGate(hooks, args.warmup, args.block), StepClock()
    steps = args.warmup + args.paired_steps
    fit(model, data, steps, [gate, *callbacks, clock])
    durations = [b - a for a, b in zip(clock.times[args.warmup - 1 :], clock.times[args.warmup :])]
    on = [d for d, flag in zip(durations, gate.on_steps) if flag]
    off = [d for d, flag in zip(durations, gate.on_steps) if not flag]
    blocks = [durations[i : i + args.block] for i in range(0, len(durations), args.block)]
    flags = [gate.on_steps[i] for i in range(0, len(durations), args.block)]
    ratios = []
    for i, (block, flag) in enumerate(zip(blocks, flags)):
        neighbours = [blocks[j] for j in (i - 1, i + 1) if 0 <= j < len(blocks) and not flags[j]]
        if flag and neighbours:
            reference = statistics.fmean(d for n in neighbours for d in n)
            ratios.append(statistics.fmean(block) / reference - 1)
    deciles = statistics.quantiles(ratios, n=10)
    overhead = statistics.fmean(on) / statistics.fmean(off) - 1
    print(f"\npaired blocks ({args.paired_steps} steps in blocks of {args.block}, {len(ratios)} on-blocks)")
    print_step_table("hooks", {"off": off, "on": on})
    print(f"overhead: ratio of means {100 * overhead:+.2f}%; per on-block against its neighbours: median "
          f"{100 * statistics.median(ratios):+.2f}%, 10th..90th percentile {100 * deciles[0]:+.2f}% .. "
          f"{100 * deciles[-1]:+.2f}%")  # fmt: skip
    print(f"paired_stack_overhead_fraction={overhead:.4f}")


def fit(model: ClassConditionedDDPM, data: MNISTDataModule, steps: int, callbacks: list[Callback]) -> None:
    """``steps`` training steps, then one validation batch (the generation passes), logged to TensorBoard."""
    with tempfile.TemporaryDirectory() as root:
        trainer = Trainer(
            accelerator="auto", devices=1, max_steps=steps, val_check_interval=steps, limit_val_batches=1,
            check_val_every_n_epoch=None, default_root_dir=root, logger=TensorBoardLogger(root),
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            num_sanity_val_steps=0, gradient_clip_val=1.0, callbacks=callbacks,
        )  # fmt: skip
        trainer.fit(model, data)


def demo_model() -> ClassConditionedDDPM:
    return ClassConditionedDDPM(
        net=DEMO_NET, prediction_type="v_prediction", beta_schedule="squaredcos_cap_v2", snr_gamma=5.0,
        learning_rate=3e-3, lr_scheduler=lambda o: WarmupCosineLR(o, warmup_steps=100),
    )  # fmt: skip


def time_samplers(callbacks: list[Callback]) -> dict[str, list[float]]:
    """Wrap each sampler's ``on_sample`` to record the seconds of its passes."""
    seconds: dict[str, list[float]] = {}
    for callback in callbacks:
        name = type(callback).__name__
        if name in SAMPLERS:
            inner, seconds[name] = callback.on_sample, []

            def timed(*args: Any, _inner=inner, _out=seconds[name]) -> None:
                start = time.perf_counter()
                _inner(*args)
                _out.append(time.perf_counter() - start)

            callback.on_sample = timed  # type: ignore[method-assign]
    return seconds


def run(
    data: MNISTDataModule, names: list[str], args: argparse.Namespace
) -> tuple[float, dict[str, list[float]], dict[str, float]]:
    """Seconds per timed step with the named callbacks, the seconds of their generation passes, and
    each callback's seconds per timed step inside its hooks."""
    seed_all(0, verbose=False)
    model = demo_model()
    callbacks = [STACK[name]() for name in names]
    passes = time_samplers(callbacks)
    hooks = HookTimer()
    for callback in callbacks:
        hooks.wrap(callback)
    clock = HookSwitch(hooks, args.warmup, args.steps)
    steps = args.warmup + args.steps
    fit(model, data, steps, [*callbacks, clock])
    timed = clock.times[args.warmup - 1 :]
    return (timed[-1] - timed[0]) / (len(timed) - 1), passes, {k: v / args.steps for k, v in hooks.seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps at the start of each run")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of every configuration")
    parser.add_argument("--alone", action="store_true", help="also run each callback alone against none")
    parser.add_argument("--paired", action="store_true", help="one fit, the stack switched on and off in blocks")
    parser.add_argument("--paired-steps", type=int, default=400, help="timed steps of the paired fit")
    parser.add_argument("--block", type=int, default=5, help="steps per block of the paired fit")
    args = parser.parse_args()
    if args.warmup < 1 or args.steps < 2:
        parser.error(f"--warmup {args.warmup} and --steps {args.steps}: need --warmup >= 1 and --steps >= 2")
    if args.block < 1 or args.paired_steps < 4 * args.block:
        parser.error(f"--block {args.block} and --paired-steps {args.paired_steps}: need --block >= 1 and "
                     "--paired-steps >= 4 x --block")  # fmt: skip
    torch.set_num_threads(os.cpu_count() or 1)
    data = MNISTDataModule(batch_size=64, eval_batch_size=250)
    if args.paired:
        print("warm-up fit (dataset parse, lazy imports) ...", flush=True)
        run(data, list(STACK), argparse.Namespace(warmup=2, steps=3))
        paired(data, args)
        return
    configs: dict[str, list[str]] = {"none": [], "stack": list(STACK)}
    if args.alone:
        configs.update({name: [name] for name in STACK})
    print("warm-up fit (dataset parse, lazy imports) ...", flush=True)
    run(data, list(STACK), argparse.Namespace(warmup=2, steps=3))

    per_step: dict[str, list[float]] = {name: [] for name in configs}
    passes: dict[str, list[float]] = {}
    in_hooks: dict[str, list[float]] = {}
    order = list(configs)
    for r in range(args.rounds):
        for name in order if r % 2 == 0 else reversed(order):
            seconds, timed, hooks = run(data, configs[name], args)
            per_step[name].append(seconds)
            if name == "stack":
                for sampler, values in timed.items():
                    passes.setdefault(sampler, []).extend(values)
                for callback, value in hooks.items():
                    in_hooks.setdefault(callback, []).append(value)
            print(f"round {r + 1}/{args.rounds} {name}: {1000 * seconds:.1f} ms/step", flush=True)

    base = statistics.median(per_step["none"])
    print(f"\nper training step ({args.steps} timed steps, {args.rounds} rounds; overhead = median / median(none) - 1)")
    print("| callbacks | ms/step (median) | overhead | per-round overhead (min .. max) |")
    print("|---|---|---|---|")
    for name, values in per_step.items():
        ratios = [v / n - 1 for v, n in zip(values, per_step["none"])]
        overhead = statistics.median(values) / base - 1
        print(f"| {name} | {1000 * statistics.median(values):.1f} | {100 * overhead:+.1f}% | "
              f"{100 * min(ratios):+.1f}% .. {100 * max(ratios):+.1f}% |")  # fmt: skip
    print("\neach callback's own time per training step (inside its hooks, in the stack's runs; % of a step without)")
    print("| callback | ms/step (median) | % of a step |")
    print("|---|---|---|")
    for callback, values in sorted(in_hooks.items(), key=lambda item: -statistics.median(item[1])):
        ms = 1000 * statistics.median(values)
        print(f"| {callback} | {ms:.2f} | {100 * statistics.median(values) / base:.2f}% |")
    total = sum(statistics.median(values) for values in in_hooks.values())
    print(f"| all hooks | {1000 * total:.2f} | {100 * total / base:.2f}% |")
    print("\ngeneration passes (run every every_n_epochs epochs, not per step; default.yaml: 5)")
    for sampler, values in passes.items():
        print(f"{sampler}: {statistics.median(values):.2f} s per pass (median of {len(values)})")
    print(f"callback_hooks_fraction={total / base:.4f}")
    print(f"stack_overhead_fraction={statistics.median(per_step['stack']) / base - 1:.3f}")


if __name__ == "__main__":
    main()
