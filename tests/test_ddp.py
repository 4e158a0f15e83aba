"""DDP: one 2-process ``fit`` (CPU, gloo) of the whole callback stack, then a resume on one process.

Lightning's ``strategy=ddp`` launches the other process by running the command line again, so the
real CLI runs in a subprocess. A :class:`~tests.ddp_probe.DDPProbe` added to the callbacks records
what each process saw (losses, batches, EMA state); the tests recompute from all processes what
the loggers show and check that every file was written once, by rank 0.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning
import pytest
import torch
import yaml
from lightning.pytorch import Callback
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DistributedSampler

from diffusion_lightning import DigitClassifier, MNISTDataModule
from diffusion_lightning.callbacks import GradientActivationWatcher
from diffusion_lightning.data import EpochSeededSampler
from diffusion_lightning.data.base import LabelledImageDataModule
from diffusion_lightning.loggers.runs import find_last_checkpoint
from tests.conftest import REPO, RandomDigits, quiet_trainer, tiny_ddpm

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="torch was built without the gloo backend, which CPU DDP needs",
)

BATCH = 16  # configs/smoke/ddpm_mnist.yaml
STEPS_PER_EPOCH = 4  # its limit_train_batches
CHECKPOINT_STEP = 6  # mid-way through the second epoch


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_cli(args: list[str], timeout: int) -> int:
    """Run ``diffusion-lightning fit ARGS``; fail on error or timeout; the launched process's id."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "HF_HUB_OFFLINE": "1",
    }
    command = [sys.executable, "-m", "diffusion_lightning", "fit", *args, "--trainer.enable_progress_bar", "false"]
    # A session of its own: on a timeout the launched process and the one it launched are killed together.
    proc = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"fit did not finish in {timeout} s:\n{out[-6000:]}")
    assert proc.returncode == 0, out[-6000:]
    return proc.pid


def write_judge(path: Path) -> None:
    """A tiny untrained digit judge checkpoint: evaluation during training only needs it to run."""
    torch.manual_seed(0)
    judge = DigitClassifier(num_classes=10, image_size=28, channels=(4, 8, 8), feature_dim=16)
    checkpoint = {
        "state_dict": judge.state_dict(),
        "hyper_parameters": dict(judge.hparams),
        "pytorch-lightning_version": lightning.__version__,
    }
    torch.save(checkpoint, path)


def stack_config(root: Path, probe: Path) -> Path:
    """configs/smoke/callbacks.yaml with an evaluation every 2 epochs and the probe appended."""
    config = yaml.safe_load((REPO / "configs/smoke/callbacks.yaml").read_text())
    evaluation = {
        "n_samples": 20,
        "batch_size": 20,
        "num_inference_steps": 2,
        "metrics": ["judge", "fid", "kid"],
        "feature_extractor": "digits",
        "judge": str(root / "judge.ckpt"),
        "cache_dir": str(root / "cache"),
        "kid_subsets": 4,
    }
    config["trainer"]["callbacks"] += [
        {
            "class_path": "diffusion_lightning.callbacks.PeriodicEvaluation",
            "init_args": {"every_n_epochs": 2, "evaluation": evaluation},
        },
        {"class_path": "tests.ddp_probe.DDPProbe", "init_args": {"path": str(probe)}},
    ]
    path = probe.parent / f"{probe.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def smoke_args(stack: Path) -> list[str]:
    return ["--config", str(REPO / "configs/smoke/ddpm_mnist.yaml"), "--config", str(stack)]


def records(probe: Path, ranks: int) -> list[dict]:
    found = sorted(p.name for p in probe.glob("rank*.json"))
    assert found == [f"rank{r}.json" for r in range(ranks)]
    return [json.loads((probe / f"rank{r}.json").read_text()) for r in range(ranks)]


def scalars(events: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(event.step, event.value) for event in events.Scalars(tag)]


def train_dataset():
    data = MNISTDataModule(source="embedded", batch_size=BATCH)
    data.setup("fit")
    return data.datasets["train"]


def expected_batch(dataset, indices: list[int]) -> tuple[list[int], torch.Tensor]:
    items = [dataset[i] for i in indices]
    return [int(item["labels"]) for item in items], torch.stack([item["images"].sum() for item in items])


def assert_batch_is(dataset, batch: dict, indices: list[int]) -> None:
    labels, sums = expected_batch(dataset, indices)
    assert batch["labels"] == labels
    torch.testing.assert_close(torch.tensor(batch["image_sums"]), sums, rtol=0, atol=1e-3)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    write_judge(root / "judge.ckpt")
    probe = root / "probe"
    stack = stack_config(root, probe)
    extra = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]
    extra += ["--trainer.default_root_dir", str(root), "--checkpoint.every_n_train_steps", str(CHECKPOINT_STEP)]
    pid = run_cli([*smoke_args(stack), *extra], timeout=300)
    return root, pid


