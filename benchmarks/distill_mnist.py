"""Distil the DDPM-schedule teacher: smaller students for equal wall time, and progressive step distillation.

    python benchmarks/distill_mnist.py [--teacher outputs/demo_v/checkpoints/last.ckpt] [--minutes 4]

1. Knowledge distillation: for each ``--factors`` size factor, a student
   (``KnowledgeDistillationModule``, alpha 0.5, EMA) trains for ``--minutes`` of wall time on the
   embedded digits; then parameters, MACs, latency per forward and judge accuracy / domain FID /
   recall (``--n-samples``, DPM-Solver++ 20 steps, guidance 2) are printed beside the teacher's.
2. Progressive distillation: ``ProgressiveDistillationModule`` from 64 DDIM steps down to
   ``64 / 2**rounds`` (``--rounds``, default 4: 4 steps; ``--steps-per-round`` per halving); each
   round's exported student is scored with DDIM (trailing spacing) at its step count, beside the
   teacher at every one of those step counts.

Writes OUT/results.json (default outputs/bench/distill_mnist). Needs the teacher (`diffusion-lightning
fit --config configs/ddpm_mnist.yaml --config configs/ddpm_mnist_v.yaml`) and trains the digit judge
if it is missing.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from lightning.pytorch import Trainer

from diffusion_lightning import ClassConditionedPipeline, MNISTDataModule, load_module
from diffusion_lightning.callbacks import EMA
from diffusion_lightning.metrics import EvaluationConfig, Evaluator, load_judge
from diffusion_lightning.modules.distill import KnowledgeDistillationModule
from diffusion_lightning.modules.progressive import ProgressiveDistillationModule
from diffusion_lightning.nets.students import describe

from _common import JUDGE_DIR, REPO, judge_checkpoint


def table(title: str, rows: list[dict[str, Any]]) -> str:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    lines = [f"\n{title}", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def trainer(root: Path, **kwargs: Any) -> Trainer:
    defaults = dict(
        accelerator="auto", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, gradient_clip_val=1.0, default_root_dir=root, enable_checkpointing=False,
    )  # fmt: skip
    return Trainer(**{**defaults, **kwargs})


def score(evaluator: Evaluator, pipeline: Any, steps: int, scheduler: str) -> dict[str, float]:
    evaluator.config.num_inference_steps = steps
    evaluator.config.scheduler = scheduler
    values = evaluator.evaluate(pipeline, steps, 2.0).metrics()
    return {k: round(values[k], 4) for k in ("accuracy", "weakest_class_accuracy", "fid", "recall")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default=str(REPO / "outputs/demo_v/checkpoints/last.ckpt"))
    parser.add_argument("--factors", type=float, nargs="+", default=[0.1, 0.25, 0.5])
    parser.add_argument("--minutes", type=float, default=4.0, help="wall time per student")
    parser.add_argument("--steps-per-round", type=int, default=100)
    parser.add_argument("--teacher-steps", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--n-samples", type=int, default=200)
    parser.add_argument("--judge", default=str(JUDGE_DIR / "checkpoints" / "last.ckpt"))
    parser.add_argument("--out", default=str(REPO / "outputs/bench/distill_mnist"))
    parser.add_argument("--skip-kd", action="store_true")
    parser.add_argument("--skip-pd", action="store_true")
    args = parser.parse_args()
    out = Path(args.out)
    judge = load_judge(judge_checkpoint(Path(args.judge)))
    config = EvaluationConfig(
        n_samples=args.n_samples, batch_size=50, progress=False, metrics=["judge", "fid", "precision_recall"]
    )
    evaluator = Evaluator(config, judge=judge)
    teacher = load_module(args.teacher)
    teacher_report = describe(teacher.unet)
    out.mkdir(parents=True, exist_ok=True)
    previous = json.loads((out / "results.json").read_text()) if (out / "results.json").is_file() else {}
    results: dict[str, Any] = {**previous, "teacher": args.teacher}  # a --skip-* run keeps the other table

    if not args.skip_kd:
        rows = [{"model": "teacher", "params": teacher_report.parameters, "macs": teacher_report.macs,
                 "latency_ms": round(teacher_report.latency_s * 1e3, 2), "steps": "-",
                 **score(evaluator, teacher.build_pipeline("dpm"), 20, "dpm")}]  # fmt: skip
        print(rows[-1], flush=True)
        for factor in args.factors:
            module = KnowledgeDistillationModule(
                args.teacher, size_factor=factor, alpha=0.5, learning_rate=2e-3, lr_scheduler=None
            )
            budget = int(args.minutes * 60)
            run = trainer(
                out / f"kd-{factor}", max_steps=100_000, max_time={"seconds": budget}, callbacks=[EMA(decay=0.995)]
            )
            start = time.perf_counter()
            run.fit(module, MNISTDataModule(batch_size=64))
            module.eval()
            report = describe(module.unet, reference_parameters=teacher_report.parameters)
            rows.append({
                "model": f"student {factor:g}", "params": report.parameters,
                "param_fraction": round(report.parameters / teacher_report.parameters, 3), "macs": report.macs,
                "latency_ms": round(report.latency_s * 1e3, 2), "steps": run.global_step,
                "train_s": round(time.perf_counter() - start),
                **score(evaluator, module.build_pipeline("dpm"), 20, "dpm"),
            })  # fmt: skip
            print(rows[-1], flush=True)
        results["knowledge_distillation"] = rows
        print(table(f"students after {args.minutes:g} min each (judge on {args.n_samples} samples, DPM++ 20)", rows))

    if not args.skip_pd:
        module = ProgressiveDistillationModule(
            args.teacher, teacher_steps=args.teacher_steps, rounds=args.rounds, steps_per_round=args.steps_per_round,
            learning_rate=2e-4, lr_scheduler=None,
        )  # fmt: skip
        # The teacher is scored with the students' DDIM (trailing spacing), so only the weights differ.
        reference = ClassConditionedPipeline(unet=teacher.unet, scheduler=module.sampling_scheduler("ddim"))
        rows = []
        # the teacher at every step count a student gets, so each student has its like-for-like row
        for steps in [args.teacher_steps // 2**r for r in range(args.rounds + 1)]:
            rows.append({"model": "teacher", "ddim_steps": steps, **score(evaluator, reference, steps, "ddim")})
            print(rows[-1], flush=True)
        start = time.perf_counter()
        trainer(out / "progressive", max_steps=args.rounds * args.steps_per_round).fit(
            module, MNISTDataModule(batch_size=64)
        )
        results["progressive_train_s"] = round(time.perf_counter() - start)
        for folder in sorted((out / "progressive" / "rounds").iterdir(), key=lambda p: -int(p.name.split("=")[1])):
            steps = int(folder.name.split("=")[1])
            pipeline = ClassConditionedPipeline.from_pretrained(folder)
            rows.append(
                {"model": f"student ({folder.name})", "ddim_steps": steps, **score(evaluator, pipeline, steps, "ddim")}
            )
            print(rows[-1], flush=True)
        results["progressive"] = rows
        print(table(f"progressive distillation ({args.steps_per_round} steps per round)", rows))
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out / 'results.json'}")


if __name__ == "__main__":
    main()
