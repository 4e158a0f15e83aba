"""Neptune (offline and debug) and W&B (offline): what a run logs is in the files they leave."""

import base64
import io
import json
import os
import struct
from argparse import Namespace

import PIL.Image
import pytest
import torch
from lightning.fabric.loggers.logger import _DummyExperiment
from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import DataLoader

from diffusion_lightning.cli import DiffusionCLI
from diffusion_lightning.loggers import NeptuneLogger, log_histogram, log_image, plan_run
from tests.conftest import REPO, RandomDigits, quiet_trainer, tiny_ddpm

SMOKE = str(REPO / "configs/smoke/ddpm_mnist.yaml")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No client may reach a server: offline modes, no inherited data directories."""
    monkeypatch.setenv("NEPTUNE_MODE", "offline")
    monkeypatch.delenv("NEPTUNE_DATA_DIRECTORY", raising=False)
    monkeypatch.delenv("NEPTUNE_API_TOKEN", raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest, above all on a busy machine
    yield
    torch.set_num_threads(threads)


class MediaProbe(Callback):
    """Logs one image and one histogram through diffusion_lightning.loggers.media at step 1."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 1:
            assert log_image(trainer, "samples", torch.rand(1, 8, 8))
            assert log_histogram(trainer, "timesteps", outputs["timesteps"].float())


def tiny_fit(tmp_path, logger, steps=3):
    trainer = quiet_trainer(tmp_path, logger=logger, max_steps=steps, log_every_n_steps=1, callbacks=[MediaProbe()])
    trainer.fit(tiny_ddpm(learning_rate=1e-3), DataLoader(RandomDigits(24), batch_size=8))
    return trainer


# ---------------------------------------------------------------------- Neptune


@pytest.fixture
def client():
    return pytest.importorskip("neptune")


def neptune_operations(save_dir):
    """The operations of the single offline run under ``save_dir``, as the client queued them."""
    runs = list((save_dir / "offline").glob("run__*"))
    assert len(runs) == 1, runs
    assert json.loads((runs[0] / "metadata.json").read_text())["mode"] == "offline"
    operations = {}
    for log in sorted(runs[0].glob("data-*.log")):
        for line in log.read_text().splitlines():
            operation = json.loads(line)["obj"]
            operations.setdefault("/".join(operation["path"]), []).append(operation)
    return operations


def series(operations, path):
    return [(value["step"], value["value"]) for op in operations[path] for value in op["values"]]


def test_neptune_offline_run_holds_hyperparameters_metrics_and_media(client, tmp_path):
    logger = NeptuneLogger(project="team/diffusion", save_dir=str(tmp_path), tags=["tiny"])
    assert logger.mode == "offline" and logger.name == "neptune" and len(logger.version) == 12
    assert logger.save_dir == str(tmp_path)
    hparams = {"learning_rate": 1e-3, "net": {"block_out_channels": (8, 16)}, "data": Namespace(batch_size=16)}
    logger.log_hyperparams({**hparams, "snr_gamma": None})
    logger.log_metrics({"train/loss": 0.5, "epoch": 0}, step=1)
    logger.log_metrics({"train/loss": torch.tensor(0.25)}, step=2)
    logger.log_image("samples", [torch.ones(3, 4, 6), PIL.Image.new("L", (5, 5))], step=2, caption=["a", "b"])
    logger.log_histogram("weights", torch.tensor([0.0, 1.0, 1.0, 3.0, float("nan")]), step=2)
    logger.log_text("notes", "loss goes down", step=2)
    logger.finalize("success")
    assert "NEPTUNE_DATA_DIRECTORY" not in os.environ  # pointed at save_dir only while the run started

    ops = neptune_operations(tmp_path)
    assert ops["config/learning_rate"][0] == {"type": "AssignFloat", "path": ["config", "learning_rate"], "value": 1e-3}
    assert ops["config/net/block_out_channels"][0]["value"] == "(8, 16)"
    assert ops["config/data/batch_size"][0]["value"] == 16 and ops["config/snr_gamma"][0]["value"] == "None"
    assert series(ops, "train/loss") == [(1, 0.5), (2, 0.25)] and series(ops, "epoch") == [(1, 0.0)]
    images = [value for op in ops["samples"] for value in op["values"]]
    assert [(image["step"], image["value"]["name"]) for image in images] == [(2, "a"), (2, "b")]
    sizes = [PIL.Image.open(io.BytesIO(base64.b64decode(image["value"]["data"]))).size for image in images]
    assert sizes == [(6, 4), (5, 5)]
    assert series(ops, "weights/mean") == [(2, 1.25)] and series(ops, "weights/max") == [(2, 3.0)]
    histogram = json.loads(series(ops, "weights/counts")[0][1])
    assert histogram["min"] == 0.0 and histogram["max"] == 3.0
    assert sum(histogram["counts"]) == 4 and len(histogram["counts"]) == 64
    assert series(ops, "notes") == [(2, "loss goes down")]
    assert ops["sys/tags"][0]["values"] == ["tiny"] and ops["sys/failed"][-1]["value"] is False


