import gzip
import pickle
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from diffusion_lightning import CIFAR10DataModule, ImageCaptionDataModule, MNISTDataModule
from diffusion_lightning.data import EpochSeededSampler, LabelledImages
from diffusion_lightning.data.mnist import read_idx


def write_idx(path, array, compress=False):
    codes = {np.dtype(np.uint8): 0x08}
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    data = header + array.tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def make_idx_folder(root, n_train=40, n_test=20):
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n, compress in (("train", n_train, True), ("t10k", n_test, False)):
        write_idx(root / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), compress)
        write_idx(root / f"{prefix}-labels-idx1-ubyte", (np.arange(n) % 10).astype(np.uint8), compress)
    return root


def make_cifar_folder(root, n_per_batch=6, batches=2):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, batches + 1)] + ["test_batch"]:
        entry = {"data": rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8), "labels": list(range(n_per_batch))}
        (folder / name).write_bytes(pickle.dumps(entry))
    return root


def test_embedded_mnist_is_real_offline_and_split_with_a_seed():
    dm = MNISTDataModule(batch_size=32, seed=3)
    dm.setup("fit")
    sizes = {k: len(v) for k, v in dm.datasets.items()}
    assert sizes == {"train": 4000, "val": 500, "test": 500}
    assert (dm.num_classes, dm.image_size, dm.in_channels) == (10, 28, 1)
    batch = next(iter(dm.train_dataloader()))
    assert batch["images"].shape == (32, 1, 28, 28)
    assert batch["images"].min() >= -1 and batch["images"].max() <= 1
    assert batch["images"].min() == -1  # background of a real digit
    assert batch["labels"].dtype == torch.long
    # every class is present in every split, 500 per class overall
    labels = torch.cat([dm.datasets[k].labels for k in ("train", "val", "test")])
    assert torch.bincount(labels).tolist() == [500] * 10
    assert torch.bincount(dm.datasets["val"].labels).tolist() == [50] * 10  # class-balanced split
    again = MNISTDataModule(seed=3)
    again.setup()
    assert torch.equal(again.datasets["val"].labels, dm.datasets["val"].labels)
    other = MNISTDataModule(seed=4)
    other.setup()
    assert not torch.equal(other.datasets["val"].labels, dm.datasets["val"].labels)


def test_padding_to_32_keeps_the_digit_centered():
    dm = MNISTDataModule(pad_to=32)
    dm.setup()
    assert dm.image_size == 32
    image = dm.datasets["train"][0]["images"]
    assert image.shape == (1, 32, 32)
    assert (image[:, :2] == -1).all() and (image[:, -2:] == -1).all()
    torch.testing.assert_close(
        image[:, 2:30, 2:30], LabelledImages(dm.datasets["train"].images, dm.datasets["train"].labels)[0]["images"]
    )


def test_idx_source_reads_plain_and_gzipped_files(tmp_path):
    root = make_idx_folder(tmp_path / "mnist")
    arr = read_idx(root / "t10k-labels-idx1-ubyte")
    assert arr.tolist() == [i % 10 for i in range(20)]
    dm = MNISTDataModule(source="idx", root=str(root), val_fraction=0.25)
    dm.setup()
    assert {k: len(v) for k, v in dm.datasets.items()} == {"train": 30, "val": 10, "test": 20}


