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