def test_neptune_logger_in_a_fit_with_the_media_helpers(client, tmp_path):
    logger = NeptuneLogger(mode="offline", save_dir=str(tmp_path / "neptune"), name="tiny", prefix="training")
    tiny_fit(tmp_path, logger)
    ops = neptune_operations(tmp_path / "neptune")
    assert [step for step, _ in series(ops, "training/train/loss")] == [0, 1, 2]
    assert ops["config/learning_rate"][0]["value"] == 1e-3 and ops["config/net/block_out_channels"]
    assert [value["step"] for op in ops["training/samples"] for value in op["values"]] == [1]
    assert sum(json.loads(series(ops, "training/timesteps/counts")[0][1])["counts"]) == 8
    assert ops["sys/name"][0]["value"] == "tiny" and ops["sys/failed"][-1]["value"] is False


def test_neptune_debug_mode_keeps_values_in_memory(client, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    logger = NeptuneLogger(mode="debug")
    logger.log_hyperparams({"learning_rate": 3e-4})
    logger.log_metrics({"val/loss": 0.75}, step=4)
    assert logger.experiment["config/learning_rate"].fetch() == 3e-4
    assert logger.experiment["val/loss"].fetch_last() == 0.75
    logger.finalize("failed")
    assert not [path for path in tmp_path.rglob("*") if path.is_file()]  # nothing written


def test_neptune_logs_on_rank_zero_only(client, tmp_path, monkeypatch):
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    logger = NeptuneLogger(save_dir=str(tmp_path))
    assert isinstance(logger.experiment, _DummyExperiment)
    logger.log_hyperparams({"learning_rate": 1e-3})
    logger.log_metrics({"train/loss": 1.0}, step=0)
    logger.log_image("samples", [torch.zeros(1, 4, 4)], step=0)
    logger.finalize("success")
    assert not (tmp_path / "offline").exists()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": "read-only"}, r"mode='read-only' \(or NEPTUNE_MODE\) is not supported"),
        ({"version": "x" * 37}, "version='x{37}' must have 1 to 36 characters"),
        ({"histogram_bins": 0}, r"histogram_bins=0 must be in \[1, 64\]"),
    ],
)
def test_neptune_logger_arguments_are_validated(client, kwargs, match):
    with pytest.raises(ValueError, match=match):
        NeptuneLogger(**kwargs)


def test_neptune_caption_count_must_match_images(client, tmp_path):
    logger = NeptuneLogger(mode="debug")
    with pytest.raises(ValueError, match="caption has 1 entries for 2 images"):
        logger.log_image("samples", [torch.zeros(1, 2, 2)] * 2, caption=["one"])
    logger.finalize("success")


def test_neptune_logger_without_the_client_says_what_to_install(monkeypatch):
    monkeypatch.setattr("diffusion_lightning.loggers.neptune._NEPTUNE_AVAILABLE", False)
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'diffusion-lightning\[neptune\]'"):
        NeptuneLogger()