def test_the_processes_train_together(ddp_run):
    root, pid = ddp_run
    rank0, rank1 = records(root / "probe", 2)
    assert rank0["world_size"] == rank1["world_size"] == 2
    assert (rank0["global_rank"], rank1["global_rank"]) == (0, 1)
    assert rank0["pid"] == pid != rank1["pid"]  # rank 0 is the launched process
    assert rank0["end_step"] == rank1["end_step"] == 2 * STEPS_PER_EPOCH
    assert len(rank0["train"]) == len(rank1["train"]) == 2 * STEPS_PER_EPOCH


def test_logged_losses_are_means_over_the_processes(ddp_run):
    root, _ = ddp_run
    rank0, rank1 = records(root / "probe", 2)
    events = EventAccumulator(str(root / "lightning_logs" / "version_0"), size_guidance={"scalars": 0})
    events.Reload()

    logged = [value for _, value in sorted(scalars(events, "train/loss"))]
    means = [(a["loss"] + b["loss"]) / 2 for a, b in zip(rank0["train"], rank1["train"])]
    assert logged == pytest.approx(means, rel=1e-5)
    assert any(abs(a["loss"] - b["loss"]) > 1e-3 for a, b in zip(rank0["train"], rank1["train"]))

    for epoch, (_, value) in enumerate(sorted(scalars(events, "val/loss"))):
        per_rank = [[v["loss"] for v in r["val"] if v["epoch"] == epoch] for r in (rank0, rank1)]
        assert [len(losses) for losses in per_rank] == [2, 2]  # limit_val_batches, equal batches
        rank_means = [sum(losses) / len(losses) for losses in per_rank]
        assert abs(rank_means[0] - rank_means[1]) > 1e-4  # rank 0 alone would give another value
        assert value == pytest.approx(sum(rank_means) / 2, rel=1e-5)


def test_bucket_losses_gather_every_sample_before_averaging(ddp_run):
    root, _ = ddp_run
    rank0, rank1 = records(root / "probe", 2)
    events = EventAccumulator(str(root / "lightning_logs" / "version_0"), size_guidance={"scalars": 0})
    events.Reload()
    summary = json.loads((root / "metrics.json").read_text())["diffusion"]
    edges = summary["timestep_buckets"]
    for epoch in range(2):
        batches = [v for r in (rank0, rank1) for v in r["val"] if v["epoch"] == epoch]
        losses = torch.tensor([x for v in batches for x in v["per_sample_loss"]], dtype=torch.float64)
        timesteps = torch.tensor([t for v in batches for t in v["timesteps"]])
        assert losses.numel() == 2 * 2 * BATCH  # both processes' samples are counted
        record = next(r for r in summary["epochs"] if r["epoch"] == epoch)
        for (lo, hi), mean in zip(edges, record["val_loss_per_bucket"]):
            inside = (timesteps >= lo) & (timesteps <= hi)
            expected = losses[inside].mean().item()
            assert mean == pytest.approx(expected, rel=1e-9)
            # logged through LightningModule.log after the metric's own reduction over both processes
            logged = sorted(scalars(events, f"val/loss_t{lo:03d}-{hi:03d}"))[epoch][1]
            assert logged == pytest.approx(expected, rel=1e-5)


def test_each_process_gets_its_share_of_the_epoch_order(ddp_run):
    root, _ = ddp_run
    dataset = train_dataset()
    sampler = EpochSeededSampler(len(dataset), seed=0)
    for rank, record in enumerate(records(root / "probe", 2)):
        for batch in record["train"]:
            sampler.set_epoch(batch["epoch"])
            share = sampler.order()[rank::2]
            i = batch["batch_idx"]
            assert_batch_is(dataset, batch, share[i * BATCH : (i + 1) * BATCH])


def test_ema_and_weights_are_identical_on_every_process(ddp_run):
    root, _ = ddp_run
    rank0, rank1 = (torch.load(root / "probe" / f"rank{r}.pt", weights_only=True) for r in range(2))
    for key in ("end_module", "end_copy"):
        assert rank0[key].keys() == rank1[key].keys()
        for name, value in rank0[key].items():
            torch.testing.assert_close(rank1[key][name], value, rtol=0, atol=0, msg=f"{key}: {name}")
    assert int(rank0["end_copy"]["n_averaged"]) == 2 * STEPS_PER_EPOCH


