"""Aspect-ratio bucketing of ImageCaptionDataModule; the size and crop every caption batch records."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from diffusion_lightning.data import BucketBatchSampler, ImageCaptionDataModule, make_buckets, nearest_bucket
from tests.conftest import quiet_trainer

#: (width, height) of the test images: squares, 2:1 landscapes, 1:2 portraits and two in between.
SIZES = [(64, 64)] * 4 + [(128, 64)] * 4 + [(64, 128)] * 4 + [(80, 64), (64, 96)]
#: The buckets of resolution 32, step 8, max_aspect 2, as (height, width).
BUCKETS_32 = [(40, 24), (32, 32), (24, 40)]


def write_folder(root: Path, sizes: list[tuple[int, int]] = SIZES) -> dict[str, tuple[int, int]]:
    """Random PNGs of ``sizes`` (width, height) and their metadata.jsonl; ``{file name: (height, width)}``."""
    root.mkdir(parents=True, exist_ok=True)
    lines, shapes = [], {}
    for i, (width, height) in enumerate(sizes):
        name = f"img{i:02d}_{width}x{height}.png"
        pixels = np.random.default_rng(i).integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / name)
        lines.append(json.dumps({"file_name": name, "text": f"caption of {name}"}))
        shapes[name] = (height, width)
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return shapes


def bucketed(root: Path, **kwargs) -> ImageCaptionDataModule:
    defaults = dict(resolution=32, bucket_step=8, max_aspect=2.0, batch_size=2, val_fraction=0.1, drop_last=False)
    return ImageCaptionDataModule(source="folder", root=str(root), aspect_buckets=True, **{**defaults, **kwargs})


def epoch_batches(data: ImageCaptionDataModule, epoch: int) -> list[dict]:
    loader = data.train_dataloader()
    loader.sampler.set_epoch(epoch)
    return list(loader)


def attach(data: ImageCaptionDataModule, epoch: int, processed: int, replicas: int = 1, rank: int = 0):
    """Give ``data`` a stand-in trainer at ``processed`` batches of ``epoch``, as process ``rank`` of ``replicas``."""
    progress = SimpleNamespace(current=SimpleNamespace(processed=processed))
    data.trainer = SimpleNamespace(
        current_epoch=epoch,
        fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress)),
        distributed_sampler_kwargs={"num_replicas": replicas, "rank": rank} if replicas > 1 else None,
    )
    return data


def expected_pixels(path: Path, size: tuple[int, int], bucket: tuple[int, int], crop: tuple[int, int], flip: bool):
    """The image file resized to ``size``, flipped or not, cut at ``crop`` to ``bucket``, in ``[-1, 1]``."""
    with Image.open(path) as file:
        image = TF.pil_to_tensor(file.convert("RGB"))
    image = TF.resize(image, list(size), interpolation=InterpolationMode.BILINEAR, antialias=True)
    if flip:
        image = image.flip(-1)
    (top, left), (height, width) = crop, bucket
    return image[:, top : top + height, left : left + width].float() / 127.5 - 1.0


def covering_size(original: tuple[int, int], bucket: tuple[int, int]) -> tuple[int, int]:
    """The smallest size of the original's aspect ratio (one side exact, the other rounded down) covering ``bucket``."""
    (height, width), (bucket_height, bucket_width) = original, bucket
    scale = max(bucket_height / height, bucket_width / width)
    size = (math.floor(height * scale + 1e-9), math.floor(width * scale + 1e-9))
    assert (
        size[0] >= bucket_height and size[1] >= bucket_width and (size[0] == bucket_height or size[1] == bucket_width)
    )
    return size


