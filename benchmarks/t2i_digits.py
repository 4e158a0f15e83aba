"""The latent text-to-image model on captioned digits: how good, how fast, and how it fine-tunes.

    python benchmarks/t2i_digits.py                        # vae, base, finetune (~75 min on 2 CPU cores)
    python benchmarks/t2i_digits.py --part base --minutes 15
    python benchmarks/t2i_digits.py --part finetune --modes lora lora+prior
    python benchmarks/t2i_digits.py --part finetune --from-demo --n-per-prompt 50   # after make demo-t2i
    python benchmarks/t2i_digits.py --part base --out outputs/bench/t2i_v -- \
        --model.init_args.prediction_type v_prediction --model.init_args.snr_gamma 5

1. ``vae``: trains configs/vae_digits.yaml and exports it; reports its PSNR/SSIM and the digit
   judge's accuracy on real validation digits and on their reconstructions.
2. ``base``: trains configs/t2i_digits.yaml on that VAE (all ten digits) for at most ``--minutes``,
   saving the UNet every ``--snapshot-minutes``, and scores every snapshot with the judge on the
   prompts of configs/prompts/digits.txt (DPM-Solver++ 20 steps, the config's guidance scale):
   accuracy overall and per digit against training time (the shape of quality_mnist.py), then the
   final weights across guidance scales.
3. ``finetune``: trains the same recipe on the digits 0-7 only (600 steps, as ``make demo-t2i``), then
   teaches it 8 and 9 from 50 examples each (configs/t2i_digits_lora.yaml) in each ``--modes`` entry:
   ``lora`` (the config's targets), ``lora_attention`` (the attention projections only), ``full``,
   ``text_encoder``, each optionally ``+prior`` (DreamBooth prior preservation with class images of
   0-7 drawn by the base model). Per mode: accuracy on the new digits' prompts, retention (accuracy
   on 0-7 relative to the base's), trained parameters, training wall time, step time and peak memory
   (each fine-tune runs in its own process; peak RSS of that process).

4. ``demo`` (after ``make demo-t2i``): loads outputs/demo_t2i/pipeline in a fresh process that
   imports diffusers alone, draws every digit's prompt, loads outputs/demo_t2i/lora with
   ``load_lora_weights`` and draws them again; the judge reads both sets.

Writes OUT/results.json, OUT/accuracy_vs_time.png and OUT/finetune.png (OUT defaults to
outputs/bench/t2i_digits). The judge (configs/classifier_mnist.yaml) is trained first if missing.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from lightning.pytorch import Callback  # noqa: E402
from quality_mnist import WallClockSnapshots, table  # noqa: E402

from diffusion_lightning import load_module  # noqa: E402
from diffusion_lightning.cli import DiffusionCLI  # noqa: E402
from diffusion_lightning.cli import main as cli  # noqa: E402
from diffusion_lightning.metrics import EvaluationConfig, Evaluator, load_judge  # noqa: E402
from diffusion_lightning.metrics.prompts import digits_in, read_prompts  # noqa: E402

from _common import JUDGE_DIR, REPO, judge_checkpoint  # noqa: E402

PROMPTS = read_prompts(REPO / "configs/prompts/digits.txt").prompts
OLD, NEW = PROMPTS[:8], PROMPTS[8:]
MODES = ("lora", "lora+prior", "lora_attention+prior", "full", "full+prior", "text_encoder", "text_encoder+prior")
#: Learning rate per training mode (LoRA's is the config's).
LEARNING_RATES = {"lora": 1e-2, "lora_attention": 1e-2, "full": 3e-4, "text_encoder": 1e-3}
GUIDANCE = (1.0, 3.0, 5.0, 7.0, 9.0)
#: Training steps of the base model on 0-7 that the fine-tunes start from: make demo-t2i's.
BASE07_STEPS = 600


class StepTimer(Callback):
    """Training-loop time, step count and trained parameters, written to ``path`` at the end of fitting."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.start = 0.0

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.start = time.perf_counter()
        self.first_step = trainer.global_step

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        seconds = time.perf_counter() - self.start
        steps = trainer.global_step - self.first_step
        trained = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        record = {"train_seconds": seconds, "steps": steps, "step_seconds": seconds / max(steps, 1),
                  "trained_parameters": trained, "peak_rss_mb": peak_mb}  # fmt: skip
        self.path.write_text(json.dumps(record, indent=2))