def test_every_artifact_is_written_once_by_rank_zero(ddp_run):
    root, pid = ddp_run
    summary = json.loads((root / "metrics.json").read_text())
    assert summary["status"] == "finished" and summary["pid"] == pid
    assert summary["global_step"] == 2 * STEPS_PER_EPOCH
    assert summary["cli_config"] == str(root / "lightning_logs" / "version_0" / "config.yaml")
    assert {"val/loss", "val/loss_raw", "train/loss", "evals/accuracy", "evals/fid"} <= set(summary["metrics"])
    assert [("evals" in r) for r in summary["diffusion"]["epochs"]] == [False, True]

    assert sorted(p.name for p in (root / "lightning_logs").iterdir()) == ["version_0"]
    (events_file,) = (root / "lightning_logs" / "version_0").glob("events.out.tfevents.*")
    assert events_file.name.split(".")[-2] == str(pid)  # written by rank 0's process
    assert sorted(p.name for p in (root / "samples").iterdir()) == [
        "epoch=000-step=000004.png",
        "epoch=001-step=000008.png",
    ]
    assert sorted(p.name for p in (root / "generation").iterdir()) == ["epoch=0", "epoch=1"]
    assert (root / "summary.png").is_file()
    assert sorted(p.name for p in (root / "eval").iterdir()) == ["epoch=1"]
    checkpoints = sorted(p.name for p in (root / "checkpoints").iterdir())
    assert checkpoints == ["best-001-000006.ckpt", "last.ckpt"]
    leftovers = [p for p in root.rglob("*") if ".partial" in p.name or p.name.endswith(".tmp")]
    assert not leftovers

    events = EventAccumulator(
        str(root / "lightning_logs" / "version_0"), size_guidance={"scalars": 0, "images": 0, "histograms": 0}
    )
    events.Reload()
    tags = events.Tags()
    watched = [tag for tag in tags["scalars"] if tag.startswith("debug/")]
    assert watched and any(tag.startswith("debug/activation/") for tag in watched)
    for tag in watched:
        assert [step for step, _ in scalars(events, tag)] == [0, 2, 4, 6], tag
    for tag in ("generation/seconds_per_image", "evals/fid", "val/loss_t000-249"):
        steps = [step for step, _ in scalars(events, tag)]
        assert len(steps) == len(set(steps)), tag
    for prefix in ("samples/grid", "generation/samples", "attention/"):
        images = [tag for tag in tags["images"] if tag.startswith(prefix)]
        assert images, prefix
        for tag in images:
            assert len(events.Images(tag)) == 2, tag  # one per epoch


def test_checkpoint_of_two_processes_resumes_on_one(ddp_run, tmp_path):
    root, _ = ddp_run
    saved_path = tmp_path / "checkpoints" / "last.ckpt"
    saved_path.parent.mkdir()
    # the mid-epoch checkpoint of every_n_train_steps (last.ckpt holds the end of the run)
    shutil.copy(root / "checkpoints" / f"best-001-{CHECKPOINT_STEP:06d}.ckpt", saved_path)
    saved = torch.load(saved_path, weights_only=False, map_location="cpu")
    assert saved["global_step"] == CHECKPOINT_STEP and saved["epoch"] == 1
    assert saved["MNISTDataModule"] == {"epoch": 1, "samples_seen": 2 * 2 * BATCH, "batches": 2}
    assert int(saved["averaging_state"]["n_averaged"]) == CHECKPOINT_STEP

    shutil.copy(root / "judge.ckpt", tmp_path / "judge.ckpt")
    probe = tmp_path / "probe"
    stack = stack_config(tmp_path, probe)
    args = [*smoke_args(stack), "--trainer.default_root_dir", str(tmp_path), "--ckpt_path", str(saved_path)]
    run_cli(args, timeout=240)

    (record,) = records(probe, 1)
    assert record["world_size"] == 1
    assert record["start_step"] == CHECKPOINT_STEP and record["end_step"] == 2 * STEPS_PER_EPOCH
    assert record["start_n_averaged"] == CHECKPOINT_STEP
    start = torch.load(probe / "rank0.pt", weights_only=True)["start_average"]
    for name, value in start.items():
        torch.testing.assert_close(value, saved["state_dict"][f"unet.{name}"], rtol=0, atol=0, msg=name)

    # The two processes consumed the first 64 samples of epoch 1's order; one process goes on from there.
    dataset = train_dataset()
    sampler = EpochSeededSampler(len(dataset), seed=0)
    sampler.set_epoch(1)
    order = sampler.order()
    assert [(b["epoch"], b["batch_idx"]) for b in record["train"]] == [(1, 2), (1, 3)]
    for n, batch in enumerate(record["train"]):
        start_index = 2 * 2 * BATCH + n * BATCH
        assert_batch_is(dataset, batch, order[start_index : start_index + BATCH])

    # Resumed into another folder, ModelCheckpoint does not overwrite the copied last.ckpt but adds last-v1.ckpt.
    final = torch.load(find_last_checkpoint(saved_path.parent), weights_only=False, map_location="cpu")
    assert final["global_step"] == 2 * STEPS_PER_EPOCH
    assert final["MNISTDataModule"] == {"epoch": 1, "samples_seen": 2 * 2 * BATCH + 2 * BATCH, "batches": 4}
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert summary["status"] == "finished" and summary["steps_this_run"] == 2


