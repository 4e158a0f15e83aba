"""The whole callback stack from the YAML configs, as a user runs it, read back with TensorBoard.

The same stacks serve the class-conditioned DDPM and the latent text-to-image model.
"""

import pytest
import torch
import yaml
from diffusers import UNet2DModel
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from diffusion_lightning.cli import main
from diffusion_lightning.modules.loading import read_checkpoint
from tests.conftest import REPO
from tests.test_ddp import write_judge

DDPM = str(REPO / "configs/smoke/ddpm_mnist.yaml")
SD = str(REPO / "configs/smoke/sd_tiny.yaml")
QUIET = ["--trainer.enable_progress_bar", "false"]


def with_evaluation(stack: str, root, **evaluation) -> str:
    """``stack`` with a PeriodicEvaluation every epoch that scores with a tiny judge (no download)."""
    write_judge(root / "judge.ckpt")
    config = yaml.safe_load((REPO / stack).read_text())
    settings = {
        "n_samples": 10,
        "batch_size": 10,
        "num_inference_steps": 2,
        "metrics": ["judge", "fid", "kid", "precision_recall"],
        "feature_extractor": "digits",
        "judge": str(root / "judge.ckpt"),
        "cache_dir": str(root / "cache"),
        "kid_subsets": 4,
        **evaluation,
    }
    entry = {"class_path": "diffusion_lightning.callbacks.PeriodicEvaluation", "init_args": {"every_n_epochs": 1}}
    entry["init_args"]["evaluation"] = settings
    config["trainer"]["callbacks"].insert(-1, entry)
    path = root / "stack.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def events_of(root) -> EventAccumulator:
    events = EventAccumulator(
        str(root / "lightning_logs" / "version_0"), size_guidance={"images": 0, "histograms": 0, "scalars": 0}
    )
    events.Reload()
    return events


@pytest.fixture(scope="module")
def ddpm_stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("stack")
    stack = with_evaluation("configs/smoke/callbacks.yaml", root)
    main(["fit", "--config", DDPM, "--config", stack, "--trainer.default_root_dir", str(root), *QUIET])
    return root


@pytest.fixture(scope="module")
def t2i_stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("t2i_stack")
    stack = with_evaluation("configs/smoke/callbacks_t2i.yaml", root)
    main(["fit", "--config", SD, "--config", stack, "--trainer.default_root_dir", str(root), *QUIET])
    return root


def assert_full_stack(events: EventAccumulator) -> set[str]:
    tags = events.Tags()
    scalars, images = set(tags["scalars"]), set(tags["images"])
    for prefix in ("diffusion/loss_t", "val/loss_t", "debug/gradient/", "debug/activation/", "generation/", "evals/"):
        assert any(tag.startswith(prefix) for tag in scalars), prefix
    assert {"val/loss", "val/loss_raw", "latent/std", "evals/fid", "evals/accuracy", "evals/precision"} <= scalars
    assert {"train/samples", "train/device/samples_per_sec", "validate/samples"} <= scalars  # ThroughputMonitor
    assert "DeviceStatsMonitor.on_train_batch_end/cpu_percent" in scalars
    assert any(tag.startswith("debug/") for tag in tags["histograms"])
    assert {"samples/grid", "generation/samples", "generation/trajectory", "diffusion/summary"} <= images
    # the EMA weights are validated, the raw ones too, and they differ
    assert events.Scalars("val/loss")[-1].value != events.Scalars("val/loss_raw")[-1].value
    return images


def test_ddpm_event_files_hold_scalars_histograms_and_images(ddpm_stack):
    images = assert_full_stack(events_of(ddpm_stack))
    assert any(tag.startswith("attention/mid_block") for tag in images)


def test_t2i_event_files_hold_scalars_histograms_and_images(t2i_stack):
    events = events_of(t2i_stack)
    images = assert_full_stack(events)
    block = "attention/mid_block.attentions.0.transformer_blocks.0"
    assert {f"{block}.attn1/t=0", f"{block}.attn2/t=0", "attention/cross/0"} <= images  # self and cross
    assert f"{block}.attn1/entropy" in events.Tags()["scalars"]
    # the grid's rows are labelled with the prompt: wider than the bare 2 x (16 + 2) + 2 px grid, upscaled x2
    grid = events.Images("samples/grid")[-1]
    assert grid.width > (2 * 18 + 2) * 2 and grid.height == (18 + 2) * 2
    # the evaluation read the validation prompt's digit with the judge
    assert events.Scalars("evals/accuracy")[-1].value in (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


@pytest.mark.parametrize("stack", ["ddpm_stack", "t2i_stack"])
def test_files_beside_the_run(stack, request):
    root = request.getfixturevalue(stack)
    assert (root / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list((root / "samples").glob("epoch=*.png"))) >= 1
    assert (root / "metrics.json").is_file()
    assert (root / "eval" / "epoch=0" / "metrics.json").is_file()


def test_export_writes_the_ema_weights(ddpm_stack, tmp_path):
    ckpt = ddpm_stack / "checkpoints" / "last.ckpt"
    checkpoint = read_checkpoint(ckpt)
    ema = {k.removeprefix("unet."): v for k, v in checkpoint["state_dict"].items() if k.startswith("unet.")}
    raw = {k.removeprefix("unet."): v for k, v in checkpoint["current_model_state"].items() if k.startswith("unet.")}
    assert any(not torch.equal(ema[k], raw[k]) for k in ema)
    main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "pipe")])
    exported = UNet2DModel.from_pretrained(tmp_path / "pipe" / "unet").state_dict()
    for name, value in exported.items():
        torch.testing.assert_close(value, ema[name], rtol=0, atol=0)


@pytest.mark.parametrize(
    ("model", "stack"),
    [
        (DDPM, "configs/callbacks/default.yaml"),
        (SD, "configs/callbacks/default.yaml"),
        (SD, "configs/callbacks/t2i.yaml"),
    ],
)
def test_shipped_stacks_run_on_both_model_kinds(model, stack, tmp_path):
    overrides = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1"]
    main(["fit", "--config", model, "--config", str(REPO / stack), "--trainer.default_root_dir", str(tmp_path)]
         + overrides + QUIET)  # fmt: skip
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file() and (tmp_path / "metrics.json").is_file()
    scalars = set(events_of(tmp_path).Tags()["scalars"])
    assert any(tag.startswith("val/loss_t") for tag in scalars)
