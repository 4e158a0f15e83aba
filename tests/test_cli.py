"""The command line as the README uses it: parse every config, fit, export, sample."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import UNet2DModel

from diffusion_lightning import ClassConditionedPipeline, LatentDiffusionModule
from diffusion_lightning.cli import DiffusionCLI, main
from tests.conftest import REPO

#: Fit configs (configs/search/ holds search files of `tune`, checked against their base configs in test_tune.py).
CONFIGS = sorted(p for p in (REPO / "configs").rglob("*.yaml") if p.relative_to(REPO / "configs").parts[0] != "search")
#: Second configs that add to a model config (``--config model.yaml --config overlay.yaml``), with the base to test on.
OVERLAY_BASES = {
    "callbacks/default.yaml": "ddpm_mnist.yaml",
    "ddpm_mnist_v.yaml": "ddpm_mnist.yaml",
    "callbacks/t2i.yaml": "smoke/sd_tiny.yaml",
    "smoke/callbacks.yaml": "smoke/ddpm_mnist.yaml",
    "smoke/callbacks_t2i.yaml": "smoke/sd_tiny.yaml",
}


@pytest.fixture(scope="module")
def local_sd(tmp_path_factory) -> list[str]:
    """Overrides that point the GPU Stable Diffusion configs at a tiny local model, caption folder and VAE, on CPU.

    An SDXL twin of the model is written beside it, at ``model_xl``, and a Flux one at ``model_flux``
    (see :func:`config_args`).
    """
    import PIL.Image
    from diffusers import FluxPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    from diffusion_lightning.nets.flux import build_flux_components
    from diffusion_lightning.nets.latent import build_components
    from diffusion_lightning.nets.latent_xl import build_xl_components

    root = tmp_path_factory.mktemp("sd")
    parts = build_components()
    StableDiffusionPipeline(
        **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    ).save_pretrained(root / "model")
    StableDiffusionXLPipeline(**build_xl_components(), add_watermarker=False).save_pretrained(root / "model_xl")
    FluxPipeline(**build_flux_components()).save_pretrained(root / "model_flux")
    (root / "data").mkdir()
    PIL.Image.new("RGB", (20, 20), "white").save(root / "data" / "a.png")
    (root / "data" / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "a white square"}) + "\n")
    parts["vae"].save_pretrained(root / "vae")
    return [
        "--model.init_args.pretrained", str(root / "model"), "--data.init_args.root", str(root / "data"),
        "--trainer.accelerator", "cpu", "--trainer.precision", "32",
        "--model.init_args.components.pretrained_vae", str(root / "vae"),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def local_teacher(tmp_path_factory) -> list[str]:
    """Points the distillation configs at a small local 28x28 MNIST teacher instead of the demo's run."""
    from diffusion_lightning.nets import UNetConfig, build_unet
    from diffusion_lightning.schedulers import make_scheduler, training_scheduler

    torch.manual_seed(0)
    unet = build_unet(UNetConfig(block_out_channels=(16, 32), norm_num_groups=4), sample_size=28, in_channels=1,
                      num_classes=10)  # fmt: skip
    scheduler = make_scheduler("ddim", training_scheduler(prediction_type="v_prediction"))
    folder = tmp_path_factory.mktemp("teacher") / "pipeline"
    ClassConditionedPipeline(unet=unet, scheduler=scheduler).save_pretrained(folder)
    return ["--model.init_args.teacher", str(folder)]


