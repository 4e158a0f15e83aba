"""Student-vs-teacher analysis: MSE heatmap, trajectories, denoising strips, timing, the analyze command."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffusion_lightning import ClassConditionedPipeline, build_unet
from diffusion_lightning.analysis import Session, load_models, mse_heatmap, time_table, trajectory_comparison
from diffusion_lightning.commands import analyze
from diffusion_lightning.schedulers import make_scheduler, training_scheduler
from tests.conftest import tiny_config
from tests.test_evaluation import judge_checkpoint  # noqa: F401  (a fixture)

FAST = ["--steps", "2", "--n-per-class", "1", "--timesteps", "3", "--repeats", "1", "--no-progress"]


def save_pipeline(path, channels=(8, 16), num_classes=3, sample_size=8, seed=0, prediction_type="epsilon"):
    torch.manual_seed(seed)
    net = tiny_config(block_out_channels=channels, norm_num_groups=4)
    unet = build_unet(net, sample_size=sample_size, in_channels=1, num_classes=num_classes)
    scheduler = make_scheduler("ddim", training_scheduler(num_train_timesteps=100, prediction_type=prediction_type))
    ClassConditionedPipeline(unet=unet, scheduler=scheduler).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {
        "teacher": save_pipeline(root / "teacher", (8, 16)),
        "small": save_pipeline(root / "small", (4, 8), seed=1),
        "smaller": save_pipeline(root / "smaller", (4, 4), seed=2),
    }


def test_analyze_all_writes_every_file_and_logs(models, tmp_path):
    out = tmp_path / "out"
    tables = analyze.main(
        ["all", "--teacher", models["teacher"], "--students", models["small"], models["smaller"], "--out", str(out)]
        + FAST
    )
    for name in ("mse", "trajectory", "denoising", "time"):
        for ext in ("png", "csv", "json"):
            assert (out / f"{name}.{ext}").is_file(), f"{name}.{ext}"
    assert list((out / "logs").rglob("events.out.tfevents.*"))
    header = (out / "mse.csv").read_text().splitlines()[0].split(",")
    assert header[:3] == ["student", "params", "size_factor"] and header[3:] == ["0", "50", "99"]
    # sorted by size, default names from the folders, size factors below 1
    assert tables["mse"].column("student") == ["smaller", "small"]
    assert all(0 < f < 1 for f in tables["mse"].column("size_factor"))
    time = json.loads((out / "time.json").read_text())
    assert time["quality"] == "skipped: no judge" and "accuracy" not in time["columns"]
    teacher = tables["time"].row(model="teacher")
    assert teacher["size_factor"] == 1 and teacher["macs"] > 0 and teacher["unet_batch"] == 6  # CFG: 2 x 3
    assert len(tables["trajectory"].rows) == 2 * 2 and len(tables["denoising"].rows) == 3 * 2


def test_mse_heatmap_equals_a_direct_recomputation(models):
    session = Session.from_paths(
        models["teacher"], [models["small"], models["smaller"]], labels=["a", "b"], steps=3, n_per_class=2, seed=7,
        progress=False,
    )  # fmt: skip
    table, figure = mse_heatmap(session, timesteps=4)
    shown = np.asarray(figure.axes[0].images[0].get_array())

    teacher, students = load_models(models["teacher"], [models["smaller"], models["small"]], progress=False)
    labels = torch.arange(3).repeat_interleave(2)
    generator = torch.Generator().manual_seed(7)
    noise = torch.randn(6, 1, 8, 8, generator=generator)
    eps = torch.randn(6, 1, 8, 8, generator=generator)
    pipe = teacher.pipeline
    x0 = pipe(labels, num_inference_steps=3, guidance_scale=2.0, output_type="pt", latents=noise).images * 2 - 1
    expected = np.zeros((2, 4))
    for j, t in enumerate([0, 33, 66, 99]):
        x_t = pipe.scheduler.add_noise(x0, eps, torch.tensor([t] * 6))
        with torch.no_grad():
            ref = pipe.unet(x_t, torch.tensor([t] * 6), class_labels=labels).sample
            for i, student in enumerate(students):
                expected[i, j] = F.mse_loss(student.unet(x_t, torch.tensor([t] * 6), class_labels=labels).sample, ref)
    np.testing.assert_allclose(shown, expected, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(np.array(table.meta["matrix"]), expected, rtol=1e-4, atol=1e-7)
    assert table.column("student") == ["b", "a"] and table.meta["timesteps"] == [0, 33, 66, 99]
    assert (expected > 0).all()


def test_teacher_against_itself_has_zero_mse_and_unit_cosine(models):
    session = Session.from_paths(
        models["teacher"], [models["teacher"], models["small"]], labels=["self", "small"], steps=3, progress=False
    )
    table, figure = trajectory_comparison(session)
    own = [r for r in table.rows if r["student"] == "self"]
    assert len(own) == 3 and [r["step"] for r in own] == [1, 2, 3]
    assert all(r["mse"] == 0 for r in own)
    assert all(r["cosine"] == pytest.approx(1, abs=1e-6) for r in own)
    other = [r for r in table.rows if r["student"] == "small"]
    assert all(r["mse"] > 0 and r["cosine"] < 1 for r in other)
    assert len(figure.axes) == 2 and len(figure.axes[0].lines) == 2


def test_mismatched_conditioning_lists_every_mismatch(models, tmp_path):
    four = save_pipeline(tmp_path / "four", (4, 8), num_classes=4)
    big = save_pipeline(tmp_path / "big", (4, 8), sample_size=16, prediction_type="v_prediction")
    with pytest.raises(SystemExit) as error:
        analyze.main(["mse", "--teacher", models["teacher"], "--students", four, big, "--out", str(tmp_path / "o")])
    message = str(error.value)
    assert message.startswith("error: ")
    assert "'four'" in message and "num_classes=4, teacher has 3" in message
    assert "'big'" in message and "sample_size=16, teacher has 8" in message
    assert "prediction_type='v_prediction', teacher has 'epsilon'" in message
    assert not (tmp_path / "o").exists()


def test_bad_path_names_both_accepted_forms(models, tmp_path):
    (tmp_path / "empty").mkdir()
    for bad in (tmp_path / "empty", tmp_path / "missing.ckpt", tmp_path / "model.pt"):
        with pytest.raises(SystemExit, match=r"\.ckpt file.*pipeline folder with model_index\.json") as error:
            analyze.main(["time", "--teacher", models["teacher"], "--students", str(bad), "--out", str(tmp_path)])
        assert str(bad) in str(error.value)
    with pytest.raises(SystemExit, match="labels has 2 names for 1 students"):
        analyze.main(["time", "--teacher", models["teacher"], "--students", models["small"], "--labels", "a", "b",
                      "--out", str(tmp_path)])  # fmt: skip
    with pytest.raises(SystemExit, match=r"timesteps=500.*1\.\.100"):
        analyze.main(["mse", "--teacher", models["teacher"], "--students", models["small"], "--out", str(tmp_path),
                      "--timesteps", "500", "--logger", "none", "--no-progress"])  # fmt: skip


def test_time_with_a_judge_adds_quality_columns(models, tmp_path, judge_checkpoint):  # noqa: F811
    data = tmp_path / "data.yaml"
    data.write_text("data:\n  class_path: tests.test_evaluation.TinyDigits\n")
    args = ["time", "--teacher", models["teacher"], "--students", models["small"], "--labels", "s"]
    args += ["--judge", str(judge_checkpoint), "--data", str(data), "--cache-dir", str(tmp_path / "cache")]
    args += ["--n-samples", "30", "--logger", "csv", "--out", str(tmp_path / "out"), *FAST]
    table = analyze.main(args)["time"]
    assert table.columns[-2:] == ["accuracy", "fid"]
    for row in table.rows:
        assert 0 <= row["accuracy"] <= 1 and row["fid"] >= 0
    header = (tmp_path / "out" / "time.csv").read_text().splitlines()[0]
    assert header.endswith("accuracy,fid")
    assert (tmp_path / "out" / "logs" / "version_0" / "metrics.csv").is_file()


def test_time_table_api_without_judge(models):
    session = Session.from_paths(models["teacher"], [models["small"]], steps=2, n_per_class=1, progress=False)
    session.guidance_scale = 1.0
    table, _ = time_table(session, repeats=2)
    assert [r["unet_batch"] for r in table.rows] == [3, 3]  # no guidance: no doubled batch
    small = table.row(model="small")
    assert small["macs"] < table.row(model="teacher")["macs"]
    assert "accuracy" not in table.columns


def test_a_checkpoint_teacher_carries_its_guidance_and_students_compare_with_it(models, tmp_path):
    from tests.conftest import quiet_trainer, tiny_ddpm
    from tests.test_evaluation import TinyDigits

    trainer = quiet_trainer(tmp_path / "run", max_steps=1, limit_val_batches=0)
    trainer.fit(tiny_ddpm(guidance_scale=3.0, num_train_timesteps=100), datamodule=TinyDigits())
    checkpoint = tmp_path / "last.ckpt"
    trainer.save_checkpoint(checkpoint)
    session = Session.from_paths(str(checkpoint), [models["small"]], steps=2, n_per_class=1, progress=False)
    assert session.teacher.name == "teacher" and session.guidance_scale == 3.0
    folder = tiny_ddpm(guidance_scale=3.0, num_train_timesteps=100).export_pipeline(tmp_path / "exported")
    exported = Session.from_paths(str(folder), [models["small"]], steps=2, n_per_class=1, progress=False)
    assert exported.guidance_scale == 3.0  # recorded by export in sampling_defaults.json
    assert type(session.teacher.pipeline.scheduler).__name__ == "DDIMScheduler"
    table, _ = trajectory_comparison(session)
    assert [r["step"] for r in table.rows] == [1, 2]
