"""Model cards: every exported folder has a README.md that huggingface_hub parses, and evaluate updates it."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from huggingface_hub import ModelCard

from diffusion_lightning import LatentDiffusionModule
from diffusion_lightning.callbacks import RunSummary
from diffusion_lightning.commands import evaluate, export
from diffusion_lightning.nets.latent import build_components
from diffusion_lightning.utils.model_card import EVALUATE_SOURCE, TRAINING_SOURCE, ModelCardOptions, read_run
from tests.conftest import RandomDigits, quiet_trainer, tiny_ddpm
from tests.test_autoencoder import tiny as tiny_vae
from tests.test_evaluation import TinyDigits, judge_checkpoint  # noqa: F401  (a fixture)

PROMPTS = ["a handwritten digit zero", "a digit two"]


def card(folder: Path) -> ModelCard:
    return ModelCard.load(folder / "README.md")


def results(folder: Path) -> dict[tuple[str, str], float]:
    """``(source, metric) -> value`` of the card's model-index."""
    return {(r.source_name, r.metric_type): r.metric_value for r in card(folder).data.eval_results or []}


def digest(folder: Path) -> dict[str, str]:
    """A hash of every file under ``folder`` but the card."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != "README.md"
    }


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> Path:
    """A 2-step digits run laid out as the CLI leaves it: checkpoints/, the RunSummary metrics.json, config.yaml."""
    root = tmp_path_factory.mktemp("digits_run")
    torch.manual_seed(0)
    trainer = quiet_trainer(root, max_steps=2, callbacks=[RunSummary(log_description=False, summary_figure=False)])
    trainer.fit(tiny_ddpm(num_inference_steps=2), torch.utils.data.DataLoader(RandomDigits(), batch_size=8))
    trainer.save_checkpoint(root / "checkpoints" / "last.ckpt")
    config = root / "lightning_logs" / "version_0" / "config.yaml"
    config.parent.mkdir(parents=True)
    config.write_text(
        "trainer:\n  max_steps: 2\ndata:\n  class_path: tests.test_evaluation.TinyDigits\n  init_args:\n    n: 60\n"
    )
    return root


def test_digits_export_card_describes_the_run(digits_run, tmp_path):
    ckpt = digits_run / "checkpoints" / "last.ckpt"
    out = export.main(["--ckpt", str(ckpt), "--out", str(tmp_path / "digits"), "--license", "mit"])
    for name in ("README.md", "samples.png", "pipeline.py", "model_index.json"):
        assert (out / name).is_file(), name
    data = card(out).data
    assert data.library_name == "diffusers" and data.license == "mit"
    assert data.pipeline_tag == "text-to-image"  # not unconditional: a class is asked for
    assert {"diffusers", "diffusion_lightning", "ddpm", "class-conditional", "UNet2DModel"} <= set(data.tags)
    assert data.base_model is None  # trained from scratch
    summary = json.loads((digits_run / "metrics.json").read_text())
    assert results(out)[(TRAINING_SOURCE, "train/loss")] == pytest.approx(summary["metrics"]["train/loss"])
    text = card(out).text
    assert "ClassConditionedDDPM" in text and "tests.test_evaluation.TinyDigits" in text and "n=60" in text
    assert "step 2" in text and "max_steps: 2" in text and "![samples](samples.png)" in text
    assert 'custom_pipeline="./digits", trust_remote_code=True' in text
    run = read_run(ckpt)
    assert run.global_step == 2 and run.run_steps == 2 and run.wall_time_s is not None and run.dataset == "TinyDigits"


def test_a_grid_of_the_run_is_copied_and_no_samples_skips_drawing(digits_run, tmp_path):
    ckpt = digits_run / "checkpoints" / "last.ckpt"
    export.main(["--ckpt", str(ckpt), "--out", str(tmp_path / "bare"), "--no-samples"])
    assert not (tmp_path / "bare" / "samples.png").exists()
    assert "No sample grid" in card(tmp_path / "bare").text
    run = tmp_path / "run"
    shutil.copytree(digits_run, run)
    (run / "samples").mkdir()
    for step in (1, 2):
        (run / "samples" / f"epoch=000-step={step:06d}.png").write_bytes(f"grid {step}".encode())
    export.main(["--ckpt", str(run / "checkpoints" / "last.ckpt"), "--out", str(tmp_path / "copied")])
    assert (tmp_path / "copied" / "samples.png").read_bytes() == b"grid 2"  # the newest


def test_bad_options_are_refused_naming_the_field(digits_run, tmp_path):
    ckpt = digits_run / "checkpoints" / "last.ckpt"
    with pytest.raises(SystemExit, match=r"--license='Apache 2\.0' is not accepted; give a Hugging Face Hub license"):
        export.main(["--ckpt", str(ckpt), "--out", str(tmp_path / "x"), "--license", "Apache 2.0"])
    assert not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match=r"license='MIT' is not accepted.*apache-2\.0"):
        ModelCardOptions(license="MIT")


def test_overwrite_replaces_the_card_and_touches_nothing_else(digits_run, tmp_path):
    ckpt = digits_run / "checkpoints" / "last.ckpt"
    out = tmp_path / "pipe"
    export.main(["--ckpt", str(ckpt), "--out", str(out), "--no-samples"])
    (out / "README.md").write_text("---\nlicense: apache-2.0\n---\nstale card\n")
    mine = tmp_path / "README.md"
    mine.write_text("the user's own notes")
    export.main(["--ckpt", str(ckpt), "--out", str(out), "--overwrite", "--no-samples"])
    assert "stale card" not in (out / "README.md").read_text() and card(out).data.license == "other"
    assert mine.read_text() == "the user's own notes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "pipe"]


@pytest.fixture(scope="module")
def sd_base(tmp_path_factory) -> Path:
    """A tiny Stable Diffusion folder, the base model of the fine-tunes."""
    folder = tmp_path_factory.mktemp("sd") / "base"
    pipeline = StableDiffusionPipeline(
        **build_components({"seed": 3}), safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipeline.save_pretrained(folder)
    return folder


def latent(base: Path, mode: str) -> LatentDiffusionModule:
    return LatentDiffusionModule(
        pretrained=str(base), training_mode=mode, lora_rank=2, num_inference_steps=2, validation_prompts=PROMPTS
    )


def test_latent_full_and_lora_cards_name_the_base_model(sd_base, tmp_path):
    options = ModelCardOptions(license="openrail++", samples=True)
    full = latent(sd_base, "full").export_pipeline(tmp_path / "full", card=options)
    data = card(full).data
    assert data.pipeline_tag == "text-to-image" and data.library_name == "diffusers" and data.license == "openrail++"
    assert data.base_model == str(sd_base) and data.base_model_relation == "finetune"
    assert {"diffusers", "diffusion_lightning", "ddpm", "text-to-image", "UNet2DConditionModel"} <= set(data.tags)
    assert "lora" not in data.tags and (full / "samples.png").is_file()
    assert 'DiffusionPipeline.from_pretrained("./full")' in card(full).text

    module = latent(sd_base, "lora")
    lora = module.export_pipeline(tmp_path / "lora", card=options)
    assert sorted(p.name for p in lora.iterdir()) == ["README.md", "pytorch_lora_weights.safetensors", "samples.png"]
    data = card(lora).data
    assert data.base_model == str(sd_base) and data.base_model_relation == "adapter" and "lora" in data.tags
    text = card(lora).text
    assert f'from_pretrained("{sd_base}")' in text and 'pipe.load_lora_weights("./lora")' in text
    assert "LoRA rank: 2" in text and "training mode: lora" in text

    merged = module.export_pipeline(tmp_path / "merged", merge_lora=True)
    data = card(merged).data
    assert data.base_model_relation == "finetune" and "lora" in data.tags and (merged / "model_index.json").is_file()


def test_vae_card(tmp_path):
    module = tiny_vae()
    folder = module.export_pipeline(tmp_path / "vae")
    data = card(folder).data
    assert data.library_name == "diffusers" and data.pipeline_tag is None and data.license == "other"
    assert {"diffusers", "diffusion_lightning", "AutoencoderKL"} <= set(data.tags) and data.base_model is None
    assert 'AutoencoderKL.from_pretrained("./vae")' in card(folder).text
    tuned = type(module)(pretrained=str(folder)).export_pipeline(tmp_path / "tuned")
    assert card(tuned).data.base_model == str(folder)


def test_evaluate_puts_its_metrics_into_the_card(tmp_path, judge_checkpoint, monkeypatch):  # noqa: F811
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))  # no Inception weights: auto is digits
    folder = tiny_ddpm(num_inference_steps=2).export_pipeline(tmp_path / "pipe")
    (folder / "notes.txt").write_text("kept")
    before = digest(folder)
    data = tmp_path / "data.yaml"
    data.write_text("data:\n  class_path: tests.test_evaluation.TinyDigits\n")
    common = ["--judge", str(judge_checkpoint), "--data", str(data), "--cache-dir", str(tmp_path / "cache")]
    common += ["--n-samples", "12", "--steps", "2", "--no-progress", "--logger", "none", "--pipeline", str(folder)]
    result = evaluate.main(common)
    found = results(folder)
    assert found[(EVALUATE_SOURCE, "accuracy")] == pytest.approx(result.metrics()["accuracy"])
    assert not any("=" in metric for _, metric in found)  # headline numbers, not one per class
    assert "| accuracy |" in card(folder).text and "No metrics yet" not in card(folder).text
    assert digest(folder) == before  # only the card changed

    again = evaluate.main([*common, "--seed", "1"])
    found = results(folder)
    assert found[(EVALUATE_SOURCE, "accuracy")] == pytest.approx(again.metrics()["accuracy"])
    assert len([m for s, m in found if m == "accuracy"]) == 1  # replaced, not appended
    assert card(folder).text.count("## Evaluation") == 1
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]  # no temporary left
