"""Standard metrics' networks without downloads: InceptionV3 weights, the LPIPS backbone, a local CLIP."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torchvision
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

from diffusion_lightning.metrics import clip as clip_module
from diffusion_lightning.metrics.clip import CLIPScorer, clip_score
from diffusion_lightning.metrics.inception import (
    INCEPTION_WEIGHTS_FILE,
    InceptionFeatures,
    InceptionWeightsMissing,
    resolve_inception_weights,
)
from diffusion_lightning.metrics.lpips import LPIPSDiversity, LPIPSWeightsMissing
from tests.assets import write_tiny_clip


@pytest.fixture
def empty_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the torch hub cache at an empty folder (restored afterwards)."""
    hub = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "_hub_dir", str(hub))
    return hub


# --- Inception ---------------------------------------------------------------------------------------


class _RandomInception(FeatureExtractorInceptionV3):
    """torch-fidelity's architecture keeping its random init: loading the given (empty) state dict is skipped."""

    def load_state_dict(self, state_dict, strict=True, assign=False):
        return None


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two random InceptionV3 state dicts in torch-fidelity's layout, differing in one tensor."""
    folder = tmp_path_factory.mktemp("inception")
    torch.save({}, folder / "empty.pth")
    torch.manual_seed(0)
    state = _RandomInception("random", ["2048"], str(folder / "empty.pth")).state_dict()
    torch.save(state, folder / "a.pth")
    state["fc.bias"] = state["fc.bias"] + 1
    torch.save(state, folder / "b.pth")
    return folder / "a.pth", folder / "b.pth"


def test_inception_weights_missing_names_hub_path_and_digits(empty_hub: Path) -> None:
    with pytest.raises(InceptionWeightsMissing) as info:
        resolve_inception_weights()
    message = str(info.value)
    assert str(empty_hub / "checkpoints" / INCEPTION_WEIGHTS_FILE) in message
    assert "digits" in message and "--inception-weights" in message and "https://" in message
    assert isinstance(info.value, FileNotFoundError)


def test_inception_explicit_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        resolve_inception_weights(missing)


def test_inception_found_in_hub_cache(empty_hub: Path) -> None:
    cached = empty_hub / "checkpoints" / INCEPTION_WEIGHTS_FILE
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"")
    assert resolve_inception_weights() == cached


def test_inception_features_and_logits(inception_weights: tuple[Path, Path]) -> None:
    extractor = InceptionFeatures(inception_weights[0])
    images = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    out = extractor.encode(images)
    assert out["features"].shape == (2, 2048) and out["logits"].shape == (2, 1008)
    assert out["features"].dtype == torch.float32 and torch.isfinite(out["features"]).all()
    assert torch.isfinite(out["logits"]).all()
    # the same as torchmetrics' FID path: uint8 at the native size, resized inside the network
    pixels = (images.expand(-1, 3, -1, -1) * 255).round().to(torch.uint8)
    assert torch.equal(out["features"], extractor.network(pixels))
    assert extractor(images).shape == (2, 2048)
    assert extractor.name.startswith("inception-v3-2048-")
    assert InceptionFeatures(inception_weights[1]).name != extractor.name
    assert InceptionFeatures(inception_weights[0]).name == extractor.name