def idx_digits(n: int, offset: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` 28x28 images whose every pixel says which image, row and column it is, and their labels."""
    k, row, column = np.meshgrid(np.arange(n), np.arange(28), np.arange(28), indexing="ij")
    images = ((offset + k) * 37 + row * 7 + column * 3) % 256  # row and column steps differ: a transpose shows
    return images.astype(np.uint8), ((offset + np.arange(n)) * 3 % 10).astype(np.uint8)


def test_idx_pixels_and_labels_are_decoded_exactly(tmp_path):
    root = tmp_path / "mnist"
    root.mkdir()
    expected = {"train": idx_digits(12, 0), "test": idx_digits(5, 100)}
    for prefix, split, compress in (("train", "train", True), ("t10k", "test", False)):
        images, labels = expected[split]
        write_idx(root / f"{prefix}-images-idx3-ubyte", images, compress)
        write_idx(root / f"{prefix}-labels-idx1-ubyte", labels, compress)
    assert read_idx(root / "train-images-idx3-ubyte.gz")[3, 5, 9] == (3 * 37 + 5 * 7 + 9 * 3) % 256
    dm = MNISTDataModule(source="idx", root=str(root), val_fraction=0.25)
    loaded = dm.load()
    for split, (images, labels) in expected.items():
        assert loaded[split][0].dtype == torch.uint8 and loaded[split][0].shape == (len(labels), 1, 28, 28)
        assert torch.equal(loaded[split][0][:, 0], torch.from_numpy(images)), split
        assert loaded[split][1].tolist() == labels.tolist(), split
    dm.setup()
    test = dm.datasets["test"]
    for i in range(5):  # what the model sees: pixels in [-1, 1], each with its own label
        item = test[i]
        torch.testing.assert_close(item["images"][0], torch.from_numpy(expected["test"][0][i]).float() / 127.5 - 1)
        assert int(item["labels"]) == int(expected["test"][1][i])
    seen = []
    for split in ("train", "val"):  # the split moves images and labels together
        for images, label in zip(dm.datasets[split].images, dm.datasets[split].labels):
            k = int(np.where((expected["train"][0] == images[0].numpy()).all(axis=(1, 2)))[0][0])
            assert int(label) == int(expected["train"][1][k])
            seen.append(k)
    assert sorted(seen) == list(range(12))


def test_idx_reads_wider_big_endian_types_exactly(tmp_path):
    values = np.array([[0, 1, -2], [70000, -70000, 2**31 - 1]], dtype=">i4")
    path = tmp_path / "wide-idx2-int"
    path.write_bytes(bytes([0, 0, 0x0C, 2]) + (2).to_bytes(4, "big") + (3).to_bytes(4, "big") + values.tobytes())
    assert read_idx(path).tolist() == values.tolist()
    floats = np.array([0.5, -1.25, 3e7], dtype=">f4")
    path = tmp_path / "floats-idx1"
    path.write_bytes(bytes([0, 0, 0x0D, 1]) + (3).to_bytes(4, "big") + floats.tobytes())
    assert read_idx(path).tolist() == [0.5, -1.25, 3e7]


def cifar_row(k: int) -> tuple[list[int], np.ndarray]:
    """Image ``k`` as a CIFAR-10 file row (1024 red, 1024 green, 1024 blue values, rows first) and as (3, 32, 32)."""
    image = np.zeros((3, 32, 32), dtype=np.uint8)
    row = [0] * 3072
    for channel in range(3):
        for y in range(32):
            for x in range(32):
                value = (k * 41 + channel * 85 + y * 5 + x * 2) % 256
                image[channel, y, x] = value
                row[channel * 1024 + y * 32 + x] = value
    return row, image


def test_cifar10_pixels_and_labels_are_decoded_exactly(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    files = {"data_batch_1": [0, 1, 2], "data_batch_2": [3, 4], "test_batch": [5, 6]}
    expected = {}
    for name, ks in files.items():
        rows, images = zip(*(cifar_row(k) for k in ks))
        expected[name] = np.stack(images), [(k * 7) % 10 for k in ks]
        entry = {"batch_label": name, "data": np.array(rows, dtype=np.uint8), "labels": expected[name][1]}
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
    dm = CIFAR10DataModule(root=str(tmp_path), val_fraction=0.2)
    loaded = dm.load()
    train_images = np.concatenate([expected["data_batch_1"][0], expected["data_batch_2"][0]])
    assert torch.equal(loaded["train"][0], torch.from_numpy(train_images))
    assert loaded["train"][1].tolist() == expected["data_batch_1"][1] + expected["data_batch_2"][1]
    assert torch.equal(loaded["test"][0], torch.from_numpy(expected["test_batch"][0]))
    assert loaded["test"][1].tolist() == expected["test_batch"][1]
    assert int(loaded["test"][0][0, 1, 0, 0]) == cifar_row(5)[0][1024]  # green plane starts at entry 1024
    assert int(loaded["test"][0][0, 0, 1, 0]) == cifar_row(5)[0][32]  # second row starts at entry 32
    dm.setup()
    item = dm.datasets["test"][1]
    torch.testing.assert_close(item["images"], torch.from_numpy(expected["test_batch"][0][1]).float() / 127.5 - 1)
    assert int(item["labels"]) == expected["test_batch"][1][1]


def test_truncated_idx_file_is_reported(tmp_path):
    path = write_idx(tmp_path / "x-idx3-ubyte", np.zeros((4, 28, 28), dtype=np.uint8))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(path)


def test_missing_idx_folder_names_the_path_and_the_remedy(tmp_path):
    dm = MNISTDataModule(source="idx", root=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"nowhere.*source='embedded'"):
        dm.setup()


def test_torchvision_source_without_network_says_how_to_get_the_files(tmp_path, monkeypatch):
    import torchvision.datasets

    class Offline:
        def __init__(self, root, train, download):
            if download:
                raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")
            raise RuntimeError("Dataset not found. You can use download=True to download it")

    monkeypatch.setattr(torchvision.datasets, "MNIST", Offline)
    for download in (False, True):
        dm = MNISTDataModule(source="torchvision", root=str(tmp_path / "mnist"), download=download)
        with pytest.raises(FileNotFoundError, match=r"mnist.*(embedded)"):
            dm.setup()


def test_cifar10_reads_the_python_batches(tmp_path):
    root = make_cifar_folder(tmp_path)
    dm = CIFAR10DataModule(root=str(root), batch_size=4, val_fraction=0.25)
    dm.setup()
    assert {k: len(v) for k, v in dm.datasets.items()} == {"train": 9, "val": 3, "test": 6}
    assert (dm.num_classes, dm.image_size, dm.in_channels) == (10, 32, 3)
    assert dm.class_names[0] == "airplane"
    batch = next(iter(dm.train_dataloader()))
    assert batch["images"].shape == (4, 3, 32, 32)


def test_cifar10_missing_folder_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"cifar-10-batches-py.*download=true"):
        CIFAR10DataModule(root=str(tmp_path)).setup()


def test_epoch_seeded_sampler_is_deterministic_and_skips_once():
    sampler = EpochSeededSampler(10, seed=1)
    first = list(sampler)
    assert sorted(first) == list(range(10))
    assert list(sampler) == first
    sampler.set_epoch(1)
    second = list(sampler)
    assert second != first
    sampler.skip_in_epoch(1, 4)
    assert list(sampler) == second[4:]
    assert list(sampler) == second  # only once
    assert len(sampler) == 10


def test_predict_dataloader_yields_labels_per_class():
    dm = MNISTDataModule(predict_samples_per_class=2, eval_batch_size=8)
    labels = torch.cat([b["labels"] for b in dm.predict_dataloader()])
    assert labels.tolist() == [c for c in range(10) for _ in range(2)]


def test_predict_batches_carry_each_label_and_its_position_in_the_whole_set():
    batches = list(MNISTDataModule(predict_samples_per_class=3, eval_batch_size=4).predict_dataloader())
    assert [len(b["labels"]) for b in batches] == [4] * 7 + [2]
    assert all(set(b) == {"labels", "index"} and b["index"].dtype == torch.long for b in batches)
    assert torch.cat([b["index"] for b in batches]).tolist() == list(range(30))


def attach(data, epoch: int, processed: int, replicas: int = 1, rank: int = 0):
    """Give ``data`` a stand-in trainer at ``processed`` batches of ``epoch``, as process ``rank`` of ``replicas``."""
    progress = SimpleNamespace(current=SimpleNamespace(processed=processed))
    data.trainer = SimpleNamespace(
        current_epoch=epoch,
        fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress)),
        distributed_sampler_kwargs={"num_replicas": replicas, "rank": rank} if replicas > 1 else None,
    )
    return data


def sampled(data, epoch: int) -> list[int]:
    """The dataset indices the training loader of ``data`` draws in ``epoch``."""
    sampler = data.train_dataloader().sampler
    sampler.set_epoch(epoch)
    items = list(sampler)
    if items and isinstance(items[0], tuple):  # captions tag each index with its epoch (for the random crops)
        assert {e for _, e in items} == {epoch}
        items = [index for index, _ in items]
    return items


@pytest.mark.parametrize(
    "make",
    [
        lambda: MNISTDataModule(batch_size=8, seed=2),
        lambda: ImageCaptionDataModule(max_samples=100, batch_size=8, seed=2),
    ],
    ids=["mnist", "captions"],
)
def test_every_data_module_resumes_to_the_batch_and_shards_the_rest_over_processes(make):
    order = sampled(attach(make(), 1, 0), epoch=1)
    assert sorted(order) == list(range(len(order))) and order != sorted(order)
    assert sampled(attach(make(), 1, 0), epoch=1) == order  # the order depends only on (seed, epoch)
    state = attach(make(), 1, 3).state_dict()
    assert state == {"epoch": 1, "samples_seen": 24, "batches": 3}
    alone = make()
    alone.load_state_dict(state)
    assert sampled(alone, epoch=1) == order[24:]
    halves = []
    for rank in range(2):
        data = attach(make(), 1, 0, replicas=2, rank=rank)
        data.load_state_dict(state)
        halves.append(sampled(data, epoch=1))
    assert halves[0] == order[24::2] and halves[1][: len(order[25::2])] == order[25::2]
    assert set(halves[0]) | set(halves[1]) == set(order[24:])


def test_labelled_evaluation_loaders_serve_their_split_in_order():
    dm = MNISTDataModule(eval_batch_size=64)
    for split, loader in (("val", dm.val_dataloader()), ("test", dm.test_dataloader())):
        labels = torch.cat([batch["labels"] for batch in loader])
        assert torch.equal(labels, dm.datasets[split].labels)
        assert loader.batch_size == 64


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(source="s3"), "source='s3'"),
        (dict(batch_size=0), "batch_size=0"),
        (dict(val_fraction=1.0), "val_fraction=1.0"),
        (dict(test_fraction=-0.1), "test_fraction=-0.1"),
        (dict(num_workers=-1), "num_workers=-1"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MNISTDataModule(**kwargs)
