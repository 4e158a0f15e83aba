"""AutoencoderKLModule: argument checks, the CLI smoke fit, the objective, the latent scale, export and EMA."""

from __future__ import annotations

import json
import math

import pytest
import torch
from diffusers import AutoencoderKL
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader
from torchmetrics.functional.image import structural_similarity_index_measure

from diffusion_lightning import EMA, AutoencoderKLModule, ImageCaptionDataModule, MNISTDataModule, ReconstructionLogger
from diffusion_lightning.cli import main
from diffusion_lightning.modules.loading import load_module, load_pipeline_source, module_class
from diffusion_lightning.utils.seeding import mix_seed
from tests.conftest import REPO

TINY = {"block_out_channels": [8, 16], "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 4}


def tiny(**kwargs) -> AutoencoderKLModule:
    return AutoencoderKLModule(vae=dict(TINY), **kwargs)


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    dm = MNISTDataModule(source="embedded", batch_size=16)
    dm.setup("fit")
    return torch.stack([dm.datasets["train"][i]["images"] for i in range(16)])


def trainer(**kwargs) -> Trainer:
    options = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return Trainer(**{**options, **kwargs})


# ---------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"loss_type": "l3"}, "loss_type"),
        ({"kl_weight": -1.0}, "kl_weight"),
        ({"lpips_weight": -0.5}, "lpips_weight"),
        ({"learning_rate": 0.0}, "learning_rate"),
        ({"in_channels": 0}, "in_channels"),
        ({"image_size": 0}, "image_size"),
        ({"scale_batches": -1}, "scale_batches"),
        ({"vae": {"bogus": 1}}, "bogus"),
        ({"vae": {"in_channels": 3}}, "vae.in_channels"),
        ({"vae": {"block_out_channels": [8, 12], "norm_num_groups": 8}}, "norm_num_groups"),
        ({"vae": {"block_out_channels": [8, 8, 8], "norm_num_groups": 4}, "image_size": 30}, "image_size"),
        ({"vae": {}, "pretrained": "some/vae"}, "pretrained"),
    ],
)
def test_bad_arguments_raise_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        AutoencoderKLModule(**kwargs)


def test_lpips_with_a_missing_weights_file_fails_naming_it(tmp_path):
    missing = tmp_path / "alexnet-missing.pth"
    with pytest.raises(FileNotFoundError, match="alexnet-missing.pth"):
        tiny(lpips_weight=0.5, lpips_weights=str(missing))


