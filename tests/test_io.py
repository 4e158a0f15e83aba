"""Atomic writes: an interrupted export or save never leaves something that looks complete, nor loses anything."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from diffusers import UNet2DModel

from diffusion_lightning import ClassConditionedPipeline
from diffusion_lightning.commands import export
from diffusion_lightning.utils import io as io_module
from diffusion_lightning.utils.io import atomic_directory, recover_directory, write_json
from tests.conftest import RandomDigits, quiet_trainer, tiny_ddpm


def test_directory_appears_only_when_complete(tmp_path):
    target = tmp_path / "out"
    with atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("a")
        assert not target.exists()
    assert (target / "a.txt").read_text() == "a"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_failure_keeps_the_previous_content_and_leaves_no_partial(tmp_path):
    target = tmp_path / "out"
    with atomic_directory(target) as tmp:
        (tmp / "old.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_directory(target) as tmp:
        (tmp / "new.txt").write_text("new")
        raise KeyboardInterrupt
    assert sorted(p.name for p in target.iterdir()) == ["old.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_partial_folder_of_a_killed_writer_is_cleaned_up(tmp_path):
    dead = tmp_path / ".out.partial-999999999-abc"  # no such pid
    dead.mkdir()
    alive = tmp_path / f".out.partial-{os.getpid()}-xyz"  # a writer still running
    alive.mkdir()
    with atomic_directory(tmp_path / "out"):
        pass
    assert not dead.exists() and alive.exists()


def test_interrupted_export_leaves_nothing_loadable(tmp_path, monkeypatch):
    model = tiny_ddpm()

    def crash_after_unet(self, directory, **kwargs):
        self.unet.save_pretrained(os.path.join(directory, "unet"))
        raise KeyboardInterrupt  # killed half-way through

    monkeypatch.setattr(ClassConditionedPipeline, "save_pretrained", crash_after_unet)
    with pytest.raises(KeyboardInterrupt):
        model.export_pipeline(tmp_path / "pipe")
    assert not (tmp_path / "pipe").exists()
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    model.export_pipeline(tmp_path / "pipe")
    UNet2DModel.from_pretrained(tmp_path / "pipe" / "unet")


# ---------------------------------------------------------------------- files, killed mid-write

#: A writer that loads ``utils/io.py`` alone (it needs only the standard library, so it starts in
#: milliseconds) and rewrites one JSON file forever, each version complete only if written atomically.
WRITER = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("io_under_test", sys.argv[1])
io = importlib.util.module_from_spec(spec)
spec.loader.exec_module(io)
pad = "x" * 4_000_000
version = 0
while True:
    io.write_json(sys.argv[2], {"version": version, "pad": pad, "end": version})
    if version == 0:
        print("ready", flush=True)
    version += 1
"""


def test_write_json_killed_at_random_moments_leaves_a_complete_file(tmp_path):
    path = tmp_path / "m.json"
    rng = random.Random(0)
    versions = []
    for _ in range(12):
        writer = subprocess.Popen(
            [sys.executable, "-c", WRITER, io_module.__file__, str(path)], stdout=subprocess.PIPE, text=True
        )
        assert writer.stdout.readline() == "ready\n"
        time.sleep(rng.uniform(0, 0.15))
        os.kill(writer.pid, signal.SIGKILL)
        assert writer.wait() == -signal.SIGKILL
        data = json.loads(path.read_text())  # parses: never a truncated or empty file
        assert data["version"] == data["end"] and len(data["pad"]) == 4_000_000
        versions.append(data["version"])
    assert len(set(versions)) > 1  # the kills landed at different moments
    write_json(path, {"a": 1})  # the next write removes the temporaries of killed writers
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_write_json_writes_non_finite_floats_as_null(tmp_path):
    data = {"loss": float("nan"), "scores": [1.5, float("inf"), -float("inf")], "nested": {"x": (float("nan"),)}}
    path = write_json(tmp_path / "metrics.json", data)

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    loaded = json.loads(path.read_text(), parse_constant=refuse)
    assert loaded == {"loss": None, "scores": [1.5, None, None], "nested": {"x": [None]}}
    with pytest.raises(TypeError):
        write_json(path, {"tensor": object()})
    assert json.loads(path.read_text()) == loaded  # an unwritable value leaves the previous file


def test_files_and_folders_take_the_permissions_of_the_umask(tmp_path):
    previous = os.umask(0o027)
    try:
        write_json(tmp_path / "a.json", {})
        with atomic_directory(tmp_path / "d") as tmp:
            (tmp / "f.txt").write_text("f")
    finally:
        os.umask(previous)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o750


# ---------------------------------------------------------------------- folders: refusals, recovery, fallback


def test_a_file_is_never_replaced_by_a_folder(tmp_path):
    target = tmp_path / "run.ckpt"
    target.write_bytes(b"checkpoint")
    with pytest.raises(NotADirectoryError, match="exists and is not a folder"), atomic_directory(target):
        pass
    with pytest.raises(NotADirectoryError, match="a parent of it is a file"), atomic_directory(target / "pipe"):
        pass
    assert target.read_bytes() == b"checkpoint"
    assert [p.name for p in tmp_path.iterdir()] == ["run.ckpt"]


