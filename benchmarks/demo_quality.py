"""Are the demo's digits readable? Generate digits of every class and let the judge read them.

    python benchmarks/demo_quality.py --pipeline outputs/demo/pipeline --n-per-class 20

Trains the digit judge (configs/classifier_mnist.yaml, about a minute) when --judge does not
exist, prints its accuracy on held-out real digits, then the fraction of generated samples of
each class that the judge reads as that class. The last line is ``demo_correct_fraction=F``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from diffusion_lightning import ClassConditionedPipeline, DigitClassifier, MNISTDataModule
from diffusion_lightning.schedulers import make_scheduler

from _common import JUDGE_DIR, REPO, judge_checkpoint


@torch.no_grad()
def real_accuracy(judge: DigitClassifier) -> float:
    data = MNISTDataModule(eval_batch_size=500)
    data.setup("test")
    correct = total = 0
    for batch in data.test_dataloader():
        correct += (judge.predict_proba(batch["images"]).argmax(-1) == batch["labels"]).sum().item()
        total += batch["labels"].numel()
    return correct / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", default=str(REPO / "outputs/demo/pipeline"))
    parser.add_argument("--judge", default=str(JUDGE_DIR / "checkpoints" / "last.ckpt"))
    parser.add_argument("--n-per-class", type=int, default=20)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--scheduler", default="dpm")
    parser.add_argument("--guidance-scale", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    judge = DigitClassifier.load_from_checkpoint(judge_checkpoint(Path(args.judge)), map_location="cpu").eval()
    print(f"judge accuracy on held-out real digits: {real_accuracy(judge):.4f}")

    pipe = ClassConditionedPipeline.from_pretrained(args.pipeline)
    pipe.scheduler = make_scheduler(args.scheduler, pipe.scheduler.config)
    labels = torch.arange(pipe.num_classes).repeat_interleave(args.n_per_class)
    out = pipe(
        labels,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        generator=torch.Generator().manual_seed(args.seed),
        output_type="pt",
    )
    read = judge.predict_proba(out.images * 2 - 1).argmax(-1)
    per_class = [(read[labels == c] == c).float().mean().item() for c in range(pipe.num_classes)]
    print("class  " + " ".join(f"{c:>5d}" for c in range(pipe.num_classes)))
    print("right  " + " ".join(f"{p:5.2f}" for p in per_class))
    print(f"weakest class: {min(per_class):.2f}")
    print(f"demo_correct_fraction={(read == labels).float().mean().item():.4f}")


if __name__ == "__main__":
    main()
