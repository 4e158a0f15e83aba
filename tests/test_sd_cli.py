"""The CLI end to end on ``configs/smoke/sd_tiny.yaml``: LoRA fit, logs, resume, export, merge and sample."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from diffusion_lightning import load_module
from diffusion_lightning.cli import main
from tests.conftest import REPO

CONFIG = REPO / "configs" / "smoke" / "sd_tiny.yaml"
PROMPT = "a handwritten digit seven"


def fit(root: Path, *extra: str) -> None:
    main(
        ["fit", "--config", str(CONFIG), "--trainer.default_root_dir", str(root),
         "--trainer.enable_progress_bar", "false", *extra]
    )  # fmt: skip


@pytest.fixture(scope="module")
def sd_run(tmp_path_factory) -> Path:
    """One LoRA smoke run (4 steps, one validation) shared by the tests of this file."""
    root = tmp_path_factory.mktemp("sd_tiny")
    fit(root)
    return root


def images(pipeline: StableDiffusionPipeline, seed: int = 0) -> torch.Tensor:
    pipeline.set_progress_bar_config(disable=True)
    out = pipeline(PROMPT, num_inference_steps=2, guidance_scale=3.0, height=16, width=16,
                   generator=torch.Generator().manual_seed(seed), output_type="pt")  # fmt: skip
    return out.images


def test_checkpoints_hold_only_the_adapters(sd_run):
    ckpts = sorted(p.name for p in (sd_run / "checkpoints").iterdir())
    assert "last.ckpt" in ckpts and any(name.startswith("best-") for name in ckpts), ckpts
    for name in ckpts:
        state = torch.load(sd_run / "checkpoints" / name, map_location="cpu", weights_only=False)["state_dict"]
        assert state and all("lora_" in key for key in state), (name, [k for k in state if "lora_" not in k][:3])


def test_validation_samples_and_cross_attention_on_disk_and_in_tensorboard(sd_run):
    assert list(sd_run.glob("samples/epoch=*-step=*.png"))  # SampleGridLogger: the validation prompts' grid
    strips = sorted(p.name for p in sd_run.glob("attention/cross/step=*/*.png"))
    assert "00.png" in strips and any(name.startswith("00_t=") for name in strips), strips

    events = EventAccumulator(str(sd_run / "lightning_logs" / "version_0"), size_guidance={"images": 0})
    events.Reload()
    tags = events.Tags()["images"]
    assert any(tag.startswith("attention/cross/") for tag in tags), tags
    assert "samples/grid" in tags, tags


def test_exported_adapters_load_into_a_fresh_base_pipeline_and_change_it(sd_run, tmp_path):
    ckpt = sd_run / "checkpoints" / "last.ckpt"
    main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "lora")])
    assert "pytorch_lora_weights.safetensors" in [p.name for p in (tmp_path / "lora").iterdir()]

    module = load_module(ckpt)
    parts = module.base_components()
    parts["scheduler"] = module.sampling_scheduler()
    pipeline = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)  # fmt: skip
    plain = images(pipeline)
    pipeline.load_lora_weights(tmp_path / "lora")
    adapted = images(pipeline)
    assert (adapted - plain).abs().max() > 1e-4
    torch.testing.assert_close(adapted, images(module.build_pipeline()), atol=1e-5, rtol=1e-4)


def test_merged_export_loads_without_adapters_and_samples_from_the_cli(sd_run, tmp_path):
    ckpt = sd_run / "checkpoints" / "last.ckpt"
    main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "merged"), "--merge-lora"])
    merged = StableDiffusionPipeline.from_pretrained(tmp_path / "merged")
    assert not [key for key in merged.unet.state_dict() if "base_layer" in key or "lora" in key]
    torch.testing.assert_close(images(merged), images(load_module(ckpt).build_pipeline()), atol=1e-4, rtol=1e-3)

    out = tmp_path / "samples"
    main(["sample", "--pipeline", str(tmp_path / "merged"), "--prompt", "a digit", "--n-per-prompt", "2",
          "--steps", "2", "--out", str(out)])  # fmt: skip
    assert (out / "samples.png").is_file()
    assert sorted(p.name for p in (out / "prompt=0").iterdir()) == ["sample=000.png", "sample=001.png"]


def test_resume_with_ckpt_path_last(sd_run):
    """Last in the file: it continues the shared run (the other tests read its first epoch)."""
    before = json.loads((sd_run / "metrics.json").read_text())["global_step"]
    fit(sd_run, "--trainer.max_epochs", "2", "--ckpt_path", "last")
    summary = json.loads((sd_run / "metrics.json").read_text())
    assert before == 4 and summary["global_step"] > before
    assert summary["steps_this_run"] == summary["global_step"] - before
    ckpt = torch.load(sd_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == summary["global_step"] and all("lora_" in key for key in ckpt["state_dict"])


def test_resumed_epochs_are_as_long_as_fresh_ones(tmp_path):
    fit(tmp_path)
    fit(tmp_path, "--trainer.max_epochs", "2", "--ckpt_path", "last")
    # as a fresh 2-epoch run: the end-of-epoch checkpoint must not shorten the epochs after it
    assert json.loads((tmp_path / "metrics.json").read_text())["global_step"] == 8
