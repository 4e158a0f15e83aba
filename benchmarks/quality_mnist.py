"""How good do the digits get, how fast, and at what sampling cost? Quality tables for the MNIST DDPM.

    python benchmarks/quality_mnist.py                       # the demo recipe (flow matching), 30-minute budget
    python benchmarks/quality_mnist.py --minutes 15 --max-steps 1200
    python benchmarks/quality_mnist.py --out outputs/bench/quality_mnist_v -- \
        --config configs/ddpm_mnist_v.yaml                   # the same recipe on a DDPM schedule (v-prediction)

1. Trains ``--config`` (default configs/ddpm_mnist.yaml) for at most ``--minutes`` of wall time,
   saving the weights every ``--snapshot-minutes``; the recipe's own ``max_steps`` (or
   ``--max-steps``) may end it sooner.
2. Scores every snapshot (DPM-Solver++ 20 steps, the config's guidance scale) with the digit
   judge: accuracy (correct_digit), weakest class, domain FID and precision/recall against the
   real training digits; prints the table and the training time to 0.90 / 0.95 / 0.98 accuracy.
3. On the final weights: samplers (DDPM 1000, DDIM 50, DPM-Solver++ 10 and 20 steps; for a
   flow-matching model flow Euler 50 and DPM-Solver++ in its flow mode); quality against sampling
   steps 1, 2, 4, 8, 20 with ``--steps-sampler`` (default the config's sampler): accuracy, domain
   FID, precision and recall from the same samples and features, the 4-step FID against the
   20-step one, and one strip of digits 0-9 per step count (same noise) in OUT/steps_strips.png;
   then guidance scales 0, 1, 2, 3, 5 (DPM-Solver++ 20), drawn as an accuracy-vs-recall plot.
   ``--sections`` picks some of them (e.g. ``--skip-train --sections steps`` on an earlier run).

Arguments after ``--`` go to ``fit`` as they are (overrides of the config, e.g. another objective).

Writes OUT/results.json, OUT/accuracy_vs_time.png, OUT/steps_strips.png and OUT/guidance_tradeoff.png
(OUT defaults to outputs/bench/quality_mnist). The judge (configs/classifier_mnist.yaml) is trained first if missing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch import Callback  # noqa: E402

from diffusion_lightning import load_module  # noqa: E402
from diffusion_lightning.cli import DiffusionCLI  # noqa: E402
from diffusion_lightning.metrics import EvaluationConfig, Evaluator, load_judge  # noqa: E402

from _common import JUDGE_DIR, REPO, judge_checkpoint, save_strips  # noqa: E402

THRESHOLDS = (0.90, 0.95, 0.98)
SAMPLERS = (("ddpm", 1000), ("ddim", 50), ("dpm", 10), ("dpm", 20))
FLOW_SAMPLERS = (("euler", 50), ("dpm", 10), ("dpm", 20))
STEPS = (1, 2, 4, 8, 20)
SECTIONS = ("time", "samplers", "steps", "guidance")
GUIDANCE = (0.0, 1.0, 2.0, 3.0, 5.0)
COLUMNS = ("accuracy", "weakest_class_accuracy", "fid", "precision", "recall", "seconds_per_image")


class WallClockSnapshots(Callback):
    """Save the UNet's weights every ``every_s`` seconds of training wall time (saving time excluded)."""

    def __init__(self, folder: Path, every_s: float) -> None:
        self.folder, self.every_s = folder, every_s
        self.start = self.paused = 0.0
        self.last = -float("inf")

    def elapsed(self) -> float:
        return time.perf_counter() - self.start - self.paused

    def save(self, trainer: Any, pl_module: Any) -> None:
        begin = time.perf_counter()
        elapsed = self.elapsed()
        state = {k: v.detach().cpu().clone() for k, v in pl_module.unet.state_dict().items()}
        path = self.folder / f"step={trainer.global_step:06d}.pt"
        torch.save({"elapsed_s": elapsed, "step": trainer.global_step, "unet": state}, path)
        self.last = elapsed
        self.paused += time.perf_counter() - begin

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        if self.elapsed() - self.last >= self.every_s:
            self.save(trainer, pl_module)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self.save(trainer, pl_module)


def train(args: argparse.Namespace, run: Path) -> None:
    budget = int(args.minutes * 60)
    # the arguments after `--` first, so that a second --config among them cannot move the run or its budget
    argv = ["fit", "--config", args.config, *args.fit_args, "--trainer.default_root_dir", str(run)]
    argv += ["--trainer.max_time", f"00:{budget // 3600:02d}:{budget % 3600 // 60:02d}:{budget % 60:02d}"]
    argv += ["--trainer.enable_progress_bar", "false"]
    if args.max_steps:
        argv += ["--trainer.max_steps", str(args.max_steps)]
    snapshots = WallClockSnapshots(run / "snapshots", args.snapshot_minutes * 60)
    DiffusionCLI(args=argv, trainer_defaults={"callbacks": [snapshots]})