def seconds_to_time(seconds: float) -> str:
    seconds = int(seconds)
    return f"00:{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def scorer(args: argparse.Namespace, judge: Any, prompts: tuple[str, ...], n_per_prompt: int) -> Evaluator:
    config = EvaluationConfig(
        n_samples=n_per_prompt * len(prompts), seed=args.seed, batch_size=100, progress=False, metrics=["judge"],
        prompts=list(prompts), num_inference_steps=20, scheduler="dpm",
    )  # fmt: skip
    return Evaluator(config, judge=judge)


def judged(evaluator: Evaluator, module: Any, guidance_scale: float | None = None) -> dict[str, Any]:
    """Overall and per-digit judge accuracy of ``module``'s samples (DPM-Solver++ 20 steps, its guidance)."""
    scale = float(module.guidance_scale if guidance_scale is None else guidance_scale)
    result = evaluator.evaluate(module.build_pipeline("dpm"), 20, scale)
    correct, targets = result.per_sample["correct_digit"].float(), result.targets
    per_digit = {int(d): round(correct[targets == d].mean().item(), 4) for d in targets.unique()}
    return {"accuracy": round(correct.mean().item(), 4), "per_digit": per_digit,
            "weakest": round(min(per_digit.values()), 4)}  # fmt: skip


# ---------------------------------------------------------------------------------------------- vae


def part_vae(args: argparse.Namespace, out: Path, judge: Any) -> dict[str, Any]:
    run, vae = out / "vae_run", out / "vae"
    if not (run / "checkpoints" / "last.ckpt").is_file() or args.retrain:
        start = time.perf_counter()
        cli(["fit", "--config", str(REPO / "configs/vae_digits.yaml"), "--trainer.default_root_dir", str(run),
             "--trainer.enable_progress_bar", "false"])  # fmt: skip
        print(f"VAE trained in {time.perf_counter() - start:.0f} s", flush=True)
    cli(["export", "--ckpt", str(run / "checkpoints" / "last.ckpt"), "--out", str(vae), "--overwrite"])
    metrics = json.loads((run / "metrics.json").read_text())["metrics"]
    module = load_module(run / "checkpoints" / "last.ckpt").eval()
    data = module_data(run)
    data.setup("fit")
    val = data.datasets["val"]
    images = torch.stack([val[i]["images"] for i in range(len(val))])
    labels = torch.tensor([digits_in(caption)[0] for caption in val.captions])
    with torch.no_grad():
        recon = torch.cat([module.reconstruct(chunk) for chunk in images.split(100)])
    evaluator = Evaluator(EvaluationConfig(metrics=["judge"], progress=False), judge=judge)
    real = evaluator.score((images / 2 + 0.5).clamp(0, 1), labels).metrics()["accuracy"]
    rec = evaluator.score((recon / 2 + 0.5).clamp(0, 1), labels).metrics()["accuracy"]
    psnr = (10 * torch.log10(4 / ((recon.clamp(-1, 1) - images) ** 2).mean(dim=(1, 2, 3)))).mean().item()
    record = {"val_psnr": round(metrics["val/psnr"], 2), "val_ssim": round(metrics["val/ssim"], 4),
              "psnr_val_digits": round(psnr, 2), "judge_real": round(real, 4), "judge_reconstructed": round(rec, 4),
              "scaling_factor": module.scaling_factor, "n": len(val)}  # fmt: skip
    print(record, flush=True)
    return record


def module_data(run: Path) -> Any:
    """The data module of a run's saved config (its validation split)."""
    from diffusion_lightning.utils.config import load_datamodule_config

    return load_datamodule_config(str(next(run.rglob("config.yaml"))))


# ---------------------------------------------------------------------------------------------- base


def fit_base(args: argparse.Namespace, out: Path, run: Path, digits: list[int] | None, snapshots: bool) -> float:
    argv = ["fit", "--config", str(REPO / "configs/t2i_digits.yaml"), "--trainer.default_root_dir", str(run),
            "--trainer.enable_progress_bar", "false", "--trainer.max_time", seconds_to_time(args.minutes * 60),
            "--model.init_args.components.pretrained_vae", str(out / "vae"),
            "--model.init_args.latent_cache_dir", str(out / "latents")]  # fmt: skip
    if digits is not None:
        argv += ["--data.init_args.digits", json.dumps(digits), "--trainer.max_steps", str(BASE07_STEPS)]
    argv += args.overrides
    callbacks = [WallClockSnapshots(run / "snapshots", args.snapshot_minutes * 60)] if snapshots else []
    start = time.perf_counter()
    DiffusionCLI(args=argv, trainer_defaults={"callbacks": callbacks})
    return time.perf_counter() - start


