"""``evaluate`` on text-to-image models: prompts files, the judge's digit map, folder references, real captions."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest
import scipy.linalg
import torch
from diffusers import StableDiffusionPipeline
from torchmetrics.image.kid import KernelInceptionDistance

from diffusion_lightning import DigitClassifier, LatentDiffusionModule
from diffusion_lightning.commands import evaluate
from diffusion_lightning.data.captions import ImageCaptionDataModule
from diffusion_lightning.data.mnist import _embedded_digits
from diffusion_lightning.metrics import (
    DigitFeatures,
    EvaluationConfig,
    Evaluator,
    FolderReference,
    PrecomputedFeatures,
    digits_in,
    load_judge,
    manifold_scores,
    prompt_classes,
    read_prompts,
    real_reference,
)
from diffusion_lightning.metrics.clip import CLIPScorer
from diffusion_lightning.pipelines.conditioning import Conditions, generate
from tests.assets import write_tiny_clip
from tests.conftest import quiet_trainer
from tests.test_evaluation import tiny_judge

PROMPTS = ["a handwritten digit zero", "the digit 1", "a squiggle"]
PROMPTS_FILE = (
    "\n# prompts for the tiny judge (classes 0-2)\na handwritten digit zero\n# comment\nthe digit 1\na squiggle\t2\n\n"
)
WORDS = ["zero", "one", "two"]


def calibrated_judge() -> DigitClassifier:
    """The tiny 3-class judge with its batch norms fitted to real digits: features that vary between images."""
    judge = tiny_judge()
    images, labels = _embedded_digits()
    chosen = (labels < 3).nonzero().flatten()[:90]
    digits = torch.nn.functional.interpolate(images[chosen].float() / 127.5 - 1, size=(8, 8), antialias=True,
                                             mode="bilinear")  # fmt: skip
    for module in judge.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None
            module.reset_running_stats()
    judge.train()
    with torch.no_grad():
        judge(digits)
    return judge.eval()


def write_captions(folder: Path, per_class: int = 10, offset: int = 0) -> list[Path]:
    """``per_class`` real digits of classes 0-2 as PNGs with a ``metadata.jsonl``; the files in its order."""
    folder.mkdir(parents=True, exist_ok=True)
    images, labels = _embedded_digits()
    lines, files = [], []
    for digit in range(3):
        for i in (labels == digit).nonzero().flatten()[offset : offset + per_class].tolist():
            PIL.Image.fromarray(images[i, 0].numpy()).save(folder / f"{i}.png")
            lines.append(json.dumps({"file_name": f"{i}.png", "text": f"a handwritten digit {WORDS[digit]}"}))
            files.append(folder / f"{i}.png")
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return files


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> SimpleNamespace:
    """A tiny exported Stable Diffusion pipeline (16x16), a judge checkpoint, a caption folder and a prompts file."""
    root = tmp_path_factory.mktemp("t2i")
    torch.manual_seed(0)
    pipeline = LatentDiffusionModule(num_inference_steps=2).export_pipeline(root / "sd")
    trainer = quiet_trainer(root / "judge", max_steps=0)
    trainer.strategy.connect(calibrated_judge())
    trainer.save_checkpoint(root / "judge.ckpt")
    files = write_captions(root / "captions")
    (root / "prompts.txt").write_text(PROMPTS_FILE)
    return SimpleNamespace(
        root=root, pipeline=pipeline, judge=root / "judge.ckpt", captions=root / "captions", files=files,
        prompts=root / "prompts.txt",
    )  # fmt: skip


def common(assets: SimpleNamespace, tmp_path: Path) -> list[str]:
    return ["--judge", str(assets.judge), "--cache-dir", str(tmp_path / "cache"), "--logger", "none"]


def no_inception(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))  # no Inception weights: auto is digits


# ---------------------------------------------------------------------- prompts


def test_prompts_file_gives_prompts_and_explicit_classes(tmp_path):
    prompts = read_prompts_file(tmp_path, PROMPTS_FILE)
    assert prompts.prompts == tuple(PROMPTS) and prompts.classes == {"a squiggle": 2}
    assert prompt_classes(prompts.prompts, prompts.classes) == [0, 1, 2]
    assert digits_in("Seven, then 7.") == [7] and digits_in("3.5 or 7th") == [] and digits_in("one 8") == [1, 8]
    with pytest.raises(ValueError, match=r"'a squiggle' names no digit.*'a squiggle<TAB>3'.*drop judge"):
        prompt_classes(["a squiggle"])
    with pytest.raises(ValueError, match=r"several digits \[1, 8\]"):
        prompt_classes(["one 8"])
    with pytest.raises(ValueError, match=r"asks for class 7, but the digit judge knows classes 0..2"):
        prompt_classes(["seven"], num_classes=3)
    for text, match in [
        ("a\nb\tx\n", r"line 2: class='x' of prompt 'b' is not accepted; expected an int >= 0"),
        ("a\n# c\na\n", r"line 3: prompt 'a' was already given on line 1"),
        ("a\t1\t2\n", r"line 1: .* has 2 tabs"),
        ("\t3\n", r"line 1: .* has no prompt before the tab"),
        ("# nothing\n\n", r"--prompts='.*' holds no prompt .* Expected one prompt per line"),
        ("a\n\n  \nb\n", r"--prompts='.*': line 2 is blank between prompts \(and 1 more\); an empty prompt would draw"),
    ]:
        with pytest.raises(ValueError, match=match):
            read_prompts_file(tmp_path, text)
    with pytest.raises(FileNotFoundError, match=r"'.*missing.txt' does not exist; expected a text file"):
        read_prompts(tmp_path / "missing.txt")


def read_prompts_file(tmp_path: Path, text: str):
    path = tmp_path / "prompts.txt"
    path.write_text(text)
    return read_prompts(path)


# ---------------------------------------------------------------------- reference folders


def test_reference_folders_plain_or_captions_with_content_keyed_caches(assets, tmp_path):
    plain = tmp_path / "plain"
    (plain / "sub").mkdir(parents=True)
    for i, file in enumerate(assets.files[:4]):
        shutil.copy(file, (plain if i < 2 else plain / "sub") / file.name)
    (plain / "notes.txt").write_text("not an image")
    folder = FolderReference(plain)
    folder.setup()
    assert folder.layout == "images" and folder.resolution == 28 and len(folder.datasets["train"]) == 4
    captions = FolderReference(assets.captions, resolution=16)
    captions.setup()
    assert captions.layout == "captions" and len(captions.datasets["train"]) == 30
    assert captions.datasets["train"][0]["images"].shape == (3, 16, 16)

    features, cache = DigitFeatures(calibrated_judge()), tmp_path / "cache"
    first = real_reference(FolderReference(plain), features, cache_dir=cache, progress=False)
    assert first.features.shape == (4, 16) and first.labels.tolist() == [-1] * 4  # image batches carry no labels
    again = real_reference(FolderReference(plain), features, cache_dir=cache, progress=False)
    assert again.key == first.key and len(list((cache / "reference").iterdir())) == 1
    shutil.copy(assets.files[5], plain / assets.files[5].name)  # a changed folder is a new entry
    grown = real_reference(FolderReference(plain), features, cache_dir=cache, progress=False)
    assert grown.key != first.key and grown.features.shape == (5, 16)
    other = real_reference(FolderReference(assets.captions), features, cache_dir=cache, progress=False)
    assert other.key not in (first.key, grown.key) and other.features.shape == (30, 16)

    # a caption data module serves batches of images and captions, without labels
    data = ImageCaptionDataModule(source="folder", root=str(assets.captions), resolution=16, val_fraction=0.2)
    split = real_reference(data, features, "val", cache_dir=cache, progress=False)
    assert split.features.shape == (6, 16) and (split.labels == -1).all()
    elsewhere = tmp_path / "copy"
    shutil.copytree(assets.captions, elsewhere)
    moved = ImageCaptionDataModule(source="folder", root=str(elsewhere), resolution=16, val_fraction=0.2)
    assert real_reference(moved, features, "val", cache_dir=cache, progress=False).key != split.key

    with pytest.raises(FileNotFoundError, match=r"reference='.*missing' is not a folder"):
        FolderReference(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"holds no image \(files ending in .png"):
        FolderReference(tmp_path / "empty")


# ---------------------------------------------------------------------- the command


def reference_features(assets: SimpleNamespace, features: DigitFeatures) -> torch.Tensor:
    """The caption folder's images as the test reads them, in ``metadata.jsonl`` order, in the judge's space."""
    pixels = [np.asarray(PIL.Image.open(file).convert("RGB")) for file in assets.files]
    images = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float() / 255
    return features.encode(images)["features"]


def closed_form_fid(real: torch.Tensor, fake: torch.Tensor) -> float:
    mu1, mu2 = real.double().mean(0).numpy(), fake.double().mean(0).numpy()
    s1, s2 = np.cov(real.double().numpy(), rowvar=False), np.cov(fake.double().numpy(), rowvar=False)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real))


def test_text_to_image_evaluation_writes_files_repeats_and_matches_a_recomputation(
    assets, tmp_path, monkeypatch, capsys
):
    no_inception(monkeypatch, tmp_path)
    args = ["--pipeline", str(assets.pipeline), "--prompts", str(assets.prompts), "--reference", str(assets.captions)]
    args += ["--n-samples", "24", "--steps", "2", *common(assets, tmp_path)]
    result = evaluate.main([*args, "--out", str(tmp_path / "a")])
    shown = capsys.readouterr()
    assert "generating (2 steps)" in shown.err and "accuracy" in shown.out and "per_prompt.csv" in shown.out
    out = tmp_path / "a"
    for name in ("metrics.json", "per_prompt.csv", "worst.png", "samples.png", "confusion.png"):
        assert (out / name).is_file(), name
    assert not (out / "per_class.csv").exists()
    lines = (out / "per_prompt.csv").read_text().splitlines()
    assert lines[0] == (
        "prompt_id,prompt,class,n,is_digit,correct_digit,class_probability,realism,realism_min,realism_max,precision"
    )
    assert [line.split(",")[:4] for line in lines[1:]] == [[str(i), p, str(i), "8"] for i, p in enumerate(PROMPTS)]
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["feature_space"]["fid"] == saved["feature_space"]["manifold"]
    # the module's guidance (2.0), recorded by export in sampling_defaults.json, not the text-to-image fallback 7.5
    assert saved["feature_space"]["fid"].startswith("digits-") and saved["sampling"]["guidance_scale"] == 2.0
    assert [row["prompt"] for row in saved["per_prompt"]] == PROMPTS and len(saved["worst"]) == 16
    assert {"prompt", "class", "class_probability"} <= set(saved["worst"][0])
    metrics = saved["metrics"]
    for i in range(3):
        assert f"correct_digit/scores/prompt={i}/min" in metrics and f"realism/scores/prompt={i}/max" in metrics

    # the samples are the prompts' own, spread 8 each, from the seed
    pipeline = StableDiffusionPipeline.from_pretrained(assets.pipeline)
    pipeline.set_progress_bar_config(disable=True)
    conditions = Conditions("prompt", tuple(PROMPTS), tuple(PROMPTS)).spread(24)
    images = generate(pipeline, conditions, num_inference_steps=2, guidance_scale=2.0,
                      generator=torch.Generator().manual_seed(0))  # fmt: skip
    torch.testing.assert_close(result.images, images)
    # FID, KID, precision/recall and the judge, recomputed from the images and the caption folder's PNGs
    features = DigitFeatures(load_judge(assets.judge))
    real, fake = reference_features(assets, features), features.encode(images)
    assert metrics["fid"] == pytest.approx(closed_form_fid(real, fake["features"]), rel=1e-3, abs=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kid = KernelInceptionDistance(feature=PrecomputedFeatures(16), subsets=100, subset_size=24)
    kid.update(real, real=True)
    kid.update(fake["features"], real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        kid_mean, kid_std = kid.compute()
    assert metrics["kid"] == pytest.approx(kid_mean.item(), rel=1e-3, abs=1e-7)
    assert metrics["kid_std"] == pytest.approx(kid_std.item(), rel=1e-3, abs=1e-7)
    manifold = manifold_scores(real, fake["features"], k=3)
    assert (metrics["precision"], metrics["recall"]) == (manifold.precision, manifold.recall)
    assert metrics["fid"] > 0 and metrics["kid_std"] > 0
    wanted = torch.arange(3).repeat_interleave(8)
    assert metrics["accuracy"] == pytest.approx((fake["logits"].argmax(1) == wanted).double().mean().item())
    assert result.confusion.sum(1).tolist() == [8, 8, 8]

    evaluate.main([*args, "--no-progress", "--out", str(tmp_path / "b")])
    assert "generating" not in capsys.readouterr().err
    again = json.loads((tmp_path / "b" / "metrics.json").read_text())["metrics"]
    drop = "seconds_per_image"
    assert {k: v for k, v in again.items() if k != drop} == {k: v for k, v in metrics.items() if k != drop}


def test_a_latent_checkpoint_is_evaluated_on_its_validation_prompts_at_its_image_size(assets, tmp_path, monkeypatch):
    no_inception(monkeypatch, tmp_path)
    torch.manual_seed(0)
    module = LatentDiffusionModule(num_inference_steps=2, image_size=8, validation_prompts=["digit 0", "two"])
    trainer = quiet_trainer(tmp_path / "run", max_steps=0)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    result = evaluate.main(
        ["--ckpt", str(tmp_path / "run" / "checkpoints" / "last.ckpt"), "--reference", str(assets.captions),
         "--n-samples", "6", "--no-progress", *common(assets, tmp_path)]
    )  # fmt: skip
    saved = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
    rows = [(row["prompt"], row["class"], row["n"]) for row in saved["per_prompt"]]
    assert rows == [("digit 0", 0, 3), ("two", 2, 3)]
    assert result.images.shape == (6, 3, 8, 8) and saved["sampling"]["image_size"] == 8 and saved["weights"] == "ema"


def test_real_caption_images_are_grouped_by_caption_and_judged_by_its_digit(assets, tmp_path, monkeypatch):
    no_inception(monkeypatch, tmp_path)
    data = tmp_path / "data.yaml"
    data.write_text(
        "data:\n  class_path: diffusion_lightning.data.captions.ImageCaptionDataModule\n  init_args:\n"
        f"    source: folder\n    root: {assets.captions}\n    resolution: 16\n    val_fraction: 0.4\n"
    )
    out = tmp_path / "real"
    result = evaluate.main(
        ["--real", "val", "--data", str(data), "--no-progress", "--out", str(out), *common(assets, tmp_path)]
    )
    rows = (out / "per_prompt.csv").read_text().splitlines()
    captions = [row.split(",")[1:3] for row in rows[1:]]
    assert captions == [[f"a handwritten digit {word}", str(d)] for d, word in enumerate(WORDS)]
    assert result.labels.numel() == 12 and result.labels.tolist() == sorted(result.labels.tolist())
    assert result.targets.tolist() == [result.labels[i].item() for i in range(12)]  # caption i is digit i here
    assert (out / "confusion.png").is_file() and "precision" in result.metrics()


def test_the_evaluator_spreads_prompts_and_takes_a_callers_conditions(assets, tmp_path, monkeypatch, tiny_pipeline):
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))  # no LPIPS weights: a random backbone
    pipeline = StableDiffusionPipeline.from_pretrained(assets.pipeline)
    clip = write_tiny_clip(tmp_path / "clip")
    config = EvaluationConfig(
        n_samples=5, prompts=["a 0", "two"], metrics=["judge", "lpips", "clip"], judge=str(assets.judge),
        allow_random_lpips=True, clip_model=str(clip), progress=False, cache_dir=str(tmp_path / "cache"),
    )  # fmt: skip
    with pytest.warns(UserWarning, match="RANDOM alex backbone"):
        evaluator = Evaluator(config)
    result = evaluator.evaluate(pipeline, 2, 1.0)
    assert result.prompts == ["a 0", "two"] and result.labels.tolist() == [0, 0, 0, 1, 1]
    assert result.targets.tolist() == [0, 0, 0, 2, 2] and result.table_name == "per_prompt"
    texts = ["a 0"] * 3 + ["two"] * 2
    torch.testing.assert_close(result.per_sample["clip_score"], CLIPScorer(clip)(result.images, texts)["per_sample"])
    metrics = result.metrics()
    assert "lpips_diversity/scores/prompt=0/avg" in metrics and "lpips_diversity/scores/prompt=1/avg" in metrics
    assert "weakest_prompt_accuracy" in metrics and "weakest_class_accuracy" not in metrics

    asked = Conditions("prompt", ("the digit 1", "zero"), ("the digit 1", "zero"))
    result = evaluator.evaluate(pipeline, 2, 1.0, conditions=asked, image_size=8)
    assert result.images.shape == (5, 3, 8, 8) and result.prompts == list(asked.values)
    assert result.sampling["image_size"] == 8 and result.targets.tolist() == [1, 1, 1, 0, 0]
    with pytest.raises(ValueError, match="conditions are of kind 'class', but the pipeline is conditioned on 'prompt'"):
        evaluator.evaluate(pipeline, 2, 1.0, conditions=Conditions("class", (0,), ("0",)))
    with pytest.raises(ValueError, match=r"'a cat' names no digit"):
        evaluator.evaluate(pipeline, 2, 1.0, conditions=Conditions("prompt", ("a cat",), ("a cat",)))
    evaluator.config.n_samples = 2
    with pytest.raises(ValueError, match=r"n_samples=2 gives each of the 2 prompts one sample; LPIPS .* at least 4"):
        evaluator.evaluate(pipeline, 2, 1.0)
    with pytest.raises(ValueError, match="prompts is set, but the model is class-conditioned"):
        evaluator.evaluate(tiny_pipeline, 2, 1.0)


def test_user_mistakes_are_one_error_line_naming_the_flag(assets, tmp_path, monkeypatch, tiny_pipeline):
    no_inception(monkeypatch, tmp_path)
    base = [*common(assets, tmp_path), "--n-samples", "3", "--steps", "2", "--no-progress"]
    sd = ["--pipeline", str(assets.pipeline), "--reference", str(assets.captions), *base]
    with pytest.raises(SystemExit, match=r"^error: --prompts: prompts file '.*nope.txt' does not exist; expected"):
        evaluate.main([*sd, "--prompts", str(tmp_path / "nope.txt")])
    with pytest.raises(SystemExit, match=r"^error: --pipeline '.*' is a text-to-image model and names no default "
                                         r"prompts; give --prompts FILE \(one prompt per line"):  # fmt: skip
        evaluate.main(sd)
    tiny_pipeline.save_pretrained(tmp_path / "digits")
    with pytest.raises(SystemExit, match=r"^error: --prompts '.*' is given, but --pipeline '.*digits' is "
                                         r"class-conditioned \(3 classes\); drop --prompts"):  # fmt: skip
        evaluate.main(["--pipeline", str(tmp_path / "digits"), "--prompts", str(assets.prompts), *base])
    cat = tmp_path / "cat.txt"
    cat.write_text("a cat\n")
    with pytest.raises(SystemExit, match=r"^error: prompt 'a cat' names no digit.*after a tab.*drop judge"):
        evaluate.main([*sd, "--prompts", str(cat)])
    result = evaluate.main([*sd, "--prompts", str(cat), "--metrics", "fid", "--out", str(tmp_path / "cat")])
    assert result.prompts == ["a cat"] and result.targets is None and "fid" in result.metrics()
    with pytest.raises(SystemExit, match=r"^error: --reference '.*missing' is not a folder; expected"):
        evaluate.main([*sd, "--prompts", str(assets.prompts), "--reference", str(tmp_path / "missing")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match=r"^error: reference='.*empty' holds no image"):
        evaluate.main([*sd, "--prompts", str(assets.prompts), "--reference", str(tmp_path / "empty")])
    with pytest.raises(SystemExit, match=r"^error: --data: config '.*none.yaml' does not exist"):
        evaluate.main(["--real", "val", "--data", str(tmp_path / "none.yaml"), *base])