def config_args(config: Path, local_sd: list[str] | None = None, local_teacher: list[str] | None = None) -> list[str]:
    name = config.relative_to(REPO / "configs").as_posix()
    model = yaml.safe_load(config.read_text()).get("model") or {}
    if "class_path" in model:
        init = model.get("init_args") or {}
        local = list(local_sd or [])
        twins = {"StableDiffusionXLModule": "_xl", "FluxModule": "_flux"}  # the SDXL and Flux twins of local_sd
        if local and model["class_path"].rsplit(".", 1)[-1] in twins:
            local[local.index("--model.init_args.pretrained") + 1] += twins[model["class_path"].rsplit(".", 1)[-1]]
        at = local.index("--model.init_args.components.pretrained_vae") if local else 0
        extra = [
            *(local[:at] if init.get("pretrained") else []),
            *(local[at:] if (init.get("components") or {}).get("pretrained_vae") else []),
            *(local_teacher or [] if init.get("teacher") else []),
        ]
        return ["--config", str(config), *extra]
    assert name in OVERLAY_BASES, f"{name} has no model: add it to OVERLAY_BASES with the config it extends"
    return ["--config", str(REPO / "configs" / OVERLAY_BASES[name]), "--config", str(config)]


def test_there_are_configs():
    names = {p.relative_to(REPO / "configs").as_posix() for p in CONFIGS}
    assert {"ddpm_mnist.yaml", "ddpm_cifar10.yaml", "smoke/ddpm_mnist.yaml", "smoke/ddpm_cifar10.yaml"} <= names


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.relative_to(REPO / "configs").as_posix())
def test_every_config_parses_against_the_code(config, local_sd, local_teacher):
    cli = DiffusionCLI(args=config_args(config, local_sd, local_teacher), run=False)
    assert cli.model is not None and cli.datamodule is not None
    # data properties reach the model through the links
    assert cli.model.num_classes == cli.datamodule.num_classes
    if isinstance(cli.model, LatentDiffusionModule):
        assert cli.model.image_size == cli.datamodule.image_size
    elif hasattr(cli.model, "unet"):
        assert cli.model.unet.config.sample_size == cli.datamodule.image_size
    if config.parent.name == "callbacks" or config.name.startswith("callbacks"):
        names = {type(c).__name__ for c in cli.trainer.callbacks}
        stack = {"EMA", "GradientActivationWatcher", "TimestepLossLogger", "GenerationMonitor", "SampleGridLogger"}
        assert stack <= names


def test_help_lists_the_extra_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in ("fit", "validate", "test", "predict", "sample", "export"):
        assert command in out
    # the extra commands are listed one per line, not reflowed into a paragraph
    lines = [line.split() for line in out.splitlines()]
    for command in ("analyze", "evaluate", "sample", "export", "tune"):
        assert any(words[:1] == [command] and len(words) > 2 for words in lines), command