def test_inception_rejects_out_of_range_and_bad_files(inception_weights: tuple[Path, Path], tmp_path: Path) -> None:
    extractor = InceptionFeatures(inception_weights[0])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        extractor.encode(torch.rand(1, 3, 8, 8) * 2 - 1)
    bad = tmp_path / "bad.pth"
    torch.save({"fc.weight": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="bad.pth"):
        InceptionFeatures(bad)


# --- LPIPS -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def alexnet_weights(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    state = torchvision.models.alexnet(weights=None).state_dict()
    path = tmp_path_factory.mktemp("alexnet") / "alexnet.pth"
    torch.save(state, path)
    return path, state


def test_lpips_missing_weights(empty_hub: Path) -> None:
    with pytest.raises(LPIPSWeightsMissing) as info:
        LPIPSDiversity()
    message = str(info.value)
    assert str(empty_hub / "checkpoints" / "alexnet-owt-7be5be79.pth") in message
    assert "allow_random_backbone=True" in message and "https://" in message
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        LPIPSDiversity(backbone_weights=empty_hub / "missing.pth", allow_random_backbone=True)


def test_lpips_random_backbone_warns(empty_hub: Path) -> None:
    with pytest.warns(UserWarning, match="RANDOM"):
        metric = LPIPSDiversity(allow_random_backbone=True)
    assert metric.random_backbone
    x = torch.rand(2, 1, 16, 16)
    assert metric.distance(x, torch.rand(2, 1, 16, 16)).shape == (2,)


def test_lpips_loads_local_backbone(alexnet_weights: tuple[Path, dict[str, torch.Tensor]], empty_hub: Path) -> None:
    path, state = alexnet_weights
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        metric = LPIPSDiversity(backbone_weights=path)
    assert not metric.random_backbone
    loaded = metric.lpips.net.state_dict()
    assert torch.equal(loaded["slice1.0.weight"], state["features.0.weight"])
    assert torch.equal(loaded["slice5.10.bias"], state["features.10.bias"])
    # the hub cache file is found without a path
    cached = empty_hub / "checkpoints" / "alexnet-owt-7be5be79.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(path.read_bytes())
    assert LPIPSDiversity().weights_path == cached


def test_lpips_rejects_wrong_backbone_file(tmp_path: Path) -> None:
    wrong = tmp_path / "wrong.pth"
    torch.save({"features.0.weight": torch.zeros(3)}, wrong)
    with pytest.raises(ValueError, match="wrong.pth"):
        LPIPSDiversity(backbone_weights=wrong)


def test_lpips_distance_and_diversity(alexnet_weights: tuple[Path, dict[str, torch.Tensor]]) -> None:
    metric = LPIPSDiversity(backbone_weights=alexnet_weights[0], batch_size=4)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(3, 1, 28, 28, generator=gen), torch.rand(3, 1, 28, 28, generator=gen)
    assert torch.allclose(metric.distance(x, x), torch.zeros(3), atol=1e-6)
    assert (metric.distance(x, y) > 0).all()
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        metric.distance(x * 2 - 1, y)

    images = torch.rand(13, 1, 28, 28, generator=gen)
    labels = torch.tensor([0] * 6 + [1] * 6 + [2])  # class 2 has one sample
    first = metric.diversity(images, labels, max_pairs_per_class=5, generator=torch.Generator().manual_seed(1))
    again = metric.diversity(images, labels, max_pairs_per_class=5, generator=torch.Generator().manual_seed(1))
    other = metric.diversity(images, labels, max_pairs_per_class=5, generator=torch.Generator().manual_seed(2))
    assert first == again
    assert first["per_class"] != other["per_class"]
    assert set(first["per_class"]) == {0, 1} and first["pairs"] == 10
    assert first["mean"] == pytest.approx(sum(first["per_class"].values()) / 2)
    assert all(v > 0 for v in first["per_class"].values())
    # few samples: every pair is used, so the value is the mean over all pairs
    pair = metric.diversity(images[:2], [0, 0])
    assert pair["pairs"] == 1
    assert pair["mean"] == pytest.approx(metric.distance(images[:1], images[1:2]).item(), abs=1e-6)
    with pytest.raises(ValueError, match="at least 2 samples"):
        metric.diversity(images[:2], [0, 1])
    with pytest.raises(ValueError, match="labels has 2 entries"):
        metric.diversity(images[:3], [0, 0])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        metric.diversity(images * 3, labels)


# --- CLIP --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_clip(tmp_path_factory.mktemp("clip"))


def test_clip_score_on_tiny_model(tiny_clip: Path) -> None:
    from transformers import CLIPModel, CLIPProcessor

    images = torch.rand(5, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    prompts = ["a zero", "the digit one", "two", "a digit", "of"]
    result = clip_score(images, prompts, tiny_clip, batch_size=2)
    per_sample = result["per_sample"]
    assert per_sample.shape == (5,) and torch.isfinite(per_sample).all()
    assert result["clip_score"] == pytest.approx(max(per_sample.mean().item(), 0.0))
    # per-sample scores are 100 * cos(image, text) of the model, whatever the batching
    model, processor = CLIPModel.from_pretrained(tiny_clip), CLIPProcessor.from_pretrained(tiny_clip)
    pixels = (images.expand(-1, 3, -1, -1) * 255).round().to(torch.uint8)
    inputs = processor(text=prompts, images=list(pixels), return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**inputs)
    cos = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds, dim=-1)
    assert torch.allclose(per_sample, 100 * cos, atol=1e-3)
    # the loaded model is reused
    hits = clip_module._scorer.cache_info().hits
    clip_score(images[:1], prompts[:1], tiny_clip)
    assert clip_module._scorer.cache_info().hits == hits + 1


def test_clip_score_errors(tiny_clip: Path, tmp_path: Path) -> None:
    images = torch.rand(2, 3, 32, 32)
    with pytest.raises(ValueError, match="3 prompts for 2 images"):
        clip_score(images, ["a", "b", "c"], tiny_clip)
    with pytest.raises(FileNotFoundError, match="missing-clip"):
        clip_score(images, ["a", "b"], tmp_path / "missing-clip")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        CLIPScorer(tmp_path / "empty")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        clip_score(images * 2 - 1, ["a", "b"], tiny_clip)