def part_base(args: argparse.Namespace, out: Path, judge: Any) -> dict[str, Any]:
    run = out / "base_run"
    if not (run / "checkpoints" / "last.ckpt").is_file() or args.retrain:
        seconds = fit_base(args, out, run, None, snapshots=True)
        print(f"base model trained in {seconds:.0f} s", flush=True)
    module = load_module(run / "checkpoints" / "last.ckpt")
    evaluator = scorer(args, judge, PROMPTS, args.n_per_prompt)
    over_time = []
    for path in sorted((run / "snapshots").glob("step=*.pt")):
        snapshot = torch.load(path, map_location="cpu", weights_only=True)
        module.unet.load_state_dict(snapshot["unet"])
        scores = judged(evaluator, module, args.guidance_scale)
        over_time.append({"minutes": round(snapshot["elapsed_s"] / 60, 2), "step": snapshot["step"], **scores})
        print(over_time[-1], flush=True)
    final_scorer = scorer(args, judge, PROMPTS, args.final_per_prompt)
    module = load_module(run / "checkpoints" / "last.ckpt")
    final = judged(final_scorer, module, args.guidance_scale)
    scale = float(module.guidance_scale if args.guidance_scale is None else args.guidance_scale)
    print(table(f"base model: judge accuracy against training time (DPM-Solver++ 20 steps, guidance {scale})",
                [{k: v for k, v in r.items() if k != "per_digit"} for r in over_time]))  # fmt: skip
    print(f"final ({args.final_per_prompt} per prompt): {final}", flush=True)
    sweep = [{"guidance_scale": g, **judged(final_scorer, module, g)} for g in GUIDANCE]
    print(table(f"final weights across guidance scales ({args.final_per_prompt} per prompt)",
                [{k: v for k, v in r.items() if k != "per_digit"} for r in sweep]))  # fmt: skip
    return {"over_time": over_time, "final": final, "guidance_scale": scale, "guidance": sweep}


# ---------------------------------------------------------------------------------------------- fine-tuning


def lora_config() -> dict[str, Any]:
    return yaml.safe_load((REPO / "configs/t2i_digits_lora.yaml").read_text())


def finetune_guidance(args: argparse.Namespace) -> float:
    """``--guidance-scale``, else the fine-tuning config's."""
    return float(lora_config()["model"]["init_args"]["guidance_scale"] if args.guidance_scale is None
                 else args.guidance_scale)  # fmt: skip


def finetune(args: argparse.Namespace, out: Path, mode: str) -> dict[str, Any]:
    """Run one fine-tune in a child process; return its timing record."""
    variant, _, prior = mode.partition("+")
    training_mode = "lora" if variant.startswith("lora") else variant
    run = out / "finetune" / mode.replace("+", "_")
    argv = ["fit", "--config", str(REPO / "configs/t2i_digits_lora.yaml"), "--trainer.default_root_dir", str(run),
            "--trainer.enable_progress_bar", "false",
            "--model.init_args.pretrained", str(out / "base07" / "pipeline"),
            "--model.init_args.training_mode", training_mode,
            "--model.init_args.learning_rate", str(LEARNING_RATES[variant]),
            "--model.init_args.latent_cache_dir", str(out / "latents")]  # fmt: skip
    if args.finetune_steps:
        argv += ["--trainer.max_steps", str(args.finetune_steps)]
    if variant == "lora_attention":  # SD's usual targets only
        argv += ["--model.init_args.lora_target_modules", "[to_k, to_q, to_v, to_out.0]"]
    if prior:
        argv += ["--model.init_args.prior_data_dir", str(out / "prior")]
    else:
        argv += ["--model.init_args.prior_data_dir", "null", "--model.init_args.prior_prompts", "null",
                 "--model.init_args.num_prior_images", "null"]  # fmt: skip
    argv += args.overrides
    shutil.rmtree(run, ignore_errors=True)  # no checkpoint of an earlier run beside this one's
    timing = run / "timing.json"
    start = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--child", str(timing), "--", *argv], check=True)
    record = json.loads(timing.read_text())
    record["process_seconds"] = time.perf_counter() - start
    return record


def child(timing: str, argv: list[str]) -> None:
    Path(timing).parent.mkdir(parents=True, exist_ok=True)
    DiffusionCLI(args=argv, trainer_defaults={"callbacks": [StepTimer(timing)]})


def from_demo(out: Path) -> None:
    """Start OUT from make demo-t2i's VAE, latent cache, base model on 0-7 and class images (copies)."""
    demo = REPO / "outputs/demo_t2i"
    copies = {"vae": "vae", "latents": "latents", "base_run": "base07/run", "prior": "prior"}
    missing = [str(demo / name) for name in copies if not (demo / name).exists()]
    if missing:
        raise SystemExit(f"error: --from-demo needs the outputs of make demo-t2i; missing: {', '.join(missing)}")
    for name, target in copies.items():
        shutil.rmtree(out / target, ignore_errors=True)
        shutil.copytree(demo / name, out / target)