def test_model_help_documents_shared_training_options(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--model.help", "ClassConditionedDDPM"])
    out = capsys.readouterr().out
    for option in ("--model.prediction_type", "--model.snr_gamma", "--model.p_uncond", "--model.net.help"):
        assert option in out
    assert "Min-SNR-gamma" in out  # the docstrings document every field


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("smoke")
    main(
        [
            "fit",
            "--config",
            str(REPO / "configs/smoke/ddpm_mnist.yaml"),
            "--trainer.default_root_dir",
            str(root),
            "--trainer.enable_progress_bar",
            "false",
        ]
    )
    return root


def test_fit_writes_best_and_last_checkpoints_and_a_summary(smoke_run):
    ckpts = sorted(p.name for p in (smoke_run / "checkpoints").iterdir())
    assert "last.ckpt" in ckpts and any(name.startswith("best-") for name in ckpts)
    summary = json.loads((smoke_run / "metrics.json").read_text())
    assert summary["status"] == "finished" and summary["global_step"] == 8
    assert {"train/loss", "val/loss"} <= set(summary["metrics"])
    assert (smoke_run / "lightning_logs" / "version_0" / "config.yaml").is_file()
    assert any((smoke_run / "lightning_logs" / "version_0").glob("events.out.tfevents.*"))


def test_resume_with_ckpt_path_last(smoke_run):
    main(
        [
            "fit",
            "--config",
            str(REPO / "configs/smoke/ddpm_mnist.yaml"),
            "--trainer.default_root_dir",
            str(smoke_run),
            "--trainer.max_epochs",
            "3",
            "--ckpt_path",
            "last",
            "--trainer.enable_progress_bar",
            "false",
        ]
    )
    summary = json.loads((smoke_run / "metrics.json").read_text())
    assert summary["global_step"] == 12 and summary["steps_this_run"] == 4


def test_export_and_sample_from_the_readme(smoke_run, tmp_path):
    ckpt = smoke_run / "checkpoints" / "last.ckpt"
    main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "pipeline")])
    assert (tmp_path / "pipeline" / "model_index.json").is_file()
    UNet2DModel.from_pretrained(tmp_path / "pipeline" / "unet")
    main(
        [
            "sample",
            "--pipeline",
            str(tmp_path / "pipeline"),
            "--out",
            str(tmp_path / "samples"),
            "--n-per-class",
            "2",
            "--steps",
            "3",
            "--classes",
            "1",
            "7",
        ]
    )
    assert (tmp_path / "samples" / "samples.png").is_file()
    assert sorted(p.name for p in (tmp_path / "samples" / "class=7").iterdir()) == ["sample=000.png", "sample=001.png"]
    meta = json.loads((tmp_path / "samples" / "samples.json").read_text())
    assert meta["classes"] == [1, 7] and meta["num_inference_steps"] == 3 and meta["scheduler"] == "dpm"
    main(
        [
            "sample",
            "--ckpt",
            str(ckpt),
            "--out",
            str(tmp_path / "from_ckpt"),
            "--n-per-class",
            "1",
            "--steps",
            "2",
            "--scheduler",
            "ddim",
            "--no-images",
        ]
    )
    meta = json.loads((tmp_path / "from_ckpt" / "samples.json").read_text())
    assert meta["scheduler"] == "ddim" and not (tmp_path / "from_ckpt" / "class=0").exists()


def test_predict_generates_images_per_class(smoke_run):
    cli = DiffusionCLI(
        args=[
            "--config",
            str(REPO / "configs/smoke/ddpm_mnist.yaml"),
            "--data.init_args.predict_samples_per_class",
            "1",
        ],
        run=False,
    )
    ckpt = torch.load(smoke_run / "checkpoints" / "last.ckpt", weights_only=False)
    cli.model.load_state_dict(ckpt["state_dict"])
    cli.trainer.enable_progress_bar = False
    batches = cli.trainer.predict(cli.model, datamodule=cli.datamodule)
    images = torch.cat([b["images"] for b in batches])
    assert images.shape == (10, 1, 28, 28)


def test_console_script_and_module_entry_points(tmp_path):
    for cmd in (["diffusion-lightning"], [sys.executable, "-m", "diffusion_lightning"]):
        exe = cmd if cmd[0] != "diffusion-lightning" else [str(Path(sys.executable).parent / "diffusion-lightning")]
        out = subprocess.run([*exe, "export", "--help"], capture_output=True, text=True, check=True)
        assert "--ckpt" in out.stdout and "--scheduler" in out.stdout


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["export", "--ckpt", "missing.ckpt", "--out", "x"], "missing.ckpt"),
        (["sample", "--out", "x"], "exactly one of --ckpt"),
    ],
)
def test_command_errors_are_clear(argv, match, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises((FileNotFoundError, SystemExit), match=match):
        main(argv)


def test_loaded_pipeline_generates_every_class(smoke_run, tmp_path):
    main(["export", "--ckpt", str(smoke_run / "checkpoints" / "last.ckpt"), "--out", str(tmp_path / "p")])
    pipe = ClassConditionedPipeline.from_pretrained(tmp_path / "p")
    pipe.set_progress_bar_config(disable=True)
    out = pipe(list(range(10)), num_inference_steps=3, output_type="pt")
    assert out.images.shape == (10, 1, 28, 28)