def test_buckets_have_about_the_square_area_step_multiple_sides_and_bounded_aspect():
    buckets = make_buckets(64, bucket_step=8, max_aspect=2.0)
    assert (64, 64) in buckets and buckets == sorted(buckets, key=lambda b: b[1] / b[0])
    assert set(buckets) == {(w, h) for h, w in buckets}  # both orientations
    for height, width in buckets:
        assert height % 8 == 0 and width % 8 == 0
        assert 0.8 * 64**2 <= height * width <= 64**2 and max(height, width) <= 2.0 * min(height, width)
    assert make_buckets(32, bucket_step=8, max_aspect=2.0) == BUCKETS_32
    assert make_buckets(64, bucket_step=8, max_aspect=1.0) == [(64, 64)]
    assert len(make_buckets(1024, bucket_step=64, max_aspect=4.0)) > len(make_buckets(1024, 64, 2.0))
    assert BUCKETS_32[nearest_bucket(BUCKETS_32, 64, 128)] == (24, 40)  # 2:1 landscape: the widest bucket
    assert BUCKETS_32[nearest_bucket(BUCKETS_32, 128, 64)] == (40, 24)
    assert BUCKETS_32[nearest_bucket(BUCKETS_32, 64, 80)] == (32, 32)  # 5:4 is nearer 1:1 than 5:3
    assert BUCKETS_32[nearest_bucket(BUCKETS_32, 10, 1000)] == (24, 40)