def part_finetune(args: argparse.Namespace, out: Path, judge: Any) -> dict[str, Any]:
    base = out / "base07"
    if args.from_demo:
        from_demo(out)
    elif not (out / "vae").is_dir():
        part_vae(args, out, judge)
    if not (base / "run" / "checkpoints" / "last.ckpt").is_file() or args.retrain:
        seconds = fit_base(args, out, base / "run", list(range(8)), snapshots=False)
        print(f"base model on 0-7 trained in {seconds:.0f} s", flush=True)
    cli(["export", "--ckpt", str(base / "run" / "checkpoints" / "last.ckpt"), "--out", str(base / "pipeline"),
         "--overwrite"])  # fmt: skip
    old, new = scorer(args, judge, OLD, args.n_per_prompt), scorer(args, judge, NEW, args.n_per_prompt)
    base_module = load_module(base / "run" / "checkpoints" / "last.ckpt")
    scale = finetune_guidance(args)  # one guidance for every row: retention compares like with like
    reference = {"old": judged(old, base_module, scale), "new": judged(new, base_module, scale)}
    print(f"base (0-7): {reference}", flush=True)
    rows = [{"mode": "base (0-7)", "new_accuracy": reference["new"]["accuracy"],
             "old_accuracy": reference["old"]["accuracy"], "retention": 1.0}]  # fmt: skip
    for mode in args.modes:
        timing = finetune(args, out, mode)
        module = load_module(out / "finetune" / mode.replace("+", "_") / "checkpoints" / "last.ckpt")
        scores_new, scores_old = judged(new, module, scale), judged(old, module, scale)
        rows.append({
            "mode": mode, "new_accuracy": scores_new["accuracy"], "new_per_digit": scores_new["per_digit"],
            "old_accuracy": scores_old["accuracy"], "old_weakest": scores_old["weakest"],
            "retention": round(scores_old["accuracy"] / reference["old"]["accuracy"], 4),
            "trained_parameters": timing["trained_parameters"], "train_seconds": round(timing["train_seconds"], 1),
            "step_ms": round(timing["step_seconds"] * 1000, 1), "peak_rss_mb": round(timing["peak_rss_mb"]),
            "process_seconds": round(timing["process_seconds"], 1),
        })  # fmt: skip
        print(rows[-1], flush=True)
    steps = args.finetune_steps or lora_config()["trainer"]["max_steps"]
    print(table(f"teaching 8 and 9 ({steps} steps, 100 examples; judge, DPM-Solver++ 20 steps, guidance {scale})",
                [{k: v for k, v in r.items() if k != "new_per_digit"} for r in rows]))  # fmt: skip
    return {"base": reference, "rows": rows, "steps": steps, "guidance_scale": scale}


# ---------------------------------------------------------------------------------------------- demo

#: Runs in a fresh interpreter that imports diffusers and torch only: the demo's folders must be enough.
DIFFUSERS_ONLY = """
import sys, torch
from diffusers import StableDiffusionPipeline
pipeline_dir, lora_dir, out, n, guidance = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
prompts = sys.argv[6:]
pipe = StableDiffusionPipeline.from_pretrained(pipeline_dir)
pipe.set_progress_bar_config(disable=True)
def draw():
    images = []
    for i, prompt in enumerate(prompts):
        g = torch.Generator().manual_seed(i)
        images.append(pipe([prompt] * n, num_inference_steps=20, guidance_scale=guidance, generator=g,
                           output_type="pt").images)
    return torch.cat(images)
base = draw()
pipe.load_lora_weights(lora_dir)
torch.save({"base": base, "lora": draw(), "modules": sorted(m for m in sys.modules if m.startswith("diffusion_"))}, out)
"""