@pytest.mark.parametrize("kwargs", [{"every_n_epochs": 0}, {"num_images": 0}, {"scale": 0}])
def test_reconstruction_logger_checks_its_arguments(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        ReconstructionLogger(**kwargs)


# ---------------------------------------------------------------------- the CLI smoke fit, checkpoint and export


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("vae")
    args = ["--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false"]
    main(["fit", "--config", str(REPO / "configs/smoke/vae_digits.yaml"), *args])
    return root


def test_smoke_fit_logs_losses_psnr_ssim_and_reconstructions(smoke_run):
    summary = json.loads((smoke_run / "metrics.json").read_text())
    assert summary["status"] == "finished" and summary["global_step"] == 8
    metrics = summary["metrics"]
    for key in ("train/loss", "train/rec_loss", "train/kl", "val/loss", "val/psnr", "val/ssim"):
        assert key in metrics and math.isfinite(metrics[key]), key
    assert metrics["val/psnr"] > 0 and -1 <= metrics["val/ssim"] <= 1
    pngs = sorted((smoke_run / "reconstructions").glob("*.png"))
    assert [p.name for p in pngs] == ["epoch=000-step=000004.png", "epoch=001-step=000008.png"]


def test_scaling_factor_is_one_over_the_latent_std_of_the_training_data(smoke_run):
    module = load_module(smoke_run / "checkpoints" / "last.ckpt")
    factor = module.scaling_factor
    assert factor != 1.0 and module.vae.config.scaling_factor == pytest.approx(factor)
    dm = ImageCaptionDataModule(source="embedded", resolution=16, max_samples=256, batch_size=16)  # the smoke config's
    dm.setup("fit")
    train = dm.datasets["train"]
    loader = DataLoader(train, batch_size=16, shuffle=False, collate_fn=dm.collate(train))
    latents = []
    with torch.no_grad():
        for index, batch in zip(range(2), loader):  # scale_batches: 2
            generator = torch.Generator().manual_seed(mix_seed(module.seed, 0x5CA1E, index))
            latents.append(module.vae.encode(batch["images"]).latent_dist.sample(generator))
    assert factor == pytest.approx(1.0 / torch.cat(latents).double().std().item(), rel=1e-5)


def test_export_loads_with_the_scaling_factor_and_reproduces_the_decode(smoke_run, tmp_path):
    ckpt = smoke_run / "checkpoints" / "last.ckpt"
    out = tmp_path / "vae"
    main(["export", "--ckpt", str(ckpt), "--out", str(out)])
    module = load_module(ckpt)
    loaded = AutoencoderKL.from_pretrained(out).eval()
    assert loaded.config.scaling_factor == pytest.approx(module.scaling_factor)
    latents = torch.randn(2, 4, 14, 14, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded.decode(latents).sample, module.vae.decode(latents).sample)
    with pytest.raises(SystemExit, match="not a pipeline"):  # export's --out rules hold
        main(["export", "--ckpt", str(ckpt), "--out", str(smoke_run / "checkpoints")])
    with pytest.raises(SystemExit, match="already holds a pipeline; add --overwrite"):
        main(["export", "--ckpt", str(ckpt), "--out", str(out)])
    (out / "config.json").write_text("{}")  # replaced as a whole with --overwrite
    main(["export", "--ckpt", str(ckpt), "--out", str(out), "--overwrite"])
    assert AutoencoderKL.from_pretrained(out).config.scaling_factor == pytest.approx(module.scaling_factor)


def test_loading_accepts_exportable_modules_only(smoke_run):
    with pytest.raises(ValueError, match="export_pipeline"):
        module_class({"hyper_parameters": {"_class_path": "diffusion_lightning.DigitClassifier"}})
    with pytest.raises(ValueError, match="no sampling pipeline"):
        load_pipeline_source(ckpt=smoke_run / "checkpoints" / "last.ckpt")


# ---------------------------------------------------------------------- the objective


def test_validation_kl_psnr_ssim_match_a_direct_recomputation(digits):
    torch.manual_seed(0)
    module = tiny(kl_weight=1e-3)
    trainer().validate(module, DataLoader([{"images": digits}], batch_size=None), verbose=False)
    logged = module.trainer.callback_metrics
    with torch.no_grad():
        posterior = module.vae.encode(digits).latent_dist
        kl = (0.5 * (posterior.mean**2 + posterior.var - 1 - posterior.logvar).sum(dim=(1, 2, 3))).mean()
        rec = module.vae.decode(posterior.mean).sample
    rec_loss = (rec - digits).abs().mean()
    a, b = ((rec + 1) / 2).clamp(0, 1), ((digits + 1) / 2).clamp(0, 1)
    psnr = 10 * torch.log10(1 / (a - b).square().mean())
    ssim = structural_similarity_index_measure(a, b, data_range=1.0)
    assert float(logged["val/kl"]) == pytest.approx(kl.item(), rel=1e-4)
    assert float(logged["val/psnr"]) == pytest.approx(psnr.item(), rel=1e-4)
    assert float(logged["val/ssim"]) == pytest.approx(ssim.item(), rel=1e-4, abs=1e-6)
    assert float(logged["val/loss"]) == pytest.approx((rec_loss + 1e-3 * kl).item(), rel=1e-4)


def test_loss_drops_when_overfitting_one_batch(digits):
    torch.manual_seed(0)
    module = tiny(learning_rate=3e-3, scale_batches=0)
    with torch.no_grad():
        before = module.losses(digits)["loss"].item()
    loader = DataLoader([{"images": digits}] * 40, batch_size=None)
    trainer(max_epochs=1, limit_val_batches=0).fit(module, loader)
    with torch.no_grad():
        after = module.losses(digits)["loss"].item()
    assert after < 0.6 * before, (before, after)


def test_training_samples_the_posterior_with_the_seeded_generator(digits):
    module = tiny()
    first = module.losses(digits, module.generator(0, 0, 0))["rec_loss"]
    again = module.losses(digits, module.generator(0, 0, 0))["rec_loss"]
    other = module.losses(digits, module.generator(0, 1, 0))["rec_loss"]
    assert first.item() == again.item() and first.item() != other.item()


def test_measure_scaling_factor_sets_buffer_and_config(digits):
    module = tiny()
    factor = module.measure_scaling_factor([{"images": digits}], max_batches=1)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(mix_seed(0, 0x5CA1E, 0))
        std = module.vae.encode(digits).latent_dist.sample(generator).double().std().item()
    assert factor == pytest.approx(1 / std, rel=1e-6)
    assert module.scaling_factor == pytest.approx(factor) and module.vae.config.scaling_factor == pytest.approx(factor)
    assert module.state_dict()["latent_scaling_factor"].item() == pytest.approx(factor)


def test_ema_with_its_default_scope_averages_the_vae(digits):
    module = tiny(scale_batches=1)
    ema = EMA(decay=0.9)
    loader = DataLoader([{"images": digits}] * 3, batch_size=None)
    fit = trainer(max_epochs=1, callbacks=[ema], limit_val_batches=1)
    fit.fit(module, loader, DataLoader([{"images": digits}], batch_size=None))
    assert fit.state.finished and ema._module_name == "vae"
    assert all(torch.isfinite(p).all() for p in module.vae.parameters())
