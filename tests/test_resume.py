"""Resuming ``fit`` from a mid-epoch checkpoint gives the uninterrupted run's weights; checkpoints are atomic.

The same with ``fit`` killed by SIGKILL (in a subprocess) is in ``tests/test_faults.py``.
"""

import os
import warnings

import pytest
import torch
from lightning.pytorch import seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from diffusion_lightning import MNISTDataModule, WarmupCosineLR
from diffusion_lightning.utils.checkpoint_io import AtomicCheckpointIO
from tests.conftest import quiet_trainer, tiny_config, tiny_ddpm


def make_run(tmp_path, callbacks=(), max_steps=12, **trainer_kwargs):
    seed_everything(0)
    # dropout draws from the global RNG, so the restored RNG state matters as well
    model = tiny_ddpm(
        net=tiny_config(dropout=0.1),
        image_size=28,
        num_classes=10,
        prediction_type="v_prediction",
        snr_gamma=5.0,
        p_uncond=0.2,
        learning_rate=3e-3,
        lr_scheduler=lambda opt: WarmupCosineLR(opt, warmup_steps=3, total_steps=12),  # whatever max_steps is
    )
    data = MNISTDataModule(batch_size=8, eval_batch_size=64)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=1, save_top_k=0)
    trainer = quiet_trainer(
        tmp_path,
        max_steps=max_steps,
        limit_train_batches=5,
        limit_val_batches=1,
        enable_checkpointing=True,
        callbacks=[checkpoint, *callbacks],
        **trainer_kwargs,
    )
    return model, data, trainer


def test_run_resumed_from_a_mid_epoch_checkpoint_equals_uninterrupted_run(tmp_path):
    model_a, data_a, trainer_a = make_run(tmp_path / "a")
    trainer_a.fit(model_a, data_a)

    model_b, data_b, trainer_b = make_run(tmp_path / "b", max_steps=7)  # stops mid-epoch 2 of 3
    trainer_b.fit(model_b, data_b)
    last = tmp_path / "b" / "ckpt" / "last.ckpt"
    saved = torch.load(last, weights_only=False)
    assert 0 < saved["global_step"] < 12 and saved["global_step"] % 5 != 0

    model_c, data_c, trainer_c = make_run(tmp_path / "b")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer_c.fit(model_c, data_c, ckpt_path="last")
    # the training loader resumes mid-epoch (its state is the data module's): Lightning does not warn it is not
    assert not [w for w in caught if "not resumable" in str(w.message)]
    assert trainer_c.global_step == trainer_a.global_step == 12

    state_a, state_c = model_a.state_dict(), model_c.state_dict()
    assert state_a.keys() == state_c.keys()
    for name in state_a:
        torch.testing.assert_close(state_c[name], state_a[name], rtol=0, atol=0, msg=name)
    opt_a, opt_c = trainer_a.optimizers[0].state_dict(), trainer_c.optimizers[0].state_dict()
    for key, value in opt_a["state"].items():
        torch.testing.assert_close(opt_c["state"][key]["exp_avg"], value["exp_avg"], rtol=0, atol=0)
    sched_a = trainer_a.lr_scheduler_configs[0].scheduler
    sched_c = trainer_c.lr_scheduler_configs[0].scheduler
    assert sched_a.last_epoch == sched_c.last_epoch and sched_a.get_last_lr() == sched_c.get_last_lr()


def test_checkpoint_records_rng_states_and_module_class(tmp_path):
    model, data, trainer = make_run(tmp_path)
    trainer.fit(model, data)
    # what Trainer.fit(ckpt_path=...) does: a weights_only load must accept everything we store
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert {"torch", "numpy", "python"} <= set(saved["rng_states"])
    assert saved["diffusion_lightning"]["module_class"] == "diffusion_lightning.modules.ddpm.ClassConditionedDDPM"
    assert saved["MNISTDataModule"] == {"epoch": 2, "samples_seen": 2 * 8, "batches": 2}  # 12 steps = 5 + 5 + 2


def test_rng_states_round_trip():
    import random

    import numpy as np

    from diffusion_lightning.utils.seeding import collect_rng_states, restore_rng_states

    states = collect_rng_states()
    first = (torch.rand(3), np.random.rand(3), random.random())
    restore_rng_states(states)
    again = (torch.rand(3), np.random.rand(3), random.random())
    torch.testing.assert_close(first[0], again[0])
    assert np.array_equal(first[1], again[1]) and first[2] == again[2]


def test_failed_checkpoint_write_keeps_the_previous_file(tmp_path, monkeypatch):
    model, data, trainer = make_run(tmp_path, plugins=[AtomicCheckpointIO()])
    trainer.fit(model, data)
    last = tmp_path / "ckpt" / "last.ckpt"
    before = last.read_bytes()

    import diffusion_lightning.utils.checkpoint_io as checkpoint_io

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        f.flush()
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_io.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        trainer.save_checkpoint(last)
    assert last.read_bytes() == before
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]  # no temporary left either


def test_atomic_checkpoint_io_writes_beside_the_target_and_removes_what_a_killed_writer_left(tmp_path, monkeypatch):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    killed = folder / ".last.ckpt.999999999-x1y2.tmp"  # a save killed outright (no such process)
    killed.write_bytes(b"half a checkpoint")
    alive = folder / f".last.ckpt.{os.getppid()}-x1y2.tmp"  # a save of a process still running
    alive.write_bytes(b"")
    written = []
    real_replace = os.replace

    def watch_replace(src, dst):
        written.append(
            (os.path.dirname(src), os.path.basename(src), torch.load(src, weights_only=False)["global_step"])
        )
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", watch_replace)
    model, data, trainer = make_run(tmp_path, max_steps=2, plugins=[AtomicCheckpointIO()])
    previous = os.umask(0o027)
    try:
        trainer.fit(model, data)
    finally:
        os.umask(previous)
    # each checkpoint serialized completely into a temporary beside its target, then renamed over it
    assert [(where, step) for where, _, step in written] == [(str(folder), 1), (str(folder), 2)]
    assert all(name.startswith(".last.ckpt.") and name.endswith(".tmp") for _, name, _ in written)
    assert not killed.exists() and alive.exists()
    assert (folder / "last.ckpt").stat().st_mode & 0o777 == 0o640
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == 2