def test_every_batch_is_one_bucket_and_records_the_original_size_and_the_crop(tmp_path):
    shapes = write_folder(tmp_path / "data")
    data = bucketed(tmp_path / "data")
    batches = epoch_batches(data, epoch=0)
    train_keys = data.datasets["train"].keys
    assert sorted(k for b in batches for k in b["keys"]) == sorted(train_keys)  # drop_last=False: every image once
    assert {tuple(b["images"].shape[-2:]) for b in batches} == set(BUCKETS_32)
    for batch in batches:
        bucket = tuple(batch["images"].shape[-2:])
        assert batch["original_size"].dtype == batch["crop_top_left"].dtype == torch.long
        assert batch["original_size"].shape == batch["crop_top_left"].shape == (len(batch["keys"]), 2)
        for key, image, original, crop in zip(
            batch["keys"], batch["images"], batch["original_size"].tolist(), batch["crop_top_left"].tolist()
        ):
            assert tuple(original) == shapes[key]
            height, width = shapes[key]
            assert bucket == BUCKETS_32[nearest_bucket(BUCKETS_32, height, width)]
            size = covering_size(shapes[key], bucket)
            assert tuple(crop) == ((size[0] - bucket[0]) // 2, (size[1] - bucket[1]) // 2)  # centred
            torch.testing.assert_close(image, expected_pixels(tmp_path / "data" / key, size, bucket, crop, False))
    wide = [c for b in batches for k, c in zip(b["keys"], b["crop_top_left"].tolist()) if shapes[k] == (64, 128)]
    assert wide and all(c == [0, 4] for c in wide)  # 64x128 covers 24x40 at 24x48: 4 columns cut each side
    val = next(iter(data.val_dataloader()))  # validation stays square and centred
    assert val["images"].shape[-2:] == (32, 32) and tuple(val["original_size"][0].tolist()) == shapes[val["keys"][0]]


def test_random_crops_and_flips_are_recorded_where_the_pixels_came_from(tmp_path):
    shapes = write_folder(tmp_path / "data")
    data = bucketed(tmp_path / "data", center_crop=False, random_flip=True, seed=3)
    crops, flips = set(), 0
    for batch in epoch_batches(data, epoch=1) + epoch_batches(data, epoch=2):
        bucket = tuple(batch["images"].shape[-2:])
        for key, image, crop in zip(batch["keys"], batch["images"], batch["crop_top_left"].tolist()):
            size = covering_size(shapes[key], bucket)
            assert 0 <= crop[0] <= size[0] - bucket[0] and 0 <= crop[1] <= size[1] - bucket[1]
            path = tmp_path / "data" / key
            matches = [
                flip
                for flip in (False, True)
                if torch.allclose(image, expected_pixels(path, size, bucket, tuple(crop), flip))
            ]
            assert matches, key
            flips += matches == [True]
            crops.add((size, tuple(crop)))
    assert flips and len({crop for size, crop in crops if size == (24, 48)}) > 1  # random crops and flips drawn


def test_drop_last_drops_the_incomplete_batch_of_each_bucket(tmp_path):
    write_folder(tmp_path / "data")
    data = bucketed(tmp_path / "data", batch_size=3, drop_last=True)
    data.setup()
    sizes = data.datasets["train"].target_sizes
    counts = {bucket: sizes.count(bucket) for bucket in set(sizes)}
    batches = epoch_batches(data, epoch=0)
    assert all(len(b["keys"]) == 3 for b in batches)
    assert len(batches) == len(data.train_dataloader()) == sum(n // 3 for n in counts.values())
    kept = epoch_batches(bucketed(tmp_path / "data", batch_size=3, drop_last=False), epoch=0)
    expected = [size for n in counts.values() for size in [3] * (n // 3) + [n % 3] * (n % 3 > 0)]
    assert sorted(len(b["keys"]) for b in kept) == sorted(expected) and min(expected) < 3  # the rest served smaller


def test_the_order_depends_only_on_seed_and_epoch(tmp_path):
    write_folder(tmp_path / "data")
    first = [b["keys"] for b in epoch_batches(bucketed(tmp_path / "data", seed=1), epoch=1)]
    again = [b["keys"] for b in epoch_batches(bucketed(tmp_path / "data", seed=1), epoch=1)]
    assert first == again
    assert [b["keys"] for b in epoch_batches(bucketed(tmp_path / "data", seed=1), epoch=2)] != first
    assert [b["keys"] for b in epoch_batches(bucketed(tmp_path / "data", seed=2), epoch=1)] != first
    shapes = [[b["images"].shape for b in epoch_batches(bucketed(tmp_path / "data"), epoch)] for epoch in range(4)]
    changes = [sum(a != b for a, b in zip(epoch, epoch[1:])) for epoch in shapes]
    assert max(changes) > 2 and len({tuple(epoch) for epoch in shapes}) > 1  # buckets interleaved, anew each epoch


def test_a_mid_epoch_resume_replays_the_remaining_batches_and_shards_them_over_processes(tmp_path):
    write_folder(tmp_path / "data")
    kwargs = dict(center_crop=False, random_flip=True, seed=4)
    data = attach(bucketed(tmp_path / "data", **kwargs), 1, 0)
    epoch = epoch_batches(data, epoch=1)
    sizes = data.datasets["train"].target_sizes
    assert len(epoch) == sum(-(-sizes.count(bucket) // 2) for bucket in BUCKETS_32) >= 6  # batches of 2 per bucket
    state = attach(bucketed(tmp_path / "data", **kwargs), 1, 3).state_dict()
    assert state == {"epoch": 1, "samples_seen": 6, "batches": 3}
    resumed = bucketed(tmp_path / "data", **kwargs)
    resumed.load_state_dict(state)
    rest = epoch_batches(resumed, epoch=1)
    assert [b["keys"] for b in rest] == [b["keys"] for b in epoch[3:]]
    for a, b in zip(rest, epoch[3:]):
        assert all(torch.equal(a[name], b[name]) for name in ("images", "original_size", "crop_top_left"))
    assert [b["keys"] for b in epoch_batches(resumed, epoch=1)] == [b["keys"] for b in epoch]  # skipped once
    shards = []
    for rank in range(2):
        data = attach(bucketed(tmp_path / "data", **kwargs), 1, 0, replicas=2, rank=rank)
        data.load_state_dict(state)
        shards.append([b["keys"] for b in epoch_batches(data, epoch=1)])
    remaining = [b["keys"] for b in epoch[3:]]
    assert shards[0] == remaining[0::2] and shards[1][: len(remaining[1::2])] == remaining[1::2]


def test_the_bucket_sampler_shards_whole_batches_and_counts_them():
    buckets = [0] * 5 + [1] * 3 + [2] * 2
    sampler = BucketBatchSampler(buckets, batch_size=2, drop_last=False, seed=0)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 6 and sorted(i for b in batches for i in b) == list(range(10))
    assert all(len({buckets[i] for i in batch}) == 1 for batch in batches)
    assert sampler.order() == [i for b in batches for i in b]
    halves = [list(BucketBatchSampler(buckets, 2, drop_last=False, num_replicas=2, rank=r)) for r in range(2)]
    assert halves == [batches[0::2], batches[1::2]]
    strict = BucketBatchSampler(buckets, batch_size=2, drop_last=True)
    assert len(strict) == 4 and all(len(b) == 2 for b in strict)


def test_embedded_digits_fill_the_one_square_bucket(tmp_path):
    data = ImageCaptionDataModule(max_samples=40, resolution=32, batch_size=8, aspect_buckets=True, bucket_step=16)
    batches = epoch_batches(data, epoch=0)
    assert len(batches) == 4  # 38 training digits, drop_last
    for batch in batches:
        assert batch["images"].shape == (8, 3, 32, 32)
        assert batch["original_size"].tolist() == [[28, 28]] * 8 and batch["crop_top_left"].tolist() == [[0, 0]] * 8


def test_square_batches_record_the_original_size_and_the_crop_too(tmp_path):
    shapes = write_folder(tmp_path / "data", [(40, 30), (30, 60)])
    data = ImageCaptionDataModule(source="folder", root=str(tmp_path / "data"), resolution=16, val_fraction=0.0)
    data.setup()
    dataset = data.datasets["train"]
    for key, expected in (("img00_40x30.png", (0, 2)), ("img01_30x60.png", (8, 0))):  # resized to 16x21 and 32x16
        sample = dataset[dataset.keys.index(key)]
        assert sample["images"].shape == (3, 16, 16)
        assert sample["original_size"] == shapes[key] and sample["crop_top_left"] == expected
    batch = next(iter(ImageCaptionDataModule(max_samples=20, batch_size=4).train_dataloader()))
    assert batch["original_size"].tolist() == [[28, 28]] * 4 and batch["crop_top_left"].tolist() == [[0, 0]] * 4


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(bucket_step=4), r"bucket_step=4 must be an integer >= 8"),
        (dict(bucket_step=12), r"bucket_step=12 must be a multiple of 8"),
        (dict(resolution=40, bucket_step=16), r"resolution=40 is not a multiple of bucket_step=16.*\[8, 40\]"),
        (dict(resolution=32, bucket_step=64), r"resolution=32 is not a multiple of bucket_step=64.*\[8, 16, 32\]"),
        (dict(max_aspect=0.5, bucket_step=8), r"max_aspect=0.5 must be a number >= 1"),
        (dict(max_aspect=float("nan"), bucket_step=8), r"max_aspect=nan must be a number >= 1"),
    ],
)
def test_bad_bucket_options_are_named_with_what_is_accepted(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ImageCaptionDataModule(**{"resolution": 32, "aspect_buckets": True, **kwargs})
    ImageCaptionDataModule(**{"resolution": 32, **kwargs})  # not checked without bucketing


def test_a_batch_size_no_bucket_fills_is_an_error_with_drop_last(tmp_path):
    write_folder(tmp_path / "data")
    with pytest.raises(ValueError, match=r"batch_size=8 with drop_last=True leaves no training batch.*24x40: \d"):
        bucketed(tmp_path / "data", batch_size=8, drop_last=True).train_dataloader()


class ShapeRecorder(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[tuple[list[str], tuple[int, int]]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append((batch["keys"], tuple(batch["images"].shape[-2:])))
        return (self.weight - batch["images"].mean()) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize(
    ("aspect_buckets", "num_workers"), [(True, 0), (True, 1), (False, 1)], ids=["buckets", "buckets-workers", "workers"]
)
def test_fit_resumed_from_a_mid_epoch_checkpoint_sees_the_uninterrupted_batches(tmp_path, aspect_buckets, num_workers):
    """Lightning makes the loader's iterator before ``set_epoch`` when resuming mid-epoch; it serves that epoch."""
    write_folder(tmp_path / "data")

    def fit(run: Path, max_steps: int, ckpt_path: str | None = None) -> ShapeRecorder:
        model = ShapeRecorder()
        checkpoint = ModelCheckpoint(dirpath=run / "ckpt", save_last=True, every_n_train_steps=1, save_top_k=0)
        trainer = quiet_trainer(
            run, max_steps=max_steps, limit_val_batches=0, enable_checkpointing=True, callbacks=[checkpoint]
        )
        data = bucketed(tmp_path / "data", seed=7, num_workers=num_workers)
        data.aspect_buckets = aspect_buckets  # the same images and batch size, square
        trainer.fit(model, data, ckpt_path=ckpt_path)
        return model

    whole = fit(tmp_path / "a", max_steps=12)  # epochs of 7 or 8 batches: stops in the second
    shapes = {shape for _, shape in whole.seen}
    assert all(len(keys) <= 2 for keys, _ in whole.seen) and len(shapes) == (3 if aspect_buckets else 1)
    first = fit(tmp_path / "b", max_steps=9)
    rest = fit(tmp_path / "b", max_steps=12, ckpt_path="last")
    assert len(first.seen) == 9 and len(rest.seen) == 3
    assert first.seen + rest.seen == whole.seen
