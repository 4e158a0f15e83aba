"""Which solver, flow shift or step-distilled student brings few-step samples closest to 20-step ones?

    python benchmarks/few_step_solvers.py --ckpt outputs/demo/checkpoints/last.ckpt [--steps 4] \
        [--shifts 0.5 0.7 1.0 1.5] [--n-samples 500] \
        [--students outputs/progressive_flow/rounds/steps=4 ...] [--out outputs/bench/few_step]

For every (solver, shift): judge accuracy and domain FID of ``--n-samples`` digits at ``--steps``
steps, from the same seed (the same noise) as the reference row, DPM-Solver++ at 20 steps with the
model's own shift. Solvers: DPM-Solver++ and UniPC in their flow mode, order 2 and 3 (diffusers
lowers the order on the last steps below 15 steps). ``--students`` adds exported pipeline folders
(progressive distillation's rounds, ``configs/progressive_distill_flow.yaml``), each sampled with its
own scheduler at the steps its export recorded, beside the teacher's Euler on the same grid. The
last line is ``best_few_step_fid_vs_20=F`` (the best row's FID over the reference's, minus 1).
``OUT/strips.png`` shows digits 0-9 from the same noise for the reference, the best solver row and
each student, side by side.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

from diffusion_lightning import load_module
from diffusion_lightning.metrics import EvaluationConfig, Evaluator, load_judge
from diffusion_lightning.modules.loading import load_pipeline_source
from diffusion_lightning.schedulers import flow_shift_of, is_flow

from _common import JUDGE_DIR, REPO, judge_checkpoint, save_strips

SOLVERS = {"dpm": DPMSolverMultistepScheduler, "unipc": UniPCMultistepScheduler}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="a flow-matching ClassConditionedDDPM checkpoint")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--shifts", type=float, nargs="+", default=[0.5, 0.7, 1.0, 1.5])
    parser.add_argument("--orders", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--n-samples", type=int, default=500)
    parser.add_argument("--judge", default=str(JUDGE_DIR / "checkpoints" / "last.ckpt"))
    parser.add_argument("--students", nargs="*", default=[], help="exported step-distilled pipeline folders")
    parser.add_argument("--out", default=str(REPO / "outputs/bench/few_step"), help="where strips.png goes")
    args = parser.parse_args()
    module = load_module(args.ckpt)
    pipe = module.build_pipeline("dpm")
    if not is_flow(pipe.scheduler):
        parser.error(f"--ckpt {args.ckpt}: a flow-matching model is needed (prediction_type='flow_prediction')")
    pipe.set_progress_bar_config(disable=True)
    judge = load_judge(str(judge_checkpoint(Path(args.judge))))

    def score(scheduler: object, steps: int, pipeline: object = pipe, guidance: float | None = None) -> dict:
        pipeline.scheduler = scheduler
        config = EvaluationConfig(n_samples=args.n_samples, seed=0, batch_size=50, progress=False)
        guidance = module.guidance_scale if guidance is None else guidance
        metrics = Evaluator(config, judge=judge).evaluate(pipeline, steps, guidance).metrics()
        generator = torch.Generator().manual_seed(0)
        strip = pipeline(list(range(10)), num_inference_steps=steps, guidance_scale=guidance, generator=generator,
                         output_type="pt").images  # fmt: skip
        kept = ("fid", "accuracy", "precision", "recall")
        return {**{key: metrics[key] for key in kept}, "strip": strip}

    def solver(name: str, shift: float, order: int) -> object:
        return SOLVERS[name](num_train_timesteps=1000, use_flow_sigmas=True, flow_shift=shift,
                             prediction_type="flow_prediction", solver_order=order)  # fmt: skip

    own = flow_shift_of(pipe.scheduler.config)
    reference = score(solver("dpm", own, 2), 20)
    print(f"reference: dpm order 2, shift {own:g}, 20 steps: FID {reference['fid']:.4f}, accuracy "
          f"{reference['accuracy']:.3f}, precision {reference['precision']:.3f}, recall {reference['recall']:.3f}",
          flush=True)  # fmt: skip
    print(f"| solver | order | shift | FID at {args.steps} steps | vs 20-step | accuracy | precision | recall |")
    print("|---|---|---|---|---|---|---|---|")
    best = float("inf")
    student_strips: dict[str, torch.Tensor] = {}
    best_solver: tuple[float, str, torch.Tensor] | None = None

    def report(cells: list, row: dict) -> None:
        nonlocal best, best_solver
        ratio = row["fid"] / reference["fid"] - 1
        best = min(best, ratio)
        if cells[2] != "grid" and (best_solver is None or ratio < best_solver[0]):
            best_solver = (ratio, f"{cells[0]} order {cells[1]} shift {cells[2]}, {args.steps} steps", row["strip"])
        scores = [f"{row[key]:.3f}" for key in ("accuracy", "precision", "recall")]
        cells = [*cells, f"{row['fid']:.4f}", f"{100 * ratio:+.1f}%", *scores]
        print("| " + " | ".join(map(str, cells)) + " |", flush=True)

    for shift in args.shifts:
        for name in SOLVERS:
            for order in args.orders:
                report([name, order, f"{shift:g}"], score(solver(name, shift, order), args.steps))
    for folder in args.students:
        student, defaults = load_pipeline_source(pipeline=folder)
        student.set_progress_bar_config(disable=True)
        steps, guidance = defaults["steps"], defaults["guidance_scale"]
        # the teacher on the student's own grid and sampler, undistilled: what distillation adds
        report([f"teacher, {folder}'s Euler", 1, "grid"], score(student.scheduler, steps, pipe, guidance))
        row = score(student.scheduler, steps, student, guidance)
        report([f"student {folder} ({steps} steps)", 1, "grid"], row)
        student_strips[f"student {Path(folder).name}, {steps} steps"] = row["strip"]
    solver_strip = {best_solver[1]: best_solver[2]} if best_solver else {}
    strips = {"dpm, 20 steps (reference)": reference["strip"], **solver_strip, **student_strips}
    print(f"wrote {save_strips(Path(args.out) / 'strips.png', strips, 'the same noise: reference, solvers, students')}")
    print(f"best_few_step_fid_vs_20={best:.4f}")


if __name__ == "__main__":
    main()