def evaluator(args: argparse.Namespace, judge: Any, n_samples: int, **overrides: Any) -> Evaluator:
    config = EvaluationConfig(n_samples=n_samples, seed=args.seed, batch_size=50, progress=False, **overrides)
    return Evaluator(config, judge=judge)


def row(result: Any) -> dict[str, float]:
    values = result.metrics()
    return {name: round(values[name], 4) for name in COLUMNS if name in values}


def table(title: str, rows: list[dict[str, Any]]) -> str:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    lines = [f"\n{title}", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs/ddpm_mnist.yaml"))
    parser.add_argument("--minutes", type=float, default=30.0, help="training wall-time budget")
    parser.add_argument("--max-steps", type=int, help="override the recipe's trainer.max_steps")
    parser.add_argument("--snapshot-minutes", type=float, default=1.5)
    parser.add_argument("--n-samples", type=int, default=200, help="samples per snapshot and per guidance scale")
    parser.add_argument("--sampler-samples", type=int, default=100, help="samples per sampler (DDPM 1000 is slow)")
    parser.add_argument("--judge", default=str(JUDGE_DIR / "checkpoints" / "last.ckpt"))
    parser.add_argument("--out", default=str(REPO / "outputs/bench/quality_mnist"))
    parser.add_argument("--skip-train", action="store_true", help="score the snapshots of an earlier run in OUT")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps-sampler", help="sampler of the steps table (default: the config's)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    args.fit_args = argv[split + 1 :]
    sections = [name.strip() for name in args.sections.split(",") if name.strip()]
    if not sections or any(name not in SECTIONS for name in sections):
        parser.error(f"--sections {args.sections!r}: give a comma-separated subset of {', '.join(SECTIONS)}")

    out = Path(args.out)
    run = out / "run"
    judge = load_judge(judge_checkpoint(Path(args.judge)))
    real = evaluator(args, judge, 10**6, metrics=["judge"])  # n_samples is unused when scoring real images
    real_acc = _real_accuracy(real)
    print(f"judge accuracy on held-out real digits: {real_acc:.4f}", flush=True)
    if not args.skip_train:
        start = time.perf_counter()
        train(args, run)
        print(f"training took {time.perf_counter() - start:.0f} s", flush=True)

    module = load_module(run / "checkpoints" / "last.ckpt")
    guidance = float(module.guidance_scale)
    results: dict[str, Any] = {"judge_real_accuracy": real_acc, "config": args.config, "guidance_scale": guidance,
                               "fit_args": args.fit_args, "prediction_type": module.prediction_type}  # fmt: skip

    over_time: list[dict[str, Any]] = []
    scorer = evaluator(args, judge, args.n_samples, num_inference_steps=20, scheduler="dpm")
    for path in sorted((run / "snapshots").glob("step=*.pt")) if "time" in sections else []:
        snapshot = torch.load(path, map_location="cpu", weights_only=True)
        module.unet.load_state_dict(snapshot["unet"])
        result = scorer.evaluate(module.build_pipeline("dpm"), 20, guidance)
        over_time.append({"minutes": round(snapshot["elapsed_s"] / 60, 2), "step": snapshot["step"], **row(result)})
        print(over_time[-1], flush=True)
    results["over_time"] = over_time
    results["time_to"] = {
        f"{t:.2f}": next((r["minutes"] for r in over_time if r["accuracy"] >= t), None) for t in THRESHOLDS
    }
    print(table("accuracy against training time (DPM-Solver++ 20 steps)", over_time))
    print("minutes to accuracy " + ", ".join(f"{t}: {m}" for t, m in results["time_to"].items()))

    samplers = []
    for name, steps in (FLOW_SAMPLERS if module.is_flow else SAMPLERS) if "samplers" in sections else ():
        scorer = evaluator(args, judge, args.sampler_samples, num_inference_steps=steps, scheduler=name)
        result = scorer.evaluate(module.build_pipeline(name), steps, guidance)
        samplers.append({"sampler": name, "steps": steps, **row(result)})
        print(samplers[-1], flush=True)
    results["samplers"] = samplers
    if samplers:
        best = max(r["accuracy"] for r in samplers)
        dpm20 = next(r["accuracy"] for r in samplers if r["sampler"] == "dpm" and r["steps"] == 20)
        print(table(f"samplers ({args.sampler_samples} samples, guidance {guidance})", samplers))
        print(f"DPM-Solver++ 20 steps vs the best sampler: {dpm20 - best:+.4f}")

    sampler = args.steps_sampler or module.sampler
    by_steps: list[dict[str, Any]] = []
    strips = {}
    for steps in STEPS if "steps" in sections else ():
        scorer = evaluator(args, judge, args.n_samples, num_inference_steps=steps, scheduler=sampler)
        pipeline = module.build_pipeline(sampler)
        result = scorer.evaluate(pipeline, steps, guidance)
        by_steps.append({"steps": steps, **row(result)})
        print(by_steps[-1], flush=True)
        generator = torch.Generator().manual_seed(args.seed)
        strips[steps] = pipeline(list(range(10)), num_inference_steps=steps, guidance_scale=guidance,
                                 generator=generator, output_type="pt").images  # fmt: skip
    results["steps"] = {"sampler": sampler, "rows": by_steps}
    if by_steps:
        print(table(f"quality against sampling steps ({sampler}, {args.n_samples} samples)", by_steps))
        fid = {r["steps"]: r["fid"] for r in by_steps}
        results["steps"]["fid_4_vs_20"] = round(fid[4] / fid[20] - 1, 4)
        print(f"4-step domain FID vs 20-step: {fid[4]:.3f} vs {fid[20]:.3f} ({100 * (fid[4] / fid[20] - 1):+.1f}%)")
        _strips(out, sampler, strips)

    scales = []
    for scale in GUIDANCE if "guidance" in sections else ():
        scorer = evaluator(args, judge, args.n_samples, num_inference_steps=20, scheduler="dpm", guidance_scale=scale)
        result = scorer.evaluate(module.build_pipeline("dpm"), 20, scale)
        scales.append({"guidance_scale": scale, **row(result)})
        print(scales[-1], flush=True)
    results["guidance"] = scales
    if scales:
        print(table("guidance scales (DPM-Solver++ 20 steps)", scales))
    operating = next((r for r in scales if r["guidance_scale"] == guidance), None)
    if operating:
        print(f"recall at the operating guidance scale {guidance}: {operating['recall']:.4f}")

    _plots(out, over_time, scales)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out / 'results.json'} and the plots in {out}")
    final = over_time[-1]["accuracy"] if over_time else float("nan")
    print(f"quality_mnist_final_accuracy={final:.4f}")


def _real_accuracy(scorer: Evaluator) -> float:
    data = scorer.datamodule
    data.setup("test")
    dataset = data.datasets["test"]
    images = torch.stack([dataset[i]["images"] for i in range(len(dataset))]) / 2 + 0.5
    labels = torch.stack([dataset[i]["labels"] for i in range(len(dataset))])
    return scorer.score(images.clamp(0, 1), labels).metrics()["accuracy"]


def _strips(out: Path, sampler: str, strips: dict[int, torch.Tensor]) -> None:
    """One row of digits 0-9 per step count, from the same starting noise."""
    rows = {f"{steps} step{'s' if steps > 1 else ''}": images for steps, images in strips.items()}
    save_strips(out / "steps_strips.png", rows, f"the same noise, {sampler}, by number of sampling steps")


def _plots(out: Path, over_time: list[dict[str, Any]], scales: list[dict[str, Any]]) -> None:
    """accuracy_vs_time.png and guidance_tradeoff.png, each when its section ran."""
    out.mkdir(parents=True, exist_ok=True)
    if over_time:
        figure, axis = plt.subplots(figsize=(6, 4))
        axis.plot([r["minutes"] for r in over_time], [r["accuracy"] for r in over_time], marker="o", label="accuracy")
        axis.plot([r["minutes"] for r in over_time], [r["recall"] for r in over_time], marker="s", label="recall")
        for t in THRESHOLDS:
            axis.axhline(t, color="grey", lw=0.6, ls="--")
        axis.set_xlabel("training wall time (minutes, 2 CPU cores)")
        axis.set_ylabel("fraction")
        axis.set_title("judge accuracy of generated digits during training")
        axis.legend()
        figure.tight_layout()
        figure.savefig(out / "accuracy_vs_time.png", dpi=100)
        plt.close(figure)
    if scales:
        figure, axis = plt.subplots(figsize=(5, 4))
        axis.plot([r["recall"] for r in scales], [r["accuracy"] for r in scales], marker="o")
        for r in scales:
            axis.annotate(
                f"w={r['guidance_scale']:g}", (r["recall"], r["accuracy"]), textcoords="offset points", xytext=(5, 5)
            )
        axis.set_xlabel("recall (diversity: real digits covered)")
        axis.set_ylabel("judge accuracy")
        axis.set_title("guidance: accuracy against diversity")
        figure.tight_layout()
        figure.savefig(out / "guidance_tradeoff.png", dpi=100)
        plt.close(figure)


if __name__ == "__main__":
    main()