def part_demo(args: argparse.Namespace, out: Path, judge: Any) -> dict[str, Any]:
    """The demo's exports in a diffusers-only process: the base pipeline, then with the LoRA loaded."""
    demo = REPO / "outputs/demo_t2i"
    target = out / "demo_images.pt"
    guidance = finetune_guidance(args)
    subprocess.run([sys.executable, "-c", DIFFUSERS_ONLY, str(demo / "pipeline"), str(demo / "lora"), str(target),
                    str(args.n_per_prompt), str(guidance), *PROMPTS], check=True)  # fmt: skip
    drawn = torch.load(target, weights_only=True)
    assert not drawn["modules"], f"the diffusers-only process imported {drawn['modules']}"
    labels = torch.tensor([digits_in(p)[0] for p in PROMPTS]).repeat_interleave(args.n_per_prompt)
    evaluator = Evaluator(EvaluationConfig(metrics=["judge"], progress=False), judge=judge)
    record = {}
    for name in ("base", "lora"):
        result = evaluator.score(drawn[name], labels)
        correct = result.per_sample["correct_digit"].float()
        per_digit = {int(d): round(correct[labels == d].mean().item(), 4) for d in labels.unique()}
        old, new = correct[labels < 8].mean().item(), correct[labels >= 8].mean().item()
        record[name] = {"old_accuracy": round(old, 4), "new_accuracy": round(new, 4), "per_digit": per_digit}
    print(f"diffusers alone, guidance {guidance}: {record}", flush=True)
    return {"guidance_scale": guidance, **record}


def plots(out: Path, results: dict[str, Any]) -> None:
    if "base" in results:
        over_time = results["base"]["over_time"]
        figure, axis = plt.subplots(figsize=(6, 4))
        minutes = [r["minutes"] for r in over_time]
        axis.plot(minutes, [r["accuracy"] for r in over_time], marker="o", label="all digits")
        axis.plot(minutes, [r["weakest"] for r in over_time], marker="s", label="weakest digit")
        for t in (0.85, 0.95):
            axis.axhline(t, color="grey", lw=0.6, ls="--")
        axis.set(xlabel="training wall time (minutes, 2 CPU cores)", ylabel="judge accuracy",
                 title="text-to-image digits: prompts read by the judge")  # fmt: skip
        axis.legend()
        figure.tight_layout()
        figure.savefig(out / "accuracy_vs_time.png", dpi=120)
        plt.close(figure)
    if "finetune" in results:
        rows = results["finetune"]["rows"][1:]
        figure, axis = plt.subplots(figsize=(6, 4))
        for r in rows:
            axis.scatter(r["retention"], r["new_accuracy"], s=40)
            axis.annotate(r["mode"], (r["retention"], r["new_accuracy"]), fontsize=8, xytext=(4, 4),
                          textcoords="offset points")  # fmt: skip
        axis.axhline(0.85, color="grey", lw=0.6, ls="--")
        axis.axvline(0.95, color="grey", lw=0.6, ls="--")
        axis.set(xlabel="retention (accuracy on 0-7 / base's)", ylabel="accuracy on the new digits 8 and 9",
                 title="fine-tuning modes")  # fmt: skip
        figure.tight_layout()
        figure.savefig(out / "finetune.png", dpi=120)
        plt.close(figure)


def main() -> None:
    if "--child" in sys.argv:
        at = sys.argv.index("--child")
        child(sys.argv[at + 1], sys.argv[sys.argv.index("--") + 1 :])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", nargs="+", choices=("vae", "base", "finetune", "demo"),
                        default=["vae", "base", "finetune"])  # fmt: skip
    parser.add_argument("--minutes", type=float, default=15.0, help="training wall-time budget of a base model")
    parser.add_argument("--snapshot-minutes", type=float, default=1.0)
    parser.add_argument("--n-per-prompt", type=int, default=20, help="samples per prompt per snapshot / mode")
    parser.add_argument("--final-per-prompt", type=int, default=50, help="samples per prompt for the final score")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--finetune-steps", type=int, help="fine-tuning steps (default: the LoRA config's)")
    parser.add_argument(
        "--guidance-scale",
        type=float,
        help="sampling guidance (default: each base model's own; the LoRA config's for fine-tuning)",
    )
    parser.add_argument("--judge", default=str(JUDGE_DIR / "checkpoints" / "last.ckpt"))
    parser.add_argument("--out", default=str(REPO / "outputs/bench/t2i_digits"))
    parser.add_argument("--retrain", action="store_true", help="train again what OUT already holds")
    parser.add_argument("--from-demo", action="store_true",
                        help="finetune: start from make demo-t2i's VAE, base on 0-7 and class images")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    args.overrides = argv[split + 1 :]  # after "--": CLI overrides for every fit (base models and fine-tunes)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    judge = load_judge(judge_checkpoint(Path(args.judge)))
    results_file = out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    for part in args.part:
        run = {"vae": part_vae, "base": part_base, "finetune": part_finetune, "demo": part_demo}[part]
        results[part] = run(args, out, judge)
        results_file.write_text(json.dumps(results, indent=2) + "\n")
    plots(out, results)
    print(f"wrote {results_file}")


if __name__ == "__main__":
    main()
