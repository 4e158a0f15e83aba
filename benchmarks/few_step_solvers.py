"""Which solver and flow shift bring a flow-matching model's few-step samples closest to its 20-step ones?

    python benchmarks/few_step_solvers.py --ckpt outputs/demo/checkpoints/last.ckpt [--steps 4] \
        [--shifts 0.5 0.7 1.0 1.5] [--n-samples 500]

For every (solver, shift): judge accuracy and domain FID of ``--n-samples`` digits at ``--steps``
steps, from the same seed (the same noise) as the reference row, DPM-Solver++ at 20 steps with the
model's own shift. Solvers: DPM-Solver++ and UniPC in their flow mode, order 2 and 3 (diffusers
lowers the order on the last steps below 15 steps). The last line is ``best_few_step_fid_vs_20=F``
(the best row's FID over the reference's, minus 1).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

from diffusion_lightning import load_module
from diffusion_lightning.metrics import EvaluationConfig, Evaluator, load_judge
from diffusion_lightning.schedulers import flow_shift_of, is_flow

from _common import JUDGE_DIR, judge_checkpoint

SOLVERS = {"dpm": DPMSolverMultistepScheduler, "unipc": UniPCMultistepScheduler}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="a flow-matching ClassConditionedDDPM checkpoint")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--shifts", type=float, nargs="+", default=[0.5, 0.7, 1.0, 1.5])
    parser.add_argument("--orders", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--n-samples", type=int, default=500)
    parser.add_argument("--judge", default=str(JUDGE_DIR / "checkpoints" / "last.ckpt"))
    args = parser.parse_args()
    module = load_module(args.ckpt)
    pipe = module.build_pipeline("dpm")
    if not is_flow(pipe.scheduler):
        parser.error(f"--ckpt {args.ckpt}: a flow-matching model is needed (prediction_type='flow_prediction')")
    pipe.set_progress_bar_config(disable=True)
    judge = load_judge(str(judge_checkpoint(Path(args.judge))))

    def score(scheduler: object, steps: int) -> dict[str, float]:
        pipe.scheduler = scheduler
        config = EvaluationConfig(n_samples=args.n_samples, seed=0, batch_size=50, progress=False)
        metrics = Evaluator(config, judge=judge).evaluate(pipe, steps, module.guidance_scale).metrics()
        return {"fid": metrics["fid"], "accuracy": metrics["accuracy"]}

    def solver(name: str, shift: float, order: int) -> object:
        return SOLVERS[name](num_train_timesteps=1000, use_flow_sigmas=True, flow_shift=shift,
                             prediction_type="flow_prediction", solver_order=order)  # fmt: skip

    own = flow_shift_of(pipe.scheduler.config)
    reference = score(solver("dpm", own, 2), 20)
    print(f"reference: dpm order 2, shift {own:g}, 20 steps: FID {reference['fid']:.4f}, accuracy "
          f"{reference['accuracy']:.3f}", flush=True)  # fmt: skip
    print(f"| solver | order | shift | FID at {args.steps} steps | vs 20-step | accuracy |\n|---|---|---|---|---|---|")
    best = float("inf")
    for shift in args.shifts:
        for name in SOLVERS:
            for order in args.orders:
                row = score(solver(name, shift, order), args.steps)
                ratio = row["fid"] / reference["fid"] - 1
                best = min(best, ratio)
                fid, accuracy = f"{row['fid']:.4f}", f"{row['accuracy']:.3f}"
                cells = [name, order, f"{shift:g}", fid, f"{100 * ratio:+.1f}%", accuracy]
                print("| " + " | ".join(map(str, cells)) + " |", flush=True)
    print(f"best_few_step_fid_vs_20={best:.4f}")


if __name__ == "__main__":
    main()