def test_neptune_logger_from_yaml(client, tmp_path, capsys):
    config = tmp_path / "neptune.yaml"
    config.write_text(
        "trainer:\n  logger:\n    class_path: diffusion_lightning.loggers.NeptuneLogger\n"
        f"    init_args: {{project: team/diffusion, mode: offline, save_dir: {tmp_path}, version: run-7}}\n"
    )
    cli = DiffusionCLI(args=["--config", SMOKE, "--config", str(config)], run=False)
    logger = cli.trainer.logger
    assert isinstance(logger, NeptuneLogger) and logger.version == "run-7" and logger.save_dir == str(tmp_path)
    with pytest.raises(SystemExit):
        DiffusionCLI(args=["fit", "--trainer.logger.help", "NeptuneLogger"])
    out = capsys.readouterr().out
    assert "--trainer.logger.histogram_bins" in out and "Custom run id" in out


@pytest.mark.parametrize(
    ("class_path", "recorded"),
    [
        ("diffusion_lightning.loggers.NeptuneLogger", "diffusion_lightning.loggers.neptune.NeptuneLogger"),
        ("lightning.pytorch.loggers.WandbLogger", "lightning.pytorch.loggers.wandb.WandbLogger"),
    ],
)
def test_resume_gives_the_logger_its_run_id_back(client, tmp_path, class_path, recorded):
    ckpt = tmp_path / "last.ckpt"
    lineage = {"loggers": [{"class_path": recorded, "name": "x", "version": "run-7"}], "parent": None}
    torch.save({"state_dict": {}, "global_step": 3, "callbacks": {"RunLineage": lineage}}, ckpt)
    logger = {"class_path": class_path, "init_args": {"version": None}}
    plan = plan_run({"ckpt_path": str(ckpt), "trainer": {"logger": logger}, "checkpoint": {}}, str(tmp_path))
    assert plan.overrides["trainer"]["logger"]["init_args"]["version"] == "run-7"


# ---------------------------------------------------------------------- Weights & Biases


def wandb_records(run_dir):
    """The records of an offline run's ``run-*.wandb`` file (a LevelDB-style log of protobufs)."""
    from wandb.proto import wandb_internal_pb2

    data = next(run_dir.glob("run-*.wandb")).read_bytes()
    assert data[:4] == b":W&B"
    position, block, chunks, pending = 7, 32768, [], b""
    while position + 7 <= len(data):
        left = block - position % block
        _, length, kind = struct.unpack("<IHB", data[position : position + 7]) if left >= 7 else (0, 0, 0)
        if kind == 0:  # block trailer padding
            position += left
            continue
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk  # full, first / middle, last
        if kind in (1, 4):
            chunks.append(pending)
    records = []
    for chunk in chunks:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(chunk)
        records.append(record)
    return records


def wandb_history(run_dir):
    rows = []
    for record in wandb_records(run_dir):
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {"/".join(item.nested_key) or item.key: json.loads(item.value_json) for item in record.history.item}
            )
    return rows


def test_wandb_offline_run_holds_images_and_histograms(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="diffusion-lightning-tests")
    try:
        tiny_fit(tmp_path, logger)
    finally:
        logger.experiment.finish()
        wandb.teardown()  # stops the wandb-core process, which flushes the run's .wandb file
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    (image,) = (run_dir / "files" / "media" / "images").rglob("samples_*.png")
    assert PIL.Image.open(image).size == (8, 8)

    rows = wandb_history(run_dir)
    losses = [row["trainer/global_step"] for row in rows if "train/loss" in row]
    assert losses == [0, 1, 2], [record.WhichOneof("record_type") for record in wandb_records(run_dir)]
    (histogram,) = [row for row in rows if "timesteps/_type" in row]
    assert histogram["timesteps/_type"] == "histogram" and histogram["trainer/global_step"] == 1
    assert sum(histogram["timesteps/values"]) == 8 and len(histogram["timesteps/bins"]) == 65
    (logged_image,) = [row for row in rows if "samples/_type" in row]
    assert logged_image["samples/_type"] == "images/separated" and logged_image["samples/count"] == 1