def test_recovery_puts_back_the_folder_of_a_writer_killed_between_two_renames(tmp_path):
    target = tmp_path / "out"
    backup = tmp_path / ".out.old-999999999-abcd"  # moved aside by a writer that is gone
    backup.mkdir()
    (backup / "old.txt").write_text("old")
    partial = tmp_path / ".out.partial-999999999-efgh"  # its new folder, complete or not
    partial.mkdir()
    running = tmp_path / f".out.old-{os.getpid()}-ijkl"  # a writer still running: left alone
    running.mkdir()
    recover_directory(target)
    assert (target / "old.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", running.name])
    running.rmdir()
    stale = tmp_path / ".out.old-999999999-mnop"  # a backup beside a folder in place: the folder is newer
    stale.mkdir()
    with atomic_directory(target) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (target / "new.txt").is_file()


def test_without_an_atomic_exchange_an_interruption_between_the_renames_keeps_the_previous_folder(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(io_module, "_exchange", lambda a, b: False)  # a file system that cannot exchange folders
    target = tmp_path / "out"
    with atomic_directory(target) as tmp:
        (tmp / "one.txt").write_text("1")
    with atomic_directory(target) as tmp:  # replaced by two renames
        (tmp / "two.txt").write_text("2")
    assert [p.name for p in target.iterdir()] == ["two.txt"]

    real_replace, calls = os.replace, []

    def interrupted_second_rename(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", interrupted_second_rename)
    with pytest.raises(KeyboardInterrupt), atomic_directory(target) as tmp:
        (tmp / "three.txt").write_text("3")
    assert [p.name for p in target.iterdir()] == ["two.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_the_exchange_swaps_two_folders(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "in_a").touch()
    (b / "in_b").touch()
    if not io_module._exchange(a, b):
        pytest.skip("this system or file system cannot exchange two folders atomically (the fallback is tested)")
    assert [p.name for p in a.iterdir()] == ["in_b"] and [p.name for p in b.iterdir()] == ["in_a"]


# ---------------------------------------------------------------------- export --out


@pytest.fixture
def checkpoint(tmp_path):
    model = tiny_ddpm()
    trainer = quiet_trainer(tmp_path / "run", max_steps=1, limit_val_batches=0)
    trainer.fit(model, torch.utils.data.DataLoader(RandomDigits(8), batch_size=4))
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    return tmp_path / "run.ckpt"


def export_error(*argv: str) -> str:
    with pytest.raises(SystemExit) as raised:
        export.main(list(argv))
    message = str(raised.value.code)
    assert message.startswith("error: ") and "\n" not in message
    return message


def test_export_refuses_to_replace_anything_but_a_pipeline(checkpoint, tmp_path):
    before = checkpoint.read_bytes()
    assert "is a file, not a pipeline folder" in export_error("--ckpt", str(checkpoint), "--out", str(checkpoint))
    assert "is a file, not a folder" in export_error("--ckpt", str(checkpoint), "--out", str(checkpoint / "pipe"))
    run = tmp_path / "run"  # a run folder with its checkpoints: not a pipeline, not even with --overwrite
    (run / "checkpoints").mkdir(parents=True, exist_ok=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"keep")
    message = export_error("--ckpt", str(checkpoint), "--out", str(run), "--overwrite")
    assert str(run) in message and "not a pipeline (no model_index.json or pytorch_lora_weights.safetensors" in message
    assert checkpoint.read_bytes() == before and (run / "checkpoints" / "last.ckpt").read_bytes() == b"keep"


def test_export_replaces_an_existing_pipeline_only_with_overwrite(checkpoint, tmp_path):
    (tmp_path / "empty").mkdir()
    export.main(["--ckpt", str(checkpoint), "--out", str(tmp_path / "empty")])  # an empty folder is fine
    pipe = tmp_path / "pipe"
    export.main(["--ckpt", str(checkpoint), "--out", str(pipe), "--scheduler", "ddim"])
    assert "already holds a pipeline; add --overwrite" in export_error("--ckpt", str(checkpoint), "--out", str(pipe))
    assert ClassConditionedPipeline.from_pretrained(pipe).scheduler.__class__.__name__ == "DDIMScheduler"
    export.main(["--ckpt", str(checkpoint), "--out", str(pipe), "--scheduler", "euler", "--overwrite"])
    assert ClassConditionedPipeline.from_pretrained(pipe).scheduler.__class__.__name__ == "EulerDiscreteScheduler"
    lora = tmp_path / "lora"  # a LoRA export counts as a pipeline too
    lora.mkdir()
    (lora / "pytorch_lora_weights.safetensors").write_bytes(b"")
    export.main(["--ckpt", str(checkpoint), "--out", str(lora), "--overwrite"])
    assert (lora / "model_index.json").is_file() and not (lora / "pytorch_lora_weights.safetensors").exists()
    inside = pipe / "model.ckpt"  # never delete the checkpoint being exported
    inside.write_bytes(checkpoint.read_bytes())
    assert "holds the checkpoint exported" in export_error("--ckpt", str(inside), "--out", str(pipe), "--overwrite")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "lora", "pipe", "run.ckpt"]
