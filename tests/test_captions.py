"""ImageCaptionDataModule: embedded captioned digits, caption folders, bad images, tokens, crops, resume."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from lightning.pytorch import LightningModule
from PIL import Image, ImageFile

from diffusion_lightning.data.captions import DIGIT_NAMES, ImageCaptionDataModule, ImageCaptions
from diffusion_lightning.data.mnist import _embedded_digits
from tests.assets import write_tiny_clip_tokenizer
from tests.conftest import quiet_trainer


def write_png(path: Path, size: tuple[int, int] = (40, 30), seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def write_metadata(folder: Path, names: list[str], column: str = "text", extra: dict | None = None) -> Path:
    """PNGs ``names`` in ``folder`` and a metadata.jsonl captioning each "caption of <name>"."""
    lines = []
    for i, name in enumerate(names):
        write_png(folder / name, seed=i)
        lines.append(json.dumps({"file_name": name, column: f"caption of {name}", **(extra or {})}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "metadata.jsonl"


def write_bad_images(folder: Path) -> list[str]:
    """A PNG cut in half and a text file named .png; returns their names."""
    data = write_png(folder / "cut.png", seed=99).read_bytes()
    (folder / "cut.png").write_bytes(data[: len(data) // 2])
    (folder / "text.png").write_text("not an image")
    return ["cut.png", "text.png"]


def folder_module(root: Path, **kwargs) -> ImageCaptionDataModule:
    kwargs = {"source": "folder", "root": str(root), "resolution": 16, "batch_size": 4, **kwargs}
    return ImageCaptionDataModule(**kwargs)


def all_batches(loader, epoch: int = 0) -> list[dict]:
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)
    return list(loader)


def test_embedded_digits_are_rgb_captioned_from_labels_and_split_seeded_and_balanced():
    dm = ImageCaptionDataModule(max_samples=200, resolution=32, batch_size=8, seed=1)
    dm.setup("fit")
    assert {k: len(v) for k, v in dm.datasets.items()} == {"train": 190, "val": 10}
    assert (dm.image_size, dm.in_channels) == (32, 3)
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"images", "captions", "keys", "skipped", "original_size", "crop_top_left"}
    images = batch["images"]
    assert images.shape == (8, 3, 32, 32) and images.dtype == torch.float32
    assert images.min() == -1 and images.max() <= 1 and images.max() > 0.5
    assert torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 1], images[:, 2])  # grey in RGB
    _, labels = _embedded_digits()
    for key, caption in zip(batch["keys"], batch["captions"]):
        assert caption == f"a handwritten digit {DIGIT_NAMES[int(labels[int(key.split('/')[1])])]}"
    val_labels = [int(labels[int(k.split("/")[1])]) for k in dm.datasets["val"].keys]
    assert sorted(val_labels) == list(range(10))  # class-balanced: one of each digit
    same, other = ImageCaptionDataModule(max_samples=200, seed=1), ImageCaptionDataModule(max_samples=200, seed=2)
    same.setup(), other.setup()
    assert same.datasets["val"].keys == dm.datasets["val"].keys
    assert other.datasets["val"].keys != dm.datasets["val"].keys
    full = ImageCaptionDataModule(caption_template="{digit} ({name})")
    full.setup()
    assert {k: len(v) for k, v in full.datasets.items()} == {"train": 4750, "val": 250}
    index = int(full.datasets["train"].keys[0].split("/")[1])
    assert full.datasets["train"].captions[0] == f"{int(labels[index])} ({DIGIT_NAMES[int(labels[index])]})"


def test_metadata_jsonl_at_the_root_carves_validation_with_a_custom_caption_column(tmp_path):
    names = [f"img{i}.png" for i in range(10)]
    write_metadata(tmp_path, names, column="prompt", extra={"text": "the wrong column"})
    dm = folder_module(tmp_path, caption_column="prompt", val_fraction=0.2, drop_last=False)
    dm.setup()
    train, val = dm.datasets["train"], dm.datasets["val"]
    assert (len(train), len(val)) == (8, 2)
    assert sorted(train.keys + val.keys) == sorted(names)
    batches = all_batches(dm.train_dataloader())
    assert [b["images"].shape for b in batches] == [(4, 3, 16, 16), (4, 3, 16, 16)]
    assert all(c == f"caption of {k}" for b in batches for k, c in zip(b["keys"], b["captions"]))
    again = folder_module(tmp_path, caption_column="prompt", val_fraction=0.2)
    again.setup()
    assert again.datasets["val"].keys == val.keys  # seeded carve
    with pytest.raises(ValueError, match=r"line 1.*caption_column='caption'"):
        folder_module(tmp_path, caption_column="caption").setup()


def test_metadata_jsonl_in_train_and_validation_folders(tmp_path):
    write_metadata(tmp_path / "train", ["a.png", "b.png", "c.png"])
    write_metadata(tmp_path / "validation", ["v.png"])
    dm = folder_module(tmp_path, eval_batch_size=2)
    dm.setup()
    assert sorted(dm.datasets["train"].keys) == ["train/a.png", "train/b.png", "train/c.png"]
    val = next(iter(dm.val_dataloader()))
    assert val["keys"] == ["validation/v.png"] and val["captions"] == ["caption of v.png"]
    assert val["images"].shape == (1, 3, 16, 16)


@pytest.mark.parametrize("form", ["dict", "list"])
def test_images_folder_with_captions_json(tmp_path, form):
    for split, names in (("train", ["0.png", "1.png", "2.png"]), ("validation", ["9.png"])):
        for i, name in enumerate(names):
            write_png(tmp_path / split / "images" / name, size=(20, 36), seed=i)
        captions = {name: f"picture {name}" for name in names}
        if form == "list":
            captions = [{"file_name": n, "text": c} for n, c in captions.items()]
            captions[0] = {"image": captions[0]["file_name"], "caption": captions[0]["text"]}
        (tmp_path / split / "captions.json").write_text(json.dumps(captions))
    dm = folder_module(tmp_path, drop_last=False)
    dm.setup()
    assert sorted(dm.datasets["train"].keys) == [f"train/images/{i}.png" for i in range(3)]
    assert dm.datasets["val"].keys == ["validation/images/9.png"]
    batch = next(iter(dm.train_dataloader()))
    assert batch["images"].shape == (3, 3, 16, 16)
    assert sorted(batch["captions"]) == ["picture 0.png", "picture 1.png", "picture 2.png"]


def test_folder_errors_name_what_is_wrong(tmp_path):
    with pytest.raises(ValueError, match="root=None"):
        ImageCaptionDataModule(source="folder")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        folder_module(tmp_path / "nowhere").setup()
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"metadata\.jsonl.*captions\.json"):
        folder_module(tmp_path / "empty").setup()
    write_metadata(tmp_path / "gaps", ["here.png"])
    lines = [json.dumps({"file_name": f"gone{i}.png", "text": "x"}) for i in range(7)]
    (tmp_path / "gaps" / "metadata.jsonl").write_text("\n".join(lines + [json.dumps({"file_name": "here.png"})]))
    with pytest.raises(ValueError, match="line 8"):  # no caption
        folder_module(tmp_path / "gaps").setup()
    (tmp_path / "gaps" / "metadata.jsonl").write_text("\n".join(lines))
    with pytest.raises(FileNotFoundError, match=r"7 image\(s\).*'gone0.png'.*'gone4.png'\] and 2 more"):
        folder_module(tmp_path / "gaps").setup()
    (tmp_path / "blank" / "train").mkdir(parents=True)
    (tmp_path / "blank" / "train" / "captions.json").write_text("{}")
    with pytest.raises(ValueError, match=r"captions\.json' holds no image-caption pairs"):
        folder_module(tmp_path / "blank").setup()


class KeyRecorder(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[tuple[int, list[str], set[str]]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append((self.current_epoch, batch["keys"], set(batch)))
        return (self.weight - batch["images"].mean()) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_bad_images_are_skipped_and_reported_once_per_epoch(tmp_path):
    good = [f"good{i}.png" for i in range(6)]
    write_metadata(tmp_path, good)
    bad = write_bad_images(tmp_path)
    lines = [json.dumps({"file_name": name, "text": name}) for name in good + bad]
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines))
    dm, model = folder_module(tmp_path, val_fraction=0, drop_last=False), KeyRecorder()
    trainer = quiet_trainer(tmp_path, max_epochs=2, limit_val_batches=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, dm)
    reports = [str(w.message) for w in caught if "unreadable" in str(w.message)]
    assert len(reports) == 2  # one per epoch: at the start of the next epoch, and at teardown
    assert all("skipped 2 unreadable" in r and "'cut.png'" in r and "'text.png'" in r for r in reports)
    assert not ImageFile.LOAD_TRUNCATED_IMAGES
    for epoch in (0, 1):
        keys = [k for e, keys, _ in model.seen if e == epoch for k in keys]
        assert sorted(keys) == good
    fields_seen = {"images", "captions", "keys", "original_size", "crop_top_left"}
    assert all(fields == fields_seen for *_, fields in model.seen)  # "skipped" taken out

    with pytest.raises(ValueError, match=r"(cut|text)\.png.*skip_bad_images=true"):
        all_batches(folder_module(tmp_path, val_fraction=0, skip_bad_images=False).train_dataloader())


def test_a_batch_of_only_bad_images_is_refilled_and_an_unreadable_set_raises(tmp_path):
    write_metadata(tmp_path, ["good.png"])
    bad = write_bad_images(tmp_path)
    lines = [json.dumps({"file_name": name, "text": name}) for name in ["good.png", *bad]]
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines))
    dm = folder_module(tmp_path, val_fraction=0, batch_size=1)
    batches = all_batches(dm.train_dataloader())
    assert [b["keys"] for b in batches] == [["good.png"]] * 3
    assert [bool(b["skipped"]) for b in batches].count(True) == 2  # the two batches drawn on a bad image
    assert {k for b in batches for k in b["skipped"]} == set(bad)
    for batch in batches:
        dm.on_before_batch_transfer(batch, 0)
    with pytest.warns(UserWarning, match="skipped 2 unreadable"):
        assert dm.report_skipped() == 2
    assert dm.report_skipped() == 0  # reported once
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines[1:]))
    with pytest.raises(RuntimeError, match="none of the 2 images"):
        all_batches(folder_module(tmp_path, val_fraction=0, batch_size=1).train_dataloader())


def test_tokenized_captions_and_one_warning_for_the_truncated(tmp_path):
    write_tiny_clip_tokenizer(tmp_path / "tokenizer")
    names = ["a.png", "b.png", "c.png", "d.png"]
    write_metadata(tmp_path / "data", names)
    captions = ["a digit", "the digit", "zero", "the digit " * 12]
    lines = [json.dumps({"file_name": name, "text": caption}) for name, caption in zip(names, captions)]
    (tmp_path / "data" / "metadata.jsonl").write_text("\n".join(lines))
    dm = folder_module(tmp_path / "data", tokenizer=str(tmp_path), tokenizer_subfolder="tokenizer", val_fraction=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm.setup()
    reports = [str(w.message) for w in caught if "truncated" in str(w.message)]
    assert len(reports) == 1 and "1 caption(s)" in reports[0] and "max_length=16" in reports[0]
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (4, 16) and batch["input_ids"].dtype == torch.long
    ids = dict(zip(batch["keys"], batch["input_ids"]))
    eos = ids["a.png"][-1]  # CLIP pads with the end token
    assert (ids["a.png"] == eos).sum() > 5 and ids["a.png"][0] != eos
    assert (ids["d.png"] == eos).sum() == 1 and ids["d.png"][-1] == eos  # truncated, end token kept
    with pytest.raises(FileNotFoundError, match="tokenizer="):
        folder_module(tmp_path / "data", tokenizer=str(tmp_path / "missing")).setup()


def test_random_crop_and_flip_depend_only_on_seed_epoch_and_index(tmp_path):
    path = write_png(tmp_path / "wide.png", size=(96, 32))
    dataset = ImageCaptions(["x"], ["wide.png"], 16, paths=[path], random_crop=True, random_flip=True, seed=5)
    first = dataset[0, 3]["images"]
    assert first.shape == (3, 16, 16)
    assert torch.equal(first, dataset[0, 3]["images"])
    twin = ImageCaptions(["y"], ["other"], 16, paths=[path], random_crop=True, random_flip=True, seed=5)
    assert torch.equal(first, twin[0, 3]["images"])  # a fresh dataset (a resumed run) draws the same
    assert not torch.equal(first, dataset[0, 4]["images"])
    centred = ImageCaptions(["x"], ["wide.png"], 16, paths=[path])
    assert torch.equal(centred[0]["images"], centred[0, 7]["images"])  # no randomness without crop or flip
    write_metadata(tmp_path / "set", ["a.png", "b.png"])
    dm = folder_module(tmp_path / "set", center_crop=False, random_flip=True, val_fraction=0.5)
    dm.setup()
    assert dm.datasets["train"].random_crop and dm.datasets["train"].random_flip
    assert not (dm.datasets["val"].random_crop or dm.datasets["val"].random_flip)


def test_resume_mid_epoch_serves_the_remaining_batches_identically():
    kwargs = dict(max_samples=100, batch_size=8, center_crop=False, random_flip=True, resolution=24, seed=4)
    first = ImageCaptionDataModule(**kwargs)
    epoch = all_batches(first.train_dataloader(), epoch=1)
    assert len(epoch) == 11
    progress = SimpleNamespace(current=SimpleNamespace(processed=3))
    first.trainer = SimpleNamespace(
        current_epoch=1, fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress))
    )
    state = first.state_dict()
    assert state == {"epoch": 1, "samples_seen": 24, "batches": 3}
    resumed = ImageCaptionDataModule(**kwargs)
    resumed.load_state_dict(state)
    rest = all_batches(resumed.train_dataloader(), epoch=1)
    assert [b["keys"] for b in rest] == [b["keys"] for b in epoch[3:]]
    assert all(torch.equal(a["images"], b["images"]) for a, b in zip(rest, epoch[3:]))
    other_epoch = all_batches(resumed.train_dataloader(), epoch=2)
    assert [b["keys"] for b in other_epoch] != [b["keys"] for b in epoch]


class ValKeyRecorder(KeyRecorder):
    def validation_step(self, batch, batch_idx):
        self.seen.append((-1, batch["keys"], set(batch)))


def fit_recording(root: Path, tmp_path: Path, **kwargs) -> tuple[ValKeyRecorder, list[str]]:
    """Fit one epoch with validation on a folder; the model (training and validation keys) and the warnings."""
    model = ValKeyRecorder()
    trainer = quiet_trainer(tmp_path / "run", max_epochs=1, num_sanity_val_steps=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, folder_module(root, drop_last=False, **kwargs))
    return model, [str(w.message) for w in caught]


def test_an_unreadable_image_alone_in_the_validation_split_skips_validation_instead_of_ending_the_run(tmp_path):
    names = [f"img{i}.png" for i in range(8)]
    write_metadata(tmp_path / "data", names)
    probe = folder_module(tmp_path / "data", val_fraction=0.1)
    probe.setup()
    (val_key,) = probe.datasets["val"].keys  # the one image the seeded carve holds out
    (tmp_path / "data" / val_key).write_text("not an image")
    model, messages = fit_recording(tmp_path / "data", tmp_path, val_fraction=0.1)
    assert sorted(k for e, keys, _ in model.seen if e == 0 for k in keys) == sorted(set(names) - {val_key})
    assert not [keys for e, keys, _ in model.seen if e == -1]  # no validation batch
    (left,) = [m for m in messages if "unreadable" in m]
    assert "left 1 unreadable image(s) out of the 'val' split (none left" in left
    assert left.count(repr(val_key)) == 1


def test_validation_leaves_out_its_unreadable_images_once_and_serves_every_other_image_once(tmp_path):
    write_metadata(tmp_path / "train", ["a.png", "b.png"])
    write_metadata(tmp_path / "validation", ["v0.png", "v1.png", "v2.png"])
    (tmp_path / "validation" / "v1.png").write_text("not an image")
    model, messages = fit_recording(tmp_path, tmp_path, eval_batch_size=1)
    assert [keys for e, keys, _ in model.seen if e == -1] == [["validation/v0.png"], ["validation/v2.png"]]
    assert [m for m in messages if "unreadable" in m] == [
        "left 1 unreadable image(s) out of the 'val' split (2 left): ['validation/v1.png']. "
        "Fix or remove them, or set skip_bad_images=false to stop at the first one."
    ]
    strict = folder_module(tmp_path, skip_bad_images=False, eval_batch_size=1)
    with pytest.raises(ValueError, match=r"v1\.png.*skip_bad_images=true"):
        list(strict.val_dataloader())


def test_a_set_of_one_unreadable_image_names_it_once(tmp_path):
    (tmp_path / "only.png").write_text("not an image")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "only.png", "text": "x"}))
    with pytest.raises(
        RuntimeError, match=r"none of the 1 images of the dataset could be read, e\.g\. \['only\.png'\]\."
    ):
        all_batches(folder_module(tmp_path, val_fraction=0, batch_size=1).train_dataloader())


@pytest.mark.parametrize("layout", ["metadata.jsonl", "captions.json"])
def test_listed_images_that_do_not_exist_are_skipped_and_counted_when_skipping(tmp_path, layout):
    names = ["a.png", "gone.png", "b.png", "c.png", "lost.png"]
    folder = tmp_path / "train" if layout == "captions.json" else tmp_path
    for i, name in enumerate(["a.png", "b.png", "c.png"]):
        write_png((folder / "images" if layout == "captions.json" else folder) / name, seed=i)
    if layout == "captions.json":
        (folder / "captions.json").write_text(json.dumps({name: f"caption of {name}" for name in names}))
    else:
        (folder / "metadata.jsonl").write_text("\n".join(json.dumps({"file_name": n, "text": n}) for n in names))
    dm = folder_module(tmp_path, val_fraction=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm.setup()
    (report,) = [str(w.message) for w in caught if "do not exist" in str(w.message)]
    assert f"skipped 2 of the 5 image(s) listed in {str(folder / layout)!r}" in report
    assert "gone.png'" in report and "lost.png'" in report  # relative to the caption file's folder
    assert sorted(Path(k).name for k in dm.datasets["train"].keys) == ["a.png", "b.png", "c.png"]
    with pytest.raises(FileNotFoundError, match=r"2 image\(s\) listed in .* do not exist: \[.*gone\.png'"):
        folder_module(tmp_path, val_fraction=0, skip_bad_images=False).setup()


def predict_batches(dm: ImageCaptionDataModule) -> list[dict]:
    return list(dm.predict_dataloader())


def test_predict_serves_each_prompt_in_order_with_its_position_in_the_whole_list():
    dm = ImageCaptionDataModule(predict_prompts=["a cat", "a dog"], predict_samples_per_prompt=3, eval_batch_size=4)
    batches = predict_batches(dm)
    assert [b["prompts"] for b in batches] == [["a cat", "a cat", "a cat", "a dog"], ["a dog", "a dog"]]
    assert [b["index"].tolist() for b in batches] == [[0, 1, 2, 3], [4, 5]]
    assert all(set(b) == {"prompts", "index"} and b["index"].dtype == torch.long for b in batches)
    assert not dm.datasets  # given prompts, nothing is read


def test_predict_prompts_file_leaves_out_comments_and_refuses_blank_lines_between_prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n# the first prompts\na red square\n  # indented comment\na blue circle  \n#\nthe end\n\n")
    batches = predict_batches(ImageCaptionDataModule(predict_prompts_file=str(path), eval_batch_size=2))
    assert [b["prompts"] for b in batches] == [["a red square", "a blue circle"], ["the end"]]
    assert torch.cat([b["index"] for b in batches]).tolist() == [0, 1, 2]
    missing = ImageCaptionDataModule(predict_prompts_file=str(tmp_path / "nowhere.txt"))
    with pytest.raises(FileNotFoundError, match=r"predict_prompts_file='.*nowhere\.txt' is not a file"):
        missing.predict_dataloader()
    path.write_text("\n# only comments\n\n")
    with pytest.raises(ValueError, match=r"predict_prompts_file='.*prompts\.txt' holds no prompt"):
        ImageCaptionDataModule(predict_prompts_file=str(path)).predict_dataloader()
    path.write_text("a red square\n\na blue circle\n")
    with pytest.raises(ValueError, match=r"predict_prompts_file='.*prompts\.txt': line 2 is blank between prompts"):
        ImageCaptionDataModule(predict_prompts_file=str(path)).predict_dataloader()


def test_predict_defaults_to_the_first_eight_distinct_validation_captions(tmp_path):
    dm = ImageCaptionDataModule(max_samples=200, seed=1, eval_batch_size=64, predict_samples_per_prompt=2)
    (batch,) = predict_batches(dm)
    val_captions = dm.datasets["val"].captions
    assert len(set(val_captions)) == 10  # one digit of each class
    expected = list(dict.fromkeys(val_captions))[:8]
    assert batch["prompts"] == [p for p in expected for _ in range(2)]
    assert batch["index"].tolist() == list(range(16))
    names = ["a.png", "b.png", "c.png", "d.png"]
    write_metadata(tmp_path / "train", names)
    write_metadata(tmp_path / "validation", names)
    captions = ["a fox", "a hen", "a fox", "an owl"]
    lines = [json.dumps({"file_name": n, "text": c}) for n, c in zip(names, captions)]
    (tmp_path / "validation" / "metadata.jsonl").write_text("\n".join(lines))
    (batch,) = predict_batches(folder_module(tmp_path))
    assert batch["prompts"] == ["a fox", "a hen", "an owl"]
    with pytest.raises(ValueError, match=r"validation split holds no caption.*val_fraction=0"):
        ImageCaptionDataModule(max_samples=20, val_fraction=0).predict_dataloader()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            dict(predict_prompts=["x"], predict_prompts_file="p.txt"),
            r"predict_prompts=\['x'\] and predict_prompts_file",
        ),
        (dict(predict_prompts=[]), r"predict_prompts=\[\] must be a non-empty list of strings"),
        (dict(predict_samples_per_prompt=0), "predict_samples_per_prompt=0 must be >= 1"),
        (dict(batch_size=0), "batch_size=0 must be >= 1"),
        (dict(resolution=0), "resolution=0 must be >= 1"),
        (dict(val_fraction=1.0), r"val_fraction=1\.0 must be in \[0, 1\)"),
        (dict(caption_template="{label}"), r"caption_template='\{label\}'"),
    ],
)
def test_bad_arguments_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ImageCaptionDataModule(**kwargs)


def test_there_is_no_test_split_to_serve():
    with pytest.raises(ValueError, match=r"ImageCaptionDataModule has no 'test' split; it has \['train', 'val'\]"):
        ImageCaptionDataModule(max_samples=20).test_dataloader()
