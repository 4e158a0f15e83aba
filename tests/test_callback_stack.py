"""The whole callback stack from the YAML configs, as a user runs it, read back with TensorBoard."""

import pytest
import torch
from diffusers import UNet2DModel
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from diffusion_lightning.cli import main
from diffusion_lightning.utils.checkpoint import read_checkpoint
from tests.conftest import REPO

SMOKE = [
    "--config",
    str(REPO / "configs/smoke/ddpm_mnist.yaml"),
    "--config",
    str(REPO / "configs/smoke/callbacks.yaml"),
]


@pytest.fixture(scope="module")
def stack_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("stack")
    main(["fit", *SMOKE, "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false"])
    return root


def test_event_files_hold_scalars_histograms_and_images(stack_run):
    events = EventAccumulator(
        str(stack_run / "lightning_logs" / "version_0"), size_guidance={"images": 0, "histograms": 0, "scalars": 0}
    )
    events.Reload()
    tags = events.Tags()
    for prefix in ("debug/gradient/", "debug/activation/", "debug/parameters/", "diffusion/loss_t", "generation/"):
        assert any(tag.startswith(prefix) for tag in tags["scalars"]), prefix
    assert {"val/loss", "val/loss_raw", "latent/std"} <= set(tags["scalars"])
    assert any(tag.startswith("debug/") for tag in tags["histograms"])
    images = set(tags["images"])
    assert {"samples/grid", "generation/trajectory", "diffusion/summary"} <= images
    assert any(tag.startswith("attention/mid_block") for tag in images)
    # the EMA weights are validated, the raw ones too, and they differ
    ema, raw = events.Scalars("val/loss")[-1].value, events.Scalars("val/loss_raw")[-1].value
    assert ema != raw


def test_files_beside_the_run(stack_run):
    assert (stack_run / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list((stack_run / "samples").glob("epoch=*.png"))) == 2
    assert (stack_run / "metrics.json").is_file()


def test_export_writes_the_ema_weights(stack_run, tmp_path):
    ckpt = stack_run / "checkpoints" / "last.ckpt"
    checkpoint = read_checkpoint(ckpt)
    ema = {k.removeprefix("unet."): v for k, v in checkpoint["state_dict"].items() if k.startswith("unet.")}
    raw = {k.removeprefix("unet."): v for k, v in checkpoint["current_model_state"].items() if k.startswith("unet.")}
    assert any(not torch.equal(ema[k], raw[k]) for k in ema)
    main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "pipe")])
    exported = UNet2DModel.from_pretrained(tmp_path / "pipe" / "unet").state_dict()
    for name, value in exported.items():
        torch.testing.assert_close(value, ema[name], rtol=0, atol=0)