# ---------------------------------------------------------------------- in-process checks (no process group)


class FewDigits(LabelledImageDataModule):
    """50 random 8x8 images of 5 classes, all for training."""

    def __init__(self, **kwargs) -> None:
        super().__init__(batch_size=4, val_fraction=0.0, **kwargs)
        self.num_classes, self.in_channels, self.image_size, self.class_names = 5, 1, 8, list("01234")

    def load(self):
        images = torch.randint(0, 256, (50, 1, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
        return {"train": (images, torch.arange(50) % 5), "test": (images[:5], torch.arange(5))}


def attach(data: FewDigits, epoch: int, processed: int, replicas: int, rank: int = 0) -> FewDigits:
    """Give ``data`` a stand-in trainer at ``processed`` batches of ``epoch``, as process ``rank`` of ``replicas``."""
    progress = SimpleNamespace(current=SimpleNamespace(processed=processed))
    data.trainer = SimpleNamespace(
        current_epoch=epoch,
        fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress)),
        distributed_sampler_kwargs={"num_replicas": replicas, "rank": rank} if replicas > 1 else None,
    )
    return data


def shards(state: dict | None, replicas: int, epoch: int) -> list[list[int]]:
    """What each of ``replicas`` processes iterates in ``epoch``, resumed from ``state``."""
    out = []
    for rank in range(replicas):
        data = attach(FewDigits(), epoch, 0, replicas, rank)
        if state is not None:
            data.load_state_dict(state)
        sampler = data.train_dataloader().sampler
        assert isinstance(sampler, DistributedSampler)  # so Lightning does not wrap it in a second sharding sampler
        sampler.set_epoch(epoch)
        out.append(list(sampler))
    return out


def test_sampler_shards_the_epoch_order_and_resumes_on_another_number_of_processes():
    order = EpochSeededSampler(50, seed=0)
    order.set_epoch(1)
    order = order.order()
    two = shards(None, 2, epoch=1)
    assert two == [order[0::2], order[1::2]] and len(two[0]) == 25
    three = shards(None, 3, epoch=1)
    assert [len(s) for s in three] == [17, 17, 17]  # padded with the order's start, as DistributedSampler
    assert sorted(set().union(*three)) == list(range(50))

    # one process, 3 batches of 4 into epoch 1 -> two processes
    state = attach(FewDigits(), 1, 3, 1).state_dict()
    assert state == {"epoch": 1, "samples_seen": 12, "batches": 3}
    rest = shards(state, 2, epoch=1)
    assert rest == [order[12::2], order[13::2]]
    # each of the two processes takes 2 more batches: together they consumed order[:12 + 16]
    data = attach(FewDigits(), 1, 0, 2)
    data.load_state_dict(state)
    data.train_dataloader()
    state = attach(data, 1, 5, 2).state_dict()
    assert state == {"epoch": 1, "samples_seen": 28, "batches": 5}
    # -> one process again
    (alone,) = shards(state, 1, epoch=1)
    assert alone == order[28:]
    assert shards(state, 1, epoch=2)[0] != alone  # the skip applies to its epoch only
    # a checkpoint written before ``batches`` was stored (one process)
    (old,) = shards({"epoch": 1, "samples_seen": 8}, 1, epoch=1)
    assert old == order[8:]


def test_watcher_skips_a_step_that_failed_on_another_process(tmp_path):
    """The non-finite guard reduces its decision: a step skipped on one process only would split the weights."""
    model = tiny_ddpm()
    snapshots = {}

    class OtherProcessFails(Callback):
        def on_train_start(self, trainer, pl_module):
            reduce = trainer.strategy.reduce_boolean_decision

            def reduce_boolean_decision(decision, all=True):  # noqa: A002 (Lightning's name)
                return False if all and trainer.global_step == 2 else reduce(decision, all=all)

            trainer.strategy.reduce_boolean_decision = reduce_boolean_decision

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            snapshots[trainer.global_step] = [p.detach().clone() for p in pl_module.parameters()]

    watcher = GradientActivationWatcher(watch=[], skip_nonfinite=True)
    trainer = quiet_trainer(tmp_path, max_steps=4, callbacks=[OtherProcessFails(), watcher])
    loader = torch.utils.data.DataLoader(RandomDigits(), batch_size=8)
    with pytest.warns(UserWarning, match="Non-finite loss or gradient on another process at global step 2"):
        trainer.fit(model, loader)
    assert watcher.skipped_steps == 1 and trainer.global_step == 4
    assert all(torch.equal(a, b) for a, b in zip(snapshots[2], snapshots[3]))  # step 2 changed nothing
