"""Evaluation: judge scores, precision/recall/realism, FID/KID, cached real features, the evaluate command."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import scipy.linalg
import torch
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.loggers import CSVLogger

from diffusion_lightning import DigitClassifier
from diffusion_lightning.callbacks import PeriodicEvaluation
from diffusion_lightning.commands import evaluate
from diffusion_lightning.data.base import LabelledImageDataModule
from diffusion_lightning.metrics import (
    DigitFeatures,
    EvaluationConfig,
    Evaluator,
    FewSamplesWarning,
    check_image_range,
    fid,
    judge_scores,
    kid,
    manifold_scores,
    real_reference,
    summarize,
)
from tests.conftest import quiet_trainer, tiny_ddpm


class TinyDigits(LabelledImageDataModule):
    """60 random 8x8 grey images of 3 classes (a stand-in for real digits)."""

    def __init__(self, n: int = 60, **kwargs) -> None:
        kwargs.setdefault("batch_size", 8)
        super().__init__(**kwargs)
        self.n = n
        self.num_classes, self.in_channels, self.image_size = 3, 1, 8
        self.class_names = ["0", "1", "2"]

    def load(self):
        g = torch.Generator().manual_seed(self.n)
        images = torch.randint(0, 256, (self.n, 1, 8, 8), generator=g, dtype=torch.uint8)
        labels = torch.arange(self.n) % 3
        return {"train": (images, labels), "test": (images[:30], labels[:30])}


def tiny_judge() -> DigitClassifier:
    torch.manual_seed(0)
    return DigitClassifier(num_classes=3, image_size=8, channels=(4, 8, 8), feature_dim=16).eval()


def config(tmp_path, **overrides) -> EvaluationConfig:
    values = dict(n_samples=30, num_inference_steps=2, batch_size=16, cache_dir=str(tmp_path / "cache"), progress=False)
    return EvaluationConfig(**{**values, **overrides})


# ---------------------------------------------------------------------- building blocks


def test_images_outside_unit_range_are_refused_with_a_hint():
    with pytest.raises(ValueError, match=r"\[0, 1\].*images / 2 \+ 0.5"):
        check_image_range(torch.rand(2, 1, 8, 8) * 2 - 1)
    with pytest.raises(ValueError, match="dtype"):
        check_image_range(torch.zeros(2, 1, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="shape"):
        check_image_range(torch.rand(1, 8, 8))


def test_digit_features_convert_size_and_channels_once_with_a_note(caplog):
    features = DigitFeatures(tiny_judge())
    rgb = torch.rand(4, 3, 12, 12)
    with caplog.at_level(logging.INFO, logger="diffusion_lightning.metrics.features"):
        first = features.encode(rgb)
        features.encode(rgb)
    notes = [r for r in caplog.records if "converting images" in r.getMessage()]
    assert len(notes) == 1 and "3 channel(s) at 12x12" in notes[0].getMessage()
    assert first["features"].shape == (4, 16) and first["logits"].shape == (4, 3)
    grey = (rgb * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    resized = torch.nn.functional.interpolate(grey, size=(8, 8), mode="bilinear", antialias=True)
    torch.testing.assert_close(first["features"], features.encode(resized)["features"])


def test_manifold_scores_equal_a_brute_force_recomputation():
    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(40, 5, generator=g), torch.randn(30, 5, generator=g) + 0.7
    k = 3

    def radii(x):
        d = torch.cdist(x.double(), x.double())
        return torch.tensor([sorted(row.tolist())[k] for row in d])

    r_real, r_fake = radii(real), radii(fake)
    precision = np.mean([any((f - r).norm() <= rr for r, rr in zip(real.double(), r_real)) for f in fake.double()])
    recall = np.mean([any((r - f).norm() <= rf for f, rf in zip(fake.double(), r_fake)) for r in real.double()])
    keep = r_real <= r_real.median()
    realism = [
        max((rr / (f - r).norm()).item() for r, rr in zip(real.double()[keep], r_real[keep])) for f in fake.double()
    ]

    scores = manifold_scores(real, fake, k=k)
    assert scores.precision == pytest.approx(precision)
    assert scores.recall == pytest.approx(recall)
    torch.testing.assert_close(scores.realism.double(), torch.tensor(realism, dtype=torch.double), rtol=1e-5, atol=1e-6)
    assert 0 < scores.precision < 1 and 0 < scores.recall < 1

    same = manifold_scores(real, real.clone(), k=k)
    assert same.precision == same.recall == 1.0
    far = manifold_scores(real, torch.randn(30, 5, generator=g) + 100, k=k)
    assert far.precision == far.recall == 0.0 and (far.realism < 0.1).all()
    with pytest.raises(ValueError, match="more than k"):
        manifold_scores(real, fake[:3], k=3)


def test_fid_equals_the_closed_form_and_warns_below_the_feature_dimension():
    g = torch.Generator().manual_seed(1)
    real, fake = torch.randn(200, 4, generator=g), torch.randn(150, 4, generator=g) * 1.5 + 0.3
    mu1, mu2 = real.double().mean(0).numpy(), fake.double().mean(0).numpy()
    s1, s2 = np.cov(real.double().numpy(), rowvar=False), np.cov(fake.double().numpy(), rowvar=False)
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert fid(real, fake) == pytest.approx(expected, rel=1e-4)
    assert fid(real, real) == pytest.approx(0.0, abs=1e-6)
    with pytest.warns(FewSamplesWarning, match="at least 5 samples"):
        fid(real, fake[:4])


def test_kid_is_repeatable_for_a_seed_and_small_for_equal_distributions():
    g = torch.Generator().manual_seed(2)
    real, fake = torch.randn(100, 8, generator=g), torch.randn(100, 8, generator=g) + 2.0
    first, second = (
        kid(real, fake, subsets=10, subset_size=50, seed=3),
        kid(real, fake, subsets=10, subset_size=50, seed=3),
    )
    assert first == second
    assert kid(real, fake[:30], subsets=5)[0] > 10 * abs(kid(real[:50], real[50:], subsets=5)[0])


def test_judge_scores_and_summaries():
    logits = torch.tensor([[4.0, 0.0, 0.0], [0.0, 4.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 4.0]])
    labels = torch.tensor([0, 0, 1, 2])
    scores = judge_scores(logits, labels, threshold=0.7)
    assert scores["is_digit"].tolist() == [1.0, 1.0, 0.0, 1.0]
    assert scores["correct_digit"].tolist() == [1.0, 0.0, 0.0, 1.0]
    torch.testing.assert_close(scores["class_probability"][2], torch.tensor(1 / 3))
    summary = summarize(scores["correct_digit"], labels, [0, 1, 2])
    assert summary["0"] == {"avg": 0.5, "min": 0.0, "max": 1.0, "n": 2}
    assert summary["overall"]["avg"] == 0.5
    with pytest.raises(ValueError, match="threshold"):
        judge_scores(logits, labels, threshold=0.0)


def test_real_features_are_cached_by_dataset_split_and_extractor(tmp_path, monkeypatch):
    features, data = DigitFeatures(tiny_judge()), TinyDigits()
    first = real_reference(data, features, "train", cache_dir=tmp_path, progress=False)
    files = list((tmp_path / "reference").iterdir())
    assert len(files) == 1 and "train" in files[0].name and features.name in files[0].name
    assert first.features.shape == (54, 16)  # 60 less 10% held out for validation
    monkeypatch.setattr(features, "extract", lambda images: pytest.fail("recomputed a cached entry"))
    again = real_reference(data, features, "train", cache_dir=tmp_path, progress=False)
    torch.testing.assert_close(again.features, first.features)
    monkeypatch.undo()
    real_reference(data, features, "test", cache_dir=tmp_path, progress=False)
    real_reference(TinyDigits(n=90), features, "train", cache_dir=tmp_path, progress=False)
    assert len(list((tmp_path / "reference").iterdir())) == 3


# ---------------------------------------------------------------------- the evaluator


def test_evaluator_scores_writes_and_repeats(tmp_path, tiny_pipeline):
    cfg = config(tmp_path, num_worst=4)
    result = Evaluator(cfg, TinyDigits(), judge=tiny_judge()).evaluate(tiny_pipeline)
    metrics = result.metrics()
    for name in ("accuracy", "weakest_class_accuracy", "fid", "kid", "precision", "recall", "seconds_per_image"):
        assert name in metrics, name
    for c in range(3):
        for stat in ("avg", "min", "max"):
            assert f"correct_digit/scores/digit={c}/{stat}" in metrics
            assert f"realism/scores/digit={c}/{stat}" in metrics
    assert metrics["accuracy"] == pytest.approx(result.per_sample["correct_digit"].mean().item())
    assert result.labels.tolist() == sorted([i % 3 for i in range(30)])

    out = result.write(tmp_path / "eval", source="test")
    for name in ("metrics.json", "per_class.csv", "worst.png", "samples.png", "confusion.png"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["metrics"] == pytest.approx(metrics) and len(saved["worst"]) == 4
    lines = (out / "per_class.csv").read_text().splitlines()
    assert lines[0].startswith("class,n,is_digit,correct_digit,class_probability,realism") and len(lines) == 4
    worst = result.worst()
    assert (
        result.per_sample["class_probability"][worst].max() <= result.per_sample["class_probability"].sort().values[4]
    )

    again = Evaluator(cfg, TinyDigits(), judge=tiny_judge()).evaluate(tiny_pipeline).metrics()
    again.pop("seconds_per_image"), metrics.pop("seconds_per_image")
    assert again == metrics

    logger = CSVLogger(tmp_path / "logs", name="")
    result.log([logger], step=7)
    logger.finalize("success")
    header = (tmp_path / "logs" / "version_0" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "evals/accuracy" in header and "evals/correct_digit/scores/digit=2/avg" in header


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="metrics=.*'psnr'"):
        EvaluationConfig(metrics=["psnr"])
    with pytest.raises(ValueError, match="feature_extractor='inception'"):
        EvaluationConfig(metrics=["is"], feature_extractor="digits")
    with pytest.raises(ValueError, match="n_samples=0"):
        EvaluationConfig(n_samples=0)
    with pytest.raises(FileNotFoundError, match="configs/classifier_mnist.yaml"):
        Evaluator(EvaluationConfig(judge=str(tmp_path / "missing.ckpt")), TinyDigits())


# ---------------------------------------------------------------------- the command and the callback


@pytest.fixture
def judge_checkpoint(tmp_path):
    judge = tiny_judge().train()
    trainer = quiet_trainer(tmp_path / "judge", max_steps=1)
    trainer.fit(judge, datamodule=TinyDigits())
    path = tmp_path / "judge.ckpt"
    trainer.save_checkpoint(path)
    return path


def test_auto_feature_extractor_takes_inception_only_when_its_weights_are_on_disk(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    evaluator = Evaluator(config(tmp_path), TinyDigits(), judge=tiny_judge())
    assert evaluator.feature_extractor == "digits" and evaluator.extractor is evaluator.judge_features
    with pytest.raises(FileNotFoundError, match="weights-inception-2015-12-05"):
        Evaluator(config(tmp_path, metrics=["is"]), TinyDigits(), judge=tiny_judge())
    weights = tmp_path / "hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"")
    assert Evaluator._resolve_extractor(config(tmp_path)) == "inception"
    assert Evaluator._resolve_extractor(config(tmp_path, metrics=["judge"])) == "auto"  # no FID asked for
    assert Evaluator._resolve_extractor(config(tmp_path, feature_extractor="digits")) == "digits"


def test_evaluate_command_writes_files_and_repeats_its_numbers(tmp_path, tiny_pipeline, judge_checkpoint, monkeypatch):
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))  # no Inception weights: auto is digits
    tiny_pipeline.save_pretrained(tmp_path / "pipeline")
    data = tmp_path / "data.yaml"
    data.write_text("data:\n  class_path: tests.test_evaluation.TinyDigits\n")
    common = ["--judge", str(judge_checkpoint), "--data", str(data), "--cache-dir", str(tmp_path / "cache")]
    common += ["--n-samples", "30", "--steps", "2", "--no-progress"]
    first = evaluate.main(["--pipeline", str(tmp_path / "pipeline"), *common, "--logger", "csv"])
    out = tmp_path / "eval"
    for name in ("metrics.json", "per_class.csv", "worst.png", "samples.png"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["source"] == str(tmp_path / "pipeline") and saved["sampling"]["num_inference_steps"] == 2
    assert (out / "logs" / "version_0" / "metrics.csv").is_file()
    evaluate.main(["--pipeline", str(tmp_path / "pipeline"), *common, "--logger", "none", "--out", str(tmp_path / "b")])
    second = json.loads((tmp_path / "b" / "metrics.json").read_text())["metrics"]
    drop = "seconds_per_image"
    assert {k: v for k, v in second.items() if k != drop} == {k: v for k, v in first.metrics().items() if k != drop}

    real = evaluate.main(["--real", "test", *common, "--logger", "none", "--out", str(tmp_path / "real")])
    assert real.labels.numel() == 30 and "accuracy" in real.metrics()

    with pytest.raises(SystemExit, match="configs/classifier_mnist.yaml"):
        evaluate.main(["--real", "test", "--judge", str(tmp_path / "none.ckpt"), "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="feature_extractor='inception'"):
        evaluate.main(["--real", "test", *common, "--metrics", "is", "--feature-extractor", "digits"])
    with pytest.raises(SystemExit, match="--inception-weights PATH"):
        evaluate.main(["--real", "test", *common, "--metrics", "is"])


def test_periodic_evaluation_every_n_epochs_drives_early_stopping(tmp_path, judge_checkpoint):
    evaluation = {"n_samples": 30, "num_inference_steps": 2, "judge": str(judge_checkpoint)}
    evaluation["cache_dir"] = str(tmp_path / "cache")
    logger = PeriodicEvaluation(every_n_epochs=2, evaluation=evaluation)
    stopper = EarlyStopping(monitor="evals/accuracy", mode="max", patience=5, strict=False)
    trainer = quiet_trainer(tmp_path, max_epochs=2, limit_train_batches=2, callbacks=[logger, stopper])
    trainer.fit(tiny_ddpm(), datamodule=TinyDigits())
    assert "evals/accuracy" in trainer.callback_metrics and "evals/fid" in trainer.callback_metrics
    assert stopper.best_score.item() == pytest.approx(trainer.callback_metrics["evals/accuracy"].item())
    assert not (tmp_path / "eval" / "epoch=0").exists()
    saved = json.loads((tmp_path / "eval" / "epoch=1" / "metrics.json").read_text())
    assert saved["metrics"]["accuracy"] == pytest.approx(trainer.callback_metrics["evals/accuracy"].item())
    assert logger.history[-1]["evals"]["evals/accuracy"] == saved["metrics"]["accuracy"]
    with pytest.raises(ValueError, match="every_n_epochs=0"):
        PeriodicEvaluation(every_n_epochs=0)
    with pytest.raises(ValueError, match=r"evaluation has unknown fields \['n_sample'\]"):
        PeriodicEvaluation(evaluation={"n_sample": 10})


def test_evaluate_command_reads_a_checkpoint_and_writes_beside_its_run(tmp_path, judge_checkpoint, monkeypatch):
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    trainer = quiet_trainer(tmp_path / "run", max_steps=2, limit_val_batches=0)
    trainer.fit(tiny_ddpm(num_inference_steps=2), datamodule=TinyDigits())
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    trainer.save_checkpoint(checkpoint)
    data = tmp_path / "data.yaml"
    data.write_text("data:\n  class_path: tests.test_evaluation.TinyDigits\n")
    common = ["--judge", str(judge_checkpoint), "--data", str(data), "--cache-dir", str(tmp_path / "cache")]
    result = evaluate.main(
        ["--ckpt", str(checkpoint), *common, "--n-samples", "12", "--no-progress", "--logger", "none"]
    )
    saved = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
    assert saved["step"] == 2 and saved["weights"] == "ema" and saved["sampling"]["num_inference_steps"] == 2
    assert saved["metrics"]["accuracy"] == pytest.approx(result.metrics()["accuracy"])
