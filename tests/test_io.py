"""Atomic writes: an interrupted export or save never leaves something that looks complete."""

import os

import pytest
from diffusers import UNet2DModel

from diffusion_lightning import ClassConditionedPipeline
from diffusion_lightning.utils.io import atomic_directory, write_json
from tests.conftest import tiny_ddpm


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


def test_write_json_is_atomic(tmp_path, monkeypatch):
    path = write_json(tmp_path / "m.json", {"a": 1})
    monkeypatch.setattr("json.dumps", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        write_json(path, {"a": 2})
    assert path.read_text().strip() == '{\n  "a": 1\n}'
